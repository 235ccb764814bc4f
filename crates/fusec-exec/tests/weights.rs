//! Loading checkpoints: single files, shards, and every kind of bad file, each of
//! which must give an error that names the tensor and the file.

mod common;

use std::path::Path;

use common::{encode, graph_weights, write_raw, write_safetensors, Cfg};
use fusec_exec::{Executor, WeightTensor, Weights};
use fusec_ir::{DType, Graph};
use fusec_model::arch::llama;
use fusec_weights::Error;
use safetensors::Dtype;

const NORM: &str = "model.norm.weight";
const EMBED: &str = "model.embed_tokens.weight";

fn model() -> (Graph, Vec<(String, WeightTensor)>) {
    let graph = llama::build(&Cfg::tiny().model("tiny")).expect("graph builds");
    let weights = Weights::random(&graph, 1).expect("random weights");
    let tensors = graph_weights(&graph, &weights);
    (graph, tensors)
}

/// The raw form of `tensors` as F32, with `edit` applied to the list.
fn raw(tensors: &[(String, WeightTensor)]) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                Dtype::F32,
                t.shape().to_vec(),
                encode(&t.to_vec_f32(), Dtype::F32),
            )
        })
        .collect()
}

/// Loads `path` and returns the error, checking that it is the user's and that its
/// message names `tensor` and the file.
fn load_error(path: &Path, graph: &Graph, tensor: &str) -> Error {
    let err = Weights::load(path, graph).expect_err("the file is bad");
    let msg = err.to_string();
    assert!(err.is_input_error(), "{msg}");
    assert!(msg.contains(tensor), "`{msg}` does not name {tensor}");
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .expect("file name");
    assert!(msg.contains(file), "`{msg}` does not name {file}");
    err
}

#[test]
fn a_missing_tensor_is_named() {
    let (graph, tensors) = model();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("missing.safetensors");
    let kept: Vec<_> = tensors.into_iter().filter(|(n, _)| n != NORM).collect();
    write_safetensors(&path, &kept, Dtype::F32);
    let err = load_error(&path, &graph, NORM);
    assert!(matches!(err, Error::MissingWeight { .. }), "{err}");
}

#[test]
fn a_wrong_shape_is_named() {
    let (graph, tensors) = model();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("shape.safetensors");
    let mut r = raw(&tensors);
    let e = r.iter_mut().find(|(n, ..)| n == EMBED).expect("embedding");
    let (v, d) = (e.2[0], e.2[1]);
    e.2 = vec![d, v];
    write_raw(&path, &r);
    let err = load_error(&path, &graph, EMBED);
    assert!(matches!(err, Error::WrongShape { .. }), "{err}");
}

#[test]
fn a_wrong_dtype_is_named() {
    let (graph, tensors) = model();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dtype.safetensors");
    let mut r = raw(&tensors);
    let e = r.iter_mut().find(|(n, ..)| n == NORM).expect("norm");
    e.1 = Dtype::I32;
    write_raw(&path, &r);
    let err = load_error(&path, &graph, NORM);
    assert!(matches!(err, Error::WrongDtype { .. }), "{err}");
}

#[test]
fn truncated_and_garbage_files_are_named() {
    let (graph, tensors) = model();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("truncated.safetensors");
    write_safetensors(&path, &tensors, Dtype::F32);
    let bytes = std::fs::read(&path).expect("reads");
    std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("writes");
    let first = graph.weights()[0].1.to_string();
    let err = load_error(&path, &graph, &first);
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");

    let path = dir.path().join("garbage.safetensors");
    std::fs::write(&path, b"not a safetensors file at all").expect("writes");
    assert!(matches!(
        load_error(&path, &graph, &first),
        Error::Corrupt { .. }
    ));
    let path = dir.path().join("empty.safetensors");
    std::fs::write(&path, b"").expect("writes");
    assert!(matches!(
        load_error(&path, &graph, &first),
        Error::Corrupt { .. }
    ));
}

#[test]
fn non_finite_values_are_named() {
    let (graph, tensors) = model();
    let dir = tempfile::tempdir().expect("temp dir");
    for (dtype, value, file) in [
        (Dtype::F32, f32::NAN, "nan.safetensors"),
        (Dtype::F16, f32::INFINITY, "inf.safetensors"),
        (Dtype::BF16, f32::NEG_INFINITY, "neginf.safetensors"),
    ] {
        let path = dir.path().join(file);
        let mut r: Vec<_> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), dtype, t.shape().to_vec(), t.to_vec_f32()))
            .collect();
        let e = r.iter_mut().find(|(n, ..)| n == NORM).expect("norm");
        e.3[5] = value;
        let r: Vec<_> = r
            .into_iter()
            .map(|(n, d, s, v)| (n, d, s, encode(&v, d)))
            .collect();
        write_raw(&path, &r);
        let err = load_error(&path, &graph, NORM);
        assert!(matches!(err, Error::NonFinite { index: 5, .. }), "{err}");
    }
}

#[test]
fn values_that_overflow_the_graph_dtype_are_rejected() {
    let mut cfg = Cfg::tiny();
    cfg.dtype = DType::F16;
    let graph = llama::build(&cfg.model("tiny-f16")).expect("graph builds");
    let weights = Weights::random(&graph, 1).expect("random weights");
    let mut r = raw(&graph_weights(&graph, &weights));
    let e = r.iter_mut().find(|(n, ..)| n == NORM).expect("norm");
    e.3[..4].copy_from_slice(&1e6f32.to_le_bytes());
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("overflow.safetensors");
    write_raw(&path, &r);
    assert!(matches!(
        load_error(&path, &graph, NORM),
        Error::NonFinite { index: 0, .. }
    ));
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let (graph, tensors) = model();
    let dir = tempfile::tempdir().expect("temp dir");
    let (first, second) = tensors.split_at(tensors.len() / 2);
    write_safetensors(
        &dir.path().join("model-00001-of-00002.safetensors"),
        first,
        Dtype::F32,
    );
    write_safetensors(
        &dir.path().join("model-00002-of-00002.safetensors"),
        second,
        Dtype::BF16,
    );
    let mut map = serde_json::Map::new();
    for (part, file) in [
        (first, "model-00001-of-00002.safetensors"),
        (second, "model-00002-of-00002.safetensors"),
    ] {
        for (name, _) in part {
            map.insert(name.clone(), serde_json::Value::String(file.into()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    let index_path = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index_path, index.to_string()).expect("writes");

    let loaded = Weights::load(dir.path(), &graph).expect("the directory loads");
    assert_eq!(loaded.len(), tensors.len());
    for (name, t) in first {
        assert_eq!(
            loaded.get(name).expect("loaded").to_vec_f32(),
            t.to_vec_f32()
        );
    }
    for (name, t) in second {
        let want: Vec<f32> = t
            .to_vec_f32()
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(loaded.get(name).expect("loaded").to_vec_f32(), want);
    }
    assert!(Executor::new(graph.clone(), &loaded).is_ok());

    // A tensor the index does not list, and a shard that is not there.
    let mut short = map.clone();
    short.remove(NORM);
    std::fs::write(
        &index_path,
        serde_json::json!({ "weight_map": short }).to_string(),
    )
    .expect("writes");
    assert!(matches!(
        load_error(&index_path, &graph, NORM),
        Error::MissingWeight { .. }
    ));
    let mut gone = map;
    gone.insert(
        NORM.into(),
        serde_json::Value::String("model-00003.safetensors".into()),
    );
    std::fs::write(
        &index_path,
        serde_json::json!({ "weight_map": gone }).to_string(),
    )
    .expect("writes");
    let err = Weights::load(&index_path, &graph).expect_err("a shard is missing");
    assert!(err.to_string().contains("model-00003.safetensors"), "{err}");
    std::fs::write(&index_path, "{\"weight_map\": 3}").expect("writes");
    assert!(matches!(
        Weights::load(&index_path, &graph),
        Err(Error::BadIndex { .. })
    ));
}

#[test]
fn paths_without_weights_are_errors() {
    let (graph, _) = model();
    let dir = tempfile::tempdir().expect("temp dir");
    assert!(matches!(
        Weights::load(dir.path(), &graph),
        Err(Error::NoWeights { .. })
    ));
    let err = Weights::load(&dir.path().join("nope.safetensors"), &graph).expect_err("no file");
    assert!(
        err.is_input_error() && err.to_string().contains("nope.safetensors"),
        "{err}"
    );
}

#[test]
fn in_memory_weights_are_checked_when_the_executor_binds_them() {
    let (graph, tensors) = model();
    let short = Weights::from_tensors(tensors.iter().filter(|(n, _)| n != NORM).cloned());
    let err = Executor::new(graph.clone(), &short).expect_err("a weight is missing");
    assert!(
        matches!(err, fusec_exec::Error::Weights(Error::MissingWeight { ref tensor, .. }) if tensor == NORM),
        "{err}"
    );
    let wrong = Weights::from_tensors(tensors.iter().map(|(n, t)| {
        if n == NORM {
            (
                n.clone(),
                WeightTensor::from_f32(DType::F32, &[3], vec![0.0; 3]).expect("valid"),
            )
        } else {
            (n.clone(), t.clone())
        }
    }));
    assert!(matches!(
        Executor::new(graph, &wrong),
        Err(fusec_exec::Error::Weights(Error::WrongShape { .. }))
    ));
}

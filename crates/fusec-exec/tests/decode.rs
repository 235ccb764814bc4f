//! End-to-end decoding: parity with Hugging Face on the bundled fixture, generality
//! over random Llama configurations, and measured counts against the cost model.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{fuse, graph_weights, rel_l2, write_safetensors, Cfg};
use fusec_exec::ndarray::Array2;
use fusec_exec::{Executor, RunOutput, Session, SplitMix64, StepOutput, Tensor, Weights};
use fusec_ir::cost::graph_cost;
use fusec_ir::{DType, Graph, InputKind};
use fusec_model::arch::llama;
use fusec_model::{load_model, ModelConfig};
use safetensors::Dtype;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf-tiny-llama-s0")
}

fn rel_l2_f64(actual: &[f32], expected: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (&a, &e) in actual.iter().zip(expected) {
        num += (f64::from(a) - e).powi(2);
        den += e * e;
    }
    (num / den).sqrt()
}

#[test]
fn matches_hugging_face_on_the_fixture() {
    let spec = load_model(&fixture()).expect("fixture config loads");
    let graph = llama::build(&spec.model).expect("graph builds");
    let weights_path = spec
        .weights
        .clone()
        .expect("a model directory names its weights");
    let weights = Weights::load(&weights_path, &graph).expect("fixture weights load");
    let mut session =
        Session::new(Executor::new(graph, &weights).expect("plans"), 1).expect("session");

    let text = std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json");
    let expected: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let ids = |v: &serde_json::Value| -> Vec<i32> {
        v.as_array()
            .expect("an id list")
            .iter()
            .map(|x| x.as_i64().expect("an id") as i32)
            .collect()
    };
    let prompt = ids(&expected["prompt"]);
    let want = ids(&expected["generated"]);
    let gen = session
        .generate(std::slice::from_ref(&prompt), want.len())
        .expect("decodes");
    assert_eq!(gen.generated[0], want);
    let rows = expected["logits"].as_array().expect("logits rows");
    assert_eq!(gen.logits.dim().1, rows.len());
    for (step, (row, exp)) in gen.rows(0).zip(rows).enumerate() {
        let exp: Vec<f64> = exp
            .as_array()
            .expect("a row")
            .iter()
            .map(|x| x.as_f64().expect("a number"))
            .collect();
        let err = rel_l2_f64(row, &exp);
        assert!(err <= 1e-4, "step {step}: relative L2 error {err}");
    }
    assert_eq!(gen.steps as usize, prompt.len() + want.len() - 1);
}

fn session(graph: Graph, weights: &Weights, batch: usize) -> Session {
    Session::new(Executor::new(graph, weights).expect("plans"), batch).expect("session")
}

fn random_prompt(rng: &mut SplitMix64, len: usize, vocab: u64) -> Vec<i32> {
    (0..len).map(|_| rng.below(vocab) as i32).collect()
}

/// MQA (one KV head), a head_dim unrelated to hidden/heads, tied embeddings.
fn odd_config() -> Cfg {
    Cfg {
        hidden: 48,
        layers: 2,
        heads: 4,
        kv_heads: 1,
        head_dim: 20,
        inter: 64,
        vocab: 97,
        tied: true,
        dtype: DType::F32,
    }
}

#[test]
fn safetensors_files_in_f32_f16_and_bf16_load_and_agree() {
    let cfg = odd_config().model("odd");
    let graph = llama::build(&cfg).expect("graph builds");
    assert!(graph.weights().iter().all(|(_, n)| *n != "lm_head.weight"));
    let weights = Weights::random(&graph, 3).expect("random weights");
    let prompt = vec![3, 14, 15, 92, 65];
    let reference = session(graph.clone(), &weights, 1)
        .generate(std::slice::from_ref(&prompt), 4)
        .expect("decodes");
    let dir = tempfile::tempdir().expect("temp dir");
    for (dtype, tol) in [(Dtype::F32, 0.0), (Dtype::F16, 5e-3), (Dtype::BF16, 4e-2)] {
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        write_safetensors(&path, &graph_weights(&graph, &weights), dtype);
        let loaded = Weights::load(&path, &graph).expect("loads");
        let gen = session(graph.clone(), &loaded, 1)
            .generate(std::slice::from_ref(&prompt), 4)
            .expect("decodes");
        let err = rel_l2(gen.row(0, 0), reference.row(0, 0));
        assert!(err <= tol, "{dtype:?}: relative L2 error {err} over {tol}");
        if dtype == Dtype::F32 {
            assert_eq!(gen.logits, reference.logits);
            assert_eq!(gen.generated, reference.generated);
        }
    }
}

#[test]
fn a_hugging_face_4x_directory_loads_with_its_weights() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/in/hf-v4-mqa/config.json");
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(&src, dir.path().join("config.json")).expect("copies config");
    let spec = load_model(dir.path()).expect("4.x config loads");
    let graph = llama::build(&spec.model).expect("graph builds");
    let weights = Weights::random(&graph, 11).expect("random weights");
    write_safetensors(
        &dir.path().join("model.safetensors"),
        &graph_weights(&graph, &weights),
        Dtype::BF16,
    );
    let spec = load_model(dir.path()).expect("reloads");
    let path = spec
        .weights
        .expect("the directory's weights are the default");
    let loaded = Weights::load(&path, &graph).expect("loads");
    let gen = session(graph, &loaded, 1)
        .generate(&[vec![1, 2, 3]], 3)
        .expect("decodes");
    assert_eq!(gen.generated[0].len(), 3);
    assert!(gen.sequence(0).iter().all(|v| v.is_finite()));
}

#[test]
fn a_bf16_graph_tracks_its_f32_twin() {
    let mut cfg = odd_config();
    cfg.dtype = DType::Bf16;
    let graph = llama::build(&cfg.model("bf16")).expect("graph builds");
    let weights = Weights::random(&graph, 5).expect("random weights");
    cfg.dtype = DType::F32;
    let graph32 = llama::build(&cfg.model("f32")).expect("graph builds");
    // The same (bf16-representable) values, held by an f32 graph.
    let weights32 =
        Weights::from_tensors(graph_weights(&graph, &weights).into_iter().map(|(n, t)| {
            let v = t.to_vec_f32();
            (
                n,
                fusec_exec::WeightTensor::from_f32(DType::F32, t.shape(), v).expect("same size"),
            )
        }));
    let prompt = vec![7, 8, 9, 10];
    let lo = session(graph, &weights, 1)
        .generate(std::slice::from_ref(&prompt), 2)
        .expect("decodes");
    let hi = session(graph32, &weights32, 1)
        .generate(&[prompt], 2)
        .expect("decodes");
    let err = rel_l2(lo.row(0, 0), hi.row(0, 0));
    assert!(err < 5e-2, "bf16 vs f32: relative L2 error {err}");
    assert!(err > 0.0, "the bf16 graph should round its activations");
}

#[test]
fn batch_of_two_equals_two_batches_of_one() {
    let cfg = Cfg::tiny().model("tiny");
    let graph = llama::build(&cfg).expect("graph builds");
    let weights = Weights::random(&graph, 9).expect("random weights");
    let mut rng = SplitMix64::new(2);
    let prompts = [
        random_prompt(&mut rng, 6, cfg.vocab_size),
        random_prompt(&mut rng, 6, cfg.vocab_size),
    ];
    let both = session(graph.clone(), &weights, 2)
        .generate(&prompts, 5)
        .expect("decodes");
    for (s, prompt) in prompts.iter().enumerate() {
        let one = session(graph.clone(), &weights, 1)
            .generate(std::slice::from_ref(prompt), 5)
            .expect("decodes");
        assert_eq!(one.generated[0], both.generated[s]);
        for (a, b) in one.rows(0).zip(both.rows(s)) {
            let max = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(max <= 1e-6, "sequence {s}: logits differ by {max}");
        }
    }
}

#[test]
fn resuming_from_a_longer_prompt_continues_the_same_text() {
    let cfg = Cfg::tiny().model("tiny");
    let graph = llama::build(&cfg).expect("graph builds");
    let weights = Weights::random(&graph, 4).expect("random weights");
    let prompt = vec![5, 6, 7];
    let full = session(graph.clone(), &weights, 1)
        .generate(std::slice::from_ref(&prompt), 8)
        .expect("decodes");
    let mut longer = prompt;
    longer.extend(&full.generated[0][..3]);
    let rest = session(graph, &weights, 1)
        .generate(&[longer], 5)
        .expect("decodes");
    assert_eq!(rest.generated[0], full.generated[0][3..]);
    for (a, b) in rest.rows(0).zip(full.rows(0).skip(3)) {
        assert!(rel_l2(a, b) < 1e-5);
    }
}

#[test]
fn a_rewound_session_decodes_the_same_continuation_again() {
    let cfg = Cfg::tiny().model("tiny");
    for fused in [false, true] {
        let eager = llama::build(&cfg).expect("graph builds");
        let graph = if fused { fuse(&eager) } else { eager };
        let weights = Weights::random(&graph, 9).expect("random weights");
        let mut s = session(graph, &weights, 1);
        let first = s.generate(&[vec![3, 1, 4, 1, 5]], 6).expect("decodes");
        assert_eq!(s.past_len(), 10);
        // Back to before the last prompt token, whose step gave the first new token.
        s.rewind(4).expect("rewinds");
        assert_eq!(s.past_len(), 4);
        // The last prompt token again, then the same greedy continuation, bit for bit.
        let mut token = 5;
        for (i, &want) in first.generated[0].iter().enumerate() {
            let out = s.step(&[token]).expect("steps");
            let logits = first.row(0, i);
            assert_eq!(out.logits.row(0).len(), logits.len());
            assert!(out
                .logits
                .row(0)
                .iter()
                .zip(logits)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            assert_eq!(out.next[0], want, "fused {fused}, step {i}");
            token = want;
        }
        assert!(s.rewind(100).is_err(), "cannot rewind forward");
    }
}

#[test]
fn bad_run_inputs_are_errors_and_leave_the_session_usable() {
    let cfg = Cfg::tiny().model("tiny");
    let graph = llama::build(&cfg).expect("graph builds");
    let weights = Weights::random(&graph, 1).expect("random weights");
    let mut s = session(graph, &weights, 1);
    let err = s
        .step(&[cfg.vocab_size as i32])
        .expect_err("id out of range");
    assert!(err.is_input_error(), "{err}");
    assert!(err.to_string().contains("out of range"), "{err}");
    assert!(s.step(&[-1]).is_err());
    assert!(s.step(&[1, 2]).is_err());
    assert_eq!(s.past_len(), 0);
    assert!(s.step(&[1]).is_ok());
    assert!(s.generate(&[vec![]], 2).is_err());
    assert_eq!(s.past_len(), 1);
}

/// Inputs for one step at `past` cached positions, with random caches that have room
/// for the step's new entries (as a session's caches do).
fn step_inputs(
    graph: &Graph,
    batch: usize,
    past: usize,
    rng: &mut SplitMix64,
) -> HashMap<String, Tensor> {
    let b = fusec_exec::decode::bindings(batch, past);
    let mut inputs = HashMap::new();
    for (id, name, kind) in graph.inputs() {
        let ty = graph.ty(id).tensor().expect("tensor input");
        let shape = common::input_shape(graph, id, &b);
        let n = shape.iter().product();
        let t = match (kind, ty.dtype) {
            (_, DType::I32) => Tensor::from_i32(&shape, vec![past as i32; n]),
            (InputKind::State, dtype) => {
                Tensor::from_f32(dtype, &shape, (0..n).map(|_| rng.normal() as f32).collect())
                    .and_then(|t| t.with_capacity(2, past + 1))
            }
            (InputKind::Data, dtype) => Tensor::zeros(dtype, &shape),
        };
        inputs.insert(name.to_string(), t.expect("sizes match"));
    }
    inputs
}

fn assert_counts_match(cfg: &ModelConfig, batch: usize, pasts: &[usize]) {
    let eager = llama::build(cfg).expect("graph builds");
    let fused = fuse(&eager);
    assert_graph_counts_match(cfg, &eager, batch, pasts);
    assert_graph_counts_match(cfg, &fused, batch, pasts);
}

fn assert_graph_counts_match(cfg: &ModelConfig, graph: &Graph, batch: usize, pasts: &[usize]) {
    let graph = graph.clone();
    let weights = Weights::random(&graph, 0).expect("random weights");
    let mut exec = Executor::new(graph.clone(), &weights).expect("plans");
    let mut rng = SplitMix64::new(8);
    for &past in pasts {
        let b = fusec_exec::decode::bindings(batch, past);
        let out = exec
            .run(&b, step_inputs(&graph, batch, past, &mut rng))
            .expect("runs");
        let predicted = graph_cost(&graph, &b).expect("bound");
        let measured: HashMap<_, _> = out.stats.nodes.iter().map(|n| (n.node, n)).collect();
        for (id, cost) in &predicted.nodes {
            let m = measured.get(id).unwrap_or_else(|| {
                panic!(
                    "{}: node {} predicted but not launched",
                    cfg.name,
                    graph.op(*id)
                )
            });
            assert_eq!(
                (m.bytes_read, m.bytes_written),
                (cost.bytes_read, cost.bytes_written),
                "{} B={batch} S={past}: {}",
                cfg.name,
                graph.op(*id)
            );
        }
        assert_eq!(
            out.stats.launches, predicted.total.launches,
            "{} S={past}",
            cfg.name
        );
        assert_eq!(
            out.stats.bytes_read, predicted.total.bytes_read,
            "{} S={past}",
            cfg.name
        );
        assert_eq!(
            out.stats.bytes_written, predicted.total.bytes_written,
            "{} S={past}",
            cfg.name
        );
    }
}

#[test]
fn measured_counts_equal_the_cost_model() {
    let spec = load_model(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tiny.toml"))
        .expect("tiny example loads");
    assert_counts_match(&spec.model, 1, &[0, 5, 63]);
    let mut gqa = Cfg::tiny();
    gqa.heads = 8;
    gqa.kv_heads = 2;
    assert_counts_match(&gqa.model("gqa"), 2, &[0, 17, 40]);
    let mut odd = odd_config();
    odd.dtype = DType::Bf16;
    assert_counts_match(&odd.model("mqa-bf16-tied"), 3, &[1, 9]);
}

#[test]
fn a_session_step_counts_what_the_cost_model_predicts() {
    let spec = load_model(&fixture()).expect("fixture config loads");
    let eager = llama::build(&spec.model).expect("graph builds");
    let fused = fuse(&eager);
    for (graph, kind) in [(eager, "linear"), (fused, "fused.decode_attention")] {
        let weights = Weights::random(&graph, 0).expect("random weights");
        let mut s = session(graph.clone(), &weights, 1);
        for past in 0..4 {
            let out = s.step(&[1]).expect("steps");
            let b = fusec_exec::decode::bindings(1, past);
            let predicted = graph_cost(&graph, &b).expect("bound");
            assert_eq!(out.stats.launches, predicted.total.launches);
            assert_eq!(out.stats.bytes_read, predicted.total.bytes_read, "{kind}");
            assert_eq!(
                out.stats.bytes_written, predicted.total.bytes_written,
                "{kind}"
            );
        }
        assert_eq!(s.profile().steps(), 4);
        let table = s.profile().render();
        assert!(
            table.contains(kind) && table.contains("total/4 steps"),
            "{table}"
        );
    }
}

#[test]
fn a_reused_step_output_gives_what_fresh_steps_give() {
    let cfg = Cfg::tiny().model("tiny");
    let fused = fuse(&llama::build(&cfg).expect("graph builds"));
    let weights = Weights::random(&fused, 2).expect("random weights");
    let mut fresh = session(fused.clone(), &weights, 2);
    let mut reused = session(fused, &weights, 2);
    let mut out = StepOutput::default();
    for step in 0..6 {
        let tokens = [step, 2 * step + 1];
        let want = fresh.step(&tokens).expect("steps");
        // A failed step in between changes nothing.
        assert!(reused.step_into(&[-1, 0], &mut out).is_err());
        reused.step_into(&tokens, &mut out).expect("steps");
        let bits = |rows: &Array2<f32>| -> Vec<u32> { rows.iter().map(|v| v.to_bits()).collect() };
        assert_eq!(bits(&out.logits), bits(&want.logits), "step {step}");
        assert_eq!(out.next, want.next);
        assert_eq!(out.stats.launches, want.stats.launches);
        assert_eq!(out.stats.nodes.len(), want.stats.nodes.len());
        assert_eq!(
            out.stats.bytes(),
            want.stats.bytes(),
            "stats are the step's own, not accumulated"
        );
    }
    assert_eq!(reused.past_len(), fresh.past_len());
    assert_eq!(reused.profile().steps(), fresh.profile().steps());
}

#[test]
fn inputs_by_position_run_like_inputs_by_name() {
    let cfg = Cfg::tiny().model("tiny");
    let graph = fuse(&llama::build(&cfg).expect("graph builds"));
    let weights = Weights::random(&graph, 3).expect("random weights");
    let mut by_name = Executor::new(graph.clone(), &weights).expect("plans");
    let mut by_position = Executor::new(graph.clone(), &weights).expect("plans");
    let b = fusec_exec::decode::bindings(1, 4);
    let named = step_inputs(&graph, 1, 4, &mut SplitMix64::new(5));
    let mut positional: Vec<Option<Tensor>> = by_position
        .input_names()
        .iter()
        .map(|n| named.get(&**n).cloned())
        .collect();
    let want = by_name.run(&b, named).expect("runs");
    let mut out = RunOutput::new();
    by_position
        .run_into(&b, &mut positional, &mut out)
        .expect("runs");
    assert!(positional.iter().all(Option::is_none), "inputs are taken");
    assert_eq!(out.outputs.len(), want.outputs.len());
    for ((n, k, v), (wn, wk, wv)) in out.outputs.iter().zip(&want.outputs) {
        assert_eq!((n, k), (wn, wk));
        let (v, wv) = (v.tensor().expect("tensor"), wv.tensor().expect("tensor"));
        assert_eq!(v.to_vec_f32(), wv.to_vec_f32(), "{n}");
    }
    // A missing input is an error that hands every input back.
    let mut short = vec![None; by_position.input_names().len()];
    short[0] = Some(Tensor::zeros(DType::F32, &[1]).expect("valid"));
    assert!(by_position.run_into(&b, &mut short, &mut out).is_err());
    assert!(short[0].is_some() && out.outputs.is_empty());
    // So is an entry past the graph's inputs.
    short.push(Some(Tensor::scalar(0.0)));
    let err = by_position
        .run_into(&b, &mut short, &mut out)
        .expect_err("not an input");
    assert!(err.is_input_error(), "{err}");
}

//! Weights through a checkpoint and back: random weights saved as safetensors load
//! bit for bit, in their dtypes, and a checkpoint that lacks a weight is an error that
//! names the tensor and the file.

use fusec_ir::text::parse;
use fusec_ir::{DType, Graph};
use fusec_weights::{save_weights, Error, WeightSource, WeightTensor, Weights};

const MLP: &str = r#"graph "mlp" layers=1 {
  %0 = input{name="x"} : bf16[B,1,8]
  layer 0 {
    %1 = weight@up : bf16[16,8]
    %2 = weight@norm : bf16[8]
    %3 = binary.mul(%0, %2) : bf16[B,1,8]
    %4 = linear(%3, %1) : bf16[B,1,16]
  }
  output "y" = %4
}
"#;

fn graph() -> Graph {
    parse(MLP).expect("parses")
}

#[test]
fn random_weights_save_and_load_bit_for_bit() {
    let g = graph();
    let w = Weights::random(&g, 3).expect("random weights");
    assert_eq!(w.len(), 2);
    assert_eq!(w.parameter_count(), 16 * 8 + 8);
    let up = w.get("up").expect("present");
    assert_eq!((up.dtype(), up.shape()), (DType::Bf16, &[16, 8][..]));
    // The gains are ones; matrices are not, and are rounded to bf16.
    assert!(w
        .get("norm")
        .expect("present")
        .to_array()
        .iter()
        .all(|&v| v == 1.0));
    let view = up.view().expect("f32 storage");
    assert!(view.iter().any(|&v| v != 0.0));
    assert!(view.iter().all(|&v| half::bf16::from_f32(v).to_f32() == v));

    let dir = tempfile::tempdir().expect("temp dir");
    let path = save_weights(dir.path(), &g, &w, &Default::default()).expect("saves");
    let loaded = Weights::load(&path, &g).expect("loads");
    for name in ["up", "norm"] {
        let (a, b) = (
            w.get(name).expect("saved"),
            loaded.get(name).expect("loaded"),
        );
        assert_eq!(a.to_array(), b.to_array(), "{name}");
        assert_eq!(loaded.source(name), Some(&WeightSource::File(path.clone())));
    }
    assert_eq!(
        Weights::metadata(&path)
            .expect("header")
            .get("fusec.format"),
        Some(&"fusec-weights/1".to_string())
    );
}

#[test]
fn a_missing_weight_names_the_tensor_and_the_file() {
    let g = graph();
    let only_norm = Weights::from_tensors([(
        "norm".to_string(),
        WeightTensor::from_f32(DType::Bf16, &[8], vec![1.0; 8]).expect("fits"),
    )]);
    let dir = tempfile::tempdir().expect("temp dir");
    // Saving needs every weight of the graph.
    assert!(matches!(
        save_weights(dir.path(), &g, &only_norm, &Default::default()),
        Err(Error::MissingWeight { .. })
    ));
    let norm_only: Graph = parse(
        r#"graph "norm" layers=1 {
  %0 = input{name="x"} : bf16[B,1,8]
  layer 0 {
    %1 = weight@norm : bf16[8]
    %2 = binary.mul(%0, %1) : bf16[B,1,8]
  }
  output "y" = %2
}
"#,
    )
    .expect("parses");
    let path =
        save_weights(dir.path(), &norm_only, &only_norm, &Default::default()).expect("saves");
    let err = Weights::load(&path, &g).expect_err("`up` is missing");
    let msg = err.to_string();
    assert!(
        matches!(err, Error::MissingWeight { ref tensor, .. } if tensor == "up"),
        "{msg}"
    );
    assert!(
        err.is_input_error() && msg.contains("model.safetensors"),
        "{msg}"
    );
}

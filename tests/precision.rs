//! Precision lowering: FP8 weights and KV cache in the fused graph, bf16 and f16 as the
//! eager graph in that dtype, and the byte reductions the report shows.

mod common;

use fusec::pipeline;
use fusec::summary::VariantSummary;
use fusec_ir::{verify, DType, Op};
use fusec_model::frontend::Precision;
use fusec_rewrite::precision::{Fp8Options, Granularity, OpClass};

fn spec(name: &str) -> fusec_model::frontend::ModelSpec {
    pipeline::load(&common::root().join("examples").join(name), None, None).expect("example loads")
}

fn fused(
    spec: &fusec_model::frontend::ModelSpec,
    p: Precision,
    fp8: &Fp8Options,
) -> fusec_ir::Graph {
    let rules = pipeline::rules(&[]).expect("built-in rules");
    pipeline::fused_in(spec, p, &rules, fp8)
        .expect("compiles")
        .0
}

#[test]
fn weights_shrink_4x_from_f32_and_2x_from_bf16() {
    let s = spec("llama-125m.toml");
    let gpu = pipeline::target_gpu(&s).expect("gpu");
    let weight_bytes = |p| {
        let g = fused(&s, p, &Fp8Options::default());
        VariantSummary::new(&g, &s, gpu)
            .expect("bound")
            .cost
            .floor
            .weight_bytes as f64
    };
    let (f32b, bf16b, fp8b) = (
        weight_bytes(Precision::F32),
        weight_bytes(Precision::Bf16),
        weight_bytes(Precision::Fp8),
    );
    // Scales add a little: 4 bytes per output channel.
    assert!((f32b / fp8b - 4.0).abs() < 0.05, "{f32b} / {fp8b}");
    assert!((bf16b / fp8b - 2.0).abs() < 0.03, "{bf16b} / {fp8b}");
}

#[test]
fn every_scale_is_named_after_what_it_scales() {
    let s = spec("tiny.toml");
    let g = fused(&s, Precision::Fp8, &Fp8Options::default());
    verify(&g).expect("verifies");
    let text = fusec_ir::text::print(&g).expect("acyclic");
    for module in [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ] {
        let name = format!("model.layers.0.{module}.weight");
        assert!(
            text.contains(&format!("weight@{name}.fp8 : fp8e4m3[")),
            "{name}"
        );
        assert!(
            text.contains(&format!("weight@{name}.scale : f32[")),
            "{name} scale"
        );
    }
    assert!(text.contains("weight@lm_head.weight.fp8"));
    assert!(text.contains("state{name=\"past.0.key\"} : fp8e4m3[B,2,S,16]"));
    assert!(text.contains("weight@past.0.key.scale : f32[]"));
    assert!(text.contains("dequant{act=fp8e4m3,to=bf16}"));
}

#[test]
fn classes_can_be_kept_and_scales_per_tensor() {
    let s = spec("tiny.toml");
    let mut opts = Fp8Options {
        granularity: Granularity::PerTensor,
        ..Fp8Options::default()
    };
    opts.keep.insert(OpClass::LmHead);
    opts.keep.insert(OpClass::KvCache);
    let g = fused(&s, Precision::Fp8, &opts);
    let text = fusec_ir::text::print(&g).expect("acyclic");
    assert!(!text.contains("lm_head.weight.fp8"), "lm_head kept");
    assert!(text.contains("weight@lm_head.weight : bf16[256,64]"));
    assert!(text.contains("state{name=\"past.0.key\"} : bf16[B,2,S,16]"));
    assert!(text.contains("q_proj.weight.scale : f32[]"), "per-tensor");
    assert!("frobs".parse::<OpClass>().is_err());
}

#[test]
fn fp8_needs_a_gpu_with_fp8() {
    let mut s = spec("tiny.toml");
    s.target.gpu = "a100-sxm".into();
    let rules = pipeline::rules(&[]).expect("built-in rules");
    let e = pipeline::fused_in(&s, Precision::Fp8, &rules, &Fp8Options::default())
        .expect_err("no FP8 on A100");
    assert!(e.is_input_error());
    assert!(
        e.to_string().contains("a100-sxm has no FP8 tensor cores"),
        "{e}"
    );
}

#[test]
fn half_precisions_rebuild_the_eager_graph_in_that_dtype() {
    let s = spec("tiny.toml");
    for (p, d) in [(Precision::Bf16, DType::Bf16), (Precision::F16, DType::F16)] {
        let g = fused(&s, p, &Fp8Options::default());
        for (id, _) in g.weights() {
            assert_eq!(g.ty(id).tensor().map(|t| t.dtype), Some(d));
        }
        assert!(g.node_ids().all(|n| !matches!(g.op(n), Op::Dequant { .. })));
    }
}

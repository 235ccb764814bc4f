//! Snapshots of what codegen emits for the tiny example (`examples/tiny.toml`): the
//! CUDA translation unit (`Output::source`, `kernels.cu` of `fusec compile --emit
//! cuda`) and the launch plan JSON, for the eager and the fused graph in f32 and bf16,
//! and the fused graph in FP8. (The eager graph of an FP8 run is the bf16 one: FP8 is
//! a lowering of the fused graph.) Each file is its own test, so one difference hides
//! no other. Bless changes with `INSTA_UPDATE=always cargo test --test
//! codegen_snapshots` and review the diff like the IR snapshots'.

use fusec::codegen::{self, DecodeShape};
use fusec::pipeline;
use fusec::rewrite::precision::Fp8Options;
use fusec_model::frontend::Precision;

/// Codegen's output for the tiny example in `precision`, of the fused graph or of the
/// eager one.
fn generated(precision: &str, fused: bool) -> codegen::Output {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny.toml");
    let spec = pipeline::load(&example, None, None).expect("the tiny example loads");
    let precision = Precision::parse(precision).expect("a precision");
    let graph = if fused {
        let rules = pipeline::rules(&[]).expect("built-in rules load");
        let (graph, report) = pipeline::fused_in(&spec, precision, &rules, &Fp8Options::default())
            .expect("the tiny example fuses");
        assert!(!report.hit_limit, "{}", report.stop_reason);
        graph
    } else {
        pipeline::eager(&pipeline::in_precision(&spec, precision)).expect("eager graph builds")
    };
    let shape = DecodeShape::new(spec.decode.batch, spec.model.max_seq_len);
    codegen::generate(&graph, &shape, &codegen::Options::default()).expect("codegen succeeds")
}

macro_rules! case {
    ($name:ident, $precision:literal, $fused:literal, $variant:literal) => {
        mod $name {
            #[test]
            fn source() {
                let code = super::generated($precision, $fused);
                insta::assert_snapshot!(
                    concat!("tiny.", $precision, ".", $variant, ".cu"),
                    code.source()
                );
            }

            #[test]
            fn launch_plan() {
                let code = super::generated($precision, $fused);
                let plan = code.plan.to_json().expect("the plan serialises");
                insta::assert_snapshot!(
                    concat!("tiny.", $precision, ".", $variant, ".plan.json"),
                    plan
                );
            }
        }
    };
}

case!(f32_eager, "f32", false, "eager");
case!(f32_fused, "f32", true, "fused");
case!(bf16_eager, "bf16", false, "eager");
case!(bf16_fused, "bf16", true, "fused");
case!(fp8_fused, "fp8", true, "fused");

/// Codegen's output for the tiny example's paged step (`StepDims::paged`, blocks of 16
/// positions), fused, in `precision`: the kernels that write into and read through the
/// paged KV cache.
fn generated_paged(precision: &str) -> codegen::Output {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny.toml");
    let spec = pipeline::load(&example, None, None).expect("the tiny example loads");
    let precision = Precision::parse(precision).expect("a precision");
    let spec = pipeline::in_precision(&spec, precision);
    let eager = pipeline::eager_prefill(&spec, &fusec_model::blocks::StepDims::paged(16))
        .expect("the paged step builds");
    let rules = pipeline::rules(&[]).expect("built-in rules load");
    let (graph, report) = pipeline::fuse(&spec, &eager, &rules).expect("the paged step fuses");
    assert!(!report.hit_limit, "{}", report.stop_reason);
    let shape = DecodeShape::new(spec.decode.batch, spec.model.max_seq_len);
    codegen::generate(&graph, &shape, &codegen::Options::default()).expect("codegen succeeds")
}

mod bf16_paged {
    /// The paged kernels alone (the write into the blocks and the attention through
    /// the tables; every layer's are the same text).
    #[test]
    fn kernels() {
        let code = super::generated_paged("bf16");
        let paged: Vec<&str> = code
            .kernels
            .iter()
            .filter(|k| k.family.starts_with("paged_"))
            .map(|k| k.function.as_str())
            .collect();
        assert_eq!(paged.len(), 2, "one write and one attention kernel");
        insta::assert_snapshot!("tiny.bf16.paged.cu", paged.join("\n"));
    }

    #[test]
    fn launch_plan() {
        let code = super::generated_paged("bf16");
        let plan = code.plan.to_json().expect("the plan serialises");
        insta::assert_snapshot!("tiny.bf16.paged.plan.json", plan);
    }
}

/// Codegen's output for the tiny example's prefill step of 16 tokens per sequence
/// (`StepDims::prefill`, the last position's logits), fused, in bf16: the tensor-core
/// GEMMs and the causal prefill attention (`fusec compile --prefill 16 --emit cuda`'s
/// `prefill_fused_kernels.cu`).
fn generated_prefill(precision: &str) -> codegen::Output {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny.toml");
    let spec = pipeline::load(&example, None, None).expect("the tiny example loads");
    let precision = Precision::parse(precision).expect("a precision");
    let dims = fusec_model::blocks::StepDims::prefill(16, fusec_model::blocks::Logits::Last);
    let rules = pipeline::rules(&[]).expect("built-in rules load");
    let (graph, report) =
        pipeline::fused_prefill_in(&spec, precision, &dims, &rules, &Fp8Options::default())
            .expect("the prefill step fuses");
    assert!(!report.hit_limit, "{}", report.stop_reason);
    let shape = DecodeShape::new(spec.decode.batch, spec.model.max_seq_len);
    codegen::generate(&graph, &shape, &codegen::Options::default()).expect("codegen succeeds")
}

mod bf16_prefill {
    #[test]
    fn source() {
        let code = super::generated_prefill("bf16");
        let families: Vec<&str> = code.kernels.iter().map(|k| k.family.as_str()).collect();
        assert!(families.contains(&"prefill_attention"), "{families:?}");
        assert!(
            families.iter().any(|f| f.starts_with("gemm")),
            "{families:?}"
        );
        insta::assert_snapshot!("tiny.bf16.prefill.cu", code.source());
    }

    #[test]
    fn launch_plan() {
        let code = super::generated_prefill("bf16");
        let plan = code.plan.to_json().expect("the plan serialises");
        insta::assert_snapshot!("tiny.bf16.prefill.plan.json", plan);
    }
}

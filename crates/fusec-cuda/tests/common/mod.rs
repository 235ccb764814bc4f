//! Helpers shared by the code generation tests: every example model in every precision.

#![allow(dead_code)]

pub mod stages;

use std::path::{Path, PathBuf};

use fusec_codegen::{generate, DecodeShape, Options, Output};
use fusec_ir::Graph;
use fusec_model::frontend::{ModelSpec, Precision};
use fusec_rewrite::precision::Fp8Options;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every bundled example model, sorted.
pub fn examples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .expect("examples exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

/// Hugging Face models whose kernels the `.toml` examples do not emit: Gemma's
/// (soft-capping, GELU-tanh, the `(1 + w)` norms), as the published Gemma 2 9B
/// configuration and the tiny Gemma 2 and 3 fixtures. (Every published configuration
/// would more than double the NVRTC test's time for kernels that differ from these
/// and the `.toml` examples' only in their sizes.)
pub fn hf_models() -> Vec<PathBuf> {
    let mut models = vec![root().join("examples/gemma-2-9b")];
    // The tiny reference of every family: each family's kernel variants (biases, q/k
    // norms, post-norms, multipliers, soft-caps, sliding-window rings) at small sizes.
    for fixture in [
        "hf-tiny-gemma2-s0",
        "hf-tiny-gemma3-s0",
        "hf-tiny-llama3-rope-s0",
        "hf-tiny-qwen2-s0",
        "hf-tiny-qwen3-s0",
        "hf-tiny-olmo2-s0",
        "hf-tiny-granite-s3",
        "hf-tiny-mistral-window-s0",
        "hf-tiny-phi3-s0",
    ] {
        models.push(root().join("tests/fixtures").join(fixture));
    }
    models
}

pub fn spec(path: &Path) -> ModelSpec {
    stages::load(path, None, None).expect("example loads")
}

pub const PRECISIONS: [Precision; 4] = [
    Precision::F32,
    Precision::F16,
    Precision::Bf16,
    Precision::Fp8,
];

/// One graph to generate code for.
pub struct Case {
    pub label: String,
    pub graph: Graph,
    pub shape: DecodeShape,
}

/// The eager and fused graphs of `path` in `precision`.
pub fn cases(path: &Path, precision: Precision) -> Vec<Case> {
    let spec = spec(path);
    let shape = DecodeShape::new(spec.decode.batch, spec.model.max_seq_len);
    let s = stages::in_precision(&spec, precision);
    let eager = stages::eager(&s).expect("eager graph");
    let rules = stages::rules().expect("built-in rules");
    let fused = stages::fused_in(&spec, precision, &rules, &Fp8Options::default()).expect("fuses");
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    vec![
        Case {
            label: format!("{name}/{}/eager", precision.name()),
            graph: eager,
            shape,
        },
        Case {
            label: format!("{name}/{}/fused", precision.name()),
            graph: fused,
            shape,
        },
    ]
}

/// The fused graphs of the examples whose GEMV widths are whole blocks of 32 (the 125M
/// Llama and Llama 3 8B), lowered to Q8_0, Q4_0 and Q4_1 codes: the integer GEMV
/// kernels.
pub fn int_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for name in ["llama-125m.toml", "llama-3-8b.toml"] {
        for precision in [Precision::Int8, Precision::Int4, Precision::Q4_1] {
            v.extend(
                cases(&root().join("examples").join(name), precision)
                    .into_iter()
                    .filter(|c| c.label.ends_with("/fused")),
            );
        }
    }
    v
}

/// The paged step graphs of `path` in `precision` (`StepDims::paged` with blocks of
/// 16 positions, eager and fused): the kernels reading a paged KV cache. The pool and
/// table sizes are `generate`'s default for the spec's batch and length.
pub fn paged_cases(path: &Path, precision: Precision) -> Vec<Case> {
    let spec = stages::in_precision(&spec(path), precision);
    let shape = DecodeShape::new(spec.decode.batch, spec.model.max_seq_len);
    let arch = fusec_model::Registry::builtin()
        .architecture(&spec.architecture)
        .expect("architecture");
    let eager = arch
        .build_step(&spec.model, &fusec_model::blocks::StepDims::paged(16))
        .expect("builds the paged step");
    let rules = stages::rules().expect("built-in rules");
    let fused = stages::fuse(&spec, &eager, &rules).expect("fuses the paged step");
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    vec![
        Case {
            label: format!("{name}/{}/paged-eager", precision.name()),
            graph: eager,
            shape,
        },
        Case {
            label: format!("{name}/{}/paged-fused", precision.name()),
            graph: fused,
            shape,
        },
    ]
}

/// The prefill step graphs of `path` in `precision` (`StepDims::prefill` of `tokens`
/// tokens per sequence, the last position's logits), eager and fused (FP8 lowered as
/// the decode graph is): the tensor-core GEMMs and the prefill attention.
pub fn prefill_cases(path: &Path, precision: Precision, tokens: u64) -> Vec<Case> {
    let spec = spec(path);
    let shape = DecodeShape::new(spec.decode.batch, spec.model.max_seq_len);
    let s = stages::in_precision(&spec, precision);
    let arch = fusec_model::Registry::builtin()
        .architecture(&s.architecture)
        .expect("architecture");
    let dims = fusec_model::blocks::StepDims::prefill(tokens, fusec_model::blocks::Logits::Last);
    let eager = arch
        .build_step(&s.model, &dims)
        .expect("builds the prefill step");
    let rules = stages::rules().expect("built-in rules");
    let mut fused = stages::fuse(&s, &eager, &rules).expect("fuses the prefill step");
    if precision == Precision::Fp8 {
        fused = fusec_rewrite::precision::lower_fp8(&fused, &Fp8Options::default())
            .expect("lowers the prefill step");
    }
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    vec![
        Case {
            label: format!("{name}/{}/prefill{tokens}-eager", precision.name()),
            graph: eager,
            shape,
        },
        Case {
            label: format!("{name}/{}/prefill{tokens}-fused", precision.name()),
            graph: fused,
            shape,
        },
    ]
}

pub fn output(case: &Case) -> Output {
    generate(&case.graph, &case.shape, &Options::default())
        .unwrap_or_else(|e| panic!("{}: {e}", case.label))
}

/// The tiny model fused with subsets of the built-in rule topics (each topic alone,
/// and all topics but one), so that every fused op appears on its own as well as in
/// the full fusion: `(label, graph)` in f32.
pub fn partial_fusions(precision: Precision) -> Vec<(String, Graph)> {
    let spec = spec(&root().join("examples/tiny.toml"));
    let s = stages::in_precision(&spec, precision);
    let eager = stages::eager(&s).expect("eager graph");
    let topics: Vec<&str> = fusec_rewrite::ruleset::BUILTIN_RULE_FILES
        .iter()
        .map(|(t, _)| *t)
        .collect();
    let mut subsets: Vec<(String, Vec<&str>)> = topics
        .iter()
        .map(|t| (format!("only {t}"), vec![*t]))
        .collect();
    subsets.extend(topics.iter().map(|t| {
        (
            format!("all but {t}"),
            topics.iter().copied().filter(|x| x != t).collect(),
        )
    }));
    let mut out = Vec::new();
    for (label, subset) in subsets {
        let mut rules = fusec_rewrite::RuleSet::empty();
        for (topic, text) in fusec_rewrite::ruleset::BUILTIN_RULE_FILES {
            if subset.contains(topic) {
                rules
                    .add_file(&format!("{topic}.rules"), text)
                    .expect("built-in rules parse");
            }
        }
        let g = stages::fuse(&s, &eager, &rules).expect("fuses");
        out.push((label, g));
    }
    out
}

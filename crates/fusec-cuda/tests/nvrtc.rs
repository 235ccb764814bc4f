//! Every kernel fusec emits, for every example model (the `.toml` ones, Gemma 2's, and
//! the tiny reference of every family, `common::hf_models`) in every precision, eager and
//! fused, compiles with NVRTC to CUBIN for sm_80 and sm_90 (so the assembler checks
//! registers and shared memory too). Kernels with identical text are compiled once:
//! the layers of a model, and the models that share shapes, emit the same kernels.
//!
//! The paged step's kernels (`common::paged_cases`) are compiled too, and in a test of
//! their own the prefill step's (`common::prefill_cases`: tensor-core GEMMs and the
//! causal prefill attention) of every `.toml` example.
//!
//! Without NVRTC the test passes but says so loudly on stderr and stdout.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Instant;

use fusec_codegen::cuda::PRELUDE;
use fusec_codegen::Arch;
use fusec_cuda::nvrtc::{Nvrtc, Target};
use fusec_ir::{DType, Dim, FusedOp, Graph, InputKind, Op, OutputKind, Shape, TensorType, F64};
use fusec_model::frontend::Precision;

/// Distinct kernel functions (with a neutral name) and where each first came from.
fn distinct_kernels() -> BTreeMap<String, String> {
    let mut kernels = BTreeMap::new();
    for path in common::examples().into_iter().chain(common::hf_models()) {
        for precision in common::PRECISIONS {
            for case in common::cases(&path, precision) {
                let out = common::output(&case);
                for k in &out.kernels {
                    let text = k.function.replace(&k.name, "FUSEC_KERNEL");
                    kernels
                        .entry(text)
                        .or_insert_with(|| format!("{} {}", case.label, k.name));
                }
            }
        }
    }
    // The tiny model fused by subsets of the rules, so that every fused op is also
    // compiled on its own (kv.append, fused.rope, fused.attention, fused.swiglu).
    let shape = fusec_codegen::DecodeShape::new(1, 128);
    for precision in [Precision::F32, Precision::Bf16] {
        for (label, graph) in common::partial_fusions(precision) {
            let case = common::Case {
                label: format!("tiny/{}/{label}", precision.name()),
                graph,
                shape,
            };
            for k in &common::output(&case).kernels {
                let text = k.function.replace(&k.name, "FUSEC_KERNEL");
                kernels
                    .entry(text)
                    .or_insert_with(|| format!("{} {}", case.label, k.name));
            }
        }
    }
    // The paged KV cache's kernels (the write into the blocks, and attention through
    // the block tables), with and without RoPE fused in, and with Gemma 3's sliding
    // windows beside its global layers.
    let paged = [
        (common::root().join("examples/tiny.toml"), Precision::F32),
        (common::root().join("examples/tiny.toml"), Precision::Bf16),
        (common::root().join("examples/tiny.toml"), Precision::F16),
        (
            common::root().join("tests/fixtures/hf-tiny-gemma3-s0"),
            Precision::Bf16,
        ),
    ];
    let mut paged_kernels = 0;
    for (path, precision) in paged {
        for case in common::paged_cases(&path, precision) {
            for k in &common::output(&case).kernels {
                paged_kernels += usize::from(k.family.starts_with("paged_"));
                let text = k.function.replace(&k.name, "FUSEC_KERNEL");
                kernels
                    .entry(text)
                    .or_insert_with(|| format!("{} {}", case.label, k.name));
            }
        }
    }
    assert!(paged_kernels >= 16, "{paged_kernels} paged kernels");
    // The integer GEMVs, Q8_0, Q4_0 and Q4_1 codes.
    let mut int_kernels = 0;
    for case in common::int_cases() {
        for k in &common::output(&case).kernels {
            int_kernels += usize::from(k.function.contains("fu_dot_q"));
            let text = k.function.replace(&k.name, "FUSEC_KERNEL");
            kernels
                .entry(text)
                .or_insert_with(|| format!("{} {}", case.label, k.name));
        }
    }
    assert!(int_kernels >= 12, "{int_kernels} integer GEMV kernels");
    // No rule set builds a lone fused.rms_norm for Llama; compile one by hand.
    for dtype in [DType::F32, DType::Bf16] {
        let case = common::Case {
            label: format!("rms_norm/{dtype}"),
            graph: lone_rms_norm(dtype),
            shape,
        };
        for k in &common::output(&case).kernels {
            let text = k.function.replace(&k.name, "FUSEC_KERNEL");
            kernels
                .entry(text)
                .or_insert_with(|| format!("{} {}", case.label, k.name));
        }
    }
    kernels
}

/// The distinct kernels of the prefill steps of every `.toml` example (64 tokens per
/// sequence, every precision, eager and fused): the tensor-core GEMMs (bf16 and FP8
/// weights) and the causal prefill attention. A model with sliding-window layers has no
/// CUDA prefill attention yet and is refused with its typed error (Mistral 7B's
/// 4096-position ring).
fn distinct_prefill_kernels() -> BTreeMap<String, String> {
    let mut kernels = BTreeMap::new();
    // The prefill steps of every `.toml` example (64 tokens per sequence): the
    // tensor-core GEMMs (bf16 and FP8 weights) and the causal prefill attention. A
    // model with sliding-window layers has no CUDA prefill attention yet and is
    // refused with its typed error (Mistral 7B's 4096-position ring).
    let (mut gemm_kernels, mut prefill_attention, mut refused) = (0, 0, Vec::new());
    // Every example in bf16 and FP8 (the GEMMs' two weight formats); the f32 and f16
    // prefill attention (beside the GEMV template) on the tiny example, whose kernels
    // differ from the others' only in their sizes (fusing every example's prefill step
    // in every precision would more than double the test's time).
    let mut cases = Vec::new();
    for path in common::examples() {
        let tiny = path.ends_with("tiny.toml");
        for precision in common::PRECISIONS {
            if tiny || matches!(precision, Precision::Bf16 | Precision::Fp8) {
                cases.push((path.clone(), precision));
            }
        }
    }
    for (path, precision) in cases {
        for case in common::prefill_cases(&path, precision, 64) {
            let out = match fusec_codegen::generate(
                &case.graph,
                &case.shape,
                &fusec_codegen::Options::default(),
            ) {
                Ok(out) => out,
                Err(fusec_codegen::Error::NoPrefillKernels { what, .. })
                    if what.contains("sliding-window") =>
                {
                    refused.push(case.label.clone());
                    continue;
                }
                Err(e) => panic!("{}: {e}", case.label),
            };
            for k in &out.kernels {
                gemm_kernels += usize::from(k.family.starts_with("gemm"));
                prefill_attention += usize::from(k.family.starts_with("prefill_attention"));
                let text = k.function.replace(&k.name, "FUSEC_KERNEL");
                kernels
                    .entry(text)
                    .or_insert_with(|| format!("{} {}", case.label, k.name));
            }
        }
    }
    assert!(gemm_kernels >= 12, "{gemm_kernels} GEMM kernels");
    assert!(
        prefill_attention >= 8,
        "{prefill_attention} prefill attention kernels"
    );
    assert!(
        !refused.is_empty() && refused.iter().all(|l| l.starts_with("mistral-7b/")),
        "refused: {refused:?}"
    );
    kernels
}

/// `fused.rms_norm(x [B,1,64], w [64], 1e-5)` as a graph output.
fn lone_rms_norm(dtype: DType) -> Graph {
    let mut g = Graph::new("rms_norm");
    let x_ty = TensorType::new(
        dtype,
        Shape::new([Dim::sym("B"), Dim::Fixed(1), Dim::Fixed(64)]),
    );
    let x = g
        .add_leaf(
            Op::Input {
                name: "x".into(),
                kind: InputKind::Data,
            },
            x_ty,
        )
        .expect("input");
    let w = g
        .add_leaf(
            Op::Weight { name: "w".into() },
            TensorType::new(dtype, Shape::fixed(&[64])),
        )
        .expect("weight");
    let eps = g.add(Op::Scalar { value: F64(1e-5) }, &[]).expect("eps");
    let y = g
        .add(Op::Fused(FusedOp::RmsNorm), &[x, w, eps])
        .expect("rms_norm");
    g.add_output("y", OutputKind::Data, y);
    g
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    let start = Instant::now();
    let kernels = distinct_kernels();
    assert!(
        kernels.len() > 20,
        "only {} distinct kernels",
        kernels.len()
    );
    compile_all(&kernels, start);
}

#[test]
fn every_prefill_kernel_compiles_for_sm80_and_sm90() {
    let start = Instant::now();
    let kernels = distinct_prefill_kernels();
    compile_all(&kernels, start);
}

/// Compiles `kernels` with NVRTC for sm_80 and sm_90 and fails on any error or warning;
/// without NVRTC says so loudly (and fails with `FUSEC_REQUIRE_TOOLS`).
fn compile_all(kernels: &BTreeMap<String, String>, start: Instant) {
    let nvrtc = match Nvrtc::load() {
        Ok(n) => n,
        Err(e) => {
            let line = format!(
                "NVRTC NOT FOUND: CUDA kernels were NOT compiled ({} distinct kernels generated and left unchecked): {e}",
                kernels.len()
            );
            // With `FUSEC_REQUIRE_TOOLS` set (as `.ci/run` sets it) a missing NVRTC
            // fails; otherwise it is written to the process's stderr, not through the
            // test harness's capture, so that the skipped check shows in every log.
            assert!(
                std::env::var_os("FUSEC_REQUIRE_TOOLS").is_none(),
                "{line} (FUSEC_REQUIRE_TOOLS is set)"
            );
            let _ = writeln!(std::io::stderr(), "\n{line}\n");
            return;
        }
    };
    let version = nvrtc.version().expect("version");
    // One translation unit per chunk of kernels, each kernel renamed after its index,
    // compiled for both architectures on two threads.
    let list: Vec<(&String, &String)> = kernels.iter().collect();
    let mut units = Vec::new();
    for chunk in list.chunks(64) {
        let mut src = String::from(PRELUDE);
        let mut origin = Vec::new();
        for (text, from) in chunk {
            let i = units.len() * 64 + origin.len();
            let _ = writeln!(src, "// from {from}");
            src.push_str(&text.replace("FUSEC_KERNEL", &format!("k{i}")));
            origin.push((*from).clone());
        }
        units.push((src, origin));
    }
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = [Arch::SM80, Arch::SM90]
            .into_iter()
            .map(|arch| {
                let (nvrtc, units) = (&nvrtc, &units);
                s.spawn(move || {
                    let mut failures = Vec::new();
                    for (src, origin) in units {
                        match nvrtc.compile(src, Target::Cubin(arch)) {
                            Ok(c) if !c.log.is_empty() => failures
                                .push(format!("{arch}: warnings for {origin:?}:\n{}", c.log)),
                            Ok(_) => {}
                            Err(e) => {
                                failures.push(format!("{arch}: {e}\nkernels from: {origin:?}"))
                            }
                        }
                    }
                    failures
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec!["a compile thread panicked".into()])
            })
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let _ = writeln!(
        std::io::stderr(),
        "NVRTC {}.{} ({}) compiled {} distinct kernels for sm_80 and sm_90 in {:.1} s",
        version.0,
        version.1,
        nvrtc.library(),
        kernels.len(),
        start.elapsed().as_secs_f64()
    );
}

//! Sweeps: time per token against context length (at the report's batch), and time
//! per token and tokens/s against batch size (at the report's context).
//!
//! Longer contexts add KV-cache traffic to every step, so time per token grows with
//! the context. Larger batches share each weight read among more tokens, so time per
//! token falls until the weight GEMVs turn compute-bound; the attention kernels read
//! a KV cache per sequence and stay memory-bound.

use serde::Serialize;

use crate::error::ReportError;
use crate::format;
use crate::kernel::{Bound, KernelClass};
use crate::model::{dollars_per_million_tokens, fits, Eval, Inputs};

/// The default context sweep: powers of two halving down from `max_seq_len`, at
/// most seven points and none below 16, in increasing order (8192 gives 128 to 8192).
pub fn default_contexts(max_seq_len: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut c = max_seq_len;
    while c >= 16 && out.len() < 7 {
        out.push(c);
        c /= 2;
    }
    if out.is_empty() {
        out.push(max_seq_len.max(1));
    }
    out.reverse();
    out
}

/// The default batch sweep: powers of two from 1 to 1024, far enough to show where
/// the weight GEMVs of a large GPU turn compute-bound (near its ridge point).
pub fn default_batches() -> Vec<u64> {
    (0..=10).map(|k| 1u64 << k).collect()
}

/// One variant at one sweep point.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PointResult {
    pub variant: String,
    pub us_per_step: f64,
    pub us_per_token: f64,
    pub tokens_per_s: f64,
    pub dollars_per_million_tokens: f64,
    pub bytes_per_step: u64,
    /// The KV cache read by the step.
    pub kv_read_bytes: u64,
    /// The step's time split by what bounds each kernel.
    pub launch_us: f64,
    pub memory_us: f64,
    pub compute_us: f64,
    /// The largest of the three.
    pub bound: Bound,
    /// Whether the weight GEMVs together spend longer on memory or on math.
    pub gemv_bound: Bound,
    /// Weights plus the KV cache after the step.
    pub resident_bytes: u64,
    /// Whether that fits in the GPU's memory, where known.
    pub fits: Option<bool>,
}

/// One sweep point: a context (context sweep) or a batch (batch sweep).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SweepPoint {
    pub context: u64,
    pub batch: u64,
    pub variants: Vec<PointResult>,
}

/// Time per token against context length.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ContextSweep {
    /// The batch every point uses.
    pub batch: u64,
    pub points: Vec<SweepPoint>,
}

/// Time per token and tokens/s against batch size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BatchSweep {
    /// The context every point uses.
    pub context: u64,
    pub points: Vec<SweepPoint>,
    /// Per variant: the first batch whose step is no longer memory-bound.
    pub memory_bound_until: Vec<BoundChange>,
}

/// Where a variant's step stops being memory-bound, and the largest batch that fits.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BoundChange {
    pub variant: String,
    /// The first swept batch whose step is compute-bound, if any.
    pub first_compute_bound_batch: Option<u64>,
    /// The first swept batch whose weight GEMVs are compute-bound, if any.
    pub first_gemv_compute_bound_batch: Option<u64>,
    /// The largest swept batch whose weights and KV cache fit in memory, where known.
    pub largest_batch_that_fits: Option<u64>,
}

fn point(inputs: &Inputs<'_>, batch: u64, context: u64) -> Result<SweepPoint, ReportError> {
    let gpu = inputs.gpu;
    let mut variants = Vec::with_capacity(inputs.variants.len());
    for v in inputs.variants {
        let e = Eval::new(&v.graph, batch, context, gpu)?;
        let t = e.by_bound();
        let (mut gemv_memory, mut gemv_math) = (0.0, 0.0);
        for ((id, _), k) in e.cost.nodes.iter().zip(&e.times) {
            if KernelClass::of(v.graph.op(*id)) == KernelClass::Gemv {
                gemv_memory += k.memory_s;
                gemv_math += k.math_s;
            }
        }
        let tokens_per_s = e.tokens_per_s();
        let resident = e.resident_bytes();
        variants.push(PointResult {
            variant: v.name.clone(),
            us_per_step: e.step_s * 1e6,
            us_per_token: e.us_per_token(),
            tokens_per_s,
            dollars_per_million_tokens: dollars_per_million_tokens(
                inputs.price_per_hour,
                tokens_per_s,
            ),
            bytes_per_step: e.cost.total.bytes(),
            kv_read_bytes: e.cost.floor.kv_read_bytes,
            bound: t.bound(),
            gemv_bound: if gemv_math > gemv_memory {
                Bound::Compute
            } else {
                Bound::Memory
            },
            launch_us: t.launch_us,
            memory_us: t.memory_us,
            compute_us: t.compute_us,
            resident_bytes: resident,
            fits: fits(gpu, resident),
        });
    }
    Ok(SweepPoint {
        context,
        batch,
        variants,
    })
}

/// The context sweep at `batch` over sorted, checked `contexts`.
pub(crate) fn context_sweep(
    inputs: &Inputs<'_>,
    batch: u64,
    contexts: &[u64],
) -> Result<ContextSweep, ReportError> {
    let points = contexts
        .iter()
        .map(|&c| point(inputs, batch, c))
        .collect::<Result<_, _>>()?;
    Ok(ContextSweep { batch, points })
}

/// The batch sweep at `context` over sorted, checked `batches`.
pub(crate) fn batch_sweep(
    inputs: &Inputs<'_>,
    context: u64,
    batches: &[u64],
) -> Result<BatchSweep, ReportError> {
    let points: Vec<SweepPoint> = batches
        .iter()
        .map(|&b| point(inputs, b, context))
        .collect::<Result<_, _>>()?;
    let memory_bound_until = inputs
        .variants
        .iter()
        .enumerate()
        .map(|(i, v)| BoundChange {
            variant: v.name.clone(),
            first_compute_bound_batch: points
                .iter()
                .find(|p| p.variants[i].bound == Bound::Compute)
                .map(|p| p.batch),
            first_gemv_compute_bound_batch: points
                .iter()
                .find(|p| p.variants[i].gemv_bound == Bound::Compute)
                .map(|p| p.batch),
            largest_batch_that_fits: points
                .iter()
                .filter(|p| p.variants[i].fits == Some(true))
                .map(|p| p.batch)
                .max(),
        })
        .collect();
    Ok(BatchSweep {
        context,
        points,
        memory_bound_until,
    })
}

/// One sentence per finding of the sweeps, for the report's notes.
pub(crate) fn summaries(
    ctx: &ContextSweep,
    batch: &BatchSweep,
    gpu: &fusec_ir::hardware::GpuSpec,
) -> Vec<String> {
    let mut out = Vec::new();
    if let (Some(first), Some(last)) = (ctx.points.first(), ctx.points.last()) {
        if first.context != last.context {
            let growth: Vec<String> = first
                .variants
                .iter()
                .zip(&last.variants)
                .map(|(a, b)| {
                    format!(
                        "{} {} -> {} us ({}x)",
                        a.variant,
                        format::us(a.us_per_token),
                        format::us(b.us_per_token),
                        format::sig(b.us_per_token / a.us_per_token)
                    )
                })
                .collect();
            out.push(format!(
                "From context {} to {} at batch {}, time per token grows with the KV cache \
                 read every step: {}.",
                first.context,
                last.context,
                ctx.batch,
                growth.join("; ")
            ));
        }
    }
    let last = batch.points.last();
    for (i, c) in batch.memory_bound_until.iter().enumerate() {
        let gemv = match c.first_gemv_compute_bound_batch {
            Some(b) => format!("its weight GEMVs turn compute-bound at batch {b}"),
            None => "its weight GEMVs stay memory-bound at every batch swept".to_string(),
        };
        let step = match (c.first_compute_bound_batch, last) {
            (Some(b), _) => format!("the whole step at batch {b}"),
            (None, Some(p)) => format!(
                "the whole step is still {}-bound at batch {}",
                p.variants[i].bound.name(),
                p.batch
            ),
            (None, None) => String::new(),
        };
        let fit = match (c.largest_batch_that_fits, gpu.memory_gb) {
            (Some(b), Some(gb)) => format!(
                "; the largest swept batch whose weights and KV cache fit in {gb} GB is {b}"
            ),
            (None, Some(gb)) => format!("; no swept batch fits in {gb} GB"),
            _ => String::new(),
        };
        out.push(format!(
            "{} at context {}: {gemv}, {step}{fit}.",
            c.variant, batch.context
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use fusec_model::arch::llama;
    use fusec_model::{parse_model_toml, ModelSpec};

    use super::*;
    use crate::model::{build, Report, Variant};

    /// A small bf16 Llama with GQA whose KV cache matters at long contexts.
    const MODEL: &str = "[model]\nname = \"small\"\narchitecture = \"llama\"\n\
        hidden_size = 256\nnum_layers = 2\nnum_heads = 4\nnum_kv_heads = 2\n\
        intermediate_size = 512\nvocab_size = 1000\nrope_theta = 10000.0\n\
        rms_norm_eps = 1e-5\nmax_seq_len = 32768\ndtype = \"bf16\"\n\
        [decode]\ncontext = 1024\n";

    fn spec() -> ModelSpec {
        parse_model_toml(Path::new("small.toml"), MODEL).expect("valid model")
    }

    fn report(contexts: &[u64], batches: &[u64]) -> Report {
        let spec = spec();
        let graph = llama::build(&spec.model).expect("builds");
        let variants = [Variant {
            name: "eager".into(),
            description: "eager".into(),
            graph,
        }];
        let gpu = fusec_ir::hardware::gpu("h100-sxm").expect("built in");
        build(&Inputs {
            spec: &spec,
            variants: &variants,
            precision: "bf16",
            gpu,
            gpus: fusec_ir::hardware::GPUS,
            price_per_hour: 2.5,
            contexts,
            batches,
            measurements: &[],
            measurements_file: None,
            cpu: None,
            notes: &[],
        })
        .expect("report builds")
    }

    #[test]
    fn time_per_token_grows_with_context() {
        let r = report(&[32768, 128, 1024, 8192, 1024], &[1]);
        let points = &r.context_sweep.points;
        // Sorted and without the repeated 1024.
        let contexts: Vec<u64> = points.iter().map(|p| p.context).collect();
        assert_eq!(contexts, [128, 1024, 8192, 32768]);
        for w in points.windows(2) {
            let (a, b) = (&w[0].variants[0], &w[1].variants[0]);
            assert!(b.us_per_token > a.us_per_token, "{a:?} then {b:?}");
            assert!(b.kv_read_bytes > a.kv_read_bytes);
            assert!(b.tokens_per_s < a.tokens_per_s);
        }
        // The KV cache read is proportional to the cached positions:
        // layers * 2 (k, v) * kv_heads * head_dim * 2 bytes per position.
        let per_position = 2 * 2 * 2 * 64 * 2;
        assert_eq!(points[0].variants[0].kv_read_bytes, 127 * per_position);
    }

    #[test]
    fn batching_shares_the_weight_reads() {
        let r = report(&[1024], &[1, 4, 16, 64]);
        let points = &r.batch_sweep.points;
        for w in points.windows(2) {
            let (a, b) = (&w[0].variants[0], &w[1].variants[0]);
            assert!(b.us_per_token < a.us_per_token, "{a:?} then {b:?}");
            assert!(b.tokens_per_s > a.tokens_per_s);
            assert!(b.dollars_per_million_tokens < a.dollars_per_million_tokens);
            // Tokens/s is the batch over the step time.
            let expected = w[1].batch as f64 / (b.us_per_step * 1e-6);
            assert!((b.tokens_per_s - expected).abs() / expected < 1e-12);
        }
        // A small model at batch 1 waits on launches, not memory.
        assert_eq!(points[0].variants[0].bound, Bound::Launch);
    }

    #[test]
    fn sweep_points_are_checked() {
        let spec = spec();
        let graph = llama::build(&spec.model).expect("builds");
        let variants = [Variant {
            name: "eager".into(),
            description: String::new(),
            graph,
        }];
        let gpu = fusec_ir::hardware::gpu("h100-sxm").expect("built in");
        let inputs = |contexts: &'static [u64], batches: &'static [u64], price: f64| {
            build(&Inputs {
                spec: &spec,
                variants: &variants,
                precision: "bf16",
                gpu,
                gpus: &[],
                price_per_hour: price,
                contexts,
                batches,
                measurements: &[],
                measurements_file: None,
                cpu: None,
                notes: &[],
            })
        };
        for (result, needle) in [
            (inputs(&[65536], &[1], 2.5), "beyond max_seq_len 32768"),
            (inputs(&[0], &[1], 2.5), "at least 1"),
            (inputs(&[128], &[0], 2.5), "--batch"),
            (inputs(&[128], &[1], 0.0), "--price-per-hour"),
            (inputs(&[128], &[1], f64::NAN), "--price-per-hour"),
        ] {
            let e = result.expect_err(needle);
            assert!(e.is_input_error());
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn default_points() {
        assert_eq!(
            default_contexts(8192),
            [128, 256, 512, 1024, 2048, 4096, 8192]
        );
        assert_eq!(default_contexts(128), [16, 32, 64, 128]);
        assert_eq!(default_contexts(10), [10]);
        assert_eq!(default_batches().first(), Some(&1));
        assert_eq!(default_batches().last(), Some(&1024));
    }
}

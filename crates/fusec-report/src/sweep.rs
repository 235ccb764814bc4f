//! Sweeps: time per token against context length (at the report's batch), and time
//! per token and tokens/s against batch size (at the report's context).
//!
//! Longer contexts add KV-cache traffic to every step, so time per token grows with
//! the context. Larger batches share each weight read among more tokens, so time per
//! token falls until the weight GEMVs turn compute-bound; the attention kernels read
//! a KV cache per sequence and stay memory-bound.

use serde::Serialize;

use crate::error::ReportError;
use crate::eval::{dollars_per_million_tokens, fits, Eval};
use crate::format;
use crate::inputs::Inputs;
use crate::kernel::{class_of, Bound};
use fusec_ir::KernelClass;

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
            if class_of(v.graph.op(*id)) == KernelClass::Gemv {
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

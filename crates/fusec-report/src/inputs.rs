//! What the report is built from: the variant graphs and the options of one report.
//! Plain data, shared by every stage of the build (`assemble`, `sweep`, `measure`).

use fusec_ir::hardware::GpuSpec;
use fusec_ir::Graph;
use fusec_model::frontend::ModelSpec;

use crate::measurement::{CpuMeasurement, Measurement};

/// The largest batch a sweep accepts: beyond it the byte counts of a large model
/// approach the range of `u64`, and no GPU holds such a KV cache anyway.
pub const MAX_BATCH: u64 = 1 << 16;

/// One compiled form of the decode step, named for the report (`eager`, `fused`,
/// `fused+fp8`).
#[derive(Clone, Debug)]
pub struct Variant {
    pub name: String,
    /// One line on how the variant was built, shown under its name.
    pub description: String,
    pub graph: Graph,
}

/// The prefill graph of one variant for `tokens` new tokens per sequence (one chunk
/// length), logits of the last position only: what the prefill sweep
/// (`crate::prefill`) evaluates.
#[derive(Clone, Debug)]
pub struct PrefillGraph {
    /// The decode variant it belongs to (`eager`, `fused`, `fused+fp8`).
    pub variant: String,
    pub tokens: u64,
    pub graph: Graph,
}

/// Everything the report is built from (by `build`).
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The model; its `decode` section is the point the per-kernel tables describe.
    pub spec: &'a ModelSpec,
    /// The variants; the first is the baseline that savings are measured against.
    pub variants: &'a [Variant],
    /// The precision the variants were compiled for (`bf16`, `fp8`...).
    pub precision: &'a str,
    /// The GPU every estimate is for.
    pub gpu: &'a GpuSpec,
    /// The GPUs listed in the report's table (built-in and the user's).
    pub gpus: &'a [GpuSpec],
    /// Dollars per GPU-hour.
    pub price_per_hour: f64,
    /// Context lengths of the context sweep (KV length after the step).
    pub contexts: &'a [u64],
    /// Batch sizes of the batch sweep.
    pub batches: &'a [u64],
    /// Prefill graphs for the prefill sweep: every chunk length the prompts need, per
    /// variant that has them (none: no prefill sweep).
    pub prefill: &'a [PrefillGraph],
    /// Prompt lengths of the prefill sweep.
    pub prompts: &'a [u64],
    /// The most tokens one prefill chunk feeds.
    pub prefill_chunk: u64,
    /// GPU measurements, of any model and GPU (the report picks its own).
    pub measurements: &'a [Measurement],
    /// Where the measurements came from, for the report's text.
    pub measurements_file: Option<&'a str>,
    /// A measured step of the CPU executor, if one was run.
    pub cpu: Option<&'a CpuMeasurement>,
    /// Notes from the caller (how the variants were built), printed with the report's.
    pub notes: &'a [String],
}

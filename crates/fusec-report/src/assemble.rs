//! Assembles the report from the variant graphs: the report's data (the JSON form is
//! [`Report`]) and [`build`], which evaluates every variant at the report's decode point
//! and at the sweep points.
//!
//! Every figure is a function of the graphs' costs under `Bindings` for a batch and a
//! context (`fusec_ir::cost`), and of the GPU's figures. The graphs are symbolic in the
//! batch `B` and the cached positions `S`, so a sweep point is only new bindings.

use std::collections::HashMap;

use fusec_ir::cost::Floor;
use fusec_ir::hardware::GpuSpec;
use fusec_ir::{Graph, NodeId};
use serde::Serialize;

use crate::error::ReportError;
pub use crate::eval::{dollars_per_million_tokens, BoundTime};
use crate::eval::{fits, Eval};
use crate::inputs::{Inputs, Variant, MAX_BATCH};
use crate::kernel::{class_of, Bound};
use crate::measure::{self, Measured};
use crate::prefill::{self, PrefillSweep};
use crate::sweep::{self, BatchSweep, ContextSweep};
use fusec_ir::KernelClass;

/// The version of the JSON form; bumped when a field changes meaning or goes away.
pub const SCHEMA: &str = "fusec-report/1";
/// The model's shape, as the report shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub layers: u64,
    pub parameters: u64,
    pub hidden_size: u64,
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
    pub intermediate_size: u64,
    pub vocab_size: u64,
    pub max_seq_len: u64,
    /// The checkpoint dtype.
    pub dtype: String,
    /// The sliding window, if any layer has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowInfo>,
}

/// A sliding attention window: how many layers attend to the last `positions` only
/// (their KV caches are rings of at most that many positions).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WindowInfo {
    pub positions: u64,
    pub windowed_layers: u64,
}

/// The formulas behind the estimates, with the figures they used.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostModel {
    /// The bandwidth used for memory time, GB/s.
    pub bandwidth_gbs: f64,
    /// `measured copy` or `datasheet`.
    pub bandwidth_source: String,
    pub launch_us: f64,
    /// Where the math peaks come from.
    pub math_peaks: String,
    pub kernel_time: String,
    pub step_time: String,
    pub tokens_per_s: String,
    pub dollars_per_million_tokens: String,
    pub mbu: String,
    /// What the estimate is: a roofline bound, and what it leaves out.
    pub bound: String,
}

/// What the step time is, said wherever it is shown.
pub const ROOFLINE_BOUND: &str = "a roofline bound, not a prediction: every kernel is taken to \
    stream at the full bandwidth from its first byte to its last, so memory latency, the \
    memory-level parallelism a kernel's design allows, its prologue and tail, and the gaps \
    between kernels are not modelled; step times are lower bounds and MBU an upper bound \
    (a review of the generated kernels estimated 60-70% MBU in bf16 on an H100 where this \
    model says about 96%)";

/// Totals over a whole step.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepTotals {
    pub launches: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flops: u64,
    /// Estimated microseconds.
    pub us: f64,
}

/// Totals per decoder layer: the sum over nodes inside layers, divided by the layer
/// count (so fractional where layers differ).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LayerTotals {
    pub launches: f64,
    pub bytes_read: f64,
    pub bytes_written: f64,
    pub flops: f64,
    pub us: f64,
}

/// What a variant saves against the baseline (negative where it costs more).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Saved {
    pub launches_per_step: i64,
    pub bytes_per_step: i64,
    pub launches_per_layer: f64,
    pub bytes_per_layer: f64,
    /// Baseline step time over this variant's.
    pub speedup: f64,
}

/// Estimated time of a step in one class of kernels, launch overhead excluded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassTime {
    pub class: KernelClass,
    pub label: String,
    pub us: f64,
}

/// An eager op that a fused kernel replaced, with how many of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Replaced {
    pub op: String,
    pub count: u64,
}

/// One kernel, or identical kernels that differ only in their layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KernelRow {
    /// The op token (`fused.rms_norm_linear`, `reduce.mean{axis=2,keepdim=true}`).
    pub op: String,
    /// The first instance as numbered in the variant's IR dump (`%15`).
    pub first: String,
    /// `layer` (inside decoder layers) or `step` (once per step).
    pub scope: String,
    /// Identical kernels (usually one per layer).
    pub count: u64,
    /// The result type.
    pub result: String,
    /// Eager kernel-launching ops replaced by one instance (empty for an eager op).
    pub replaces: Vec<Replaced>,
    /// Eager kernels one instance replaced (views not counted).
    pub replaced_kernels: u64,
    /// The first instance's provenance: every eager op it covers, views included, as
    /// `%N op` numbered as in the eager IR dump.
    pub covers: Vec<String>,
    pub class: KernelClass,
    /// Per instance: one launch.
    pub launches: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flops: u64,
    /// FLOPs per byte moved.
    pub intensity: f64,
    pub bound: Bound,
    /// Estimated microseconds per instance.
    pub us: f64,
    /// Estimated microseconds of all instances.
    pub total_us: f64,
}

/// One variant at the report's decode point.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VariantReport {
    pub name: String,
    pub description: String,
    pub per_step: StepTotals,
    pub per_layer: LayerTotals,
    /// Against the baseline (absent for the baseline itself).
    pub saved: Option<Saved>,
    pub floor: Floor,
    pub floor_bytes: u64,
    /// Bytes moved over the floor.
    pub floor_ratio: f64,
    pub us_per_token: f64,
    pub tokens_per_s: f64,
    pub dollars_per_million_tokens: f64,
    /// Model bandwidth utilisation: floor time over estimated step time.
    pub mbu: f64,
    /// Weights plus the KV cache after the step (activations not counted).
    pub resident_bytes: u64,
    /// Whether that fits in the GPU's memory, where known.
    pub fits: Option<bool>,
    pub time_by_class: Vec<ClassTime>,
    pub time_by_bound: BoundTime,
    pub kernels: Vec<KernelRow>,
}

/// The whole report. Its JSON form is this struct.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub model: ModelInfo,
    pub batch: u64,
    pub context: u64,
    pub precision: String,
    pub gpu: GpuSpec,
    pub cost_model: CostModel,
    pub price_per_hour: f64,
    pub variants: Vec<VariantReport>,
    pub context_sweep: ContextSweep,
    pub batch_sweep: BatchSweep,
    /// Time to first token against prompt length, when prefill graphs were given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill: Option<PrefillSweep>,
    pub gpus: Vec<GpuSpec>,
    pub measured: Measured,
    pub notes: Vec<String>,
}

/// Checks the options that do not depend on the graphs.
fn check(inputs: &Inputs<'_>) -> Result<(), ReportError> {
    let bad = |m: String| Err(ReportError::BadOption(m));
    if inputs.variants.is_empty() {
        return bad("a report needs at least one variant".into());
    }
    for (i, v) in inputs.variants.iter().enumerate() {
        if inputs.variants[..i].iter().any(|w| w.name == v.name) {
            return bad(format!("variant `{}` is given twice", v.name));
        }
    }
    if !(inputs.price_per_hour.is_finite() && inputs.price_per_hour > 0.0) {
        return bad(format!(
            "--price-per-hour must be a positive number of dollars, got {}",
            inputs.price_per_hour
        ));
    }
    let model = &inputs.spec.model;
    if inputs.contexts.is_empty() {
        return bad("the context sweep needs at least one context".into());
    }
    for &c in inputs.contexts {
        if c == 0 {
            return bad("--context: a context must be at least 1".into());
        }
        if c > model.max_seq_len {
            return bad(format!(
                "--context: context {c} is beyond max_seq_len {} of {}",
                model.max_seq_len, model.name
            ));
        }
    }
    if inputs.batches.is_empty() {
        return bad("the batch sweep needs at least one batch size".into());
    }
    for &b in inputs.batches {
        if b == 0 || b > MAX_BATCH {
            return bad(format!("--batch: {b} is not between 1 and {MAX_BATCH}"));
        }
    }
    Ok(())
}

/// Sorted, without repeats.
fn points(v: &[u64]) -> Vec<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

/// Builds the report. See the crate documentation.
pub fn build(inputs: &Inputs<'_>) -> Result<Report, ReportError> {
    check(inputs)?;
    let spec = inputs.spec;
    let gpu = inputs.gpu;
    let (batch, context) = (spec.decode.batch, spec.decode.context);
    let mut variants = Vec::with_capacity(inputs.variants.len());
    let mut baseline: Option<(Eval, f64)> = None;
    for v in inputs.variants {
        let eval = Eval::new(&v.graph, batch, context, gpu)?;
        let report = variant_report(v, &eval, baseline.as_ref(), inputs)?;
        if baseline.is_none() {
            let layer_bytes = report.per_layer.bytes_read + report.per_layer.bytes_written;
            baseline = Some((eval, layer_bytes));
        }
        variants.push(report);
    }
    let contexts = points(inputs.contexts);
    let batches = points(inputs.batches);
    let context_sweep = sweep::context_sweep(inputs, batch, &contexts)?;
    let batch_sweep = sweep::batch_sweep(inputs, context, &batches)?;
    let measured = measure::compare(inputs)?;
    let prefill = prefill::prefill_sweep(inputs)?;

    let m = &spec.model;
    let mut notes: Vec<String> = inputs.notes.to_vec();
    notes.extend(sweep::summaries(&context_sweep, &batch_sweep, gpu));
    let off_roofline: Vec<String> = variants
        .iter()
        .filter_map(|v| {
            let n: u64 = v
                .kernels
                .iter()
                .filter(|k| k.flops == 0)
                .map(|k| k.count)
                .sum();
            (n > 0).then(|| format!("{} {}", n, v.name))
        })
        .collect();
    if !off_roofline.is_empty() {
        notes.push(format!(
            "Kernels without FLOPs (copies, appends) have no arithmetic intensity and are \
             left off the roofline plot: {} kernels per step.",
            off_roofline.join(", ")
        ));
    }
    Ok(Report {
        schema: SCHEMA,
        model: ModelInfo {
            name: m.name.clone(),
            layers: m.num_layers,
            parameters: m.parameter_count(),
            hidden_size: m.hidden_size,
            num_heads: m.num_heads,
            num_kv_heads: m.num_kv_heads,
            head_dim: m.head_dim,
            intermediate_size: m.intermediate_size,
            vocab_size: m.vocab_size,
            max_seq_len: m.max_seq_len,
            dtype: m.dtype.to_string(),
            window: m.sliding_window.and_then(|positions| {
                let windowed_layers = (0..m.num_layers)
                    .filter(|&l| m.layer_window(l).is_some())
                    .count() as u64;
                (windowed_layers > 0).then_some(WindowInfo {
                    positions,
                    windowed_layers,
                })
            }),
        },
        batch,
        context,
        precision: inputs.precision.to_string(),
        gpu: gpu.clone(),
        cost_model: CostModel {
            bandwidth_gbs: gpu.bandwidth_gbs(),
            bandwidth_source: gpu.bandwidth_source().to_string(),
            launch_us: gpu.launch_us,
            math_peaks: "datasheet dense peaks: f32, bf16 (also f16), fp8 (bf16 where the \
                         GPU has no FP8 tensor cores)"
                .to_string(),
            kernel_time: "launch_us + max(bytes / bandwidth, flops / peak(dtype of the result))"
                .to_string(),
            step_time: "the sum over the step's kernels (no overlap between kernels)".to_string(),
            tokens_per_s: "batch / step_seconds".to_string(),
            dollars_per_million_tokens: "price_per_hour / 3600 / tokens_per_s * 1e6".to_string(),
            mbu: "(floor_bytes / bandwidth) / step_seconds".to_string(),
            bound: ROOFLINE_BOUND.to_string(),
        },
        price_per_hour: inputs.price_per_hour,
        variants,
        context_sweep,
        batch_sweep,
        prefill,
        gpus: inputs.gpus.to_vec(),
        measured,
        notes,
    })
}

/// The canonical `%N` of every node: its position in the topological order the text
/// printer numbers values by.
fn value_numbers(graph: &Graph) -> HashMap<NodeId, usize> {
    graph
        .topo_order()
        .unwrap_or_else(|_| graph.node_ids().collect())
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, i))
        .collect()
}

/// Counts of the kernel-launching eager ops in a provenance's `covers` list (entries
/// `%N op.name`), most frequent first, then by first appearance. Views launch nothing
/// and are left out.
pub(crate) fn replaced(covers: &[String]) -> Vec<Replaced> {
    let mut out: Vec<Replaced> = Vec::new();
    for c in covers {
        let op = c.split_once(' ').map_or(c.as_str(), |(_, op)| op).trim();
        if op.is_empty() || op.starts_with("view.") || op == "get" {
            continue;
        }
        match out.iter_mut().find(|r| r.op == op) {
            Some(r) => r.count += 1,
            None => out.push(Replaced {
                op: op.to_string(),
                count: 1,
            }),
        }
    }
    // A stable sort keeps first appearance among equal counts.
    out.sort_by_key(|r| std::cmp::Reverse(r.count));
    out
}

fn variant_report(
    v: &Variant,
    eval: &Eval,
    baseline: Option<&(Eval, f64)>,
    inputs: &Inputs<'_>,
) -> Result<VariantReport, ReportError> {
    let gpu = inputs.gpu;
    let graph = &v.graph;
    let c = &eval.cost;
    let layers = f64::from(c.layers.max(1));
    let numbers = value_numbers(graph);

    let mut kernels: Vec<KernelRow> = Vec::new();
    type Key = (bool, String, String, Vec<String>, [u64; 4]);
    let mut index: HashMap<Key, usize> = HashMap::new();
    let mut in_layer_s = 0.0;
    let mut by_class = [0.0f64; 4];
    for ((id, cost), time) in c.nodes.iter().zip(&eval.times) {
        let node = graph.node(*id);
        let in_layer = node.layer.is_some();
        if in_layer {
            in_layer_s += time.total();
        }
        let class = class_of(&node.op);
        by_class[class as usize] += time.work();
        let op = node.op.to_string();
        let result = node.ty.to_string();
        let key: Key = (
            in_layer,
            op.clone(),
            result.clone(),
            node.provenance.covers.iter().map(|s| cover_op(s)).collect(),
            [
                cost.launches,
                cost.bytes_read,
                cost.bytes_written,
                cost.flops,
            ],
        );
        if let Some(&i) = index.get(&key) {
            kernels[i].count += 1;
            kernels[i].total_us += time.total() * 1e6;
            continue;
        }
        let replaces = replaced(&node.provenance.covers);
        let bytes = cost.bytes();
        index.insert(key, kernels.len());
        kernels.push(KernelRow {
            op,
            first: format!("%{}", numbers.get(id).copied().unwrap_or(id.index())),
            scope: if in_layer { "layer" } else { "step" }.to_string(),
            count: 1,
            result,
            replaced_kernels: replaces.iter().map(|r| r.count).sum(),
            replaces,
            covers: node.provenance.covers.clone(),
            class,
            launches: cost.launches,
            bytes_read: cost.bytes_read,
            bytes_written: cost.bytes_written,
            flops: cost.flops,
            intensity: if bytes == 0 {
                0.0
            } else {
                cost.flops as f64 / bytes as f64
            },
            bound: time.bound(),
            us: time.total() * 1e6,
            total_us: time.total() * 1e6,
        });
    }

    let per_step = StepTotals {
        launches: c.total.launches,
        bytes_read: c.total.bytes_read,
        bytes_written: c.total.bytes_written,
        flops: c.total.flops,
        us: eval.step_s * 1e6,
    };
    let l = &c.in_layers;
    let per_layer = LayerTotals {
        launches: l.launches as f64 / layers,
        bytes_read: l.bytes_read as f64 / layers,
        bytes_written: l.bytes_written as f64 / layers,
        flops: l.flops as f64 / layers,
        us: in_layer_s * 1e6 / layers,
    };
    let saved = baseline.map(|(b, b_layer_bytes)| {
        let bl = &b.cost;
        Saved {
            launches_per_step: bl.total.launches as i64 - c.total.launches as i64,
            bytes_per_step: bl.total.bytes() as i64 - c.total.bytes() as i64,
            launches_per_layer: bl.launches_per_layer() - c.launches_per_layer(),
            bytes_per_layer: b_layer_bytes - (per_layer.bytes_read + per_layer.bytes_written),
            speedup: b.step_s / eval.step_s,
        }
    });
    let tokens_per_s = eval.tokens_per_s();
    let resident = eval.resident_bytes();
    let time_by_class = KernelClass::ALL
        .iter()
        .map(|&k| ClassTime {
            class: k,
            label: k.label().to_string(),
            us: by_class[k as usize] * 1e6,
        })
        .collect();
    Ok(VariantReport {
        name: v.name.clone(),
        description: v.description.clone(),
        per_step,
        per_layer,
        saved,
        floor: c.floor,
        floor_bytes: c.floor.total(),
        floor_ratio: c.floor_ratio(),
        us_per_token: eval.us_per_token(),
        tokens_per_s,
        dollars_per_million_tokens: dollars_per_million_tokens(inputs.price_per_hour, tokens_per_s),
        mbu: eval.mbu(gpu),
        resident_bytes: resident,
        fits: fits(gpu, resident),
        time_by_class,
        time_by_bound: eval.by_bound(),
        kernels,
    })
}

/// The op of a `covers` entry, without the eager value number, so that the same
/// kernel in two layers (which replaced differently numbered ops) groups together.
fn cover_op(entry: &str) -> String {
    entry
        .split_once(' ')
        .map_or(entry, |(_, op)| op)
        .trim()
        .to_string()
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_count_launching_ops_only() {
        let covers: Vec<String> = [
            "%34 linear",
            "%32 binary.mul",
            "%31 cast",
            "%30 binary.mul",
            "%73 view.transpose",
            "%38 linear",
            "%9 get",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let r = replaced(&covers);
        let names: Vec<(&str, u64)> = r.iter().map(|r| (r.op.as_str(), r.count)).collect();
        assert_eq!(names, [("linear", 2), ("binary.mul", 2), ("cast", 1)]);
    }
}

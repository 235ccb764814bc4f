//! The per-step summary `fusec compile` prints and writes as JSON.

use std::fmt::Write;

use fusec_ir::cost::{graph_cost, GraphCost};
use fusec_ir::frontend::ModelSpec;
use fusec_ir::shape::UnboundSymbol;
use fusec_ir::Graph;
use serde::Serialize;

/// Costs of one variant (eager, fused…) of the decode step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VariantSummary {
    pub launches_total: u64,
    pub launches_per_layer: f64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flops: u64,
    pub floor_bytes: u64,
    /// Bytes moved per step over the floor.
    pub floor_ratio: f64,
}

impl VariantSummary {
    pub fn from_cost(c: &GraphCost) -> Self {
        Self {
            launches_total: c.total.launches,
            launches_per_layer: c.launches_per_layer(),
            bytes_read: c.total.bytes_read,
            bytes_written: c.total.bytes_written,
            flops: c.total.flops,
            floor_bytes: c.floor.total(),
            floor_ratio: c.floor_ratio(),
        }
    }
}

/// The `--report-json` object.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub model: String,
    pub layers: u64,
    pub batch: u64,
    pub context: u64,
    pub precision: String,
    pub gpu: String,
    pub eager: VariantSummary,
    #[serde(skip)]
    pub eager_cost: GraphCost,
}

impl Summary {
    pub fn new(spec: &ModelSpec, eager: &Graph) -> Result<Self, UnboundSymbol> {
        let cost = graph_cost(eager, &crate::pipeline::bindings(spec))?;
        Ok(Self {
            model: spec.model.name.clone(),
            layers: spec.model.num_layers,
            batch: spec.decode.batch,
            context: spec.decode.context,
            precision: spec.target.precision.name().to_string(),
            gpu: spec.target.gpu.clone(),
            eager: VariantSummary::from_cost(&cost),
            eager_cost: cost,
        })
    }

    /// The human-readable summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "model {}: {} layers, batch {}, context {}, precision {}, gpu {}",
            self.model, self.layers, self.batch, self.context, self.precision, self.gpu
        );
        let e = &self.eager;
        let f = &self.eager_cost.floor;
        let _ = writeln!(
            out,
            "eager: {:.1} launches/layer, {} launches/step",
            e.launches_per_layer, e.launches_total
        );
        let _ = writeln!(
            out,
            "       {} read + {} written per step, {} FLOPs",
            human_bytes(e.bytes_read),
            human_bytes(e.bytes_written),
            human_count(e.flops)
        );
        let _ = writeln!(
            out,
            "floor: {} = weights {} + KV read {} + KV write {} + io {}",
            human_bytes(e.floor_bytes),
            human_bytes(f.weight_bytes),
            human_bytes(f.kv_read_bytes),
            human_bytes(f.kv_write_bytes),
            human_bytes(f.io_bytes)
        );
        let _ = writeln!(out, "eager moves {:.2}x the floor", e.floor_ratio);
        out
    }
}

/// `1.23 GB`, with decimal units.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    for (unit, scale) in [("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)] {
        if b >= scale {
            return format!("{:.2} {unit}", b / scale);
        }
    }
    format!("{b} B")
}

/// `4.56 G`, with decimal units.
pub fn human_count(n: u64) -> String {
    let n = n as f64;
    for (unit, scale) in [("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)] {
        if n >= scale {
            return format!("{:.2} {unit}", n / scale);
        }
    }
    format!("{n}")
}

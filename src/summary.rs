//! The per-step summary `fusec compile` prints and writes as JSON.

use std::fmt::Write;

use fusec_ir::cost::{estimate_seconds, graph_cost, GraphCost};
use fusec_ir::hardware::GpuSpec;
use fusec_ir::shape::{Bindings, UnboundSymbol};
use fusec_ir::step;
use fusec_ir::Graph;
use fusec_model::frontend::ModelSpec;
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
    /// Estimated microseconds per token on the target GPU.
    pub est_us_per_token: f64,
    #[serde(skip)]
    pub cost: GraphCost,
}

impl VariantSummary {
    pub fn new(graph: &Graph, spec: &ModelSpec, gpu: &GpuSpec) -> Result<Self, UnboundSymbol> {
        Self::with_bindings(graph, spec, gpu, &crate::pipeline::bindings(spec))
    }

    /// The costs of `graph` under `bindings` (a paged step's real lengths,
    /// [`PagedSummary::bindings`]). The launches are the target GPU's: the kernels
    /// CUDA launches (`GraphCost::cuda_launches`), two for a paged attention.
    pub fn with_bindings(
        graph: &Graph,
        spec: &ModelSpec,
        gpu: &GpuSpec,
        bindings: &Bindings,
    ) -> Result<Self, UnboundSymbol> {
        let c = graph_cost(graph, bindings)?;
        // One step yields one token per sequence.
        let us = estimate_seconds(graph, &c, gpu) * 1e6 / spec.decode.batch as f64;
        Ok(Self {
            launches_total: c.cuda_launches,
            launches_per_layer: c.cuda_launches_per_layer(),
            bytes_read: c.total.bytes_read,
            bytes_written: c.total.bytes_written,
            flops: c.total.flops,
            floor_bytes: c.floor.total(),
            floor_ratio: c.floor_ratio(),
            est_us_per_token: us,
            cost: c,
        })
    }

    fn bytes(&self) -> u64 {
        self.bytes_read + self.bytes_written
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused: Option<VariantSummary>,
    /// The paged KV cache of a paged step (`fusec compile --paged`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paged: Option<PagedSummary>,
}

/// A paged step's KV cache: its blocks, the sequences' lengths the costs are counted
/// from, and the KV traffic they give.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PagedSummary {
    /// Positions per block.
    pub block_size: u64,
    /// Positions each sequence holds after the step, its new entry included.
    pub lengths: Vec<u64>,
    /// Bytes of keys and values the step's attention reads: every layer's attended
    /// positions (a sliding window's at most the window).
    pub kv_read_bytes: u64,
    /// Bytes of keys and values the step writes: one entry per sequence and layer.
    pub kv_write_bytes: u64,
}

impl PagedSummary {
    /// The bindings of the step: `B` sequences of these lengths, tables as wide as the
    /// model's `max_seq_len` needs (`fusec_ir::step::paged_bindings`).
    pub fn bindings(block_size: u64, lengths: &[u64], spec: &ModelSpec) -> Bindings {
        step::paged_bindings(lengths, block_size, spec.model.max_seq_len)
    }
}

impl Summary {
    pub fn new(
        spec: &ModelSpec,
        gpu: &GpuSpec,
        eager: &Graph,
        fused: Option<&Graph>,
    ) -> Result<Self, UnboundSymbol> {
        Self::with_bindings(
            spec,
            gpu,
            eager,
            fused,
            &crate::pipeline::bindings(spec),
            None,
        )
    }

    /// The summary of a paged step of blocks of `block_size` positions whose
    /// sequences hold `lengths` positions after it (`spec.decode.batch` of them).
    pub fn paged(
        spec: &ModelSpec,
        gpu: &GpuSpec,
        eager: &Graph,
        fused: Option<&Graph>,
        block_size: u64,
        lengths: Vec<u64>,
    ) -> Result<Self, UnboundSymbol> {
        let b = PagedSummary::bindings(block_size, &lengths, spec);
        let paged = PagedSummary {
            block_size,
            lengths,
            kv_read_bytes: 0,
            kv_write_bytes: 0,
        };
        Self::with_bindings(spec, gpu, eager, fused, &b, Some(paged))
    }

    fn with_bindings(
        spec: &ModelSpec,
        gpu: &GpuSpec,
        eager: &Graph,
        fused: Option<&Graph>,
        b: &Bindings,
        mut paged: Option<PagedSummary>,
    ) -> Result<Self, UnboundSymbol> {
        let eager = VariantSummary::with_bindings(eager, spec, gpu, b)?;
        if let Some(p) = &mut paged {
            p.kv_read_bytes = eager.cost.floor.kv_read_bytes;
            p.kv_write_bytes = eager.cost.floor.kv_write_bytes;
        }
        Ok(Self {
            model: spec.model.name.clone(),
            layers: spec.model.num_layers,
            batch: spec.decode.batch,
            context: spec.decode.context,
            precision: spec.target.precision.name().to_string(),
            gpu: gpu.name.to_string(),
            eager,
            fused: fused
                .map(|f| VariantSummary::with_bindings(f, spec, gpu, b))
                .transpose()?,
            paged,
        })
    }

    /// The human-readable summary: eager next to fused.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "model {}: {} layers, batch {}, context {}, precision {}, gpu {}",
            self.model, self.layers, self.batch, self.context, self.precision, self.gpu
        );
        if let Some(p) = &self.paged {
            let lengths: Vec<String> = p.lengths.iter().map(u64::to_string).collect();
            let _ = writeln!(
                out,
                "paged KV cache: blocks of {} positions, sequence lengths {}: KV read {}, KV write {} per step",
                p.block_size,
                lengths.join(","),
                human_bytes(p.kv_read_bytes),
                human_bytes(p.kv_write_bytes)
            );
        }
        let e = &self.eager;
        let mut cols = vec![("eager", e)];
        if let Some(f) = &self.fused {
            cols.push(("fused", f));
        }
        let _ = write!(out, "{:<18}", "");
        for (name, _) in &cols {
            let _ = write!(out, "{name:>14}");
        }
        if cols.len() == 2 {
            let _ = write!(out, "{:>14}", "saved");
        }
        out.push('\n');
        type Row<'a> = (
            &'a str,
            Box<dyn Fn(&VariantSummary) -> String>,
            Option<String>,
        );
        let saved = self.fused.as_ref().map(|f| {
            (
                format!("{}", e.launches_total as i64 - f.launches_total as i64),
                human_bytes(e.bytes().saturating_sub(f.bytes())),
                format!("{:.2}x", e.est_us_per_token / f.est_us_per_token.max(1e-12)),
            )
        });
        let rows: Vec<Row<'_>> = vec![
            (
                "launches/layer",
                Box::new(|v| format!("{:.1}", v.launches_per_layer)),
                None,
            ),
            (
                "launches/step",
                Box::new(|v| v.launches_total.to_string()),
                saved.as_ref().map(|s| s.0.clone()),
            ),
            (
                "bytes read/step",
                Box::new(|v| human_bytes(v.bytes_read)),
                None,
            ),
            (
                "bytes written/step",
                Box::new(|v| human_bytes(v.bytes_written)),
                None,
            ),
            (
                "bytes/step",
                Box::new(|v| human_bytes(v.bytes())),
                saved.as_ref().map(|s| s.1.clone()),
            ),
            ("FLOPs/step", Box::new(|v| human_count(v.flops)), None),
            ("floor/step", Box::new(|v| human_bytes(v.floor_bytes)), None),
            (
                "x floor",
                Box::new(|v| format!("{:.3}", v.floor_ratio)),
                None,
            ),
            (
                "est. us/token",
                Box::new(|v| format!("{:.1}", v.est_us_per_token)),
                saved.as_ref().map(|s| s.2.clone()),
            ),
        ];
        for (label, value, save) in rows {
            let _ = write!(out, "{label:<18}");
            for (_, v) in &cols {
                let _ = write!(out, "{:>14}", value(v));
            }
            if let Some(s) = save {
                let _ = write!(out, "{s:>14}");
            }
            out.push('\n');
        }
        let f = &e.cost.floor;
        let _ = writeln!(
            out,
            "eager floor: {} = weights {} + KV read {} + KV write {} + io {}",
            human_bytes(e.floor_bytes),
            human_bytes(f.weight_bytes),
            human_bytes(f.kv_read_bytes),
            human_bytes(f.kv_write_bytes),
            human_bytes(f.io_bytes)
        );
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

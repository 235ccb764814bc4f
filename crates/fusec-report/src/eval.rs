//! One graph evaluated at one decode point: its costs under the cost model and every
//! kernel's time, and the per-token figures derived from them. Every figure of the
//! report, at its own point or a sweep's, comes from an [`Eval`].

use fusec_ir::cost::{graph_cost, GraphCost};
use fusec_ir::hardware::GpuSpec;
use fusec_ir::step;
use fusec_ir::{Bindings, Graph};
use serde::Serialize;

use crate::error::ReportError;
use crate::kernel::{kernel_time, Bound, KernelTime};

/// A step's time split by what bounds each kernel: launch overheads, the memory time
/// of memory-bound kernels, the math time of compute-bound ones. The parts sum to the
/// step time.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BoundTime {
    pub launch_us: f64,
    pub memory_us: f64,
    pub compute_us: f64,
}

impl BoundTime {
    /// The largest part.
    pub fn bound(&self) -> Bound {
        if self.launch_us > self.memory_us.max(self.compute_us) {
            Bound::Launch
        } else if self.compute_us > self.memory_us {
            Bound::Compute
        } else {
            Bound::Memory
        }
    }
}

/// Dollars per million tokens at `price_per_hour` dollars per GPU-hour when the GPU
/// produces `tokens_per_s` tokens per second: the hour's price spread over the tokens
/// of an hour, `price_per_hour / 3600 / tokens_per_s * 1e6`.
pub fn dollars_per_million_tokens(price_per_hour: f64, tokens_per_s: f64) -> f64 {
    price_per_hour / 3600.0 / tokens_per_s * 1e6
}

/// The bindings of a step of `batch` sequences whose KV length is `context` after it.
pub fn bindings(batch: u64, context: u64) -> Bindings {
    step::bindings_for_context(batch, context)
}

/// One graph evaluated at one point: its costs and every kernel's time.
#[derive(Clone, Debug)]
pub(crate) struct Eval {
    pub cost: GraphCost,
    pub times: Vec<KernelTime>,
    pub step_s: f64,
    pub batch: u64,
}

impl Eval {
    pub fn new(
        graph: &Graph,
        batch: u64,
        context: u64,
        gpu: &GpuSpec,
    ) -> Result<Eval, ReportError> {
        let cost = graph_cost(graph, &bindings(batch, context))?;
        let times: Vec<KernelTime> = cost
            .nodes
            .iter()
            .map(|(id, c)| kernel_time(graph, *id, c, gpu))
            .collect();
        // Summed in node order, as `estimate_seconds` sums, so the two agree exactly.
        let step_s = times.iter().map(KernelTime::total).sum();
        if cost.total.launches == 0 {
            return Err(ReportError::BadOption(format!(
                "graph `{}` launches no kernels",
                graph.name
            )));
        }
        Ok(Eval {
            cost,
            times,
            step_s,
            batch,
        })
    }

    pub fn tokens_per_s(&self) -> f64 {
        self.batch as f64 / self.step_s
    }

    pub fn us_per_token(&self) -> f64 {
        self.step_s * 1e6 / self.batch as f64
    }

    pub fn by_bound(&self) -> BoundTime {
        let mut t = BoundTime::default();
        for k in &self.times {
            t.launch_us += k.launch_s * 1e6;
            if k.math_s > k.memory_s {
                t.compute_us += k.math_s * 1e6;
            } else {
                t.memory_us += k.memory_s * 1e6;
            }
        }
        t
    }

    /// Weights plus the KV cache after the step.
    pub fn resident_bytes(&self) -> u64 {
        let f = &self.cost.floor;
        f.weight_bytes + f.kv_read_bytes + f.kv_write_bytes
    }

    pub fn mbu(&self, gpu: &GpuSpec) -> f64 {
        gpu.memory_seconds(self.cost.floor.total()) / self.step_s
    }
}

/// Whether `bytes` fit in the GPU's memory, where it is known.
pub(crate) fn fits(gpu: &GpuSpec, bytes: u64) -> Option<bool> {
    gpu.memory_gb.map(|gb| bytes as f64 <= gb * 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_per_million_tokens_spreads_the_hourly_price() {
        // $3.60 an hour is $0.001 a second; at 1000 tokens/s that is $1e-6 a token,
        // $1 per million tokens.
        assert!((dollars_per_million_tokens(3.6, 1000.0) - 1.0).abs() < 1e-12);
        // Twice the throughput halves the cost; twice the price doubles it.
        let base = dollars_per_million_tokens(2.5, 185.0);
        assert!((dollars_per_million_tokens(2.5, 370.0) - base / 2.0).abs() < 1e-12);
        assert!((dollars_per_million_tokens(5.0, 185.0) - base * 2.0).abs() < 1e-12);
        assert!((base - 2.5 / 3600.0 / 185.0 * 1e6).abs() < 1e-12);
    }

    #[test]
    fn step_time_is_the_cost_models_estimate() {
        let spec = fusec_model::parse_model_toml(
            std::path::Path::new("m.toml"),
            "[model]\narchitecture = \"llama\"\nhidden_size = 64\nnum_layers = 2\n\
             num_heads = 4\nintermediate_size = 128\nvocab_size = 100\n\
             rope_theta = 10000.0\nrms_norm_eps = 1e-5\nmax_seq_len = 256\n",
        )
        .expect("valid model");
        let graph = fusec_model::arch::llama::build(&spec.model).expect("builds");
        let gpu = fusec_ir::hardware::gpu("l4").expect("built in");
        let eval = Eval::new(&graph, 3, 200, gpu).expect("costs");
        let expected = fusec_ir::cost::estimate_seconds(&graph, &eval.cost, gpu);
        assert_eq!(eval.step_s, expected);
        let parts = eval.by_bound();
        let sum = (parts.launch_us + parts.memory_us + parts.compute_us) * 1e-6;
        assert!((sum - eval.step_s).abs() < 1e-15);
        assert_eq!(eval.tokens_per_s(), 3.0 / eval.step_s);
    }
}

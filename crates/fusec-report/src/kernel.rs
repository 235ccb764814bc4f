//! One kernel's estimated time, what bounds it, and which class of work it does.
//!
//! The time model is `fusec_ir::hardware::GpuSpec::kernel_seconds`: a launch overhead plus the
//! larger of the memory time (bytes over bandwidth) and the math time (FLOPs over the
//! peak of the result's dtype). [`kernel_time`] splits that sum into its parts so the
//! report can say why a kernel takes the time it does; its total is computed with the
//! same operations in the same order, so summing it over a graph reproduces
//! `fusec_ir::cost::estimate_seconds` exactly.

use fusec_ir::cost::Cost;
use fusec_ir::hardware::GpuSpec;
use fusec_ir::{Graph, KernelClass, NodeId, Op};
use serde::Serialize;

/// What limits a kernel's estimated time.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    /// Moving its bytes takes longer than its math.
    Memory,
    /// Its math takes longer than moving its bytes.
    Compute,
    /// The launch overhead alone exceeds both: the kernel is too small to matter
    /// except as a launch.
    Launch,
}

impl Bound {
    pub fn name(self) -> &'static str {
        match self {
            Bound::Memory => "memory",
            Bound::Compute => "compute",
            Bound::Launch => "launch",
        }
    }
}

/// The parts of one kernel's estimated time, in seconds.
#[derive(Copy, Clone, Debug, Default, PartialEq, Serialize)]
pub struct KernelTime {
    pub launch_s: f64,
    pub memory_s: f64,
    pub math_s: f64,
}

impl KernelTime {
    /// Launch overhead plus the larger of memory and math time.
    pub fn total(&self) -> f64 {
        self.launch_s + self.memory_s.max(self.math_s)
    }

    /// The time beyond the launch overhead.
    pub fn work(&self) -> f64 {
        self.memory_s.max(self.math_s)
    }

    pub fn bound(&self) -> Bound {
        if self.launch_s > self.work() {
            Bound::Launch
        } else if self.math_s > self.memory_s {
            Bound::Compute
        } else {
            Bound::Memory
        }
    }
}

pub use fusec_ir::cost::math_dtype;

/// The estimated time of node `id`, whose cost is `cost`, on `gpu`.
pub fn kernel_time(graph: &Graph, id: NodeId, cost: &Cost, gpu: &GpuSpec) -> KernelTime {
    KernelTime {
        launch_s: gpu.launch_us * 1e-6,
        memory_s: gpu.memory_seconds(cost.bytes()),
        math_s: gpu.math_seconds(cost.flops, math_dtype(graph, id)),
    }
}

/// The class of a launching node's kernel, from the op table. The report's per-kernel
/// figures only ever hold launching nodes (`fusec_ir::cost::GraphCost::nodes`), so the
/// fallback for an op that launches nothing is never taken.
pub fn class_of(op: &Op) -> KernelClass {
    op.kernel_class().unwrap_or(KernelClass::Elementwise)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(launch_s: f64, memory_s: f64, math_s: f64) -> KernelTime {
        KernelTime {
            launch_s,
            memory_s,
            math_s,
        }
    }

    #[test]
    fn the_largest_part_bounds_a_kernel() {
        assert_eq!(t(1e-6, 5e-6, 1e-6).bound(), Bound::Memory);
        assert_eq!(t(1e-6, 1e-6, 5e-6).bound(), Bound::Compute);
        assert_eq!(t(1e-6, 1e-7, 2e-7).bound(), Bound::Launch);
        assert_eq!(t(1e-6, 5e-6, 1e-6).total(), 6e-6);
    }

    #[test]
    fn parts_reproduce_the_gpu_time_model() {
        let gpu = fusec_ir::hardware::gpu("h100-sxm").expect("built in");
        let k = KernelTime {
            launch_s: gpu.launch_us * 1e-6,
            memory_s: gpu.memory_seconds(1 << 30),
            math_s: gpu.math_seconds(1 << 40, fusec_ir::DType::Bf16),
        };
        assert_eq!(
            k.total(),
            gpu.kernel_seconds(1 << 30, 1 << 40, fusec_ir::DType::Bf16)
        );
    }
}

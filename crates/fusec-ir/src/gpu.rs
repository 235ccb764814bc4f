//! Target GPUs for the cost model: datasheet figures, and measured ones where a machine
//! lent here was measured (GUIDE §5). Every figure says where it came from.

use crate::dtype::DType;

/// A GPU's figures. Bandwidths in GB/s, throughputs in TFLOP/s (dense).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Gpu {
    pub name: &'static str,
    pub description: &'static str,
    /// HBM bandwidth from the vendor datasheet.
    pub hbm_gbs: f64,
    /// A device-to-device copy measured on a lent machine, if any.
    pub measured_copy_gbs: Option<f64>,
    pub f32_tflops: f64,
    pub bf16_tflops: f64,
    /// `None` where the GPU has no FP8 tensor cores.
    pub fp8_tflops: Option<f64>,
    /// Overhead per kernel launch, in microseconds (GUIDE §1: 3-5 us eager, ~1.3 us
    /// under CUDA graphs; we charge the CUDA-graph figure to every variant alike).
    pub launch_us: f64,
    pub source: &'static str,
}

impl Gpu {
    /// The bandwidth the cost model uses: measured where known, else the datasheet.
    pub fn bandwidth_gbs(&self) -> f64 {
        self.measured_copy_gbs.unwrap_or(self.hbm_gbs)
    }

    /// Which bandwidth figure [`Gpu::bandwidth_gbs`] uses.
    pub fn bandwidth_source(&self) -> &'static str {
        if self.measured_copy_gbs.is_some() {
            "measured copy"
        } else {
            "datasheet"
        }
    }

    /// Peak throughput for math in `dtype`, TFLOP/s.
    pub fn peak_tflops(&self, dtype: DType) -> f64 {
        match dtype {
            DType::F16 | DType::Bf16 => self.bf16_tflops,
            DType::Fp8E4M3 | DType::Fp8E5M2 => self.fp8_tflops.unwrap_or(self.bf16_tflops),
            DType::F32 | DType::I32 => self.f32_tflops,
        }
    }

    /// Estimated seconds for one kernel: launch overhead plus the larger of its memory
    /// time and its math time.
    pub fn kernel_seconds(&self, bytes: u64, flops: u64, dtype: DType) -> f64 {
        let memory = bytes as f64 / (self.bandwidth_gbs() * 1e9);
        let math = flops as f64 / (self.peak_tflops(dtype) * 1e12);
        self.launch_us * 1e-6 + memory.max(math)
    }
}

/// The built-in GPUs.
pub const GPUS: &[Gpu] = &[
    Gpu {
        name: "h100-sxm",
        description: "NVIDIA H100 SXM 80GB",
        hbm_gbs: 3350.0,
        measured_copy_gbs: Some(3000.0),
        f32_tflops: 67.0,
        bf16_tflops: 989.0,
        fp8_tflops: Some(1979.0),
        launch_us: 1.3,
        source: "NVIDIA H100 datasheet; copy measured on a lent H100 (GUIDE §5)",
    },
    Gpu {
        name: "h200-sxm",
        description: "NVIDIA H200 SXM 141GB",
        hbm_gbs: 4800.0,
        measured_copy_gbs: Some(4300.0),
        f32_tflops: 67.0,
        bf16_tflops: 989.0,
        fp8_tflops: Some(1979.0),
        launch_us: 1.3,
        source: "NVIDIA H200 datasheet; copy measured on a lent H200 (GUIDE §5)",
    },
    Gpu {
        name: "a100-sxm",
        description: "NVIDIA A100 SXM 80GB",
        hbm_gbs: 2039.0,
        measured_copy_gbs: None,
        f32_tflops: 19.5,
        bf16_tflops: 312.0,
        fp8_tflops: None,
        launch_us: 1.3,
        source: "NVIDIA A100 datasheet",
    },
    Gpu {
        name: "l40s",
        description: "NVIDIA L40S",
        hbm_gbs: 864.0,
        measured_copy_gbs: None,
        f32_tflops: 91.6,
        bf16_tflops: 362.0,
        fp8_tflops: Some(733.0),
        launch_us: 1.3,
        source: "NVIDIA L40S datasheet",
    },
    Gpu {
        name: "l4",
        description: "NVIDIA L4",
        hbm_gbs: 300.0,
        measured_copy_gbs: None,
        f32_tflops: 30.3,
        bf16_tflops: 121.0,
        fp8_tflops: Some(242.0),
        launch_us: 1.3,
        source: "NVIDIA L4 datasheet",
    },
];

/// The built-in GPU called `name`.
pub fn gpu(name: &str) -> Option<&'static Gpu> {
    GPUS.iter().find(|g| g.name == name)
}

/// The names of the built-in GPUs, for messages.
pub fn gpu_names() -> Vec<&'static str> {
    GPUS.iter().map(|g| g.name).collect()
}

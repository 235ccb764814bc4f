//! Target GPUs for the cost model: datasheet figures, and measured ones where a machine
//! lent here was measured (BENCHMARKS.md, "GPU figures of the cost model"). Every
//! figure says where it came from.
//!
//! The built-in table is [`GPUS`]; users add their own GPUs in a TOML file (format
//! below), read by `fusec_model::frontend::parse_gpu_file` into owned [`GpuSpec`] values
//! that work everywhere a built-in one does.
//!
//! ```toml
//! [[gpu]]
//! name = "rtx-4090"                    # unique, not a built-in name
//! description = "NVIDIA GeForce RTX 4090"
//! hbm_gbs = 1008.0                     # datasheet memory bandwidth, GB/s
//! f32_tflops = 82.6                    # dense datasheet throughputs, TFLOP/s
//! bf16_tflops = 165.2
//! fp8_tflops = 330.3                   # optional: omit without FP8 tensor cores
//! measured_copy_gbs = 910.0            # optional: a measured device-to-device copy
//! measured_bf16_tflops = 150.0         # optional: a measured bf16 GEMM
//! memory_gb = 24.0                     # optional: device memory
//! launch_us = 1.3                      # optional (default 1.3): overhead per launch
//! source = "NVIDIA Ada whitepaper; copy measured with nvbandwidth"
//! ```

use std::borrow::Cow;

use crate::dtype::DType;

/// The launch overhead charged when a GPU file does not give one: the per-kernel cost
/// under CUDA graphs (NVIDIA's CUDA Graphs documentation and gpt-fast report about
/// 1-1.5 us), which the built-in GPUs use too.
pub const DEFAULT_LAUNCH_US: f64 = 1.3;

/// A GPU's figures. Bandwidths in GB/s, throughputs in TFLOP/s (dense).
///
/// The strings are `Cow` so that the built-in table is a `const` of borrowed strings
/// while GPUs read from a user's file own theirs.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GpuSpec {
    pub name: Cow<'static, str>,
    pub description: Cow<'static, str>,
    /// HBM bandwidth from the vendor datasheet.
    pub hbm_gbs: f64,
    /// A device-to-device copy measured on a lent machine, if any.
    pub measured_copy_gbs: Option<f64>,
    pub f32_tflops: f64,
    pub bf16_tflops: f64,
    /// A bf16 GEMM measured on a lent machine, if any. Shown next to the datasheet
    /// figure; the cost model's math time uses the datasheet peaks (see
    /// [`GpuSpec::peak_tflops`]), since no FP8 figure was measured to pair with it.
    pub measured_bf16_tflops: Option<f64>,
    /// `None` where the GPU has no FP8 tensor cores.
    pub fp8_tflops: Option<f64>,
    /// Device memory in GB, where known, to flag batches whose KV cache cannot fit.
    pub memory_gb: Option<f64>,
    /// Overhead per kernel launch, in microseconds (3-5 us for an eager launch, about
    /// 1.3 us under CUDA graphs; we charge the CUDA-graph figure to every variant alike).
    pub launch_us: f64,
    pub source: Cow<'static, str>,
}

impl GpuSpec {
    /// The bandwidth the cost model uses: measured where known, else the datasheet.
    pub fn bandwidth_gbs(&self) -> f64 {
        self.measured_copy_gbs.unwrap_or(self.hbm_gbs)
    }

    /// Which bandwidth figure [`GpuSpec::bandwidth_gbs`] uses.
    pub fn bandwidth_source(&self) -> &'static str {
        if self.measured_copy_gbs.is_some() {
            "measured copy"
        } else {
            "datasheet"
        }
    }

    /// Peak throughput for math in `dtype`, TFLOP/s (datasheet, dense).
    pub fn peak_tflops(&self, dtype: DType) -> f64 {
        match dtype {
            DType::F16 | DType::Bf16 => self.bf16_tflops,
            // Integer tensor-core math runs at the FP8 rate on the GPUs of the table.
            DType::Fp8E4M3 | DType::Fp8E5M2 | DType::I8 | DType::I4 | DType::U4 | DType::U8 => {
                self.fp8_tflops.unwrap_or(self.bf16_tflops)
            }
            DType::F32 | DType::I32 => self.f32_tflops,
        }
    }

    /// Seconds of memory traffic for `bytes` at [`GpuSpec::bandwidth_gbs`].
    pub fn memory_seconds(&self, bytes: u64) -> f64 {
        bytes as f64 / (self.bandwidth_gbs() * 1e9)
    }

    /// Seconds of math for `flops` in `dtype` at [`GpuSpec::peak_tflops`].
    pub fn math_seconds(&self, flops: u64, dtype: DType) -> f64 {
        flops as f64 / (self.peak_tflops(dtype) * 1e12)
    }

    /// Estimated seconds for one kernel: launch overhead plus the larger of its memory
    /// time and its math time.
    pub fn kernel_seconds(&self, bytes: u64, flops: u64, dtype: DType) -> f64 {
        let memory = self.memory_seconds(bytes);
        let math = self.math_seconds(flops, dtype);
        self.launch_us * 1e-6 + memory.max(math)
    }
}

/// The built-in GPUs.
pub const GPUS: &[GpuSpec] = &[
    GpuSpec {
        name: Cow::Borrowed("h100-sxm"),
        description: Cow::Borrowed("NVIDIA H100 SXM 80GB"),
        hbm_gbs: 3350.0,
        measured_copy_gbs: Some(3000.0),
        f32_tflops: 67.0,
        bf16_tflops: 989.0,
        measured_bf16_tflops: Some(798.0),
        fp8_tflops: Some(1979.0),
        memory_gb: Some(80.0),
        launch_us: DEFAULT_LAUNCH_US,
        source: Cow::Borrowed(
            "NVIDIA H100 datasheet; copy and bf16 GEMM measured on a lent H100 (BENCHMARKS.md)",
        ),
    },
    GpuSpec {
        name: Cow::Borrowed("h200-sxm"),
        description: Cow::Borrowed("NVIDIA H200 SXM 141GB"),
        hbm_gbs: 4800.0,
        measured_copy_gbs: Some(4300.0),
        f32_tflops: 67.0,
        bf16_tflops: 989.0,
        measured_bf16_tflops: Some(790.0),
        fp8_tflops: Some(1979.0),
        memory_gb: Some(141.0),
        launch_us: DEFAULT_LAUNCH_US,
        source: Cow::Borrowed(
            "NVIDIA H200 datasheet; copy and bf16 GEMM measured on a lent H200 (BENCHMARKS.md)",
        ),
    },
    GpuSpec {
        name: Cow::Borrowed("a100-sxm"),
        description: Cow::Borrowed("NVIDIA A100 SXM 80GB"),
        hbm_gbs: 2039.0,
        measured_copy_gbs: None,
        f32_tflops: 19.5,
        bf16_tflops: 312.0,
        measured_bf16_tflops: None,
        fp8_tflops: None,
        memory_gb: Some(80.0),
        launch_us: DEFAULT_LAUNCH_US,
        source: Cow::Borrowed("NVIDIA A100 datasheet"),
    },
    GpuSpec {
        name: Cow::Borrowed("l40s"),
        description: Cow::Borrowed("NVIDIA L40S"),
        hbm_gbs: 864.0,
        measured_copy_gbs: None,
        f32_tflops: 91.6,
        bf16_tflops: 362.0,
        measured_bf16_tflops: None,
        fp8_tflops: Some(733.0),
        memory_gb: Some(48.0),
        launch_us: DEFAULT_LAUNCH_US,
        source: Cow::Borrowed("NVIDIA L40S datasheet"),
    },
    GpuSpec {
        name: Cow::Borrowed("l4"),
        description: Cow::Borrowed("NVIDIA L4"),
        hbm_gbs: 300.0,
        measured_copy_gbs: None,
        f32_tflops: 30.3,
        bf16_tflops: 121.0,
        measured_bf16_tflops: None,
        fp8_tflops: Some(242.0),
        memory_gb: Some(24.0),
        launch_us: DEFAULT_LAUNCH_US,
        source: Cow::Borrowed("NVIDIA L4 datasheet"),
    },
];

/// The built-in GPU called `name`.
pub fn gpu(name: &str) -> Option<&'static GpuSpec> {
    GPUS.iter().find(|g| g.name == name)
}

/// The names of the built-in GPUs, for messages.
pub fn gpu_names() -> Vec<&'static str> {
    GPUS.iter().map(|g| g.name.as_ref()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_names_are_listed() {
        assert_eq!(
            gpu_names(),
            ["h100-sxm", "h200-sxm", "a100-sxm", "l40s", "l4"]
        );
        assert!(gpu("h100-sxm").is_some_and(|g| g.measured_bf16_tflops == Some(798.0)));
    }
}

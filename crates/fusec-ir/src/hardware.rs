//! Target GPUs for the cost model: datasheet figures, and measured ones where a machine
//! lent here was measured (BENCHMARKS.md, "GPU figures of the cost model"). Every
//! figure says where it came from.
//!
//! The built-in table is [`GPUS`]; users add their own GPUs in a TOML file read by
//! [`parse_gpu_file`] (format below), which yields owned [`GpuSpec`] values that work
//! everywhere a built-in one does.
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
use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::dtype::DType;
use crate::frontend::ConfigError;

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
            DType::Fp8E4M3 | DType::Fp8E5M2 => self.fp8_tflops.unwrap_or(self.bf16_tflops),
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpuFile {
    #[serde(default)]
    gpu: Vec<RawGpu>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpu {
    name: Spanned<String>,
    description: Option<String>,
    hbm_gbs: Spanned<f64>,
    measured_copy_gbs: Option<Spanned<f64>>,
    f32_tflops: Spanned<f64>,
    bf16_tflops: Spanned<f64>,
    measured_bf16_tflops: Option<Spanned<f64>>,
    fp8_tflops: Option<Spanned<f64>>,
    memory_gb: Option<Spanned<f64>>,
    launch_us: Option<Spanned<f64>>,
    source: Spanned<String>,
}

/// Reads a user's GPU file (format in the module documentation). Every GPU needs a
/// unique name that is not a built-in one, positive finite figures, and a source; errors
/// give the file, line and column.
pub fn parse_gpu_file(path: &Path, src: &str) -> Result<Vec<GpuSpec>, ConfigError> {
    let raw: RawGpuFile = toml::from_str(src).map_err(|e| match e.span() {
        Some(span) => ConfigError::at(path, src, span.start, e.message().trim()),
        None => ConfigError::new(path, e.message().trim()),
    })?;
    if raw.gpu.is_empty() {
        return Err(ConfigError::new(
            path,
            "no GPUs: expected one or more [[gpu]] tables",
        ));
    }
    let positive = |key: &str, v: &Spanned<f64>| -> Result<f64, ConfigError> {
        let x = *v.get_ref();
        if x.is_finite() && x > 0.0 {
            Ok(x)
        } else {
            Err(ConfigError::at(
                path,
                src,
                v.span().start,
                format!("`{key}` must be a positive number"),
            ))
        }
    };
    let optional = |key: &str, v: &Option<Spanned<f64>>| -> Result<Option<f64>, ConfigError> {
        v.as_ref().map(|v| positive(key, v)).transpose()
    };
    let mut seen = HashSet::new();
    let mut gpus = Vec::with_capacity(raw.gpu.len());
    for g in raw.gpu {
        let name = g.name.get_ref().trim().to_string();
        let at = |message: String| ConfigError::at(path, src, g.name.span().start, message);
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            return Err(at(
                "`name` must be a non-empty word without spaces".to_string()
            ));
        }
        if gpu(&name).is_some() {
            return Err(at(format!(
                "GPU `{name}` is built in; give your GPU another name"
            )));
        }
        if !seen.insert(name.clone()) {
            return Err(at(format!("GPU `{name}` is defined twice")));
        }
        if g.source.get_ref().trim().is_empty() {
            return Err(ConfigError::at(
                path,
                src,
                g.source.span().start,
                "`source` must say where the figures come from",
            ));
        }
        gpus.push(GpuSpec {
            description: Cow::Owned(g.description.unwrap_or_else(|| name.clone())),
            hbm_gbs: positive("hbm_gbs", &g.hbm_gbs)?,
            measured_copy_gbs: optional("measured_copy_gbs", &g.measured_copy_gbs)?,
            f32_tflops: positive("f32_tflops", &g.f32_tflops)?,
            bf16_tflops: positive("bf16_tflops", &g.bf16_tflops)?,
            measured_bf16_tflops: optional("measured_bf16_tflops", &g.measured_bf16_tflops)?,
            fp8_tflops: optional("fp8_tflops", &g.fp8_tflops)?,
            memory_gb: optional("memory_gb", &g.memory_gb)?,
            launch_us: optional("launch_us", &g.launch_us)?.unwrap_or(DEFAULT_LAUNCH_US),
            source: Cow::Owned(g.source.into_inner()),
            name: Cow::Owned(name),
        });
    }
    Ok(gpus)
}

/// Reads a GPU file from disk; see [`parse_gpu_file`].
pub fn load_gpu_file(path: &Path) -> Result<Vec<GpuSpec>, ConfigError> {
    let src = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, format!("cannot read: {e}")))?;
    parse_gpu_file(path, &src)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Vec<GpuSpec>, ConfigError> {
        parse_gpu_file(Path::new("gpus.toml"), src)
    }

    const ONE: &str = "[[gpu]]\nname = \"rtx-4090\"\nhbm_gbs = 1008.0\nf32_tflops = 82.6\n\
                       bf16_tflops = 165.2\nsource = \"Ada whitepaper\"\n";

    #[test]
    fn a_user_gpu_gets_defaults_and_owns_its_strings() {
        let gpus = parse(ONE).expect("valid file");
        assert_eq!(gpus.len(), 1);
        let g = &gpus[0];
        assert_eq!(g.name, "rtx-4090");
        assert_eq!(g.description, "rtx-4090");
        assert_eq!(g.launch_us, DEFAULT_LAUNCH_US);
        assert_eq!(g.fp8_tflops, None);
        assert_eq!(g.bandwidth_source(), "datasheet");
        // Without FP8 tensor cores, FP8 math runs at the bf16 rate.
        assert_eq!(g.peak_tflops(DType::Fp8E4M3), 165.2);
    }

    #[test]
    fn bad_gpu_files_name_the_position() {
        let cases = [
            (ONE.replace("rtx-4090", "h100-sxm"), "built in", 2),
            (
                ONE.replace("1008.0", "-3.0"),
                "`hbm_gbs` must be a positive number",
                3,
            ),
            (ONE.replace("hbm_gbs", "hbm"), "unknown field `hbm`", 3),
            (format!("{ONE}{ONE}"), "defined twice", 8),
            (ONE.replace("Ada whitepaper", " "), "`source`", 6),
            ("".to_string(), "no GPUs", 0),
        ];
        for (src, needle, line) in cases {
            let e = parse(&src).expect_err(needle);
            assert!(e.message.contains(needle), "{needle}: got {e}");
            assert_eq!(e.location.map_or(0, |l| l.0), line, "{needle}: {e}");
        }
    }

    #[test]
    fn built_in_names_are_listed() {
        assert_eq!(
            gpu_names(),
            ["h100-sxm", "h200-sxm", "a100-sxm", "l40s", "l4"]
        );
        assert!(gpu("h100-sxm").is_some_and(|g| g.measured_bf16_tflops == Some(798.0)));
    }
}

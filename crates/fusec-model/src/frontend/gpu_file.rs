//! A user's GPU file: extra [`GpuSpec`]s for the cost model, in the TOML format
//! documented in [`fusec_ir::hardware`].

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;

use fusec_ir::hardware::{gpu, GpuSpec, DEFAULT_LAUNCH_US};
use serde::Deserialize;
use toml::Spanned;

use super::error::ConfigError;

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

/// Reads a user's GPU file (format in [`fusec_ir::hardware`]). Every GPU needs a
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
    use fusec_ir::DType;

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
}

//! Measured inputs of the report: GPU measurements read from a TOML file, and a CPU
//! executor step. The `measure` module pairs them with the predictions.
//!
//! **GPU measurements** live in a TOML file (`measurements.toml`) that a GPU check
//! writes, one `[[measurement]]` table per measured point:
//!
//! ```toml
//! [[measurement]]
//! model = "llama-3-8b"        # the model's name, as the report prints it
//! gpu = "h100-sxm"            # the GPU's name, built in or from --gpu-file
//! variant = "eager"           # a variant of the report: eager, fused, fused+fp8
//! batch = 1
//! context = 4096              # KV length after the step
//! us_per_token = 9876.5       # measured, per token (step time / batch)
//! launches_per_step = 1556    # optional
//! bytes_per_step = 21080000000  # optional, e.g. from a profiler's DRAM counters
//! source = "what ran, where, and when it was measured"
//! ```
//!
//! The report shows those of its model and GPU, each next to the prediction for the
//! same variant, batch and context; it ignores (and counts) the others.
//!
//! **CPU measurements** come from the CPU executor (`fusec-exec`): the caller runs a
//! step and hands over each node's measured bytes and time as a [`CpuMeasurement`].
//! The report compares the counts with the cost model's per op kind (they must be
//! equal: the executor counts from runtime tensors) and shows the CPU time beside
//! them. CPU times are not GPU predictions; they show where a CPU spends the step.

use std::path::Path;

use fusec_ir::NodeId;
use serde::{Deserialize, Serialize};

use crate::error::ReportError;

/// One measured point of a GPU check. See the module documentation.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Measurement {
    pub model: String,
    pub gpu: String,
    pub variant: String,
    pub batch: u64,
    pub context: u64,
    pub us_per_token: f64,
    pub launches_per_step: Option<u64>,
    pub bytes_per_step: Option<u64>,
    pub source: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MeasurementFile {
    #[serde(default)]
    measurement: Vec<toml::Spanned<Measurement>>,
}

/// Reads a measurements file; `path` is used in messages. Every entry needs a
/// positive batch, context and time, and a source.
pub fn parse_measurements(path: &Path, src: &str) -> Result<Vec<Measurement>, ReportError> {
    let at = |offset: Option<usize>, message: String| ReportError::BadFile {
        path: path.to_path_buf(),
        location: offset.map(|o| fusec_ir::text::line_col(src, o)),
        message,
    };
    let file: MeasurementFile = toml::from_str(src)
        .map_err(|e| at(e.span().map(|s| s.start), e.message().trim().into()))?;
    let mut out = Vec::with_capacity(file.measurement.len());
    for m in file.measurement {
        let start = Some(m.span().start);
        let m = m.into_inner();
        if m.batch == 0 || m.context == 0 {
            return Err(at(start, "`batch` and `context` must be at least 1".into()));
        }
        if !(m.us_per_token.is_finite() && m.us_per_token > 0.0) {
            return Err(at(start, "`us_per_token` must be a positive number".into()));
        }
        if m.source.trim().is_empty() {
            return Err(at(
                start,
                "`source` must say what was measured and where".into(),
            ));
        }
        out.push(m);
    }
    Ok(out)
}

/// A measured step of the CPU executor on one variant's graph.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuMeasurement {
    /// The variant whose graph ran (node ids refer to it).
    pub variant: String,
    pub batch: u64,
    /// KV length after the measured step.
    pub context: u64,
    /// Wall time of the step, interpreter overhead included.
    pub step_seconds: f64,
    /// What ran it, for the report (`fusec-exec, random weights, 2 threads`).
    pub description: String,
    pub nodes: Vec<MeasuredNode>,
}

/// One measured kernel launch.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct MeasuredNode {
    pub node: NodeId,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = "[[measurement]]\nmodel = \"m\"\ngpu = \"h100-sxm\"\nvariant = \"eager\"\n\
                       batch = 1\ncontext = 64\nus_per_token = 12.5\nsource = \"test\"\n";

    #[test]
    fn a_measurement_file_parses() {
        let m = parse_measurements(Path::new("m.toml"), ONE).expect("valid");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].us_per_token, 12.5);
        assert_eq!(m[0].launches_per_step, None);
        assert!(parse_measurements(Path::new("m.toml"), "")
            .expect("empty is valid")
            .is_empty());
    }

    #[test]
    fn bad_measurement_files_name_the_position() {
        for (src, needle) in [
            (ONE.replace("12.5", "-1.0"), "us_per_token"),
            (ONE.replace("batch = 1", "batch = 0"), "at least 1"),
            (ONE.replace("source", "sauce"), "unknown field"),
            (ONE.replace("\"test\"", "\"\""), "source"),
        ] {
            let e = parse_measurements(Path::new("m.toml"), &src).expect_err(needle);
            let text = e.to_string();
            assert!(text.contains(needle), "{needle}: {text}");
            assert!(text.starts_with("m.toml:"), "{text}");
        }
    }
}

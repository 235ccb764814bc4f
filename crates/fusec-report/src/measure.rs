//! Measured figures, shown next to the predictions.
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

use std::collections::HashMap;
use std::path::Path;

use fusec_ir::cost::graph_cost;
use fusec_ir::NodeId;
use serde::{Deserialize, Serialize};

use crate::error::ReportError;
use crate::model::{bindings, Eval, Inputs};

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

/// A GPU measurement next to its prediction.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuComparison {
    pub variant: String,
    pub batch: u64,
    pub context: u64,
    pub predicted_us_per_token: f64,
    pub measured_us_per_token: f64,
    /// Measured over predicted time.
    pub ratio: f64,
    pub predicted_launches_per_step: u64,
    pub measured_launches_per_step: Option<u64>,
    pub predicted_bytes_per_step: u64,
    pub measured_bytes_per_step: Option<u64>,
    pub source: String,
}

/// Predicted and measured counts of one op kind on the CPU.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CpuRow {
    pub op: String,
    pub predicted_launches: u64,
    pub measured_launches: u64,
    pub predicted_bytes: u64,
    pub measured_bytes: u64,
    pub measured_us: f64,
    /// Measured bytes over measured time.
    pub gb_per_s: f64,
}

/// The CPU executor's step next to the cost model's counts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CpuComparison {
    pub variant: String,
    pub batch: u64,
    pub context: u64,
    pub description: String,
    pub step_us: f64,
    /// Per op kind, the most time first.
    pub rows: Vec<CpuRow>,
    pub total: CpuRow,
    /// Whether every launch's measured bytes equal the prediction.
    pub counts_agree: bool,
}

/// The measured section of the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Measured {
    /// The file the GPU measurements came from, if any.
    pub file: Option<String>,
    pub gpu: Vec<GpuComparison>,
    /// Measurements of other models or GPUs, or of points the report cannot predict.
    pub ignored: usize,
    /// Why measurements of this model and GPU were ignored.
    pub ignored_reasons: Vec<String>,
    pub cpu: Option<CpuComparison>,
}

/// Pairs the measurements with predictions.
pub(crate) fn compare(inputs: &Inputs<'_>) -> Result<Measured, ReportError> {
    let spec = inputs.spec;
    let mut out = Measured {
        file: inputs.measurements_file.map(str::to_string),
        ..Measured::default()
    };
    for m in inputs.measurements {
        if m.model != spec.model.name || m.gpu != inputs.gpu.name {
            out.ignored += 1;
            continue;
        }
        let Some(v) = inputs.variants.iter().find(|v| v.name == m.variant) else {
            out.ignored += 1;
            out.ignored_reasons.push(format!(
                "variant `{}` (batch {}, context {}) is not in this report",
                m.variant, m.batch, m.context
            ));
            continue;
        };
        if m.context > spec.model.max_seq_len || m.batch > crate::model::MAX_BATCH {
            out.ignored += 1;
            out.ignored_reasons.push(format!(
                "{} at batch {}, context {} is outside what the model supports",
                m.variant, m.batch, m.context
            ));
            continue;
        }
        let e = Eval::new(&v.graph, m.batch, m.context, inputs.gpu)?;
        let predicted = e.us_per_token();
        out.gpu.push(GpuComparison {
            variant: m.variant.clone(),
            batch: m.batch,
            context: m.context,
            predicted_us_per_token: predicted,
            measured_us_per_token: m.us_per_token,
            ratio: m.us_per_token / predicted,
            predicted_launches_per_step: e.cost.total.launches,
            measured_launches_per_step: m.launches_per_step,
            predicted_bytes_per_step: e.cost.total.bytes(),
            measured_bytes_per_step: m.bytes_per_step,
            source: m.source.clone(),
        });
    }
    out.cpu = inputs.cpu.map(|c| cpu_comparison(inputs, c)).transpose()?;
    Ok(out)
}

fn cpu_comparison(inputs: &Inputs<'_>, m: &CpuMeasurement) -> Result<CpuComparison, ReportError> {
    let v = inputs
        .variants
        .iter()
        .find(|v| v.name == m.variant)
        .ok_or_else(|| {
            ReportError::BadOption(format!(
                "the CPU measurement ran variant `{}`, which is not in the report",
                m.variant
            ))
        })?;
    let graph = &v.graph;
    let cost = graph_cost(graph, &bindings(m.batch, m.context))?;
    let mut rows: Vec<CpuRow> = Vec::new();
    let mut slot: HashMap<&'static str, usize> = HashMap::new();
    let mut row = |name: &'static str, rows: &mut Vec<CpuRow>| -> usize {
        *slot.entry(name).or_insert_with(|| {
            rows.push(CpuRow {
                op: name.to_string(),
                ..CpuRow::default()
            });
            rows.len() - 1
        })
    };
    let predicted: HashMap<NodeId, u64> =
        cost.nodes.iter().map(|(id, c)| (*id, c.bytes())).collect();
    for (id, c) in &cost.nodes {
        let i = row(graph.op(*id).name(), &mut rows);
        rows[i].predicted_launches += c.launches;
        rows[i].predicted_bytes += c.bytes();
    }
    let mut counts_agree = m.nodes.len() == cost.nodes.len();
    for n in &m.nodes {
        if !graph.contains(n.node) {
            return Err(ReportError::BadOption(
                "the CPU measurement names a node that is not in its graph".into(),
            ));
        }
        let bytes = n.bytes_read + n.bytes_written;
        counts_agree &= predicted.get(&n.node) == Some(&bytes);
        let i = row(graph.op(n.node).name(), &mut rows);
        rows[i].measured_launches += 1;
        rows[i].measured_bytes += bytes;
        rows[i].measured_us += n.seconds * 1e6;
    }
    let mut total = CpuRow {
        op: "total".to_string(),
        ..CpuRow::default()
    };
    for r in &mut rows {
        r.gb_per_s = gb_per_s(r.measured_bytes, r.measured_us);
        total.predicted_launches += r.predicted_launches;
        total.measured_launches += r.measured_launches;
        total.predicted_bytes += r.predicted_bytes;
        total.measured_bytes += r.measured_bytes;
        total.measured_us += r.measured_us;
    }
    total.gb_per_s = gb_per_s(total.measured_bytes, total.measured_us);
    rows.sort_by(|a, b| {
        b.measured_us
            .total_cmp(&a.measured_us)
            .then_with(|| a.op.cmp(&b.op))
    });
    Ok(CpuComparison {
        variant: m.variant.clone(),
        batch: m.batch,
        context: m.context,
        description: m.description.clone(),
        step_us: m.step_seconds * 1e6,
        rows,
        total,
        counts_agree,
    })
}

fn gb_per_s(bytes: u64, us: f64) -> f64 {
    if us > 0.0 {
        bytes as f64 / (us * 1e-6) / 1e9
    } else {
        0.0
    }
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

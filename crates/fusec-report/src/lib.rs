//! fusec's report: what one decode step of a model costs in each compiled variant
//! (eager, fused, fused in FP8...) on one GPU, and why; and, given prefill graphs, the
//! time to the first token of a prompt.
//!
//! [`build`] takes the model's [`ModelSpec`](fusec_model::frontend::ModelSpec) (its
//! shape and the decode point), a list of named [`Variant`] graphs (the first is the
//! baseline the others are compared with), a [`GpuSpec`](fusec_ir::hardware::GpuSpec), a price per
//! GPU-hour and the sweep points, and returns a [`Report`]: plain data that serialises
//! to JSON and renders as text, Markdown or a self-contained HTML page with
//! hand-written SVG charts.
//!
//! Modules, each using only those listed before it:
//!
//! - [`inputs`]: what a report is built from ([`Variant`], [`Inputs`]);
//! - [`measurement`]: measured inputs: GPU results in a `measurements.toml` file, and
//!   the CPU executor's per-node profile;
//! - [`kernel`]: one kernel's estimated time, what bounds it, and its class;
//! - `eval`: one graph evaluated at one decode point;
//! - [`sweep`]: time per token against context length and against batch size;
//! - [`prefill`]: time to first token against prompt length, chunk by chunk;
//! - [`measure`]: the measurements paired with the predictions;
//! - [`assemble`]: the report's data and [`build`], which assembles it;
//! - `render`: the text, Markdown and HTML forms; `svg`: the charts.
//!
//! Invariant: the output is a function of the inputs alone. No clocks, no hash-map
//! iteration order, no environment: the same inputs give byte-identical reports.
//! (A CPU measurement carries wall times, which differ run to run; it is an input.)

pub mod assemble;
mod doc;
mod error;
mod eval;
mod format;
pub mod inputs;
pub mod kernel;
pub mod measure;
pub mod measurement;
pub mod prefill;
mod render;
mod svg;
pub mod sweep;

pub use assemble::{build, dollars_per_million_tokens, Report};
pub use error::ReportError;
pub use fusec_ir::KernelClass;
pub use inputs::{Inputs, PrefillGraph, Variant};
pub use kernel::{class_of, Bound, KernelTime};
pub use measurement::{parse_measurements, CpuMeasurement, MeasuredNode, Measurement};

/// The output formats of [`Report::render`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Markdown,
    Html,
}

impl Format {
    /// Parses a format name as the command line spells it.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "text" | "txt" => Some(Format::Text),
            "json" => Some(Format::Json),
            "md" | "markdown" => Some(Format::Markdown),
            "html" => Some(Format::Html),
            _ => None,
        }
    }
}

impl Report {
    /// The report in `format`.
    pub fn render(&self, format: Format) -> Result<String, ReportError> {
        match format {
            Format::Text => Ok(render::text(self)),
            Format::Json => render::json(self),
            Format::Markdown => Ok(render::markdown(self)),
            Format::Html => Ok(render::html(self)),
        }
    }
}

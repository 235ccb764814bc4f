//! What can go wrong when building a report.

use std::path::PathBuf;

/// A report could not be built. Everything but `Internal` is the caller's input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReportError {
    /// The options (sweep points, price, variants) are unusable.
    #[error("{0}")]
    BadOption(String),
    /// A measurements file is malformed; the location is 1-based line and column.
    #[error("{}{}: {message}", path.display(), location.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    BadFile {
        path: PathBuf,
        location: Option<(usize, usize)>,
        message: String,
    },
    /// A graph could not be costed (a symbol without a value, a cycle), which means
    /// the graph and the report disagree about its interface: a bug, not bad input.
    #[error("internal: {0}")]
    Internal(String),
}

impl ReportError {
    pub fn is_input_error(&self) -> bool {
        !matches!(self, ReportError::Internal(_))
    }
}

impl From<fusec_ir::shape::UnboundSymbol> for ReportError {
    fn from(e: fusec_ir::shape::UnboundSymbol) -> Self {
        ReportError::Internal(format!("cannot cost the graph: {e}"))
    }
}

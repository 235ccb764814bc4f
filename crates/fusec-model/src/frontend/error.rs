//! The error every frontend returns: a bad model description, with its position.

use std::path::{Path, PathBuf};

use fusec_ir::text::line_col;

/// A bad model description. Displays as `file:line:column: message` where the format
/// gives a position, else `file: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", path.display(), location.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line and column.
    pub location: Option<(usize, usize)>,
    pub message: String,
}

impl ConfigError {
    /// An error about the whole file.
    pub fn new(path: &Path, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            location: None,
            message: message.into(),
        }
    }

    /// An error at byte `offset` of `src`, the text of `path`.
    pub fn at(path: &Path, src: &str, offset: usize, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            location: Some(line_col(src, offset)),
            message: message.into(),
        }
    }
}

/// `a`, `a and b`, `a, b and c`.
pub(crate) fn english_list(items: &[impl AsRef<str>]) -> String {
    match items {
        [] => "nothing".to_string(),
        [one] => one.as_ref().to_string(),
        [init @ .., last] => {
            let init: Vec<&str> = init.iter().map(AsRef::as_ref).collect();
            format!("{} and {}", init.join(", "), last.as_ref())
        }
    }
}

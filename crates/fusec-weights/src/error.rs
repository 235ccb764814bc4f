//! The weights' error type.

use std::path::PathBuf;

use fusec_ir::DType;

/// Everything that can go wrong when loading, making or saving weights.
///
/// Weight-file problems are the user's ([`Error::is_input_error`]); the rest mean the
/// graph or the caller is at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: no weights found: expected a .safetensors file, a model.safetensors.index.json, or a directory holding one", path.display())]
    NoWeights { path: PathBuf },
    #[error("{}: not a checkpoint: neither a file nor a directory (a device, pipe or socket)", path.display())]
    NotACheckpoint { path: PathBuf },
    #[error("{}: bad shard index: {message}", file.display())]
    BadIndex { file: PathBuf, message: String },
    #[error("{}: cannot read tensor `{tensor}`: the file is truncated or corrupt ({message})", file.display())]
    Corrupt {
        tensor: String,
        file: PathBuf,
        message: String,
    },
    #[error("{}: tensor `{tensor}` is missing", file.display())]
    MissingWeight { tensor: String, file: PathBuf },
    #[error("{}: tensor `{tensor}` has shape {found:?}, the model needs {expected:?}", file.display())]
    WrongShape {
        tensor: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{}: tensor `{tensor}` has dtype {found}, the model needs {expected}", file.display())]
    WrongDtype {
        tensor: String,
        file: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{}: tensor `{tensor}` holds a non-finite value ({value}) at element {index}", file.display())]
    NonFinite {
        tensor: String,
        file: PathBuf,
        index: usize,
        value: f32,
    },
    #[error("{}: derived weight `{tensor}` cannot be made: {reason}", file.display())]
    Underivable {
        tensor: String,
        file: PathBuf,
        reason: String,
    },
    #[error("`{tensor}` is a KV-cache scale, which no checkpoint holds: calibrate it by running the prompt through the unlowered graph (`fusec_exec::calibrate::calibrate_kv_scales`), or load FP8 weights saved with their scales")]
    Uncalibrated { tensor: String },
    /// Values that do not fill the shape they are given.
    #[error("{len} values do not fill shape {shape:?}")]
    Length { shape: Vec<usize>, len: usize },
    /// Values that a weight of this dtype cannot be stored as.
    #[error("a tensor of dtype {dtype} cannot hold {what}")]
    Storage { dtype: DType, what: &'static str },
    #[error("the graph is not executable: {0}")]
    InvalidGraph(String),
}

impl Error {
    /// Whether the error is the user's: a bad or incomplete weight file.
    pub fn is_input_error(&self) -> bool {
        match self {
            Error::Io { .. }
            | Error::NoWeights { .. }
            | Error::NotACheckpoint { .. }
            | Error::BadIndex { .. }
            | Error::Corrupt { .. }
            | Error::MissingWeight { .. }
            | Error::WrongShape { .. }
            | Error::WrongDtype { .. }
            | Error::NonFinite { .. }
            | Error::Underivable { .. }
            | Error::Uncalibrated { .. } => true,
            Error::Length { .. } | Error::Storage { .. } | Error::InvalidGraph(_) => false,
        }
    }
}

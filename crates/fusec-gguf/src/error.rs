//! The reader's error type: every message names the file, and the tensor or key at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a GGUF file (the magic is {found:?}, expected \"GGUF\")", file.display())]
    NotGguf { file: PathBuf, found: [u8; 4] },
    #[error("{}: GGUF version {version} is not supported (fusec reads versions 2 and 3)", file.display())]
    Version { file: PathBuf, version: u32 },
    #[error("{}: the file is truncated or corrupt in {what}: {message}", file.display())]
    Corrupt {
        file: PathBuf,
        what: String,
        message: String,
    },
    #[error("{}: tensor `{tensor}` is truncated or corrupt: {message}", file.display())]
    CorruptTensor {
        file: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{}: tensor `{tensor}` has ggml type {type_id} ({name}), which fusec cannot read (it reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K)", file.display())]
    UnsupportedType {
        file: PathBuf,
        tensor: String,
        type_id: u32,
        name: &'static str,
    },
    #[error("{}: metadata key `{key}` is missing", file.display())]
    MissingKey { file: PathBuf, key: String },
    #[error("{}: metadata key `{key}` is {found}, expected {expected}", file.display())]
    WrongKeyType {
        file: PathBuf,
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("{}: tensor `{tensor}` is missing", file.display())]
    MissingTensor { file: PathBuf, tensor: String },
}

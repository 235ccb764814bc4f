//! The text side's error type: each names the file, key or template at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", file.display())]
    BadFile { file: PathBuf, message: String },
    #[error("{}: cannot load the tokenizer: {message}", file.display())]
    Tokenizer { file: PathBuf, message: String },
    #[error("{}: unsupported tokenizer: {message}", file.display())]
    UnsupportedTokenizer { file: PathBuf, message: String },
    #[error(transparent)]
    Gguf(#[from] fusec_gguf::Error),
    #[error("{}: no tokenizer found: expected tokenizer.json beside the model, or a GGUF file with its vocabulary (tokenizer.ggml.*)", path.display())]
    NoTokenizer { path: PathBuf },
    #[error("{}: the checkpoint has no chat template (chat_template in tokenizer_config.json, chat_template.jinja, or tokenizer.chat_template in GGUF)", path.display())]
    NoChatTemplate { path: PathBuf },
    #[error("{origin}: the chat template failed to render: {message}")]
    Template { origin: String, message: String },
    #[error("cannot encode the text: {0}")]
    Encode(String),
    #[error("cannot decode token {id}: {message}")]
    Decode { id: u32, message: String },
    #[error("bad sampling option: {0}")]
    Sampling(String),
}

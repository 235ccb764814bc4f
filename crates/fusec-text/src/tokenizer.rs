//! A checkpoint's tokenizer: Hugging Face `tokenizers` types, from `tokenizer.json` or
//! from a GGUF file's vocabulary, with what generation needs besides: the ids that end
//! a sequence, the special tokens a chat template names, and the chat template.
//!
//! Where transformers reads them from: a model directory's `tokenizer.json`,
//! `tokenizer_config.json` (`bos_token`, `eos_token`, `chat_template`),
//! `chat_template.jinja` (which takes precedence, as in transformers 5), and
//! `generation_config.json`'s `eos_token_id` (an id or a list, the ids `generate`
//! stops at; else the tokenizer's `eos_token`). A GGUF file holds all of these as
//! `tokenizer.ggml.*` and `tokenizer.chat_template`.

use std::path::{Path, PathBuf};

use fusec_gguf::GgufFile;
use serde_json::Value;

use crate::error::Error;
use crate::gguf_vocab;

/// A tokenizer and the generation facts that come with it.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The file it came from, for messages.
    origin: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    chat_template: Option<String>,
}

fn read_json(path: &Path) -> Result<Option<serde_json::Map<String, Value>>, Error> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        file: path.to_path_buf(),
        source,
    })?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(Error::BadFile {
            file: path.to_path_buf(),
            message: "expected a JSON object".into(),
        }),
        Err(e) => Err(Error::BadFile {
            file: path.to_path_buf(),
            message: format!("{}:{}: invalid JSON: {e}", e.line(), e.column()),
        }),
    }
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// The tokenizer of the model at `path`: a `.gguf` file's own, or the
    /// `tokenizer.json` beside a `config.json` (or in a model directory).
    pub fn for_model(path: &Path) -> Result<Tokenizer, Error> {
        if path.extension().is_some_and(|e| e == "gguf") {
            return Tokenizer::from_gguf(&GgufFile::open(path)?);
        }
        let dir = if path.is_dir() {
            path
        } else {
            path.parent().unwrap_or(Path::new("."))
        };
        if dir.join("tokenizer.json").is_file() {
            Tokenizer::from_dir(dir)
        } else {
            Err(Error::NoTokenizer {
                path: path.to_path_buf(),
            })
        }
    }

    /// A Hugging Face model directory's tokenizer (see the module documentation).
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, Error> {
        let file = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| Error::Tokenizer {
            file: file.clone(),
            message: e.to_string(),
        })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let bos_token = token_text(config.get("bos_token"));
        let eos_token = token_text(config.get("eos_token"));
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
                file: jinja.clone(),
                source,
            })?)
        } else {
            match config.get("chat_template") {
                Some(Value::String(t)) => Some(t.clone()),
                // A list of named templates: the one named `default`.
                Some(Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            }
        };
        let generation = dir.join("generation_config.json");
        let eos_ids = match read_json(&generation)?.and_then(|g| g.get("eos_token_id").cloned()) {
            Some(v) => ids_of(&v).ok_or_else(|| Error::BadFile {
                file: generation.clone(),
                message: format!("`eos_token_id` must be an id or a list of ids, got {v}"),
            })?,
            None => eos_token
                .as_deref()
                .and_then(|t| inner.token_to_id(t))
                .into_iter()
                .collect(),
        };
        Ok(Tokenizer {
            inner,
            origin: file,
            bos_token,
            eos_token,
            eos_ids,
            chat_template,
        })
    }

    /// A GGUF file's tokenizer (see [`crate::gguf_vocab`]): it ends sequences at
    /// `tokenizer.ggml.eos_token_id` and, where given, `eot_token_id`.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, Error> {
        let vocab = gguf_vocab::from_gguf(file)?;
        let name = |id: Option<u32>| id.map(|i| vocab.tokens[i as usize].clone());
        let mut eos_ids: Vec<u32> = vocab.eos.into_iter().collect();
        if let Some(eot) = vocab.eot.filter(|e| !eos_ids.contains(e)) {
            eos_ids.push(eot);
        }
        Ok(Tokenizer {
            bos_token: name(vocab.bos),
            eos_token: name(vocab.eos),
            eos_ids,
            chat_template: file.string("tokenizer.chat_template")?.map(str::to_string),
            inner: vocab.tokenizer,
            origin: file.path().to_path_buf(),
        })
    }

    /// The file the tokenizer came from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The ids of `text`. Special tokens written in the text match whole, as in
    /// transformers; `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (a BOS, for tokenizers that want one).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, Error> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Encode(e.to_string()))
    }

    /// The text of `ids`, special tokens kept or skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, Error> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Decode {
                id: ids.first().copied().unwrap_or_default(),
                message: e.to_string(),
            })
    }

    /// The ids that end a sequence (empty when the checkpoint names none).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The checkpoint's chat template source, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// An id or a list of ids.
fn ids_of(v: &Value) -> Option<Vec<u32>> {
    match v {
        Value::Number(n) => Some(vec![u32::try_from(n.as_u64()?).ok()?]),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()))
            .collect(),
        _ => None,
    }
}

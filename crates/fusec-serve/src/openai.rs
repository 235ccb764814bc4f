//! The OpenAI API's request and response bodies, as far as `fusec serve` takes them.
//!
//! Unknown fields are ignored, as OpenAI-compatible servers do. `temperature`, `top_p`
//! and `seed` choose greedy decoding or sampling ([`Decoding::sampling`]); `n` and
//! `best_of` only at 1, penalties only at 0, no `logprobs` or `echo`.

use fusec_text::SamplingOptions;
use serde::{Deserialize, Serialize};

/// A prompt: text or token ids, one or a list of one.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: a string or a list of strings.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints share that choose how to decode.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct Decoding {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<u64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logprobs: Option<serde_json::Value>,
    pub top_logprobs: Option<u64>,
    pub best_of: Option<u64>,
    pub echo: Option<bool>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    /// Not OpenAI's (vLLM's): keep generating past end-of-sequence ids.
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

impl Decoding {
    /// How to choose tokens: greedy at temperature 0 or without one, else sampling
    /// at that temperature with top_p, from a generator seeded with `seed` (or with
    /// `default_seed` when the request gives none). Refuses, naming the field, what
    /// is out of the API's ranges or what one sampled choice cannot honour.
    pub fn sampling(&self, default_seed: u64) -> Result<SamplingOptions, (String, &'static str)> {
        let off = |v: Option<f64>, neutral: f64| v.is_some_and(|v| v != neutral);
        if let Some(t) = self.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
            return Err((
                format!("temperature must be between 0 and 2, got {t}"),
                "temperature",
            ));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err((
                format!("top_p must be greater than 0 and at most 1, got {p}"),
                "top_p",
            ));
        }
        if self.n.is_some_and(|n| n != 1) || self.best_of.is_some_and(|n| n != 1) {
            return Err(("only n = 1 (and best_of = 1) is supported".into(), "n"));
        }
        if off(self.presence_penalty, 0.0) || off(self.frequency_penalty, 0.0) {
            return Err((
                "presence and frequency penalties are not supported".into(),
                "presence_penalty",
            ));
        }
        let logprobs = match &self.logprobs {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
            Some(serde_json::Value::Number(n)) => n.as_u64() != Some(0),
            Some(_) => true,
        };
        if logprobs || self.top_logprobs.is_some_and(|n| n != 0) {
            return Err(("logprobs are not supported".into(), "logprobs"));
        }
        if self.echo == Some(true) {
            return Err(("echo is not supported".into(), "echo"));
        }
        let temperature = self.temperature.filter(|&t| t > 0.0);
        Ok(SamplingOptions {
            temperature: temperature.map(|t| t as f32),
            top_p: temperature.and(self.top_p).map(|p| p as f32),
            // The bits of a negative seed: every i64 is a seed of its own.
            seed: self.seed.map_or(default_seed, |s| s as u64),
            ..SamplingOptions::default()
        })
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// `POST /v1/completions`.
#[derive(Deserialize, Debug, Clone)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: Option<u64>,
    #[serde(flatten)]
    pub decoding: Decoding,
}

/// A chat message's content: text, or a list of parts of which the text ones count.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, Debug, Clone)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Deserialize, Debug, Clone)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    #[serde(flatten)]
    pub decoding: Decoding,
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// An error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Serialize, Debug, Clone)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, Debug, Clone)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

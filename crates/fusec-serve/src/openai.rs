//! The OpenAI API's request and response bodies, as far as `fusec serve` takes them.
//!
//! Unknown fields are ignored, as OpenAI-compatible servers do. Sampling fields are
//! accepted only at their greedy values (the server decodes greedily); `n` only at 1.

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
    /// Refuses what greedy decoding of one choice cannot honour, naming the field.
    pub fn check_greedy(&self) -> Result<(), (String, &'static str)> {
        let off = |v: Option<f64>, greedy: f64| v.is_some_and(|v| v != greedy);
        if off(self.temperature, 0.0) {
            return Err((
                "fusec serve decodes greedily: temperature must be 0 or absent".into(),
                "temperature",
            ));
        }
        if off(self.top_p, 1.0) {
            return Err((
                "fusec serve decodes greedily: top_p must be 1 or absent".into(),
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
        Ok(())
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

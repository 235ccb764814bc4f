//! fusec's text side: what turns a user's text into token ids and generated ids back
//! into text.
//!
//! - [`tokenizer`]: a checkpoint's tokenizer ([`Tokenizer`]) from `tokenizer.json`
//!   (Hugging Face's `tokenizers`) or from a GGUF file's vocabulary ([`gguf_vocab`],
//!   built into the same `tokenizers` types), with its special ids, end-of-sequence ids
//!   and chat template;
//! - [`stream`]: incremental decoding for streaming, holding back bytes of a character
//!   that the next token completes;
//! - [`chat`]: the chat template rendered with `minijinja` as transformers'
//!   `apply_chat_template` renders it with Jinja2;
//! - [`sampling`]: greedy decoding and transformers' logits processors (repetition
//!   penalty, temperature, top-k, top-p, min-p) with a seeded generator.
//!
//! It knows no model: the CLI feeds it the executor's logits.

pub mod chat;
pub mod error;
pub mod gguf_vocab;
pub mod sampling;
pub mod stream;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use error::Error;
pub use sampling::{Sampler, SamplingOptions};
pub use stream::TextStream;
pub use tokenizer::Tokenizer;

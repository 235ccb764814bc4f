//! Chat templates: a checkpoint's Jinja template rendered with `minijinja` as
//! transformers' `apply_chat_template` renders it with Jinja2
//! (`utils/chat_template_utils.py`: `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)` with loop controls, a `raise_exception` function, the messages,
//! `add_generation_prompt`, and the tokenizer's special tokens as variables).
//! minijinja's Python compatibility (`minijinja_contrib::pycompat`) supplies the string
//! and dict methods templates call (`.strip()`, `.startswith()`, `.items()`, ...).

use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use crate::error::Error;
use crate::tokenizer::Tokenizer;

/// One message of a conversation.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A compiled chat template and the special tokens it may name.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

fn template_error(origin: &str, e: &minijinja::Error) -> Error {
    // The message, the line it points at, and the causes (a raise_exception's text).
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    Error::Template {
        origin: origin.to_string(),
        message,
    }
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names it in messages (a file and key).
    pub fn new(
        source: &str,
        origin: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<ChatTemplate, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat_template", source.to_string())
            .map_err(|e| template_error(origin, &e))?;
        Ok(ChatTemplate {
            env,
            origin: origin.to_string(),
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
        })
    }

    /// The template of `tokenizer`'s checkpoint.
    pub fn of(tokenizer: &Tokenizer) -> Result<ChatTemplate, Error> {
        let source = tokenizer
            .chat_template()
            .ok_or_else(|| Error::NoChatTemplate {
                path: tokenizer.origin().to_path_buf(),
            })?;
        ChatTemplate::new(
            source,
            &format!("{} (chat template)", tokenizer.origin().display()),
            tokenizer.bos_token(),
            tokenizer.eos_token(),
        )
    }

    /// The text of `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let template = self
            .env
            .get_template("chat_template")
            .map_err(|e| template_error(&self.origin, &e))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| template_error(&self.origin, &e))
    }
}

//! Streaming detokenization: the text of each generated token as it comes, with the
//! bytes of a character split across tokens held back until the token that completes
//! it (a byte-level token can end in the middle of a UTF-8 sequence).
//!
//! This is `tokenizers`' `DecodeStream` (the algorithm of text-generation-inference's
//! `decode_token`): decode the ids since a prefix offset, and emit the new suffix only
//! when it does not end in U+FFFD, the replacement character of an incomplete
//! sequence.

use crate::error::Error;
use crate::tokenizer::Tokenizer;

/// A decoder fed one id at a time.
pub struct TextStream<'a> {
    stream: tokenizers::tokenizer::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl std::fmt::Debug for TextStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextStream").finish_non_exhaustive()
    }
}

impl<'a> TextStream<'a> {
    /// A stream over `tokenizer`, with special tokens kept or skipped.
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> TextStream<'a> {
        TextStream {
            stream: tokenizer.inner().decode_stream(skip_special_tokens),
        }
    }

    /// The text `id` completes: `None` while it ends inside a character.
    pub fn step(&mut self, id: u32) -> Result<Option<String>, Error> {
        self.stream.step(id).map_err(|e| Error::Decode {
            id,
            message: e.to_string(),
        })
    }
}

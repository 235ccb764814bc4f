//! A GGUF file's vocabulary (`tokenizer.ggml.*`) built into Hugging Face `tokenizers`
//! types, as transformers builds it (`integrations/gguf/gguf_tokenizer_mapping.py`,
//! transformers 5.x), so that a GGUF checkpoint tokenizes exactly as
//! `AutoTokenizer.from_pretrained(..., gguf_file=...)` does.
//!
//! `tokenizer.ggml.model` `gpt2` is byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2):
//! the vocabulary in the GPT-2 byte alphabet (tokens spelled otherwise are respelled as
//! their UTF-8 bytes), the file's merges, the GPT-2 pre-tokenizer or, for the
//! `tokenizer.ggml.pre` types whose merges were learned on another split, that split
//! (`GGUF_PRE_TOKENIZER_SPLITS`) before a byte-level mapping; control tokens (type 3)
//! become special tokens and user-defined ones (type 4) added tokens, so that they
//! match whole. Other tokenizer models are rejected by name.

use fusec_gguf::GgufFile;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::Error;

/// llama.cpp's `llama_token_type` values of `tokenizer.ggml.token_type`.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The split of Llama 3's tokenizer (transformers' `_LLAMA3_SPLIT`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The split of Qwen2's tokenizer (`models/qwen2/tokenization_qwen2.py`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split a `tokenizer.ggml.pre` type stands for, where it is not GPT-2's.
fn pre_split(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "dbrx"
        | "smaug-bpe" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

/// GPT-2's byte-to-character table (`bytes_to_unicode` in `encoder.py` of openai/gpt-2):
/// printable bytes map to themselves, the others to U+0100 onwards in order.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    table
}

/// What the GGUF vocabulary says besides the tokenizer itself.
#[derive(Debug)]
pub struct GgufVocab {
    pub tokenizer: tokenizers::Tokenizer,
    pub tokens: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
}

fn unsupported(file: &GgufFile, message: String) -> Error {
    Error::UnsupportedTokenizer {
        file: file.path().to_path_buf(),
        message,
    }
}

fn id_key(file: &GgufFile, key: &str, vocab: usize) -> Result<Option<u32>, Error> {
    match file.uint(key)? {
        None => Ok(None),
        Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
        Some(id) => Err(Error::BadFile {
            file: file.path().to_path_buf(),
            message: format!("`{key}` = {id} is outside the vocabulary of {vocab} tokens"),
        }),
    }
}

/// Builds the tokenizer of a GGUF file.
pub fn from_gguf(file: &GgufFile) -> Result<GgufVocab, Error> {
    let missing = |key: &str| Error::BadFile {
        file: file.path().to_path_buf(),
        message: format!("metadata key `{key}` is missing: the file holds no tokenizer"),
    };
    let model = file
        .string("tokenizer.ggml.model")?
        .ok_or_else(|| missing("tokenizer.ggml.model"))?;
    if model != "gpt2" {
        return Err(unsupported(
            file,
            format!("`tokenizer.ggml.model` is `{model}`; fusec builds `gpt2` (byte-level BPE) tokenizers from GGUF"),
        ));
    }
    let tokens: Vec<String> = file
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| missing("tokenizer.ggml.tokens"))?
        .into_iter()
        .map(str::to_string)
        .collect();
    let merges = file
        .strings("tokenizer.ggml.merges")?
        .ok_or_else(|| missing("tokenizer.ggml.merges"))?;
    let types = file.ints("tokenizer.ggml.token_type")?.unwrap_or_default();

    let spelling = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = spelling.iter().copied().collect();
    let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        let key = if spelled(token) {
            token.clone()
        } else {
            token.bytes().map(|b| spelling[b as usize]).collect()
        };
        vocab.insert(key, id as u32);
    }
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| Error::BadFile {
            file: file.path().to_path_buf(),
            message: format!(
                "`tokenizer.ggml.merges`[{i}] = {m:?} is not two tokens separated by a space"
            ),
        })?;
        pairs.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .fuse_unk(false)
        .build()
        .map_err(|e| Error::Tokenizer {
            file: file.path().to_path_buf(),
            message: e.to_string(),
        })?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    let pre = file.string("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer: PreTokenizerWrapper = match pre_split(pre) {
        None => ByteLevel::default().add_prefix_space(false).into(),
        Some(split) => {
            let split = Split::new(
                SplitPattern::Regex(split.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Tokenizer {
                file: file.path().to_path_buf(),
                message: format!("the split of `tokenizer.ggml.pre` `{pre}`: {e}"),
            })?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::default()
                    .add_prefix_space(false)
                    .use_regex(false)
                    .into(),
            ])
            .into()
        }
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, &ty)| ty == CONTROL && spelled(t))
        .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(&control);
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty == USER_DEFINED)
        .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    tokenizer.add_tokens(&user);

    let bos = id_key(file, "tokenizer.ggml.bos_token_id", tokens.len())?;
    let eos = id_key(file, "tokenizer.ggml.eos_token_id", tokens.len())?;
    let eot = id_key(file, "tokenizer.ggml.eot_token_id", tokens.len())?;
    if file.bool("tokenizer.ggml.add_bos_token")? == Some(true) {
        if let Some(bos) = bos {
            let name = tokens[bos as usize].clone();
            let template = TemplateProcessing::builder()
                .try_single(format!("{name} $A"))
                .and_then(|b| b.try_pair(format!("{name} $A {name} $B")))
                .map_err(|e| Error::Tokenizer {
                    file: file.path().to_path_buf(),
                    message: format!("the BOS template: {e}"),
                })?
                .special_tokens(vec![(name, bos)])
                .build()
                .map_err(|e| Error::Tokenizer {
                    file: file.path().to_path_buf(),
                    message: format!("the BOS template: {e}"),
                })?;
            tokenizer.with_post_processor(Some(template));
        }
    }
    Ok(GgufVocab {
        tokenizer,
        tokens,
        bos,
        eos,
        eot,
    })
}

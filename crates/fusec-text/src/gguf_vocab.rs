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
//! match whole.
//!
//! `llama` is SentencePiece as transformers' `LlamaTokenizer` runs it (Llama 2,
//! TinyLlama, Mistral): BPE with byte fallback over the file's vocabulary, merges from
//! the file or, as SentencePiece files rarely have them, derived from the scores
//! (transformers' `generate_merges`), the `▁` Metaspace pre-tokenizer prepending to the
//! first word, and a BOS added unless `tokenizer.ggml.add_bos_token` is false. Other
//! tokenizer models are rejected by name.

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
    let byte_level = match model {
        "gpt2" => true,
        "llama" => false,
        other => {
            return Err(unsupported(
                file,
                format!("`tokenizer.ggml.model` is `{other}`; fusec builds `gpt2` (byte-level BPE) and `llama` (SentencePiece BPE) tokenizers from GGUF"),
            ))
        }
    };
    let tokens: Vec<String> = file
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| missing("tokenizer.ggml.tokens"))?
        .into_iter()
        .map(str::to_string)
        .collect();
    let merges = file.strings("tokenizer.ggml.merges")?;
    let types = file.ints("tokenizer.ggml.token_type")?.unwrap_or_default();
    if !byte_level {
        return sentencepiece(file, tokens, merges, &types);
    }
    let merges = merges.ok_or_else(|| missing("tokenizer.ggml.merges"))?;

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

    finish(file, tokenizer, tokens, false)
}

/// The special ids, and the BOS post-processor when the file asks for one (by default
/// for SentencePiece, as llama.cpp and transformers add it).
fn finish(
    file: &GgufFile,
    mut tokenizer: tokenizers::Tokenizer,
    tokens: Vec<String>,
    bos_by_default: bool,
) -> Result<GgufVocab, Error> {
    let bos = id_key(file, "tokenizer.ggml.bos_token_id", tokens.len())?;
    let eos = id_key(file, "tokenizer.ggml.eos_token_id", tokens.len())?;
    let eot = id_key(file, "tokenizer.ggml.eot_token_id", tokens.len())?;
    let add_bos = file
        .bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(bos_by_default);
    if add_bos {
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

/// Merges implied by a vocabulary and its scores: transformers' `generate_merges` with
/// scores. Every split of a token into two tokens of the vocabulary is a merge ranked
/// by the whole token's score (ties: longer left, then longer right piece first; then
/// the file's order, the pieces' ids within one token).
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let mut vocab: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (id, t) in tokens.iter().enumerate() {
        vocab.insert(t.as_str(), id);
    }
    // `dict(zip(tokens, scores))`: one entry per distinct token, at its first position
    // with its last score.
    let mut score_of: std::collections::HashMap<&str, f32> = std::collections::HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (t, &s) in tokens.iter().zip(scores) {
        if score_of.insert(t.as_str(), s).is_none() {
            order.push(t.as_str());
        }
    }
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for merge in order {
        let score = score_of[merge];
        let mut local: Vec<(&str, &str, f32)> = merge
            .char_indices()
            .skip(1)
            .map(|(at, _)| merge.split_at(at))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    // Python's `sorted(..., reverse=True)` is stable: equal keys keep their order.
    merges.sort_by(|a, b| {
        let key = |m: &(&str, &str, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// A SentencePiece vocabulary as transformers' `LlamaTokenizer` builds it (see the
/// module documentation).
fn sentencepiece(
    file: &GgufFile,
    tokens: Vec<String>,
    merges: Option<Vec<&str>>,
    types: &[i64],
) -> Result<GgufVocab, Error> {
    use tokenizers::decoders::{byte_fallback::ByteFallback, fuse::Fuse, strip::Strip};
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};

    let pairs: Vec<(String, String)> = match merges {
        Some(m) => m
            .iter()
            .filter_map(|m| m.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        None => {
            let scores: Vec<f32> = match file.get("tokenizer.ggml.scores") {
                Some(v) => v
                    .as_array()
                    .and_then(|s| s.iter().map(|x| x.as_f64().map(|f| f as f32)).collect())
                    .ok_or_else(|| Error::BadFile {
                        file: file.path().to_path_buf(),
                        message: "`tokenizer.ggml.scores` is not an array of numbers".into(),
                    })?,
                None => {
                    return Err(Error::BadFile {
                        file: file.path().to_path_buf(),
                        message: "a SentencePiece vocabulary needs `tokenizer.ggml.merges` or `tokenizer.ggml.scores`".into(),
                    })
                }
            };
            merges_from_scores(&tokens, &scores)
        }
    };
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (id, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), id as u32);
    }
    let bad = |e: String| Error::Tokenizer {
        file: file.path().to_path_buf(),
        message: e,
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    let replace = tokenizers::decoders::DecoderWrapper::Replace(
        Replace::new("▁", " ").map_err(|e| bad(e.to_string()))?,
    );
    tokenizer.with_decoder(Some(tokenizers::decoders::sequence::Sequence::new(vec![
        replace,
        ByteFallback::default().into(),
        Fuse::default().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &ty)| ty == CONTROL)
        .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(&control);
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &ty)| ty == USER_DEFINED)
        .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    tokenizer.add_tokens(&user);
    finish(file, tokenizer, tokens, true)
}

//! The decode step's interface: what every decode graph takes and returns, by name.
//!
//! A decode step of `B` sequences with `S` positions cached before it takes `input_ids`
//! `[B,1]` (i32), `position_ids` `[B,1]` (i32) and an additive `attention_mask`
//! `[B,1,1,S+1]`, carries one key and one value cache per layer as state
//! (`past.L.key`, `past.L.value`, `[B,KV,S,hd]` in, `[B,KV,S+1,hd]` out), and returns
//! `logits` `[B,1,V]` and the greedy `next_token` `[B,1]`. Builders, the executor,
//! codegen's runtime and the report all read these names from here. Weights are named
//! as Hugging Face spells them.

use crate::shape::Bindings;

pub const INPUT_IDS: &str = "input_ids";
pub const POSITION_IDS: &str = "position_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
pub const LOGITS: &str = "logits";
pub const NEXT_TOKEN: &str = "next_token";
pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";
/// The suffix of the stored values of a weight quantized to FP8 (`W.fp8`), as the
/// FP8 lowering names them and the weights derive them.
pub const FP8_SUFFIX: &str = ".fp8";
/// The suffixes of the integer codes of a weight quantized to 8 bits (`W.q8_0`) or 4
/// bits (`W.q4_0`, `W.q4_1`) per block of 32, as the integer lowering names them and
/// the weights derive them (or read them from a GGUF file's tensors of that type);
/// [`crate::quant::IntFormat::suffix`] says which is which.
pub const Q8_0_SUFFIX: &str = ".q8_0";
pub const Q4_0_SUFFIX: &str = ".q4_0";
pub const Q4_1_SUFFIX: &str = ".q4_1";
pub const Q4_K_SUFFIX: &str = ".q4_k";
/// The suffix of a scale: of a quantized weight (`W.scale`), or of a KV cache
/// (`past.L.key.scale`).
pub const SCALE_SUFFIX: &str = ".scale";
/// The symbol for the batch.
pub const BATCH: &str = "B";
/// The symbol for the number of cached positions before the step.
pub const PAST: &str = "S";

/// The paged step's symbol for the blocks of each layer's KV pool.
pub const POOL_BLOCKS: &str = "P";
/// The paged step's symbol for the width of the block table: the most blocks one
/// sequence may hold.
pub const MAX_BLOCKS: &str = "M";
/// The paged step's block table, `[B,M]` i32: row `b` lists the pool blocks of
/// sequence `b` in order (its positions `i*BS .. (i+1)*BS - 1` are in block
/// `block_table[b, i]`). Layers with a sliding window of `W` positions read their own
/// table, [`window_block_table`], since they keep fewer blocks.
pub const BLOCK_TABLE: &str = "block_table";

/// The paged step's symbol for the positions every sequence holds after the step
/// (its new entry included): a row at position `p` attends `p + 1` of them (the last
/// `W` in a sliding-window layer). The types of a paged step do not hold it; the cost
/// model reads it from the bindings, per row from [`seq_len`] where bound.
pub const SEQ_LEN: &str = "L";

/// The symbol for the positions row `row` of a paged step holds after the step: a
/// ragged batch's own length, which overrides [`SEQ_LEN`] for that row.
pub fn seq_len(row: u64) -> String {
    format!("{SEQ_LEN}.{row}")
}

/// The bindings of a paged step (blocks of `block_size` positions, tables wide enough
/// for `max_seq_len`) whose rows hold `lengths` positions after it: `B` rows, each
/// row's [`seq_len`], `M = ceil(max_seq_len / BS)` and a pool `P` of the blocks the
/// rows hold. A length of 0 is taken as 1 (the row's new entry).
pub fn paged_bindings(lengths: &[u64], block_size: u64, max_seq_len: u64) -> Bindings {
    let bs = block_size.max(1);
    let mut b = Bindings::new()
        .with(BATCH, lengths.len() as u64)
        .with(MAX_BLOCKS, max_seq_len.div_ceil(bs).max(1));
    let mut blocks = 0u64;
    for (row, &len) in lengths.iter().enumerate() {
        let len = len.max(1);
        b.set(&seq_len(row as u64), len);
        blocks = blocks.saturating_add(len.div_ceil(bs));
    }
    b.set(POOL_BLOCKS, blocks.max(1));
    b
}

/// The positions a paged attention reads over the rows of a step of `rows` rows whose
/// tables reach `reach` positions (`M * BS`): each row's length (its [`seq_len`], else
/// [`SEQ_LEN`]) capped at the reach and at `window`. `None` where neither is bound:
/// the lengths are not known.
pub fn paged_positions(b: &Bindings, rows: u64, reach: u64, window: Option<u64>) -> Option<u64> {
    let cap = window.map_or(reach, |w| w.max(1).min(reach));
    if b.get(&seq_len(0)).is_none() {
        return b.get(SEQ_LEN).map(|l| rows.saturating_mul(l.min(cap)));
    }
    let uniform = b.get(SEQ_LEN);
    let mut total = 0u64;
    for row in 0..rows {
        total = total.saturating_add(b.get(&seq_len(row)).or(uniform)?.min(cap));
    }
    Some(total)
}

/// The block table of the layers with a sliding window of `window` positions, `[B,M]`:
/// the blocks before the window are freed, so their entries are not read.
pub fn window_block_table(window: u64) -> String {
    format!("{BLOCK_TABLE}.window{window}")
}

/// What the block-table input `name` covers: `Some(None)` for [`BLOCK_TABLE`],
/// `Some(Some(W))` for [`window_block_table`]`(W)`, `None` for any other name.
pub fn table_window(name: &str) -> Option<Option<u64>> {
    if name == BLOCK_TABLE {
        return Some(None);
    }
    let w = name.strip_prefix(BLOCK_TABLE)?.strip_prefix(".window")?;
    match w.bytes().all(|c| c.is_ascii_digit()) {
        true => w.parse().ok().map(Some),
        false => None,
    }
}

/// The additive mask of the layers with a sliding window of `window` positions,
/// `[B,1,1,min(S+1,W)]`: one entry per slot of their ring-buffer caches (which hold
/// only positions inside the window, so a decode step masks none of them).
pub fn window_mask(window: u64) -> String {
    format!("{ATTENTION_MASK}.window{window}")
}

/// Whether a data input is an additive attention mask: the whole cache's or a
/// window's.
pub fn is_attention_mask(name: &str) -> bool {
    mask_window(name).is_some()
}

/// What the additive mask input `name` covers: `Some(None)` for `attention_mask` (the
/// whole cache), `Some(Some(W))` for [`window_mask`]`(W)`, `None` for any other name.
pub fn mask_window(name: &str) -> Option<Option<u64>> {
    if name == ATTENTION_MASK {
        return Some(None);
    }
    let w = name.strip_prefix(ATTENTION_MASK)?.strip_prefix(".window")?;
    match w.bytes().all(|c| c.is_ascii_digit()) {
        true => w.parse().ok().map(Some),
        false => None,
    }
}

/// State name of layer `layer`'s key cache.
pub fn past_key(layer: u64) -> String {
    format!("past.{layer}.key")
}
pub fn past_value(layer: u64) -> String {
    format!("past.{layer}.value")
}
/// A weight of layer `layer`, e.g. `layer_weight(0, "self_attn.q_proj")`.
pub fn layer_weight(layer: u64, module: &str) -> String {
    format!("model.layers.{layer}.{module}.weight")
}

/// A bias of layer `layer`, e.g. `layer_bias(0, "self_attn.q_proj")`.
pub fn layer_bias(layer: u64, module: &str) -> String {
    format!("model.layers.{layer}.{module}.bias")
}

/// The bindings of a step of `batch` sequences with `past` positions cached before it.
/// A paged step's sizes are bound too, to what the same context needs at most (blocks
/// of one position: `M = S+1` per sequence, `P = B * M`, every row holding
/// [`SEQ_LEN`] `= S+1` positions), so that the cost model and extraction see finite
/// sizes; a paged session binds the real ones.
pub fn bindings(batch: u64, past: u64) -> Bindings {
    let blocks = past.saturating_add(1);
    Bindings::new()
        .with(BATCH, batch)
        .with(PAST, past)
        .with(MAX_BLOCKS, blocks)
        .with(POOL_BLOCKS, batch.saturating_mul(blocks))
        .with(SEQ_LEN, blocks)
}

/// The bindings of a step of `batch` sequences whose KV length is `context` after it
/// (`context - 1` cached positions before; a context of 0 is taken as 1).
pub fn bindings_for_context(batch: u64, context: u64) -> Bindings {
    bindings(batch, context.saturating_sub(1))
}

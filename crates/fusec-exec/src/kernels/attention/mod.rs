//! Attention kernels: the in-place KV append, attention with GQA, and decode attention
//! (RoPE, append and attention in one kernel).
//!
//! - `append.rs`: the in-place append ([`append`], [`kv_append`]);
//! - `storage.rs`: how keys and values are stored (`f32` values or E4M3 bytes) and
//!   viewed;
//! - this module: [`attention`], which plans a call and picks a path per chunk;
//!   `plan.rs`: the three passes over one chunk of query rows;
//! - `inner.rs`: the inner loops each path provides; `portable.rs` and `avx2.rs`
//!   (x86-64, detected at run time): the two paths;
//! - `decode.rs`: [`decode_attention`], RoPE, append and attention in one kernel;
//! - `paged.rs`: [`paged_attention`], the append and attention over a paged KV cache
//!   (blocks of a pool read through a block table).
//!
//! **The in-place append.** A KV cache is a prefix view of a buffer with spare
//! capacity along its sequence axis (`Tensor::with_capacity`). Appending writes only
//! the new entries, after the view's end, and returns a longer view of the same
//! buffer. That is only allowed when no other tensor shares the buffer (so no value
//! anyone can see changes); the executor hands the kernel the cache it owns. A cache
//! without room, or one that is shared, is first copied into a new buffer with room
//! (twice the length needed), and the kernel reports the bytes it copied so that the
//! measured traffic stays honest. The new entries are read in place through their
//! strides (no gathered copy), and an E4M3 cache quantizes them with the bit-exact
//! fast rounding of [`crate::rounding::round_e4m3`] rather than the generic conversion. A cache in
//! compact storage (below) gets the byte of each quantized value.
//!
//! **Attention, in three passes over the keys.** Decode attention is memory-bound: it
//! should read each cached key and value once, at close to memory speed. The query
//! rows that share a KV head (the `heads / kv_heads` heads of a GQA group, and all
//! query positions of one head) are processed together, up to [`ROW_TILE`] at a
//! time, so that one pass over that head's cache serves the whole tile and a GQA
//! group reads its cache once instead of once per head:
//!
//! 1. every score of every row of the tile, into a scratch buffer: the key rows are
//!    read in place from the cache (no copy when their `head_dim` values are
//!    contiguous, as a cache's are; a strided view is gathered row by row) and dotted
//!    with each query row in the order of [`super::dot::dot`]; rows of `f32` values in
//!    place are scored a block of 32 keys at a time by every row of the tile, and the
//!    AVX2 path reduces eight keys' accumulators together (one transposition of eight
//!    registers instead of eight reductions to a scalar), each score still in `dot`'s
//!    order;
//! 2. per row, the rounding of the scores, their maximum, one `exp` per key, the sum
//!    and the normalized probabilities, all in place in the scratch buffer;
//! 3. per row, the weighted sum of the value rows, read in place, into the output
//!    row, which the AVX2 path keeps in registers across all keys.
//!
//! A row skips the keys after its last visible one (its mask at or below the dtype's
//! `finfo.min` from there on: a causal mask's future positions) in all three passes,
//! which halves a prefill chunk's work over its own keys and changes no bit (see
//! `Plan::visible_end`).
//!
//! This replaces an online softmax, which kept a running maximum and paid an extra
//! `exp` and a rescale of the whole accumulator every time the maximum grew, and
//! copied every key and value row before using it. The scratch comes from the
//! executor's per-thread pool (`crate::pool`) with a capacity asked for the cache's
//! capacity rather than its length, so a decode step gets the same buffer back step
//! after step and attention allocates nothing but its result.
//!
//! **Roundings, and agreement with the eager graph.** Scores are rounded as the eager
//! graph rounds them (the `q k^T` product, the scaled scores and the masked scores
//! are each a value of the attention dtype there). The softmax then does what the
//! eager `softmax` kernel does: the maximum (NaN propagating), `e = exp(s - max)` in
//! `f32`, the sum of the `e` in `f64`, and `p = e * (1 / sum)` with the reciprocal
//! rounded to `f32`. The weighted sum adds `p * v` key by key, in key order, from
//! zero, as the eager `p @ v` matmul does; a key whose probability is exactly 0 (a
//! masked one) is skipped, which changes nothing for finite values. Hence, in `f32`
//! and with `head_dim > 1` (where the eager matmul takes that path), the result equals
//! the eager composition bit for bit. Probabilities stay `f32`, as in flash attention
//! and the CUDA kernel; an eager `bf16` graph rounds them to `bf16`, so there the two
//! differ by that rounding. A row whose every key is masked gets `exp(-inf - -inf)`,
//! NaN, as the eager softmax does. The result does not depend on the thread count or
//! on how rows are grouped into tiles and chunks: each row's arithmetic is the same
//! in any grouping.
//!
//! **FP8 caches.** A cache in an FP8 format stores `fp8(x / scale)` with one static
//! scale per cache, so an entry's value is `code * scale`. Its buffer holds the codes
//! either as `f32` values, as the executor holds every other float, or, for E4M3, in
//! compact storage: one byte per code (`Buffer::U8`), which is what a decode session
//! gives the caches only this kernel reads, so that attention streams one byte per
//! cached value, as the IR and the cost model say, instead of four. Both hold the same
//! values and give the same results bit for bit: a compact row is decoded exactly,
//! in registers, into the `f32` values the other storage holds, and every sum then
//! runs in the same order. A key row is decoded once into a row of scratch for all
//! the query rows of a tile; the value rows are decoded inside the weighted sum when
//! one query row reads them, and a block of `VALUE_BLOCK` rows at a time into
//! scratch when several do (a GQA group), so each byte is decoded once per tile.
//! The fast decoding reads an E4M3 NaN code as a finite value, so a pass first scans
//! its head's bytes (32 at a time, and then found in cache by the pass) and takes a
//! decoding that turns NaN codes into NaNs only where one occurs.
//!
//! In either storage the passes apply the scales to the few values derived from the
//! codes instead of to every entry: a score is `dot(q, codes) * k_scale` (then
//! rounded as above), and the
//! value scale is folded into the normalization, `p = e * ((1 / sum) * v_scale)`, so
//! the weighted sum of code rows comes out in value units. Attention over the
//! dequantized caches rounds every `code * scale` (once per entry); this order
//! rounds instead once per score (the product by the key scale) and once per row
//! (the normalization times the value scale), so the two differ by a few `f32` ulps,
//! far below the FP8 quantization itself.
//!
//! **Vector code.** On x86-64 with AVX2 and FMA (detected at run time) the passes are
//! compiled for both and their two inner loops are written with intrinsics: the dot
//! product in `dot::dot`'s order, fused multiply-adds included (which the compiler
//! does not vectorize once it is inlined into the passes), and the weighted sum with
//! the output row in registers, over `f32` or E4M3 value rows, with a multiply and an
//! add each rounded as the portable loop does. So every path gives the same bits. The
//! portable path decodes E4M3 bytes by table.

mod append;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod decode;
mod full;
mod inner;
mod paged;
mod plan;
mod portable;
mod storage;

pub use self::append::{append, kv_append, Ring};
pub use self::decode::{decode_attention, decode_attention_capped, Caches};
pub use self::full::{attention, attention_capped};
pub use self::paged::{paged_attention, Pages};
pub(crate) use self::plan::masked;
pub use self::plan::ROW_TILE;

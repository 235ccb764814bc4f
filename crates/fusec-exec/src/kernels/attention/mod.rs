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
//! - `decode.rs`: [`decode_attention`], RoPE, append and attention in one kernel.
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
//! 1. every score of every row of the tile, key by key, into a scratch buffer: the
//!    key row is read in place from the cache (no copy when its `head_dim` values are
//!    contiguous, as a cache's are; a strided view is gathered row by row) and dotted
//!    with each query row in the order of [`super::dot::dot`];
//! 2. per row, the rounding of the scores, their maximum, one `exp` per key, the sum
//!    and the normalized probabilities, all in place in the scratch buffer;
//! 3. per row, the weighted sum of the value rows, read in place, into the output
//!    row, which the AVX2 path keeps in registers across all keys.
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
//! **Vector code.** On x86-64 with AVX2 (detected at run time) the passes are
//! compiled for AVX2 and their two inner loops are written with intrinsics: the dot
//! product in `dot::dot`'s order (which the compiler does not vectorize once it is
//! inlined into the passes), and the weighted sum with the output row in registers,
//! over `f32` or E4M3 value rows. Both use separate multiplies and adds, never FMA,
//! so every path gives the same bits. The portable path decodes E4M3 bytes by table.

mod append;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod decode;
mod inner;
mod plan;
mod portable;
mod storage;

use self::plan::Plan;
use self::portable::Portable;
use self::storage::{Kv, View4};
use super::{float_buffer, KernelError};
use crate::pool;
use crate::team;
use crate::tensor::{Buffer, Dims, Tensor};

pub use self::append::{append, kv_append};
pub use self::decode::{decode_attention, Caches};
pub use self::plan::ROW_TILE;

/// Multiply-adds of the score pass (query rows times keys times `head_dim`; the value
/// pass does as many again) below which attention runs on the calling thread: a
/// smaller attention finishes in less time than handing work to another thread costs.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// `softmax(q k^T * scale + mask) v` with GQA (query head `h` reads KV head
/// `h / (H / KV)`), in three passes per tile of query rows; see the module
/// documentation. `kv_scales` are the scales of FP8 caches. The result has q's dtype.
/// Keys and values are read as they are stored, `f32` values or E4M3 bytes; when only
/// one of them is stored as bytes, it is decoded into a copy first (no cache the
/// executor makes is stored that way).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    mask: &Tensor,
    kv_scales: Option<(f32, f32)>,
) -> Result<Tensor, KernelError> {
    let compact = |t: &Tensor| matches!(t.buffer(), Buffer::U8(_));
    match (compact(k), compact(v)) {
        (true, true) => attention_in::<u8>(q, k, v, scale, mask, kv_scales),
        (false, false) => attention_in::<f32>(q, k, v, scale, mask, kv_scales),
        (true, false) => attention_in::<f32>(q, &decoded(k), v, scale, mask, kv_scales),
        (false, true) => attention_in::<f32>(q, k, &decoded(v), scale, mask, kv_scales),
    }
}

/// A compact tensor's values in `f32` storage, as a new contiguous tensor.
fn decoded(t: &Tensor) -> Tensor {
    Tensor::from_kernel_f32(t.dtype(), t.dims(), t.to_vec_f32())
}

/// [`attention`] with keys and values stored as `T`.
fn attention_in<T: Kv>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    mask: &Tensor,
    kv_scales: Option<(f32, f32)>,
) -> Result<Tensor, KernelError> {
    let qv = View4::<f32>::new(q, "q")?;
    let kv = View4::<T>::new(k, "k")?;
    let vv = View4::<T>::new(v, "v")?;
    let [bq, heads, tq, hd] = qv.shape;
    let [bk, kv_heads, len, hdk] = kv.shape;
    if bk != bq || hdk != hd || vv.shape != kv.shape {
        return Err(KernelError::Invalid(format!(
            "attention: q {:?}, k {:?} and v {:?} do not agree",
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(KernelError::Invalid(format!(
            "attention: {heads} query heads are not a multiple of {kv_heads} KV heads"
        )));
    }
    let dtype = q.dtype();
    let kv_dtype_ok =
        |t: &Tensor| t.dtype() == dtype || (kv_scales.is_some() && t.dtype().is_fp8());
    if !kv_dtype_ok(k) || !kv_dtype_ok(v) || mask.dtype() != dtype {
        return Err(KernelError::Invalid(format!(
            "attention: dtypes q {dtype}, k {}, v {}, mask {} do not agree",
            k.dtype(),
            v.dtype(),
            mask.dtype()
        )));
    }
    let scores = [bq, heads, tq, len];
    let mask_strides = mask_strides(mask, scores).ok_or_else(|| {
        KernelError::Invalid(format!(
            "attention: mask {:?} does not broadcast to the scores {scores:?}",
            mask.shape()
        ))
    })?;
    let group = heads / kv_heads;
    let rows = bq * heads * tq;
    let work = rows * len * hd;
    let parallel = work >= PARALLEL_MIN_WORK;
    let plan = Plan {
        q: qv,
        k: kv,
        v: vv,
        mask: float_buffer(mask, "attention")?,
        mask_offset: mask.offset(),
        mask_strides,
        dtype,
        scale,
        k_scale: kv_scales.map(|s| s.0).filter(|_| k.dtype().is_fp8()),
        v_scale: kv_scales.map(|s| s.1).filter(|_| v.dtype().is_fp8()),
        heads,
        group,
        tq,
        len,
        hd,
        chunk_rows: chunk_rows(bq * kv_heads, group * tq, parallel),
        positions: len.max(k.storage_len() / (bq * kv_heads * hd).max(1)),
    };
    let mut out = pool::zeros(rows * hd);
    if hd > 0 && rows > 0 {
        team::for_each_chunk_mut(&mut out, plan.chunk_rows * hd, parallel, |i, chunk| {
            plan.chunk(i, chunk)
        });
    }
    Ok(Tensor::from_kernel_f32(
        dtype,
        Dims::from([bq, heads, tq, hd]),
        out,
    ))
}

/// The strides that read `mask` broadcast to the scores' shape, or `None` when it does
/// not broadcast to it (without allocating, unlike the general broadcasting helpers).
fn mask_strides(mask: &Tensor, scores: [usize; 4]) -> Option<[usize; 4]> {
    let rank = mask.rank();
    if rank > 4 {
        return None;
    }
    let pad = 4 - rank;
    let mut strides = [0; 4];
    for (i, (&d, &s)) in mask.shape().iter().zip(mask.strides()).enumerate() {
        if d == scores[pad + i] {
            strides[pad + i] = s;
        } else if d != 1 {
            return None;
        }
    }
    Some(strides)
}

/// Query rows per chunk of the parallel loop. A chunk is a whole block of rows that
/// share a KV head (`block_rows = group * tq`), so that the block's cache is read once;
/// only when there are fewer blocks than threads are blocks split, into the largest
/// divisor of `block_rows` that gives every thread a chunk, trading extra reads of a
/// cache for the second core's bandwidth. Grouping never changes a row's result.
fn chunk_rows(blocks: usize, block_rows: usize, parallel: bool) -> usize {
    let threads = if parallel { team::threads() } else { 1 };
    if blocks >= threads || block_rows <= 1 {
        return block_rows.max(1);
    }
    let most = block_rows.div_ceil(threads.div_ceil(blocks.max(1))).max(1);
    (1..=most)
        .rev()
        .find(|&d| block_rows.is_multiple_of(d))
        .unwrap_or(1)
}

impl<T: Kv> Plan<'_, T> {
    /// Computes chunk `index` of the output rows on the fastest path this machine has.
    fn chunk(&self, index: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::available() {
                avx2::chunk(self, index, out);
                return;
            }
        }
        self.chunk_body(index, out, &Portable);
    }
}

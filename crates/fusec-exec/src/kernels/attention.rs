//! Attention kernels: the in-place KV append, attention with GQA, and decode attention
//! (RoPE, append and attention in one kernel).
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
//! fast rounding of [`round_e4m3`] rather than the generic conversion. A cache in
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
//! executor's per-thread pool ([`crate::pool`]) with a capacity asked for the cache's
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
//! one query row reads them, and a block of [`VALUE_BLOCK`] rows at a time into
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

use fusec_ir::{numerics, DType};

use super::dot::dot;
use super::fused::rope;
use super::gemv::round_e4m3;
use super::rowdot::e4m3_table;
use super::strided::walk;
use super::{float_buffer, KernelError};
use crate::pool;
use crate::recycle;
use crate::rounding::{self, round};
use crate::team;
use crate::tensor::{Buffer, Dims, Tensor};

/// Multiply-adds of the score pass (query rows times keys times `head_dim`; the value
/// pass does as many again) below which attention runs on the calling thread: a
/// smaller attention finishes in less time than handing work to another thread costs.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// Query rows that share one pass over their KV head's cache. A tile's query rows and
/// outputs (`ROW_TILE * head_dim` values each) stay in L1 while the key and value rows
/// stream past; eight covers the GQA groups of common models in one pass.
pub const ROW_TILE: usize = 8;

/// Value rows of a compact cache decoded at a time when several query rows share them
/// (16 KB of `f32` values at a `head_dim` of 128, which stay in L1 while every row of
/// the tile adds them).
const VALUE_BLOCK: usize = 32;

/// The smallest capacity, in positions, of a cache that has to be copied to grow.
const MIN_CAPACITY: usize = 16;

/// `past` with `new` appended along `axis`: written in place into `past`'s buffer when
/// it has room and is not shared, else into a new buffer with room. Values of `new`
/// are stored through `store` (the cache's rounding, or FP8 quantization); a cache in
/// compact E4M3 storage (`Buffer::U8`) gets the byte of the stored value, which
/// `store` has made an E4M3 value. Returns the appended view and the bytes of `past`
/// copied (0 in place). `past` is left viewing the buffer the result shares (a copy of
/// its values if it was copied).
pub fn append(
    past: &mut Tensor,
    new: &Tensor,
    axis: usize,
    store: impl Fn(f32) -> f32,
) -> Result<(Tensor, u64), KernelError> {
    let op = "kv.append";
    let compact = matches!(past.buffer(), Buffer::U8(_));
    if compact && past.dtype() != DType::Fp8E4M3 {
        return Err(KernelError::Invalid(format!(
            "{op}: a {} cache cannot have byte storage",
            past.dtype()
        )));
    }
    if !compact {
        float_buffer(past, op)?;
    }
    let src = float_buffer(new, op)?;
    let agrees = past.rank() == new.rank()
        && axis < past.rank()
        && past
            .shape()
            .iter()
            .zip(new.shape())
            .enumerate()
            .all(|(d, (a, b))| d == axis || a == b);
    if !agrees {
        return Err(KernelError::Invalid(format!(
            "{op}: cannot append {:?} to {:?} along axis {axis}",
            new.shape(),
            past.shape()
        )));
    }
    let (len, n) = (past.shape()[axis], new.shape()[axis]);
    let mut copied = 0;
    let room = past.capacity_along(axis).is_some_and(|c| c >= len + n);
    if !room || !past.is_unique() {
        copied = past.bytes();
        *past = past.with_capacity(axis, (2 * (len + n)).max(MIN_CAPACITY))?;
    }
    let capacity = past.capacity_along(axis).ok_or_else(|| {
        KernelError::Invalid(format!("{op}: the grown cache is not a prefix view"))
    })?;
    let outer: usize = past.shape()[..axis].iter().product();
    let block: usize = past.shape()[axis + 1..].iter().product();
    let entries = Entries {
        new,
        src,
        outer,
        span: n * block,
        capacity,
        len,
        block,
    };
    let shared = || KernelError::Invalid(format!("{op}: the cache buffer is shared after copying"));
    if compact {
        let buf = past.unique_u8_mut().ok_or_else(shared)?;
        entries.write(buf, |v| e4m3_code(store(v)));
    } else {
        let buf = past.unique_f32_mut().ok_or_else(shared)?;
        entries.write(buf, store);
    }
    let mut shape = past.dims();
    shape[axis] = len + n;
    Ok((past.with_layout(shape, past.stride_dims(), 0), copied))
}

/// The byte of an E4M3 value (the result of [`round_e4m3`], which saturates, so every
/// value but NaN is one); a NaN becomes the E4M3 NaN of its sign, whose value reads
/// back as NaN (its payload is not kept).
#[inline]
fn e4m3_code(x: f32) -> u8 {
    rounding::e4m3_bits_nan(x).unwrap_or_else(|| numerics::e4m3_encode(x))
}

/// The entries of `new` to append, and where they go in a cache's buffer.
struct Entries<'a> {
    new: &'a Tensor,
    src: &'a [f32],
    outer: usize,
    /// Values of `new` per outer index.
    span: usize,
    capacity: usize,
    len: usize,
    block: usize,
}

impl Entries<'_> {
    /// Writes `put(v)` for every value `v` of `new` at its place in `buf`. The new
    /// entries are read in place through their strides (no gathered copy).
    fn write<T>(&self, buf: &mut [T], put: impl Fn(f32) -> T) {
        let (span, new, src) = (self.span, self.new, self.src);
        if span == 0 || self.outer == 0 {
            return;
        }
        // Element `e` of `new` in row-major order is entry `rest` of outer index `o`.
        let dst = |e: usize| (e / span * self.capacity + self.len) * self.block + e % span;
        if new.is_contiguous() {
            let values = &src[new.offset()..new.offset() + self.outer * span];
            for (o, from) in values.chunks_exact(span).enumerate() {
                let at = dst(o * span);
                for (d, &v) in buf[at..at + span].iter_mut().zip(from) {
                    *d = put(v);
                }
            }
        } else {
            // A row along the last axis lies inside one outer index (the last axis is
            // the appended one or one after it), so its destination is contiguous.
            let rank = new.rank();
            let (inner, step) = (new.shape()[rank - 1], new.strides()[rank - 1]);
            let mut first = 0;
            walk(
                &new.shape()[..rank - 1],
                [&new.strides()[..rank - 1]],
                [new.offset()],
                |[from]| {
                    let at = dst(first);
                    for (i, d) in buf[at..at + inner].iter_mut().enumerate() {
                        *d = put(src[from + i * step]);
                    }
                    first += inner;
                },
            );
        }
    }
}

/// How a cache's values are stored: rounded to its dtype, or for an FP8 cache
/// quantized as `fp8(x / scale)`. E4M3 takes [`round_e4m3`], which equals the generic
/// `numerics::round_to` bit for bit at a fraction of its cost, and `f32` is stored as
/// it is, without a call to the generic rounding per value.
fn storer(dtype: DType, scale: Option<f32>) -> impl Fn(f32) -> f32 {
    let scale = scale.filter(|_| dtype.is_fp8());
    move |x| match (dtype, scale) {
        (DType::F32, _) => x,
        (DType::Fp8E4M3, Some(s)) => round_e4m3(x / s),
        (DType::Fp8E4M3, None) => round_e4m3(x),
        (_, Some(s)) => numerics::round_to(dtype, x / s),
        (_, None) => round(dtype, x),
    }
}

/// `kv.append(past, new)` along axis -2, in place (see [`append`]).
pub fn kv_append(past: &mut Tensor, new: &Tensor) -> Result<(Tensor, u64), KernelError> {
    if past.dtype() != new.dtype() || past.rank() < 2 {
        return Err(KernelError::Invalid(format!(
            "kv.append: cannot append {}{:?} to {}{:?}",
            new.dtype(),
            new.shape(),
            past.dtype(),
            past.shape()
        )));
    }
    let axis = past.rank() - 2;
    let dtype = past.dtype();
    append(past, new, axis, storer(dtype, None))
}

/// How an attention operand's values are stored: `f32` values, or the bytes of E4M3
/// values (a cache in compact storage). The passes read keys and values through this,
/// so that a compact cache is read at one byte per value and decoded in registers.
trait Kv: Copy + Send + Sync + 'static {
    /// Whether this is compact storage, decoded before use.
    const COMPACT: bool;

    /// `t`'s buffer, if it has this storage.
    fn buffer(t: &Tensor) -> Option<&[Self]>;

    /// The value of one stored entry.
    fn value(self) -> f32;

    /// Whether `data` may hold a NaN code, which the fast decoding does not read as NaN
    /// (always false for `f32` values, which need no decoding).
    fn may_hold_nan(inner: &impl Inner, data: &[Self]) -> bool;

    /// `row` as `f32` values: `row` itself, or decoded by `inner` into `tmp` (at least
    /// `row.len()` long), minding NaN codes when `nan` says they may occur.
    fn values<'s>(inner: &impl Inner, row: &'s [Self], tmp: &'s mut [f32], nan: bool) -> &'s [f32];

    /// [`Inner::accumulate`] over value rows of this storage, minding NaN codes when
    /// `nan` says they may occur.
    #[allow(clippy::too_many_arguments)]
    fn accumulate(
        inner: &impl Inner,
        out: &mut [f32],
        probs: &[f32],
        v: &[Self],
        base: usize,
        stride: usize,
        nan: bool,
    );
}

impl Kv for f32 {
    const COMPACT: bool = false;

    fn buffer(t: &Tensor) -> Option<&[f32]> {
        t.f32_buffer()
    }

    #[inline(always)]
    fn value(self) -> f32 {
        self
    }

    fn may_hold_nan(_: &impl Inner, _: &[f32]) -> bool {
        false
    }

    #[inline(always)]
    fn values<'s>(_: &impl Inner, row: &'s [f32], _: &'s mut [f32], _: bool) -> &'s [f32] {
        row
    }

    #[inline(always)]
    fn accumulate(
        inner: &impl Inner,
        out: &mut [f32],
        probs: &[f32],
        v: &[f32],
        base: usize,
        stride: usize,
        _: bool,
    ) {
        inner.accumulate(out, probs, v, base, stride);
    }
}

impl Kv for u8 {
    const COMPACT: bool = true;

    fn buffer(t: &Tensor) -> Option<&[u8]> {
        match t.buffer() {
            Buffer::U8(b) if t.dtype() == DType::Fp8E4M3 => Some(b),
            _ => None,
        }
    }

    #[inline(always)]
    fn value(self) -> f32 {
        e4m3_table()[usize::from(self)]
    }

    #[inline(always)]
    fn may_hold_nan(inner: &impl Inner, data: &[u8]) -> bool {
        inner.has_e4m3_nan(data)
    }

    #[inline(always)]
    fn values<'s>(inner: &impl Inner, row: &'s [u8], tmp: &'s mut [f32], nan: bool) -> &'s [f32] {
        let tmp = &mut tmp[..row.len()];
        inner.decode_e4m3(row, tmp, nan);
        tmp
    }

    #[inline(always)]
    fn accumulate(
        inner: &impl Inner,
        out: &mut [f32],
        probs: &[f32],
        v: &[u8],
        base: usize,
        stride: usize,
        nan: bool,
    ) {
        inner.accumulate_e4m3(out, probs, v, base, stride, nan);
    }
}

/// A `[batch, heads, len, head_dim]` operand as a strided view of its buffer.
#[derive(Copy, Clone)]
struct View4<'a, T> {
    data: &'a [T],
    shape: [usize; 4],
    strides: [usize; 4],
    offset: usize,
}

impl<'a, T: Kv> View4<'a, T> {
    fn new(t: &'a Tensor, what: &str) -> Result<Self, KernelError> {
        let data = T::buffer(t).ok_or_else(|| {
            KernelError::Invalid(format!(
                "attention needs {what} stored as f32 values or E4M3 bytes, got {}",
                t.dtype()
            ))
        })?;
        match (t.shape(), t.strides()) {
            ([a, b, c, d], [sa, sb, sc, sd]) => Ok(View4 {
                data,
                shape: [*a, *b, *c, *d],
                strides: [*sa, *sb, *sc, *sd],
                offset: t.offset(),
            }),
            _ => Err(KernelError::Invalid(format!(
                "attention: {what} must be [batch, heads, len, head_dim], got {:?}",
                t.shape()
            ))),
        }
    }

    /// The buffer offset of row `[b, h, i, :]`.
    #[inline(always)]
    fn base(&self, b: usize, h: usize, i: usize) -> usize {
        self.offset + b * self.strides[0] + h * self.strides[1] + i * self.strides[2]
    }

    /// Whether rows `[b, h, :, :]` may hold a NaN code (see [`Kv::may_hold_nan`]); a
    /// view with strided rows reads them exactly, so it answers false.
    #[inline(always)]
    fn may_hold_nan(&self, inner: &impl Inner, b: usize, h: usize) -> bool {
        let [len, hd] = [self.shape[2], self.shape[3]];
        if !T::COMPACT || self.strides[3] != 1 || len == 0 || hd == 0 {
            return false;
        }
        let base = self.base(b, h, 0);
        if self.strides[2] == hd {
            T::may_hold_nan(inner, &self.data[base..base + len * hd])
        } else {
            (0..len).any(|j| {
                let at = base + j * self.strides[2];
                T::may_hold_nan(inner, &self.data[at..at + hd])
            })
        }
    }

    /// Row `[b, h, i, :]` as `f32` values: read in place when its values are
    /// contiguous `f32`s (a cache's rows always are contiguous), else decoded by
    /// `inner` (minding NaN codes when `nan`) or gathered into `tmp` (`head_dim`
    /// long).
    #[inline(always)]
    fn row<'s>(
        &'s self,
        inner: &impl Inner,
        (b, h, i): (usize, usize, usize),
        tmp: &'s mut [f32],
        nan: bool,
    ) -> &'s [f32] {
        let base = self.base(b, h, i);
        let n = self.shape[3];
        if self.strides[3] == 1 {
            T::values(inner, &self.data[base..base + n], tmp, nan)
        } else {
            let sd = self.strides[3];
            for (j, t) in tmp.iter_mut().enumerate() {
                *t = self.data[base + j * sd].value();
            }
            tmp
        }
    }
}

/// One attention call's operands and geometry, shared by every chunk of rows.
struct Plan<'a, T> {
    q: View4<'a, f32>,
    /// The keys and values, both in the storage `T`.
    k: View4<'a, T>,
    v: View4<'a, T>,
    mask: &'a [f32],
    mask_offset: usize,
    /// The mask's strides broadcast to the scores `[batch, heads, tq, len]`.
    mask_strides: [usize; 4],
    dtype: DType,
    scale: f32,
    /// The scales of FP8 caches: keys, values.
    k_scale: Option<f32>,
    v_scale: Option<f32>,
    heads: usize,
    group: usize,
    tq: usize,
    len: usize,
    hd: usize,
    /// Query rows per chunk: a divisor of `group * tq`, so that a chunk's rows share
    /// one KV head.
    chunk_rows: usize,
    /// Positions the scores scratch has room for: the cache's capacity when the keys
    /// are a cache, so that its size does not change as the cache grows in place.
    positions: usize,
}

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

    /// Chunk `index` of the output rows (`out`, zeroed, `rows * head_dim` long): every
    /// row shares one KV head, and rows are processed [`ROW_TILE`] at a time in the
    /// three passes of the module documentation, with the inner loops of `inner`.
    /// Inlined into the AVX2 path, so that the code around the inner loops is compiled
    /// for AVX2 too; the arithmetic is the same on every path.
    #[inline(always)]
    fn chunk_body(&self, index: usize, out: &mut [f32], inner: &impl Inner) {
        let (hd, len) = (self.hd, self.len);
        let rows = out.len() / hd;
        let first = index * self.chunk_rows;
        let (b, h0) = (first / (self.heads * self.tq), first / self.tq % self.heads);
        let kvh = h0 / self.group;
        let tile = ROW_TILE.min(rows);
        // One scratch buffer, from this thread's pool, holds the tile's scores, its
        // query rows, and a key and a value row for views with strided rows. Its
        // capacity is asked for the cache's capacity, so that the pool hands back the
        // same buffer at every length the cache takes in place; only the part this
        // length uses is zeroed.
        // Compact values take a block of decoded value rows as well.
        let decoded = if T::COMPACT { VALUE_BLOCK * hd } else { 0 };
        let mut scratch = pool::take(tile * (self.positions + hd) + 2 * hd + decoded);
        scratch.resize(tile * (len + hd) + 2 * hd + decoded, 0.0);
        let (scores, rest) = scratch.split_at_mut(tile * len);
        let (queries, rest) = rest.split_at_mut(tile * hd);
        let (ktmp, rest) = rest.split_at_mut(hd);
        let (vtmp, vblock) = rest.split_at_mut(hd);
        // Whether this head's compact keys and values may hold a NaN code: one scan of
        // their bytes (which the passes then find in cache) lets the common case,
        // without any, decode without the per-value NaN fix-up.
        let k_nan = self.k.may_hold_nan(inner, b, kvh);
        let v_nan = self.v.may_hold_nan(inner, b, kvh);
        for start in (0..rows).step_by(tile) {
            let n = tile.min(rows - start);
            let at = |r: usize| {
                let g = first + start + r;
                (g / self.tq % self.heads, g % self.tq)
            };
            for (r, qrow) in queries.chunks_exact_mut(hd).take(n).enumerate() {
                let (h, t) = at(r);
                qrow.copy_from_slice(self.q.row(inner, (b, h, t), ktmp, false));
            }
            // Pass 1: every score of the tile, one key row read per key (a compact
            // row is decoded once, into `ktmp`, for all the rows of the tile).
            for j in 0..len {
                let krow = self.k.row(inner, (b, kvh, j), ktmp, k_nan);
                for (r, qrow) in queries.chunks_exact(hd).take(n).enumerate() {
                    scores[r * len + j] = inner.dot(qrow, krow);
                }
            }
            // Pass 2: each row's softmax, in place.
            for r in 0..n {
                let (h, t) = at(r);
                let ms = self.mask_strides;
                let mask_base = self.mask_offset + b * ms[0] + h * ms[1] + t * ms[2];
                self.softmax(&mut scores[r * len..(r + 1) * len], mask_base);
            }
            // Pass 3: the weighted sum of the value rows.
            let outs = &mut out[start * hd..(start + n) * hd];
            if T::COMPACT && n > 1 && self.v.strides[3] == 1 {
                // Compact rows shared by several output rows: each block of value rows
                // is decoded once, then every output row of the tile adds it. Each
                // output value still sums its keys in key order, so the blocks change
                // no bit.
                let (base, stride) = (self.v.base(b, kvh, 0), self.v.strides[2]);
                for first in (0..len).step_by(VALUE_BLOCK) {
                    let keys = VALUE_BLOCK.min(len - first);
                    for (i, dst) in vblock.chunks_exact_mut(hd).take(keys).enumerate() {
                        let at = base + (first + i) * stride;
                        T::values(inner, &self.v.data[at..at + hd], dst, v_nan);
                    }
                    for (r, o) in outs.chunks_exact_mut(hd).enumerate() {
                        let probs = &scores[r * len + first..r * len + first + keys];
                        inner.accumulate(o, probs, vblock, 0, hd);
                    }
                }
            } else if self.v.strides[3] == 1 {
                // Rows in place: each output row accumulates in registers over all keys
                // (the value rows it reads again for the next row of the tile are in
                // L1 or L2 by then).
                let base = self.v.base(b, kvh, 0);
                for (r, o) in outs.chunks_exact_mut(hd).enumerate() {
                    let probs = &scores[r * len..(r + 1) * len];
                    let stride = self.v.strides[2];
                    T::accumulate(inner, o, probs, self.v.data, base, stride, v_nan);
                }
            } else {
                for j in 0..len {
                    let vrow = self.v.row(inner, (b, kvh, j), vtmp, true);
                    for (r, o) in outs.chunks_exact_mut(hd).enumerate() {
                        Portable.accumulate(o, &scores[r * len + j..][..1], vrow, 0, 0);
                    }
                }
            }
        }
        pool::give(scratch);
    }

    /// Turns one row's raw dot products into probabilities, in place: the scores
    /// rounded as the eager graph rounds them, then the eager softmax's arithmetic (see
    /// the module documentation), with an FP8 cache's scales applied.
    #[inline(always)]
    fn softmax(&self, row: &mut [f32], mask_base: usize) {
        let (dtype, scale, step) = (self.dtype, self.scale, self.mask_strides[3]);
        let ks = self.k_scale.unwrap_or(1.0);
        let fp8 = self.k_scale.is_some();
        let mask = |j: usize| self.mask[mask_base + j * step];
        if dtype == DType::F32 {
            // Rounding to f32 changes nothing; a loop without it vectorizes.
            match (fp8, step) {
                (false, 1) => {
                    let m = &self.mask[mask_base..mask_base + row.len()];
                    for (s, &m) in row.iter_mut().zip(m) {
                        *s = *s * scale + m;
                    }
                }
                (false, _) => {
                    for (j, s) in row.iter_mut().enumerate() {
                        *s = *s * scale + mask(j);
                    }
                }
                (true, _) => {
                    for (j, s) in row.iter_mut().enumerate() {
                        *s = *s * ks * scale + mask(j);
                    }
                }
            }
        } else {
            for (j, s) in row.iter_mut().enumerate() {
                let raw = if fp8 { *s * ks } else { *s };
                *s = round(dtype, round(dtype, round(dtype, raw) * scale) + mask(j));
            }
        }
        let max = nan_max(row);
        for s in row.iter_mut() {
            *s = (*s - max).exp();
        }
        // Summed in order in f64, as the eager softmax sums.
        let sum = row.iter().fold(0.0f64, |a, &e| a + f64::from(e));
        let inv = (1.0 / sum) as f32;
        let norm = match self.v_scale {
            Some(vs) => inv * vs,
            None => inv,
        };
        for s in row.iter_mut() {
            *s *= norm;
        }
    }
}

/// The largest value, or NaN if any value is NaN: the eager softmax's maximum (a fold
/// that keeps the first NaN), computed over eight lanes so that it vectorizes. Which
/// of two equal values, or of `0.0` and `-0.0`, it picks does not matter to
/// `exp(s - max)`.
#[inline(always)]
fn nan_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut nan = false;
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
            nan |= x.is_nan();
        }
    }
    let mut max = lanes
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for &x in tail {
        max = if x > max { x } else { max };
        nan |= x.is_nan();
    }
    if nan {
        f32::NAN
    } else {
        max
    }
}

/// The inner loops of the passes, as each path provides them.
trait Inner {
    /// [`super::dot::dot`] of `a` and `b`, bit for bit.
    fn dot(&self, a: &[f32], b: &[f32]) -> f32;

    /// `out[d] += probs[j] * v[base + j * stride + d]` for every key `j` in order, each
    /// product and sum rounded, skipping keys of probability exactly 0 (a masked key
    /// adds nothing to a finite sum; a NaN weight, of a fully masked row, still
    /// reaches the output).
    fn accumulate(&self, out: &mut [f32], probs: &[f32], v: &[f32], base: usize, stride: usize);

    /// Whether any of `codes` is an E4M3 NaN (`s 1111 111`).
    fn has_e4m3_nan(&self, codes: &[u8]) -> bool;

    /// `out[i]` = the value of the E4M3 byte `codes[i]`, exactly (`out` is as long as
    /// `codes`). Unless `nan`, the caller has checked that no code is a NaN, and a
    /// path may read one as any value.
    fn decode_e4m3(&self, codes: &[u8], out: &mut [f32], nan: bool);

    /// [`Inner::accumulate`] over value rows of E4M3 bytes, each decoded exactly: the
    /// same sums as over the same values stored as `f32`, bit for bit (with `nan` as
    /// for [`Inner::decode_e4m3`]).
    #[allow(clippy::too_many_arguments)]
    fn accumulate_e4m3(
        &self,
        out: &mut [f32],
        probs: &[f32],
        v: &[u8],
        base: usize,
        stride: usize,
        nan: bool,
    );
}

/// The portable inner loops.
struct Portable;

impl Inner for Portable {
    #[inline(always)]
    fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }

    #[inline(always)]
    fn accumulate(&self, out: &mut [f32], probs: &[f32], v: &[f32], base: usize, stride: usize) {
        let hd = out.len();
        for (j, &p) in probs.iter().enumerate() {
            if p != 0.0 {
                let row = &v[base + j * stride..base + j * stride + hd];
                for (a, &x) in out.iter_mut().zip(row) {
                    *a += p * x;
                }
            }
        }
    }

    #[inline(always)]
    fn has_e4m3_nan(&self, codes: &[u8]) -> bool {
        codes.iter().any(|&c| c & 0x7f == 0x7f)
    }

    #[inline(always)]
    fn decode_e4m3(&self, codes: &[u8], out: &mut [f32], _: bool) {
        let table = e4m3_table();
        for (o, &c) in out.iter_mut().zip(codes) {
            *o = table[usize::from(c)];
        }
    }

    #[inline(always)]
    fn accumulate_e4m3(
        &self,
        out: &mut [f32],
        probs: &[f32],
        v: &[u8],
        base: usize,
        stride: usize,
        _: bool,
    ) {
        let (hd, table) = (out.len(), e4m3_table());
        for (j, &p) in probs.iter().enumerate() {
            if p != 0.0 {
                let row = &v[base + j * stride..base + j * stride + hd];
                for (a, &x) in out.iter_mut().zip(row) {
                    *a += p * table[usize::from(x)];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The attention passes compiled for AVX2, with the two inner loops written with
    //! intrinsics: the dot product in the order of `dot::dot` (the compiler does
    //! not vectorize that order by itself once it is inlined into the passes), and the
    //! weighted sum of value rows with the output row held in registers across all
    //! keys, where the compiler's loop loaded and stored it once per key. Only
    //! separate multiplies and adds are used, never FMA, so this path rounds exactly
    //! as the portable one does.
    //!
    //! `unsafe` is confined to this module: the `#[target_feature]` functions run only
    //! after run-time detection said the CPU has AVX2, and their loads and stores are
    //! unaligned accesses of eight values inside slices whose lengths were checked
    //! first.
    #![allow(unsafe_code)]

    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::{Inner, Kv, Plan, Portable};

    /// Whether this CPU has AVX2, detected once.
    pub(super) fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2"))
    }

    /// `Plan::chunk_body` on AVX2; the caller has checked [`available`].
    pub(super) fn chunk<T: Kv>(plan: &Plan<'_, T>, index: usize, out: &mut [f32]) {
        // SAFETY: `available()` returned true (the caller checks it), so this CPU runs
        // the AVX2 instructions `chunk_avx2` contains.
        unsafe { chunk_avx2(plan, index, out) }
    }

    #[target_feature(enable = "avx2")]
    fn chunk_avx2<T: Kv>(plan: &Plan<'_, T>, index: usize, out: &mut [f32]) {
        plan.chunk_body(index, out, &Avx2);
    }

    /// The AVX2 inner loops; only made where [`available`] said yes.
    struct Avx2;

    impl Inner for Avx2 {
        #[inline(always)]
        fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
            // SAFETY: an `Avx2` exists only inside `chunk_avx2`, which runs on CPUs
            // with AVX2.
            unsafe { dot(a, b) }
        }

        #[inline(always)]
        fn accumulate(
            &self,
            out: &mut [f32],
            probs: &[f32],
            v: &[f32],
            base: usize,
            stride: usize,
        ) {
            checked_accumulate::<f32, false>(out, probs, v, base, stride);
        }

        #[inline(always)]
        fn has_e4m3_nan(&self, codes: &[u8]) -> bool {
            let main = codes.len() - codes.len() % 32;
            // SAFETY: as for `dot`; every load reads `j..j + 32` with
            // `j + 32 <= main <= codes.len()`.
            let any = unsafe {
                let low = _mm256_set1_epi8(0x7f);
                let mut any = _mm256_setzero_si256();
                for j in (0..main).step_by(32) {
                    let c = _mm256_loadu_si256(codes.as_ptr().add(j).cast());
                    any = _mm256_or_si256(any, _mm256_cmpeq_epi8(_mm256_and_si256(c, low), low));
                }
                _mm256_movemask_epi8(any) != 0
            };
            any || Portable.has_e4m3_nan(&codes[main..])
        }

        #[inline(always)]
        fn decode_e4m3(&self, codes: &[u8], out: &mut [f32], nan: bool) {
            if nan {
                decode::<true>(codes, out);
            } else {
                decode::<false>(codes, out);
            }
        }

        #[inline(always)]
        fn accumulate_e4m3(
            &self,
            out: &mut [f32],
            probs: &[f32],
            v: &[u8],
            base: usize,
            stride: usize,
            nan: bool,
        ) {
            if nan {
                checked_accumulate::<u8, true>(out, probs, v, base, stride);
            } else {
                checked_accumulate::<u8, false>(out, probs, v, base, stride);
            }
        }
    }

    /// `Inner::decode_e4m3` on AVX2, minding NaN codes when `NAN`.
    #[inline(always)]
    fn decode<const NAN: bool>(codes: &[u8], out: &mut [f32]) {
        let n = codes.len().min(out.len());
        let main = n - n % 8;
        for j in (0..main).step_by(8) {
            // SAFETY: as for `dot`; `j + 8 <= main <= n` keeps the eight bytes read
            // and the eight values written inside both slices.
            unsafe {
                let v = u8::load8::<NAN>(codes.as_ptr().add(j));
                _mm256_storeu_ps(out.as_mut_ptr().add(j), v);
            }
        }
        Portable.decode_e4m3(&codes[main..n], &mut out[main..n], NAN);
    }

    /// `Inner::accumulate` on AVX2 over value rows stored as `T`, after checking that
    /// every row read lies inside `v`.
    #[inline(always)]
    fn checked_accumulate<T: Load, const NAN: bool>(
        out: &mut [f32],
        probs: &[f32],
        v: &[T],
        base: usize,
        stride: usize,
    ) {
        let hd = out.len();
        let last = probs.len().checked_sub(1).map(|j| base + j * stride + hd);
        if last.is_some_and(|end| end > v.len()) {
            // Not reachable for a valid view; the portable loop's bounds checks
            // report the bug as a panic instead of reading out of bounds here.
            T::portable(out, probs, v, base, stride);
            return;
        }
        // SAFETY: an `Avx2` exists only inside `chunk_avx2`, which runs on CPUs with
        // AVX2, and this is only called by its methods; every value row read,
        // `v[base + j * stride..][..hd]` for `j < probs.len()`, lies inside `v`
        // (checked above).
        unsafe { accumulate::<T, NAN>(out, probs, v, base, stride) }
    }

    /// Eight stored values as `f32`, exactly, and the portable loops over them.
    trait Load: Kv {
        /// The eight values at `p`; unless `NAN`, the caller has checked that they
        /// hold no NaN code, and one may read as any value.
        ///
        /// # Safety
        /// The CPU has AVX2 and `p..p + 8` lies inside one slice.
        unsafe fn load8<const NAN: bool>(p: *const Self) -> __m256;

        /// `Portable`'s weighted sum over rows of this storage.
        fn portable(out: &mut [f32], probs: &[f32], v: &[Self], base: usize, stride: usize);
    }

    impl Load for f32 {
        #[inline(always)]
        unsafe fn load8<const NAN: bool>(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }

        fn portable(out: &mut [f32], probs: &[f32], v: &[f32], base: usize, stride: usize) {
            Portable.accumulate(out, probs, v, base, stride);
        }
    }

    impl Load for u8 {
        /// Eight E4M3 bytes decoded exactly: each byte sign-extended to 32 bits,
        /// shifted left 20 and masked to the sign, the four exponent bits and the three
        /// mantissa bits is the `f32` whose value is the E4M3 value times `2^-120`
        /// (subnormals included, which land on `f32` subnormals with the same factor;
        /// see `rowdot`), and the product by `2^120` restores the value exactly. The
        /// NaN codes (`s 1111 111`), which that would read as 480, are replaced by NaN.
        #[inline(always)]
        unsafe fn load8<const NAN: bool>(p: *const u8) -> __m256 {
            let wide = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()));
            let bits = _mm256_and_si256(
                _mm256_slli_epi32::<20>(wide),
                _mm256_set1_epi32(0x87F0_0000u32 as i32),
            );
            let value = _mm256_mul_ps(
                _mm256_castsi256_ps(bits),
                _mm256_set1_ps(f32::from_bits((127 + 120) << 23)),
            );
            if !NAN {
                return value;
            }
            // All ones, which OR makes the result, is a NaN.
            let low = _mm256_set1_epi32(0x7f);
            let nan = _mm256_cmpeq_epi32(_mm256_and_si256(wide, low), low);
            _mm256_or_ps(value, _mm256_castsi256_ps(nan))
        }

        fn portable(out: &mut [f32], probs: &[f32], v: &[u8], base: usize, stride: usize) {
            Portable.accumulate_e4m3(out, probs, v, base, stride, true);
        }
    }

    /// `dot::dot` on AVX2: chunk `c` of eight values goes to accumulator `c % 4`,
    /// the accumulators are combined as `(a0 + a1) + (a2 + a3)`, the lanes reduced as
    /// `((v0 + v4) + (v1 + v5)) + ((v2 + v6) + (v3 + v7))`, then the tail added in
    /// order; every product and sum rounded separately.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (main, quad) = (n - n % 8, n - n % 32);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        // Every load reads `j..j + 8` with `j + 8 <= main <= n`, inside both slices.
        let madd = |acc: __m256, j: usize| {
            _mm256_add_ps(
                acc,
                _mm256_mul_ps(_mm256_loadu_ps(pa.add(j)), _mm256_loadu_ps(pb.add(j))),
            )
        };
        let (mut a0, mut a1, mut a2, mut a3) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        let mut j = 0;
        while j < quad {
            a0 = madd(a0, j);
            a1 = madd(a1, j + 8);
            a2 = madd(a2, j + 16);
            a3 = madd(a3, j + 24);
            j += 32;
        }
        // The last full chunks (at most three) go to accumulators 0, 1, 2.
        if j < main {
            a0 = madd(a0, j);
            j += 8;
        }
        if j < main {
            a1 = madd(a1, j);
            j += 8;
        }
        if j < main {
            a2 = madd(a2, j);
        }
        let acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let h = _mm_hadd_ps(s, s);
        let mut s = _mm_cvtss_f32(h) + _mm_cvtss_f32(_mm_shuffle_ps::<1>(h, h));
        for t in main..n {
            s += a[t] * b[t];
        }
        s
    }

    /// Keys per block of [`accumulate`]: the value rows of a block (16 KB at a
    /// `head_dim` of 128) stay in L1 while each strip of the output row goes over them.
    const KEY_BLOCK: usize = 32;

    /// `Inner::accumulate` on AVX2: for each block of [`KEY_BLOCK`] keys, the output
    /// row in strips of up to 64 values, each strip held in eight registers while every
    /// key's value strip is added to it, then the last `hd % 8` values in order. A row
    /// of up to 64 values is one strip, read once; a longer one is read once per strip,
    /// which the key blocks keep in L1. The caller has checked that every value row
    /// read lies inside `v`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn accumulate<T: Load, const NAN: bool>(
        out: &mut [f32],
        probs: &[f32],
        v: &[T],
        base: usize,
        stride: usize,
    ) {
        let hd = out.len();
        let main = hd - hd % 8;
        for (block, ps) in probs.chunks(KEY_BLOCK).enumerate() {
            let from = base + block * KEY_BLOCK * stride;
            let mut d = 0;
            while d + 64 <= main {
                strip::<T, NAN, 8>(out, ps, v, from + d, stride, d);
                d += 64;
            }
            while d + 32 <= main {
                strip::<T, NAN, 4>(out, ps, v, from + d, stride, d);
                d += 32;
            }
            while d < main {
                strip::<T, NAN, 1>(out, ps, v, from + d, stride, d);
                d += 8;
            }
            if main < hd {
                for (j, &p) in ps.iter().enumerate() {
                    if p != 0.0 {
                        let row = &v[from + j * stride + main..from + j * stride + hd];
                        for (a, &x) in out[main..].iter_mut().zip(row) {
                            *a += p * x.value();
                        }
                    }
                }
            }
        }
    }

    /// Values `d..d + 8 N` of the output row, accumulated over every key in registers:
    /// `out[d + i] += probs[j] * v[from + j * stride + i]`, in key order.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn strip<T: Load, const NAN: bool, const N: usize>(
        out: &mut [f32],
        probs: &[f32],
        v: &[T],
        from: usize,
        stride: usize,
        d: usize,
    ) {
        let po = out.as_mut_ptr().add(d);
        let mut acc = [_mm256_setzero_ps(); N];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(po.add(8 * i));
        }
        let pv = v.as_ptr().add(from);
        for (j, &p) in probs.iter().enumerate() {
            if p != 0.0 {
                let pp = _mm256_set1_ps(p);
                let row = pv.add(j * stride);
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(pp, T::load8::<NAN>(row.add(8 * i))));
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(po.add(8 * i), *a);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::{Avx2, Inner, Portable};
        use crate::kernels::dot;

        fn values(n: usize, seed: &mut u32) -> Vec<f32> {
            (0..n)
                .map(|_| {
                    *seed ^= *seed << 13;
                    *seed ^= *seed >> 17;
                    *seed ^= *seed << 5;
                    (*seed as f32 / u32::MAX as f32 - 0.5) * 3.0
                })
                .collect()
        }

        #[test]
        fn the_avx2_loops_equal_the_portable_ones() {
            if !super::available() {
                return;
            }
            let mut seed = 0x9e37_79b9u32;
            for n in 0..140 {
                let (a, b) = (values(n, &mut seed), values(n, &mut seed));
                let fast = Avx2.dot(&a, &b);
                assert_eq!(fast.to_bits(), dot::dot(&a, &b).to_bits(), "dot, n = {n}");
            }
            for (hd, keys) in [
                (1, 13),
                (7, 40),
                (8, 13),
                (9, 13),
                (31, 70),
                (32, 13),
                (40, 33),
                (64, 13),
                (72, 65),
                (100, 13),
                (128, 40),
                (131, 13),
            ] {
                let stride = hd + 5;
                let v = values(3 + keys * stride, &mut seed);
                let mut probs = values(keys, &mut seed);
                probs[4] = 0.0;
                let init = values(hd, &mut seed);
                let (mut fast, mut slow) = (init.clone(), init);
                Avx2.accumulate(&mut fast, &probs, &v, 3, stride);
                Portable.accumulate(&mut slow, &probs, &v, 3, stride);
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&slow), "accumulate, hd = {hd}");
                // The same over E4M3 bytes, every code (NaNs included) among them.
                let codes: Vec<u8> = (0..v.len()).map(|i| (i * 37 + hd) as u8).collect();
                let init = values(hd, &mut seed);
                let (mut fast, mut slow) = (init.clone(), init);
                Avx2.accumulate_e4m3(&mut fast, &probs, &codes, 3, stride, true);
                Portable.accumulate_e4m3(&mut slow, &probs, &codes, 3, stride, true);
                let canonical = |x: &[f32]| {
                    x.iter()
                        .map(|v| if v.is_nan() { f32::NAN } else { *v }.to_bits())
                        .collect::<Vec<_>>()
                };
                assert_eq!(canonical(&fast), canonical(&slow), "e4m3, hd = {hd}");
            }
        }

        #[test]
        fn the_avx2_e4m3_decoding_is_exact_for_every_byte() {
            if !super::available() {
                return;
            }
            let codes: Vec<u8> = (0..=255).chain(0..=6).collect();
            let (mut fast, mut slow) = (vec![0.0; codes.len()], vec![0.0; codes.len()]);
            Avx2.decode_e4m3(&codes, &mut fast, true);
            Portable.decode_e4m3(&codes, &mut slow, true);
            // Without NaN codes, the fast decoding is exact too.
            let finite: Vec<u8> = codes.iter().copied().filter(|c| c & 0x7f != 0x7f).collect();
            let mut quick = vec![0.0; finite.len()];
            Avx2.decode_e4m3(&finite, &mut quick, false);
            for (&c, q) in finite.iter().zip(&quick) {
                assert_eq!(
                    q.to_bits(),
                    crate::rounding::e4m3_value(c).to_bits(),
                    "{c:#04x}"
                );
            }
            for (at, code) in [(0, 0x7f), (31, 0xff), (32, 0x7f), (40, 0xff)] {
                let mut bytes = vec![0x3cu8; 41];
                assert!(!Avx2.has_e4m3_nan(&bytes));
                bytes[at] = code;
                assert!(Avx2.has_e4m3_nan(&bytes), "{at}");
            }
            for (i, (&c, (f, s))) in codes.iter().zip(fast.iter().zip(&slow)).enumerate() {
                let want = crate::rounding::e4m3_value(c);
                assert_eq!(s.to_bits(), want.to_bits(), "portable, byte {c:#04x}");
                if want.is_nan() {
                    assert!(f.is_nan(), "byte {c:#04x} at {i}");
                } else {
                    assert_eq!(f.to_bits(), want.to_bits(), "byte {c:#04x} at {i}");
                }
            }
        }
    }
}

/// The caches and their FP8 scales for [`decode_attention`].
#[derive(Debug)]
pub struct Caches<'a> {
    pub past_k: &'a mut Tensor,
    pub past_v: &'a mut Tensor,
    /// `(key scale, value scale)` of FP8 caches.
    pub scales: Option<(f32, f32)>,
}

/// `fused.decode_attention`: RoPE on `q` and `k`, the in-place append of the rotated
/// `k` and of `v` to the caches, and attention of the rotated `q` over the appended
/// caches. Returns `(out, k_all, v_all)` and the bytes of the caches copied (0 when
/// both had room).
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    caches: Caches<'_>,
    scale: f32,
    mask: &Tensor,
) -> Result<([Tensor; 3], u64), KernelError> {
    let op = "fused.decode_attention";
    let cache = caches.past_k.dtype();
    if caches.past_v.dtype() != cache || caches.past_k.rank() != 4 {
        return Err(KernelError::Invalid(format!(
            "{op}: caches {}{:?} and {}{:?} must share a dtype and be [batch, heads, len, head_dim]",
            cache,
            caches.past_k.shape(),
            caches.past_v.dtype(),
            caches.past_v.shape()
        )));
    }
    match (cache.is_fp8(), caches.scales) {
        (true, Some((ks, vs))) if ks > 0.0 && vs > 0.0 && ks.is_finite() && vs.is_finite() => {}
        (false, None) if cache == q.dtype() && k.dtype() == cache && v.dtype() == cache => {}
        _ => {
            return Err(KernelError::Invalid(format!(
                "{op}: a {cache} cache for {} values needs {}",
                q.dtype(),
                if cache.is_fp8() {
                    "two positive, finite cache scales"
                } else {
                    "no cache scales and one dtype throughout"
                }
            )))
        }
    }
    let q_rot = rope(q, cos, sin)?;
    let k_rot = rope(k, cos, sin)?;
    let (ks, vs) = caches.scales.unzip();
    let (k_all, copied_k) = append(caches.past_k, &k_rot, 2, storer(cache, ks))?;
    let (v_all, copied_v) = append(caches.past_v, v, 2, storer(cache, vs))?;
    let out = attention(&q_rot, &k_all, &v_all, scale, mask, caches.scales)?;
    // The rotated q and k are this kernel's own scratch: back to the pool, so that the
    // next step takes them again instead of allocating.
    recycle::recycle(q_rot);
    recycle::recycle(k_rot);
    Ok(([out, k_all, v_all], copied_k + copied_v))
}

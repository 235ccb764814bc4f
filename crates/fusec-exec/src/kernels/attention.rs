//! Attention kernels: the in-place KV append, attention with an online softmax and
//! GQA, and decode attention (RoPE, append and attention in one kernel).
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
//! fast rounding of [`round_e4m3`] rather than the generic conversion.
//!
//! **Online softmax.** For one query row, a single pass over the keys keeps the running
//! maximum `m`, the running sum `l` of `exp(s - m)` and the running output
//! `acc = sum(exp(s - m) * v)`; when the maximum grows from `m` to `m'`, `l` and `acc`
//! are rescaled by `exp(m - m')`. The result is `acc / l`. Scores are rounded as the
//! eager graph rounds them (the `q k^T` product, the scaled scores and the masked scores
//! are each a value of the attention dtype there); the softmax and the weighted sum are
//! `f32`, as in flash attention.
//!
//! **FP8 caches.** A cache in an FP8 format stores `fp8(x / scale)` with one static
//! scale per cache, and attention reads an entry back as `q * scale` in `f32`.

use fusec_ir::{numerics, DType};
use rayon::prelude::*;

use super::fused::rope;
use super::gemv::round_e4m3;
use super::matmul::dot;
use super::strided::{broadcast_shape, broadcast_strides};
use super::{float_buffer, KernelError};
use crate::dtype::round;
use crate::pool;
use crate::tensor::Tensor;

/// Query rows times keys below which attention runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 14;

/// The smallest capacity, in positions, of a cache that has to be copied to grow.
const MIN_CAPACITY: usize = 16;

/// The largest rank of a non-contiguous appended tensor read in place through its
/// strides; a higher one (never a KV cache) is gathered into a copy first.
const MAX_STRIDED_RANK: usize = 8;

/// `past` with `new` appended along `axis`: written in place into `past`'s buffer when
/// it has room and is not shared, else into a new buffer with room. Values of `new`
/// are stored through `store` (the cache's rounding, or FP8 quantization). Returns the
/// appended view and the bytes of `past` copied (0 in place). `past` is left viewing
/// the buffer the result shares (a copy of its values if it was copied).
pub fn append(
    past: &mut Tensor,
    new: &Tensor,
    axis: usize,
    store: impl Fn(f32) -> f32,
) -> Result<(Tensor, u64), KernelError> {
    let op = "kv.append";
    float_buffer(past, op)?;
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
    if !room || past.unique_f32_mut().is_none() {
        copied = past.bytes();
        *past = past.with_capacity(axis, (2 * (len + n)).max(MIN_CAPACITY))?;
    }
    let capacity = past.capacity_along(axis).ok_or_else(|| {
        KernelError::Invalid(format!("{op}: the grown cache is not a prefix view"))
    })?;
    let outer: usize = past.shape()[..axis].iter().product();
    let block: usize = past.shape()[axis + 1..].iter().product();
    let span = n * block;
    let buf = past.unique_f32_mut().ok_or_else(|| {
        KernelError::Invalid(format!("{op}: the cache buffer is shared after copying"))
    })?;
    if span > 0 && outer > 0 {
        // Element `e` of `new` in row-major order is entry `rest` of outer index `o`.
        let dst = |e: usize| (e / span * capacity + len) * block + e % span;
        if new.is_contiguous() {
            let values = &src[new.offset()..new.offset() + outer * span];
            for (o, from) in values.chunks_exact(span).enumerate() {
                let at = dst(o * span);
                for (d, &v) in buf[at..at + span].iter_mut().zip(from) {
                    *d = store(v);
                }
            }
        } else if new.rank() <= MAX_STRIDED_RANK {
            // A row along the last axis lies inside one outer index (the last axis is
            // the appended one or one after it), so its destination is contiguous.
            let (inner, step) = (new.shape()[new.rank() - 1], new.strides()[new.rank() - 1]);
            for_each_last_axis_row(new.shape(), new.strides(), new.offset(), |e, from| {
                let at = dst(e);
                for (i, d) in buf[at..at + inner].iter_mut().enumerate() {
                    *d = store(src[from + i * step]);
                }
            });
        } else {
            let values = new.contiguous_f32().unwrap_or_default();
            for (o, from) in values.chunks_exact(span).enumerate() {
                let at = dst(o * span);
                for (d, &v) in buf[at..at + span].iter_mut().zip(from) {
                    *d = store(v);
                }
            }
        }
    }
    let mut shape = past.shape().to_vec();
    shape[axis] = len + n;
    Ok((past.with_layout(shape, past.strides().to_vec(), 0), copied))
}

/// Calls `f(first, offset)` for every row along the last axis of the view of `shape`
/// and `strides` at `offset`, in row-major order: `first` is the row-major index of the
/// row's first element and `offset` its place in the buffer. The rank is at most
/// [`MAX_STRIDED_RANK`] (the odometer lives on the stack, so this allocates nothing).
fn for_each_last_axis_row(
    shape: &[usize],
    strides: &[usize],
    offset: usize,
    mut f: impl FnMut(usize, usize),
) {
    let rank = shape.len();
    if rank == 0 || rank > MAX_STRIDED_RANK || shape.contains(&0) {
        return;
    }
    let inner = shape[rank - 1];
    let mut index = [0usize; MAX_STRIDED_RANK];
    let (mut off, mut first) = (offset, 0);
    loop {
        f(first, off);
        first += inner;
        // Advance the outer index like an odometer.
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            index[d] += 1;
            off += strides[d];
            if index[d] < shape[d] {
                break;
            }
            off -= strides[d] * shape[d];
            index[d] = 0;
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

/// A `[batch, heads, len, head_dim]` operand as a strided view.
struct View4<'a> {
    data: &'a [f32],
    shape: [usize; 4],
    strides: [usize; 4],
    offset: usize,
    /// The dequantization scale of an FP8 cache.
    scale: Option<f32>,
}

impl<'a> View4<'a> {
    fn new(t: &'a Tensor, what: &str, scale: Option<f32>) -> Result<Self, KernelError> {
        let data = float_buffer(t, "attention")?;
        match (t.shape(), t.strides()) {
            ([a, b, c, d], [sa, sb, sc, sd]) => Ok(View4 {
                data,
                shape: [*a, *b, *c, *d],
                strides: [*sa, *sb, *sc, *sd],
                offset: t.offset(),
                scale: scale.filter(|_| t.dtype().is_fp8()),
            }),
            _ => Err(KernelError::Invalid(format!(
                "attention: {what} must be [batch, heads, len, head_dim], got {:?}",
                t.shape()
            ))),
        }
    }

    /// Row `[b, h, i, :]` into `row`, dequantized.
    fn row_into(&self, b: usize, h: usize, i: usize, row: &mut Vec<f32>) {
        let base = self.offset + b * self.strides[0] + h * self.strides[1] + i * self.strides[2];
        let sd = self.strides[3];
        row.clear();
        if sd == 1 {
            row.extend_from_slice(&self.data[base..base + self.shape[3]]);
        } else {
            row.extend((0..self.shape[3]).map(|j| self.data[base + j * sd]));
        }
        if let Some(s) = self.scale {
            row.iter_mut().for_each(|v| *v *= s);
        }
    }
}

/// `softmax(q k^T * scale + mask) v` with GQA (query head `h` reads KV head
/// `h / (H / KV)`) and an online softmax; see the module documentation. `kv_scales`
/// dequantize FP8 caches. The result has q's dtype.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    mask: &Tensor,
    kv_scales: Option<(f32, f32)>,
) -> Result<Tensor, KernelError> {
    let qv = View4::new(q, "q", None)?;
    let kv = View4::new(k, "k", kv_scales.map(|s| s.0))?;
    let vv = View4::new(v, "v", kv_scales.map(|s| s.1))?;
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
    if mask.rank() > 4 || broadcast_shape(&scores, mask.shape()).as_deref() != Some(&scores[..]) {
        return Err(KernelError::Invalid(format!(
            "attention: mask {:?} does not broadcast to the scores {scores:?}",
            mask.shape()
        )));
    }
    let md = float_buffer(mask, "attention")?;
    let ms = broadcast_strides(mask.shape(), mask.strides(), &scores);
    let group = heads / kv_heads;
    let rows = bq * heads * tq;
    let mut out = pool::zeros(rows * hd);
    let row = |(r, o): (usize, &mut [f32])| {
        let (b, h, t) = (r / (heads * tq), (r / tq) % heads, r % tq);
        let kvh = h / group;
        let (mut qrow, mut krow, mut vrow) = (Vec::new(), Vec::new(), Vec::new());
        qv.row_into(b, h, t, &mut qrow);
        let mask_base = mask.offset() + b * ms[0] + h * ms[1] + t * ms[2];
        let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
        for j in 0..len {
            kv.row_into(b, kvh, j, &mut krow);
            let s = round(dtype, dot(&qrow, &krow));
            let s = round(dtype, s * scale);
            let s = round(dtype, s + md[mask_base + j * ms[3]]);
            if s == f32::NEG_INFINITY {
                // A masked position has weight exp(-inf) = 0.
                continue;
            }
            if s > m {
                let c = (m - s).exp();
                l *= c;
                o.iter_mut().for_each(|a| *a *= c);
                m = s;
            }
            let p = (s - m).exp();
            l += p;
            vv.row_into(b, kvh, j, &mut vrow);
            for (a, &x) in o.iter_mut().zip(&vrow) {
                *a += p * x;
            }
        }
        // Every position masked gives 0 / 0 = NaN, as the eager softmax does.
        o.iter_mut().for_each(|a| *a = round(dtype, *a / l));
    };
    if hd > 0 {
        if rows * len * hd >= PARALLEL_MIN_WORK {
            out.par_chunks_mut(hd).enumerate().for_each(row);
        } else {
            out.chunks_mut(hd).enumerate().for_each(row);
        }
    }
    Ok(Tensor::from_kernel_f32(dtype, vec![bq, heads, tq, hd], out))
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
    Ok(([out, k_all, v_all], copied_k + copied_v))
}

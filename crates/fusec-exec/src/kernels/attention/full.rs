//! Attention of every query row over the whole of K and V, in tiles of query rows
//! spread over the cores (see the module documentation of `kernels::attention`).

use super::super::{float_buffer, KernelError};
use super::plan::Plan;
use super::portable::Portable;
use super::storage::{Kv, View4};
use crate::pool;
use crate::team;
use crate::tensor::{Buffer, Dims, Tensor};

#[cfg(target_arch = "x86_64")]
use super::avx2;

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
    attention_capped(q, k, v, scale, None, mask, kv_scales)
}

/// [`attention`] with the scaled scores soft-capped before the mask when `softcap` is
/// `Some(c)`: `tanh(s / c) * c`, each step rounded as the eager `div`, `tanh` and `mul`
/// round (Gemma 2's `attn_logit_softcapping`, transformers'
/// models/gemma2/modeling_gemma2.py `eager_attention_forward`).
pub fn attention_capped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    softcap: Option<f32>,
    mask: &Tensor,
    kv_scales: Option<(f32, f32)>,
) -> Result<Tensor, KernelError> {
    let s = (scale, softcap);
    let compact = |t: &Tensor| matches!(t.buffer(), Buffer::U8(_));
    match (compact(k), compact(v)) {
        (true, true) => attention_in::<u8>(q, k, v, s, mask, kv_scales),
        (false, false) => attention_in::<f32>(q, k, v, s, mask, kv_scales),
        (true, false) => attention_in::<f32>(q, &decoded(k), v, s, mask, kv_scales),
        (false, true) => attention_in::<f32>(q, k, &decoded(v), s, mask, kv_scales),
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
    (scale, softcap): (f32, Option<f32>),
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
        softcap,
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

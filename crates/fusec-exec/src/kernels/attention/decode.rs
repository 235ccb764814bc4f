//! `fused.decode_attention`: RoPE, the in-place append and attention in one kernel.

use super::super::fused::rope;
use super::super::KernelError;
use super::append::{append, storer, Ring};
use super::full::attention_capped;
use crate::recycle;
use crate::tensor::Tensor;

/// The caches and their FP8 scales for [`decode_attention`].
#[derive(Debug)]
pub struct Caches<'a> {
    pub past_k: &'a mut Tensor,
    pub past_v: &'a mut Tensor,
    /// `(key scale, value scale)` of FP8 caches.
    pub scales: Option<(f32, f32)>,
    /// The sliding window's ring, if the caches are one.
    pub ring: Option<Ring>,
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
    decode_attention_capped(q, k, v, cos, sin, caches, (scale, None), mask)
}

/// [`decode_attention`] with the scaled scores soft-capped, `tanh(s / c) * c`, when
/// the cap is `Some(c)` (Gemma 2's `attn_logit_softcapping`; see
/// [`attention_capped`]).
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_capped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    caches: Caches<'_>,
    (scale, softcap): (f32, Option<f32>),
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
    let ring = caches.ring;
    let (k_all, copied_k) = append(caches.past_k, &k_rot, 2, storer(cache, ks), ring)?;
    let (v_all, copied_v) = append(caches.past_v, v, 2, storer(cache, vs), ring)?;
    let out = attention_capped(&q_rot, &k_all, &v_all, scale, softcap, mask, caches.scales)?;
    // The rotated q and k are this kernel's own scratch: back to the pool, so that the
    // next step takes them again instead of allocating.
    recycle::recycle(q_rot);
    recycle::recycle(k_rot);
    Ok(([out, k_all, v_all], copied_k + copied_v))
}

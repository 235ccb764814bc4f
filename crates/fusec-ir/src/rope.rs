//! RoPE inverse frequencies as transformers computes them when a model is loaded (the
//! `inv_freq` buffer of its rotary embedding modules), for the load-time constants
//! `rope.inv_freq` and `rope.inv_freq_llama3`. Every step is in `f32`, as PyTorch
//! runs it on an `f32` tensor with Python scalars (a Python float operand is rounded
//! to `f32` first).

use std::f64::consts::PI;

/// The keys of `rope_parameters` (5.x) or `rope_scaling` (4.x) with `rope_type`
/// `llama3`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: u64,
}

/// `1.0 / (base ** (arange(0, dim, 2).float() / dim))`, transformers'
/// `compute_default_rope_parameters` (models/llama/modeling_llama.py).
pub fn default_inv_freq(theta: f64, head_dim: u64) -> Vec<f32> {
    let base = theta as f32;
    (0..head_dim / 2)
        .map(|j| 1.0 / base.powf((2 * j) as f32 / head_dim as f32))
        .collect()
}

/// transformers' `_compute_llama3_parameters` (modeling_rope_utils.py): wavelengths
/// `2π / inv_freq` shorter than `original_max_position_embeddings /
/// high_freq_factor` keep their frequency, those longer than `... / low_freq_factor`
/// are divided by `factor`, and those between are interpolated with
/// `smooth = (old_context_len / wavelen - low) / (high - low)`:
/// `(1 - smooth) * inv_freq / factor + smooth * inv_freq`.
pub fn llama3_inv_freq(theta: f64, head_dim: u64, s: &Llama3Scaling) -> Vec<f32> {
    let old_context_len = s.original_max_position_embeddings as f64;
    // Python floats, computed in f64, then rounded to f32 where they meet the tensor.
    let low_freq_wavelen = (old_context_len / s.low_freq_factor) as f32;
    let high_freq_wavelen = (old_context_len / s.high_freq_factor) as f32;
    let factor = s.factor as f32;
    let low = s.low_freq_factor as f32;
    let band = (s.high_freq_factor - s.low_freq_factor) as f32;
    let two_pi = (2.0 * PI) as f32;
    let old = old_context_len as f32;
    default_inv_freq(theta, head_dim)
        .into_iter()
        .map(|inv| {
            let wavelen = two_pi / inv;
            // torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
            let scaled = if wavelen > low_freq_wavelen {
                inv / factor
            } else {
                inv
            };
            // ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen); no NaN here.
            let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
            if is_medium {
                let smooth = (old / wavelen - low) / band;
                (1.0 - smooth) * scaled / factor + smooth * scaled
            } else {
                scaled
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `inv_freq` of tests/fixtures/hf-tiny-llama3-rope-s0 as transformers 5.24.0
    /// computes it (`ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")`), bit for bit: the
    /// first in the interpolated band, the others past `low_freq_wavelen` (divided by 8).
    #[test]
    fn llama3_matches_transformers() {
        let s = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16,
        };
        let expected: [u32; 8] = [
            1058240622, 1019646896, 999950536, 980350799, 960060705, 940558584, 920588484,
            900532135,
        ];
        let got = llama3_inv_freq(500000.0, 16, &s);
        let base = default_inv_freq(500000.0, 16);
        assert_eq!(got[7], base[7] / 8.0);
        let bits: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, expected);
    }
}

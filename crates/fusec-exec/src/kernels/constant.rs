//! Load-time constants: buffers computed once when a model is loaded, never launched.

use fusec_ir::DType;

use super::KernelError;
use crate::tensor::Tensor;

/// RoPE inverse frequencies `theta^(-2j/head_dim)` for `j < head_dim/2`, in `f32`,
/// computed as Hugging Face's `LlamaRotaryEmbedding` does:
/// `1.0 / (base ** (arange(0, dim, 2).float() / dim))`, every step in `f32`.
pub fn rope_inv_freq(theta: f64, head_dim: u64) -> Result<Tensor, KernelError> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(KernelError::Invalid(format!(
            "rope.inv_freq: head_dim {head_dim} must be even and positive"
        )));
    }
    let base = theta as f32;
    let values = (0..head_dim / 2)
        .map(|j| {
            let exponent = (2 * j) as f32 / head_dim as f32;
            1.0 / base.powf(exponent)
        })
        .collect();
    Ok(Tensor::from_f32(
        DType::F32,
        &[(head_dim / 2) as usize],
        values,
    )?)
}

/// Llama 3's RoPE inverse frequencies (`rope.inv_freq_llama3`): transformers'
/// `_compute_llama3_parameters` (modeling_rope_utils.py), as
/// [`fusec_ir::rope::llama3_inv_freq`] computes it.
pub fn rope_inv_freq_llama3(
    theta: f64,
    head_dim: u64,
    scaling: &fusec_ir::rope::Llama3Scaling,
) -> Result<Tensor, KernelError> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(KernelError::Invalid(format!(
            "rope.inv_freq_llama3: head_dim {head_dim} must be even and positive"
        )));
    }
    let values = fusec_ir::rope::llama3_inv_freq(theta, head_dim, scaling);
    Ok(Tensor::from_f32(
        DType::F32,
        &[(head_dim / 2) as usize],
        values,
    )?)
}

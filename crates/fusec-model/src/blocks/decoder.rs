//! The decode (or prefill) step that every Llama-shaped family shares around its
//! decoder layers: the step's inputs, the token embedding, the RoPE tables, the
//! layers in order, the final RMSNorm, the rows that get logits, the LM head and the
//! greedy outputs (transformers' `LlamaModel.forward` and `LlamaForCausalLM.forward`;
//! OLMo 2 and Qwen2 follow the same outline). A family supplies its decoder layer and
//! the order of its final norm; families that scale the embeddings or the logits
//! (Granite, Gemma) build their own outline from the same blocks.

use fusec_ir::{step, Graph, NodeId};

use super::{greedy_outputs, Embedding, LmHead, RmsNorm, RopeTables, StepDims, StepInputs};
use crate::build::{BuildError, Builder};
use crate::frontend::ModelConfig;

/// How the final RMSNorm applies its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalNorm {
    /// Llama's order: [`RmsNorm::forward`].
    Llama,
    /// OLMo 2's order, the weight times the f32 values: [`RmsNorm::forward_weight_in_f32`].
    WeightInF32,
}

/// One decoder layer: `layer(b, index, x, rope, attention_mask)` returns the residual
/// stream after the layer.
pub type DecoderLayer<'a> =
    dyn FnMut(&mut Builder, u64, NodeId, &RopeTables, NodeId) -> Result<NodeId, BuildError> + 'a;

/// The eager step of `cfg` over `dims` with `layer` as each decoder layer (see the
/// module documentation).
pub fn decoder_step(
    cfg: &ModelConfig,
    dims: &StepDims,
    final_norm: FinalNorm,
    layer: &mut DecoderLayer<'_>,
) -> Result<Graph, BuildError> {
    let dt = cfg.dtype;
    let mut b = Builder::new(&cfg.name);
    b.set_layer_count(cfg.num_layers);
    let inputs = StepInputs::new(&mut b, dims, dt)?;
    let embed = Embedding::new(&mut b, step::EMBED, cfg.vocab_size, cfg.hidden_size, dt)?;
    let mut x = embed.forward(&mut b, inputs.input_ids)?;
    let rope = RopeTables::scaled(
        &mut b,
        inputs.position_ids,
        cfg.rope_theta,
        cfg.rope_scaling,
        cfg.head_dim,
        dims,
        dt,
    )?;
    for index in 0..cfg.num_layers {
        b.set_layer(Some(index as u32));
        x = layer(&mut b, index, x, &rope, inputs.attention_mask)?;
    }
    b.set_layer(None);
    let norm = RmsNorm::new(
        &mut b,
        step::FINAL_NORM,
        cfg.hidden_size,
        cfg.rms_norm_eps,
        dt,
    )?;
    let h = match final_norm {
        FinalNorm::Llama => norm.forward(&mut b, x)?,
        FinalNorm::WeightInF32 => norm.forward_weight_in_f32(&mut b, x)?,
    };
    let h = dims.head_rows(&mut b, h)?;
    let head = LmHead::of_model(&mut b, &embed, cfg, dt)?;
    let logits = head.forward(&mut b, h)?;
    greedy_outputs(&mut b, logits)?;
    Ok(b.finish())
}

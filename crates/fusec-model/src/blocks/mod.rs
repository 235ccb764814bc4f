//! The building blocks decoder architectures are made of, each emitting the ops an
//! eager framework runs for it (Hugging Face transformers' modeling files), in order.
//!
//! An architecture composes them the way Luminal's `examples/llama/src/model.rs`
//! composes a model from library modules; [`crate::arch::Llama`] is the reference. A
//! block declares its weights (with their [`fusec_ir::WeightRole`]) when it runs, at
//! the point the eager framework first reads them, so graphs keep the node order of
//! the original forward pass.
//!
//! - [`step`]: the decode step's symbolic dimensions, its inputs and its outputs;
//! - [`embedding`]: the token embedding; [`head`]: the LM head;
//! - [`norm`]: RMSNorm; [`rope`]: rotary tables and their application;
//! - [`linear`]: a projection with an optional bias;
//! - [`attention`]: projections, KV-cache append, GQA `repeat_kv`, masked softmax;
//! - [`mlp`]: the gated (SwiGLU) MLP;
//! - [`decoder`]: the step around the decoder layers that Llama-shaped families share.

pub mod attention;
pub mod decoder;
pub mod embedding;
pub mod head;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod rope;
pub mod step;

pub use attention::{
    attend, eager_attention, eager_attention_scaled, eager_attention_with, kv_cache_append,
    layer_mask, paged_attention, repeat_kv, soft_cap, split_heads, Attention, Heads, Scores,
};
pub use decoder::{decoder_step, FinalNorm};
pub use embedding::Embedding;
pub use head::LmHead;
pub use linear::Linear;
pub use mlp::GatedMlp;
pub use norm::RmsNorm;
pub use rope::{rotate_half_apply, RopeTables};
pub use step::{greedy_outputs, paged_table_shape, Logits, StepDims, StepInputs};

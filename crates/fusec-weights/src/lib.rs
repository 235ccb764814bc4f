//! fusec's model weights: what a graph's `weight` leaves hold, loaded, made or saved.
//!
//! - [`tensor`]: one weight's values ([`WeightTensor`]): a dtype, a shape and a shared
//!   buffer of `f32` values rounded to the dtype, or of compact codes (`u16` bits of
//!   `f16`/`bf16`, `u8` E4M3 bytes); read as an `ndarray` view or array;
//! - [`rounding`]: rounding of `f32` values to an IR dtype, and the compact codes;
//! - [`weights`]: the named set ([`Weights`]), checked against a graph's types;
//! - [`load`]: Hugging Face safetensors checkpoints by memory map ([`Weights::load`]);
//!   [`packed`]: the packed projections (Phi-3's `qkv_proj`, `gate_up_proj`) it splits;
//! - [`gguf`]: GGUF checkpoints, dequantized at load, named as Hugging Face names them;
//! - [`random`]: seeded random weights with a documented distribution
//!   ([`Weights::random`]);
//! - [`quant`]: the FP8 weights of a lowered graph (`W.fp8`, `W.scale`) derived from
//!   their base weights; [`save`]: writing weights as safetensors.
//!
//! The KV-cache scales of an FP8 graph depend on activations, so a run calibrates them;
//! that lives with the executor (`fusec_exec::calibrate`), which depends on this crate
//! and binds its weights without copying them.

pub mod checked;
pub mod error;
pub mod gguf;
pub mod load;
pub mod packed;
pub mod quant;
pub mod random;
pub mod rounding;
pub mod save;
pub mod tensor;
pub mod weights;

pub use error::Error;
pub use quant::{derived_weights, lower_weights, quantize, Derived, KvScales};
pub use random::SplitMix64;
pub use save::{save_weights, save_weights_to};
pub use tensor::{Storage, WeightTensor};
pub use weights::{WeightSource, Weights};

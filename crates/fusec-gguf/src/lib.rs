//! fusec's GGUF reader: llama.cpp's single-file checkpoint format.
//!
//! - [`file`]: the container ([`GgufFile`]): header, typed metadata, the tensor directory
//!   and the aligned data, memory-mapped and checked so that every tensor's bytes lie
//!   inside the file;
//! - [`value`]: one metadata value ([`Value`]) with typed accessors;
//! - [`ggml_type`]: the tensor element types ([`GgmlType`]) and their block layouts;
//! - [`write`]: writing GGUF files ([`GgufWriter`]), for tools and hand-built tests;
//! - [`dequant`]: exact dequantization of the block formats to `f32`, following ggml's
//!   `dequantize_row_*` (`ggml/src/ggml-quants.c`, block structs in
//!   `ggml/src/ggml-common.h`).
//!
//! The format is specified in ggml's `docs/gguf.md`. This crate knows nothing of models:
//! mapping metadata onto a model configuration is `fusec-model`'s, tensor names onto a
//! graph's weights `fusec-weights`', and the vocabulary onto a tokenizer `fusec-text`'s.

pub mod dequant;
pub mod error;
pub mod file;
pub mod ggml_type;
pub mod value;
pub mod write;

pub use error::Error;
pub use file::{GgufFile, TensorInfo};
pub use ggml_type::GgmlType;
pub use value::Value;
pub use write::GgufWriter;

//! GGUF checkpoints (llama.cpp's format, read by `fusec-gguf`): the graph's Hugging
//! Face weight names mapped onto llama.cpp's tensor names, every tensor dequantized
//! exactly to `f32` at load and rounded to the graph's dtype, and the row permutation
//! llama.cpp's converter applies to `attn_q` and `attn_k` undone.
//!
//! The names are `gguf-py`'s `tensor_mapping.py` for the Llama architecture
//! (`token_embd`, `blk.N.attn_q`, ...). The permutation is `LlamaModel.permute` in
//! llama.cpp's `convert_hf_to_gguf.py`: within each head, the rows of the two RoPE
//! halves are interleaved (`w.reshape(n_head, 2, rows / n_head / 2, cols)
//! .swapaxes(1, 2)`), with `n_head` the query heads for `q_proj` and the KV heads for
//! `k_proj`; transformers undoes it the same way (`TensorProcessor` for llama in
//! `modeling_gguf_pytorch_utils.py`).
//!
//! **Native blocks.** A graph lowered to integer codes (`--precision
//! int8|int4|q4_1|q4_k|gguf`) names `W.q8_0` / `W.q4_0` / `W.q4_1` / `W.q4_k` and
//! `W.scale` for a GEMV weight `W`. When the file holds `W` in that very format,
//! its blocks are split into the codes and the `f16` side data as they are: no
//! dequantized copy is made and nothing is quantized again, so the bytes a step
//! streams are the file's. Any other tensor type is dequantized and quantized to the
//! format as for a float checkpoint.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fusec_gguf::{GgmlType, GgufFile};
use fusec_ir::quant::IntFormat;
use fusec_ir::Graph;

use crate::checked::{insert_checked, wanted_weights};
use crate::error::Error;
use crate::quant::{self, Derived, KvScales};
use crate::tensor::{Storage, WeightTensor, I4_BLOCK};
use crate::weights::{fixed_shape, WeightSource, Weights};

/// Whether `path` names a GGUF file (by its extension, as llama.cpp's tools do).
pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gguf")
}

/// The llama.cpp name of a Hugging Face Llama weight name, and the head count whose
/// row permutation the converter applied to it (`None`: not permuted).
pub fn gguf_name(hf: &str) -> Option<(String, Option<Permuted>)> {
    let top = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = top {
        return Some((name.to_string(), None));
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (name, permuted) = match rest {
        "input_layernorm.weight" => ("attn_norm.weight", None),
        "self_attn.q_proj.weight" => ("attn_q.weight", Some(Permuted::QueryHeads)),
        "self_attn.k_proj.weight" => ("attn_k.weight", Some(Permuted::KvHeads)),
        "self_attn.v_proj.weight" => ("attn_v.weight", None),
        "self_attn.o_proj.weight" => ("attn_output.weight", None),
        "post_attention_layernorm.weight" => ("ffn_norm.weight", None),
        "mlp.gate_proj.weight" => ("ffn_gate.weight", None),
        "mlp.up_proj.weight" => ("ffn_up.weight", None),
        "mlp.down_proj.weight" => ("ffn_down.weight", None),
        _ => return None,
    };
    Some((format!("blk.{layer}.{name}"), permuted))
}

/// Which head count a permuted tensor was permuted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permuted {
    QueryHeads,
    KvHeads,
}

/// Undoes `LlamaModel.permute` on a `[rows, cols]` matrix of `heads` heads: the GGUF
/// row `h * d + 2 * i + j` is the Hugging Face row `h * d + j * d / 2 + i`.
pub fn unpermute_rows<T: Copy + Default>(
    values: &[T],
    rows: usize,
    cols: usize,
    heads: usize,
) -> Option<Vec<T>> {
    if heads == 0
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || values.len() != rows * cols
    {
        return None;
    }
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![T::default(); values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = (h * d + 2 * i + j) * cols;
                let to = (h * d + j * half + i) * cols;
                out[to..to + cols].copy_from_slice(&values[from..from + cols]);
            }
        }
    }
    Some(out)
}

fn reader_error(e: fusec_gguf::Error) -> Error {
    use fusec_gguf::Error as G;
    match e {
        G::Io { file, source } => Error::Io { file, source },
        G::CorruptTensor {
            file,
            tensor,
            message,
        } => Error::Corrupt {
            tensor,
            file,
            message,
        },
        G::MissingTensor { file, tensor } => Error::MissingWeight { tensor, file },
        G::UnsupportedType {
            file, tensor, name, ..
        } => Error::WrongDtype {
            tensor,
            file,
            expected: "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K or Q6_K".into(),
            found: name.into(),
        },
        other => {
            let file = match &other {
                G::NotGguf { file, .. }
                | G::Version { file, .. }
                | G::Corrupt { file, .. }
                | G::MissingKey { file, .. }
                | G::WrongKeyType { file, .. } => file.clone(),
                _ => Default::default(),
            };
            Error::Corrupt {
                tensor: "(header)".into(),
                file,
                message: other.to_string(),
            }
        }
    }
}

/// Loads every weight `graph` names from the GGUF file at `path` (see the module
/// documentation); derived FP8 weights are made from their bases as for safetensors.
pub fn load(path: &Path, graph: &Graph) -> Result<Weights, Error> {
    let file = GgufFile::open(path).map_err(reader_error)?;
    let arch = file.architecture().map_err(reader_error)?.to_string();
    let heads = |key: &str| -> Result<usize, Error> {
        let full = format!("{arch}.{key}");
        file.uint(&full)
            .map_err(reader_error)?
            .map(|n| n as usize)
            .ok_or_else(|| Error::Corrupt {
                tensor: "(header)".into(),
                file: path.to_path_buf(),
                message: format!("metadata key `{full}` is missing; it is needed to undo the q/k row permutation"),
            })
    };
    // The derived integer weights whose bases the file holds in their format.
    let mut native: HashMap<String, (String, String, IntFormat)> = HashMap::new();
    for d in quant::derived_weights(graph)?.into_values() {
        if let Derived::Gemv {
            base,
            values,
            scale,
            int: Some(format),
            ..
        } = d
        {
            let ty = ggml_type(format);
            let held = gguf_name(&base)
                .and_then(|(g, _)| file.tensor(&g))
                .is_some_and(|t| t.ty == ty);
            if held {
                native.insert(values.clone(), (base.clone(), scale.clone(), format));
                native.insert(scale, (base, values, format));
            }
        }
    }
    let present = |name: &str| {
        native.contains_key(name) || gguf_name(name).is_some_and(|(g, _)| file.tensor(&g).is_some())
    };
    let (wanted, derives) = wanted_weights(graph, present)?;
    let mut weights = Weights::new(WeightSource::File(path.to_path_buf()));
    for (name, ty) in &wanted {
        if let Some((base, other, format)) = native.get(name) {
            if weights.get(name).is_none() {
                let (codes, scales) = native_blocks(&file, base, *format, &heads)?;
                let (values, scale) = match codes.dtype() == ty.dtype {
                    true => (name, other),
                    false => (other, name),
                };
                let source = WeightSource::File(path.to_path_buf());
                weights.insert(values.clone(), codes, source.clone());
                weights.insert(scale.clone(), scales, source);
            }
            continue;
        }
        let Some((gguf, permuted)) = gguf_name(name) else {
            return Err(Error::MissingWeight {
                tensor: format!("{name} (no GGUF tensor corresponds to it)"),
                file: path.to_path_buf(),
            });
        };
        let missing = || Error::MissingWeight {
            tensor: format!("{gguf} (for {name})"),
            file: path.to_path_buf(),
        };
        let info = file.tensor(&gguf).ok_or_else(missing)?;
        let expected = fixed_shape(name, ty)?;
        if info.shape() != expected {
            return Err(Error::WrongShape {
                tensor: gguf.clone(),
                file: path.to_path_buf(),
                expected,
                found: info.shape(),
            });
        }
        let (_, mut values) = file.dequantize(&gguf).map_err(reader_error)?;
        if let Some(p) = permuted {
            let n = match p {
                Permuted::QueryHeads => heads("attention.head_count")?,
                Permuted::KvHeads => match heads("attention.head_count_kv") {
                    Ok(n) => n,
                    Err(_) => heads("attention.head_count")?,
                },
            };
            let (rows, cols) = (expected[0], expected.get(1).copied().unwrap_or(1));
            values = unpermute_rows(&values, rows, cols, n).ok_or_else(|| Error::Corrupt {
                tensor: gguf.clone(),
                file: path.to_path_buf(),
                message: format!("{rows} rows do not split into {n} heads of two RoPE halves"),
            })?;
        }
        insert_checked(&mut weights, path, name, ty, &expected, values)?;
    }
    if derives {
        weights = quant::lower_weights(&weights, graph, &KvScales::new())?;
    }
    Ok(weights)
}

/// The integer format of each GEMV-shaped weight (a matrix) `graph` names that the
/// GGUF file at `path` holds in a format fusec runs natively (the `gguf` precision's
/// formats), by the graph's weight name.
pub fn int_formats(path: &Path, graph: &Graph) -> Result<HashMap<String, IntFormat>, Error> {
    let file = GgufFile::open(path).map_err(reader_error)?;
    let mut out = HashMap::new();
    for (_, name) in graph.weights() {
        let Some(info) = gguf_name(name).and_then(|(g, _)| file.tensor(&g)) else {
            continue;
        };
        let format = IntFormat::ALL
            .into_iter()
            .find(|&f| ggml_type(f) == info.ty);
        if let Some(f) = format.filter(|_| info.shape().len() == 2) {
            out.insert(name.to_string(), f);
        }
    }
    Ok(out)
}

/// The GGUF tensor type of an integer format.
pub fn ggml_type(format: IntFormat) -> GgmlType {
    match format {
        IntFormat::Q8_0 => GgmlType::Q8_0,
        IntFormat::Q4_0 => GgmlType::Q4_0,
        IntFormat::Q4_1 => GgmlType::Q4_1,
        IntFormat::Q4K => GgmlType::Q4_K,
    }
}

/// The codes and side data of the Q8_0, Q4_0, Q4_1 or Q4_K tensor holding the
/// Hugging Face weight `base`, split from its blocks (`block_q8_0`, `block_q4_0`,
/// `block_q4_1`, `block_q4_K` in ggml-common.h: an `f16` scale (and for Q4_1 an `f16`
/// minimum) then 32 one-byte or 16 two-nibble codes; for Q4_K 16 bytes of side data,
/// kept as bytes, then 128 bytes of codes, rearranged into Q4_0's nibble order) with
/// the converter's q/k row permutation undone (a block never spans two rows).
fn native_blocks(
    file: &GgufFile,
    base: &str,
    format: IntFormat,
    heads: &dyn Fn(&str) -> Result<usize, Error>,
) -> Result<(WeightTensor, WeightTensor), Error> {
    let path = file.path().to_path_buf();
    let (gguf, permuted) = gguf_name(base).ok_or_else(|| Error::MissingWeight {
        tensor: base.to_string(),
        file: path.clone(),
    })?;
    let info = file.tensor(&gguf).ok_or_else(|| Error::MissingWeight {
        tensor: gguf.clone(),
        file: path.clone(),
    })?;
    let corrupt = |message: String| Error::Corrupt {
        tensor: gguf.clone(),
        file: path.clone(),
        message,
    };
    let shape = info.shape();
    let [rows, cols] = shape[..] else {
        return Err(corrupt(format!(
            "a GEMV weight must be a matrix, got {shape:?}"
        )));
    };
    let per_block = format.block_weights() as usize;
    if !cols.is_multiple_of(per_block) {
        return Err(corrupt(format!(
            "{cols} columns are not whole blocks of {per_block}"
        )));
    }
    let sides = format.scales_per_block() as usize;
    let side_bytes = format.side_bytes() as usize;
    let block_bytes = format.block_bytes() as usize;
    let bytes = file.bytes(info);
    let blocks = rows * cols / per_block;
    if bytes.len() != blocks * block_bytes {
        return Err(corrupt(format!(
            "{} bytes are not {blocks} blocks of {block_bytes}",
            bytes.len(),
        )));
    }
    let mut codes = Vec::with_capacity(rows * cols / 2);
    let mut scales = Vec::with_capacity(blocks * sides);
    let mut raw_side = Vec::new();
    for (k, block) in bytes.chunks_exact(block_bytes).enumerate() {
        // The f16 values leading the block: its scale (and minimum), or Q4_K's `d`
        // and `dmin`.
        for s in 0..side_bytes.min(4) / 2 {
            let d = half::f16::from_le_bytes([block[2 * s], block[2 * s + 1]]).to_f32();
            if !d.is_finite() {
                return Err(Error::NonFinite {
                    tensor: gguf.clone(),
                    file: path.clone(),
                    index: k * per_block,
                    value: d,
                });
            }
            if s < sides {
                scales.push(d);
            }
        }
        match format {
            IntFormat::Q4K => {
                raw_side.extend_from_slice(&block[..side_bytes]);
                codes.extend(quant::q4_k_codes_to_block_order(&block[side_bytes..]));
            }
            _ => codes.extend_from_slice(&block[side_bytes..]),
        }
    }
    if let Some(p) = permuted {
        let n = match p {
            Permuted::QueryHeads => heads("attention.head_count")?,
            Permuted::KvHeads => match heads("attention.head_count_kv") {
                Ok(n) => n,
                Err(_) => heads("attention.head_count")?,
            },
        };
        let split = || {
            corrupt(format!(
                "{rows} rows do not split into {n} heads of two RoPE halves"
            ))
        };
        let row_codes = codes.len() / rows.max(1);
        codes = unpermute_rows(&codes, rows, row_codes, n).ok_or_else(split)?;
        scales = unpermute_rows(&scales, rows, cols / I4_BLOCK * sides, n).ok_or_else(split)?;
        raw_side =
            unpermute_rows(&raw_side, rows, raw_side.len() / rows.max(1), n).ok_or_else(split)?;
    }
    let codes =
        WeightTensor::from_storage(format.codes(), &[rows, cols], Storage::U8(Arc::new(codes)))
            .map_err(|e| corrupt(e.to_string()))?;
    let side = format.scales(fusec_ir::Dim::Fixed(rows as u64), cols as u64);
    let shape: Vec<usize> = side
        .shape
        .dims()
        .iter()
        .filter_map(|d| d.as_fixed().map(|v| v as usize))
        .collect();
    let scales = match format {
        IntFormat::Q4K => {
            WeightTensor::from_storage(side.dtype, &shape, Storage::U8(Arc::new(raw_side)))
        }
        _ => WeightTensor::from_f32(side.dtype, &shape, scales),
    }
    .map_err(|e| corrupt(e.to_string()))?;
    Ok((codes, scales))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `LlamaModel.permute` itself, for the round trip.
    fn permute(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
        let d = rows / heads;
        let half = d / 2;
        let mut out = vec![0.0; values.len()];
        // reshape(heads, 2, half, cols).swapaxes(1, 2): out[h, i, j] = in[h, j, i].
        for h in 0..heads {
            for i in 0..half {
                for j in 0..2 {
                    let to = (h * d + i * 2 + j) * cols;
                    let from = (h * d + j * half + i) * cols;
                    out[to..to + cols].copy_from_slice(&values[from..from + cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_the_converters_permutation() {
        let (rows, cols, heads) = (24, 3, 3);
        let w: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let p = permute(&w, rows, cols, heads);
        assert_ne!(p, w);
        // Head 0, d = 8: GGUF rows 0..8 are HF rows 0, 4, 1, 5, 2, 6, 3, 7.
        let row = |m: &[f32], r: usize| m[r * cols];
        let order: Vec<f32> = (0..8).map(|r| row(&p, r) / cols as f32).collect();
        assert_eq!(order, vec![0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]);
        assert_eq!(unpermute_rows(&p, rows, cols, heads), Some(w));
        assert_eq!(unpermute_rows(&p, rows, cols, 5), None);
    }
}

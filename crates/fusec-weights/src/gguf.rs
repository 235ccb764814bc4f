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

use std::path::Path;

use fusec_gguf::GgufFile;
use fusec_ir::Graph;

use crate::checked::{insert_checked, wanted_weights};
use crate::error::Error;
use crate::quant::{self, KvScales};
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
pub fn unpermute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Option<Vec<f32>> {
    if heads == 0
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || values.len() != rows * cols
    {
        return None;
    }
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0.0f32; values.len()];
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
    let present = |name: &str| gguf_name(name).is_some_and(|(g, _)| file.tensor(&g).is_some());
    let (wanted, derives) = wanted_weights(graph, present)?;
    let mut weights = Weights::new(WeightSource::File(path.to_path_buf()));
    for (name, ty) in &wanted {
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

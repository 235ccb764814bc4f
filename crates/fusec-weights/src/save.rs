//! Saving the weights of a graph as safetensors.
//!
//! [`save_weights`] writes every weight of a graph, FP8 values as `F8_E4M3` (their
//! exact codes) with the `f32` scales beside them, plus metadata (`fusec.*` keys) that
//! says how they were made. [`crate::Weights::load`] reads that file back into the same
//! graph bit for bit.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use fusec_ir::{numerics, DType, Graph};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::error::Error;
use crate::tensor::WeightTensor;
use crate::weights::Weights;

/// The safetensors dtype a value of `dtype` is saved as.
fn file_dtype(dtype: DType) -> Option<Dtype> {
    match dtype {
        DType::F32 => Some(Dtype::F32),
        DType::F16 => Some(Dtype::F16),
        DType::Bf16 => Some(Dtype::BF16),
        DType::Fp8E4M3 => Some(Dtype::F8_E4M3),
        DType::Fp8E5M2 => Some(Dtype::F8_E5M2),
        // Integer codes are saved by the GGUF writer, in their own block layout.
        DType::I32 | DType::I8 | DType::I4 | DType::U4 | DType::U8 => None,
    }
}

/// The little-endian bytes of `t` as stored in its dtype (FP8 values by their codes).
fn encode(t: &WeightTensor) -> Vec<u8> {
    let values = t.to_vec_f32();
    match t.dtype() {
        DType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::Bf16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        DType::Fp8E4M3 => values.iter().map(|&v| numerics::e4m3_encode(v)).collect(),
        DType::Fp8E5M2 => values.iter().map(|&v| numerics::e5m2_encode(v)).collect(),
        DType::F32 | DType::I32 | DType::I8 | DType::I4 | DType::U4 | DType::U8 => {
            values.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
    }
}

/// Writes every weight of `graph` from `weights` to `dir/model.safetensors`, each in
/// its graph dtype, with `metadata` in the header (plus `fusec.format`). Returns the
/// file's path.
pub fn save_weights(
    dir: &Path,
    graph: &Graph,
    weights: &Weights,
    metadata: &BTreeMap<String, String>,
) -> Result<PathBuf, Error> {
    let path = dir.join("model.safetensors");
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        file: dir.to_path_buf(),
        source,
    })?;
    save_weights_to(&path, graph, weights, metadata)?;
    Ok(path)
}

/// Writes the weights as [`save_weights`] does, to the file `path` itself (a caller
/// that writes through a temporary file and renames it passes the temporary's path).
pub fn save_weights_to(
    path: &Path,
    graph: &Graph,
    weights: &Weights,
    metadata: &BTreeMap<String, String>,
) -> Result<(), Error> {
    let io = |source| Error::Io {
        file: path.to_path_buf(),
        source,
    };
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (id, name) in graph.weights() {
        let ty = graph
            .ty(id)
            .tensor()
            .ok_or_else(|| Error::InvalidGraph(format!("weight `{name}` has a tuple type")))?;
        let t = weights.bind(name, ty)?;
        let dtype = file_dtype(t.dtype()).ok_or_else(|| {
            Error::InvalidGraph(format!("weight `{name}` has dtype {}", t.dtype()))
        })?;
        tensors.push((name.to_string(), dtype, t.shape().to_vec(), encode(t)));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors.dedup_by(|a, b| a.0 == b.0);
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::InvalidGraph(format!("weight `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let mut info: HashMap<String, String> = metadata.clone().into_iter().collect();
    info.insert("format".into(), "pt".into());
    info.insert("fusec.format".into(), "fusec-weights/1".into());
    safetensors::serialize_to_file(views, Some(info), path)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    Ok(())
}

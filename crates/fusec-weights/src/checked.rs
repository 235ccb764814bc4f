//! What a checkpoint loader reads for a graph, and how each tensor it reads is
//! admitted: shared by the safetensors ([`crate::load`]) and GGUF ([`crate::gguf`])
//! loaders.

use std::collections::HashSet;
use std::path::Path;

use fusec_ir::{Graph, TensorType};

use crate::error::Error;
use crate::quant::{self, Derived};
use crate::rounding;
use crate::tensor::WeightTensor;
use crate::weights::{WeightSource, Weights};

/// The tensors to read for `graph`, in its order (so that the first problem reported
/// is the first weight the step needs), given which names the checkpoint `has`; and
/// whether derived weights must then be made from their bases.
pub fn wanted_weights(
    graph: &Graph,
    has: impl Fn(&str) -> bool,
) -> Result<(Vec<(String, TensorType)>, bool), Error> {
    let derived = quant::derived_weights(graph)?;
    let mut wanted: Vec<(String, TensorType)> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut want = |name: &str, ty: TensorType| {
        if seen.insert(name.to_string()) {
            wanted.push((name.to_string(), ty));
        }
    };
    let mut derives = false;
    for (id, name) in graph.weights() {
        let ty = graph
            .ty(id)
            .tensor()
            .ok_or_else(|| Error::InvalidGraph(format!("weight `{name}` has a tuple type")))?;
        match derived.get(name) {
            _ if has(name) => want(name, ty.clone()),
            Some(Derived::Gemv {
                base, to, shape, ..
            }) if has(base) => {
                let dims = shape.iter().map(|&d| fusec_ir::Dim::Fixed(d as u64));
                let base_ty = TensorType::new(*to, fusec_ir::Shape::new(dims));
                want(base, base_ty);
                derives = true;
            }
            Some(Derived::KvScale { .. }) => {
                return Err(Error::Uncalibrated {
                    tensor: name.to_string(),
                })
            }
            _ => want(name, ty.clone()),
        }
    }
    Ok((wanted, derives))
}

/// Rounds `values` to the dtype of `ty`, checks them finite, and inserts them as the
/// weight `name` read from `file`.
pub fn insert_checked(
    weights: &mut Weights,
    file: &Path,
    name: &str,
    ty: &TensorType,
    shape: &[usize],
    mut values: Vec<f32>,
) -> Result<(), Error> {
    rounding::round_slice(ty.dtype, &mut values);
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFinite {
            tensor: name.to_string(),
            file: file.to_path_buf(),
            index,
            value,
        });
    }
    let tensor =
        WeightTensor::from_f32(ty.dtype, shape, values).map_err(|e| Error::WrongDtype {
            tensor: name.to_string(),
            file: file.to_path_buf(),
            expected: ty.dtype.to_string(),
            found: e.to_string(),
        })?;
    weights.insert(
        name.to_string(),
        tensor,
        WeightSource::File(file.to_path_buf()),
    );
    Ok(())
}

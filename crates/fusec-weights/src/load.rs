//! Hugging Face safetensors checkpoints, read by memory map and checked against the
//! graph.
//!
//! A checkpoint is a `.safetensors` file, a `model.safetensors.index.json` listing
//! shards, or a directory holding either. Only the tensors the graph names are read
//! (a tied `lm_head` is absent from the graph, which uses the embedding table). Each
//! is checked for presence, shape and dtype (F32, F16, BF16, or F8_E4M3 and F8_E5M2
//! as saved FP8 weights are), converted once to `f32`, rounded to the dtype the graph
//! declares (as `torch_dtype` does when loading), and checked for NaN and infinities.
//! Every error names the tensor and the file.
//!
//! A lowered (FP8) graph names derived weights (`W.fp8`, `W.scale`; see
//! [`crate::quant`]): those the checkpoint lacks are made at load from their base `W`.
//! KV-cache scales cannot be made from weights and must be calibrated or saved.
//!
//! A weight the checkpoint lacks that is part of a packed projection the checkpoint
//! has (Phi-3's `qkv_proj`, `gate_up_proj`; see [`crate::packed`]) is cut out of it:
//! the packed tensor is read and checked as the parts stacked along rows.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use fusec_ir::{numerics, Graph, TensorType};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::checked::{insert_checked, wanted_weights};
use crate::error::Error;
use crate::packed;
use crate::quant::{self, KvScales};
use crate::tensor::WeightTensor;
use crate::weights::{fixed_shape, WeightSource, Weights};

impl Weights {
    /// Loads and checks every weight `graph` names from the checkpoint at `path`. A
    /// derived weight of a lowered graph that the checkpoint lacks is made from its
    /// base (see [`crate::quant`]); a KV-cache scale it lacks is an
    /// [`Error::Uncalibrated`].
    pub fn load(path: &Path, graph: &Graph) -> Result<Weights, Error> {
        if crate::gguf::is_gguf(path) {
            return crate::gguf::load(path, graph);
        }
        let layout = Layout::resolve(path)?;
        let present = layout.names();
        let has = |name: &str| present.as_ref().is_none_or(|p| p.contains(name));
        // The packed tensor a weight the checkpoint lacks can be cut from.
        let packed_home = |name: &str| {
            if has(name) {
                return None;
            }
            packed::home(name).filter(|h| has(&h.packed))
        };
        let available = |name: &str| has(name) || packed_home(name).is_some();
        let (wanted, derives) = wanted_weights(graph, available)?;
        let (wanted, splits) = packed_wanted(wanted, packed_home);
        let mut by_file: BTreeMap<PathBuf, Vec<(String, TensorType)>> = BTreeMap::new();
        for (name, ty) in wanted {
            let file = layout.file_of(&name)?;
            by_file.entry(file).or_default().push((name, ty));
        }
        let mut weights = Weights::new(WeightSource::File(layout.origin()));
        for (file, wanted) in &by_file {
            load_file(file, wanted, &mut weights)?;
        }
        for split in &splits {
            split.apply(&mut weights)?;
        }
        if derives {
            weights = quant::lower_weights(&weights, graph, &KvScales::new())?;
        }
        Ok(weights)
    }

    /// The `__metadata__` of the checkpoint at `path` (empty if it has none), e.g. the
    /// `fusec.*` keys of saved FP8 weights.
    pub fn metadata(path: &Path) -> Result<HashMap<String, String>, Error> {
        let layout = Layout::resolve(path)?;
        let file = match &layout {
            Layout::Single(f) => f.clone(),
            Layout::Sharded { files, .. } => match files.values().next() {
                Some(f) => f.clone(),
                None => return Ok(HashMap::new()),
            },
        };
        let io = |source| Error::Io {
            file: file.clone(),
            source,
        };
        let handle = File::open(&file).map_err(io)?;
        let map = map_file(&handle).map_err(io)?;
        let (_, meta) = SafeTensors::read_metadata(&map).map_err(|e| Error::Corrupt {
            tensor: "__metadata__".into(),
            file: file.clone(),
            message: e.to_string(),
        })?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }
}

/// How a checkpoint is laid out on disk.
enum Layout {
    Single(PathBuf),
    Sharded {
        index: PathBuf,
        files: HashMap<String, PathBuf>,
    },
}

impl Layout {
    fn resolve(path: &Path) -> Result<Layout, Error> {
        if path.is_dir() {
            let index = path.join("model.safetensors.index.json");
            if index.is_file() {
                return Layout::sharded(&index);
            }
            let single = path.join("model.safetensors");
            if single.is_file() {
                return Ok(Layout::Single(single));
            }
            let entries = std::fs::read_dir(path).map_err(|source| Error::Io {
                file: path.to_path_buf(),
                source,
            })?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            return match found.len() {
                1 => Ok(Layout::Single(found.remove(0))),
                _ => Err(Error::NoWeights {
                    path: path.to_path_buf(),
                }),
            };
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.ends_with(".index.json") {
            Layout::sharded(path)
        } else if path.is_file() {
            Ok(Layout::Single(path.to_path_buf()))
        } else if path.exists() {
            // A device, a pipe or a socket (`/dev/null`): it exists, but no
            // checkpoint can be memory-mapped from it.
            Err(Error::NotACheckpoint {
                path: path.to_path_buf(),
            })
        } else {
            Err(Error::Io {
                file: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            })
        }
    }

    /// Reads a shard index: `{"weight_map": {"tensor name": "shard file", ...}}`.
    fn sharded(index: &Path) -> Result<Layout, Error> {
        let bad = |message: String| Error::BadIndex {
            file: index.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
            file: index.to_path_buf(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files = HashMap::with_capacity(map.len());
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("`weight_map.{name}` is not a file name")))?;
            files.insert(name.clone(), dir.join(file));
        }
        Ok(Layout::Sharded {
            index: index.to_path_buf(),
            files,
        })
    }

    /// The names of the tensors in the checkpoint, or `None` when a file's header cannot
    /// be read (loading then reports the problem, naming the tensor it was after).
    fn names(&self) -> Option<HashSet<String>> {
        match self {
            Layout::Sharded { files, .. } => Some(files.keys().cloned().collect()),
            Layout::Single(file) => {
                let handle = File::open(file).ok()?;
                let map = map_file(&handle).ok()?;
                let (_, meta) = SafeTensors::read_metadata(&map).ok()?;
                Some(meta.tensors().into_keys().collect())
            }
        }
    }

    fn file_of(&self, tensor: &str) -> Result<PathBuf, Error> {
        match self {
            Layout::Single(f) => Ok(f.clone()),
            Layout::Sharded { index, files } => {
                files
                    .get(tensor)
                    .cloned()
                    .ok_or_else(|| Error::MissingWeight {
                        tensor: tensor.to_string(),
                        file: index.clone(),
                    })
            }
        }
    }

    fn origin(&self) -> PathBuf {
        match self {
            Layout::Single(f) => f.clone(),
            Layout::Sharded { index, .. } => index.clone(),
        }
    }
}

/// Tensors to read, by name, with the types the graph wants.
type Wanted = Vec<(String, TensorType)>;

/// A packed tensor to cut into its parts after loading.
struct Split {
    packed: String,
    /// The parts' names and types, rows in order.
    parts: Wanted,
}

impl Split {
    fn apply(&self, weights: &mut Weights) -> Result<(), Error> {
        let source = weights.source(&self.packed).cloned();
        let tensor = weights
            .remove(&self.packed)
            .ok_or_else(|| Error::InvalidGraph(format!("`{}` was not loaded", self.packed)))?;
        let values = tensor.to_vec_f32();
        let width = tensor.shape().get(1).copied().unwrap_or(0);
        let mut row = 0;
        for (name, ty) in &self.parts {
            let shape = fixed_shape(name, ty)?;
            let rows = shape.first().copied().unwrap_or(0);
            let part = values[row * width..(row + rows) * width].to_vec();
            row += rows;
            let part = WeightTensor::from_f32(ty.dtype, &shape, part)?;
            let source = source.clone().unwrap_or(WeightSource::Memory);
            weights.insert(name.clone(), part, source);
        }
        Ok(())
    }
}

/// `wanted` with every weight that lies in a packed tensor replaced by that tensor
/// (once), typed as its parts stacked along rows, and the splits to make after loading.
/// A part whose siblings the graph does not all name, or whose siblings differ in
/// dtype or width, stays wanted under its own name, which then is reported missing.
fn packed_wanted(
    wanted: Wanted,
    home: impl Fn(&str) -> Option<packed::PackedHome>,
) -> (Wanted, Vec<Split>) {
    let types: HashMap<String, TensorType> = wanted.iter().cloned().collect();
    let mut out = Vec::with_capacity(wanted.len());
    let mut splits: Vec<Split> = Vec::new();
    for (name, ty) in wanted {
        let Some(h) = home(&name) else {
            out.push((name, ty));
            continue;
        };
        if splits.iter().any(|s| s.packed == h.packed) {
            continue;
        }
        let parts: Option<Vec<(String, TensorType)>> = h
            .parts
            .iter()
            .map(|p| types.get(p).map(|t| (p.clone(), t.clone())))
            .collect();
        let stacked = parts.as_ref().and_then(|parts| {
            let mut rows = 0;
            for (p, t) in parts {
                let shape = fixed_shape(p, t).ok()?;
                let [r, width] = shape[..] else { return None };
                let same =
                    t.dtype == ty.dtype && Some(width as u64) == ty.shape.0.get(1)?.as_fixed();
                if !same {
                    return None;
                }
                rows += r as u64;
            }
            let shape = fusec_ir::Shape::new([rows.into(), ty.shape.0[1].clone()]);
            Some(TensorType::new(ty.dtype, shape))
        });
        match (parts, stacked) {
            (Some(parts), Some(stacked)) => {
                out.push((h.packed.clone(), stacked));
                splits.push(Split {
                    packed: h.packed,
                    parts,
                });
            }
            _ => out.push((name, ty)),
        }
    }
    (out, splits)
}

/// Maps `file` read-only.
///
/// Mapping is `unsafe` because another process could truncate or rewrite the file
/// while it is mapped. The map lives only while this module copies the needed tensors
/// out (converting them to `f32`), the bytes are only ever read as plain integers, and
/// checkpoints are not rewritten in place while a model loads; a rewrite at worst
/// yields wrong values, which the shape and finiteness checks are likely to catch.
#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: see the function documentation: the mapping is read-only and short-lived.
    unsafe { memmap2::Mmap::map(file) }
}

fn load_file(
    file: &Path,
    wanted: &[(String, TensorType)],
    weights: &mut Weights,
) -> Result<(), Error> {
    let io = |source| Error::Io {
        file: file.to_path_buf(),
        source,
    };
    let handle = File::open(file).map_err(io)?;
    let map = map_file(&handle).map_err(io)?;
    let first = wanted.first().map(|(n, _)| n.clone()).unwrap_or_default();
    let st = SafeTensors::deserialize(&map).map_err(|e| Error::Corrupt {
        tensor: first,
        file: file.to_path_buf(),
        message: e.to_string(),
    })?;
    for (name, ty) in wanted {
        let view = st.tensor(name).map_err(|e| match e {
            SafeTensorError::TensorNotFound(_) => Error::MissingWeight {
                tensor: name.clone(),
                file: file.to_path_buf(),
            },
            other => Error::Corrupt {
                tensor: name.clone(),
                file: file.to_path_buf(),
                message: other.to_string(),
            },
        })?;
        let expected = fixed_shape(name, ty)?;
        if view.shape() != expected.as_slice() {
            return Err(Error::WrongShape {
                tensor: name.clone(),
                file: file.to_path_buf(),
                expected,
                found: view.shape().to_vec(),
            });
        }
        let values = decode(view.dtype(), view.data()).ok_or_else(|| Error::WrongDtype {
            tensor: name.clone(),
            file: file.to_path_buf(),
            expected: format!(
                "{} (stored as F32, F16, BF16, F8_E4M3 or F8_E5M2)",
                ty.dtype
            ),
            found: format!("{:?}", view.dtype()),
        })?;
        insert_checked(weights, file, name, ty, &expected, values)?;
    }
    Ok(())
}

/// Little-endian F32, F16 or BF16 bytes, or F8_E4M3 or F8_E5M2 codes, as `f32`; `None`
/// for any other dtype.
fn decode(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F8_E4M3 => Some(bytes.iter().map(|&c| numerics::e4m3_decode(c)).collect()),
        Dtype::F8_E5M2 => Some(bytes.iter().map(|&c| numerics::e5m2_decode(c)).collect()),
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        ),
        Dtype::BF16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

//! A named set of weights, each with where it came from, checked against the graph
//! that binds it.

use std::collections::HashMap;
use std::path::PathBuf;

use fusec_ir::TensorType;

use crate::error::Error;
use crate::tensor::WeightTensor;

/// Where a weight's values came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightSource {
    File(PathBuf),
    Random {
        seed: u64,
    },
    /// Built in memory by the caller.
    Memory,
}

impl WeightSource {
    /// The file to name in an error (a placeholder for non-file sources).
    pub fn path(&self) -> PathBuf {
        match self {
            WeightSource::File(p) => p.clone(),
            WeightSource::Random { seed } => {
                PathBuf::from(format!("<random weights, seed {seed}>"))
            }
            WeightSource::Memory => PathBuf::from("<in-memory weights>"),
        }
    }
}

/// Named weight tensors (see [`WeightTensor`]), each with its [`WeightSource`].
#[derive(Clone, Debug)]
pub struct Weights {
    tensors: HashMap<String, (WeightTensor, WeightSource)>,
    /// Where a missing tensor would have come from.
    origin: WeightSource,
}

impl Default for Weights {
    fn default() -> Self {
        Weights::new(WeightSource::Memory)
    }
}

impl Weights {
    /// An empty set whose missing tensors are reported against `origin`.
    pub fn new(origin: WeightSource) -> Weights {
        Weights {
            tensors: HashMap::new(),
            origin,
        }
    }

    /// Weights built in memory (tests, tools).
    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, WeightTensor)>) -> Weights {
        let mut w = Weights::default();
        for (name, t) in tensors {
            w.insert(name, t, WeightSource::Memory);
        }
        w
    }

    pub fn insert(&mut self, name: String, tensor: WeightTensor, source: WeightSource) {
        self.tensors.insert(name, (tensor, source));
    }

    /// Removes and returns the tensor `name`.
    pub fn remove(&mut self, name: &str) -> Option<WeightTensor> {
        self.tensors.remove(name).map(|(t, _)| t)
    }

    pub fn get(&self, name: &str) -> Option<&WeightTensor> {
        self.tensors.get(name).map(|(t, _)| t)
    }

    pub fn source(&self, name: &str) -> Option<&WeightSource> {
        self.tensors.get(name).map(|(_, s)| s)
    }

    pub fn origin(&self) -> &WeightSource {
        &self.origin
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Parameters held (elements over all tensors).
    pub fn parameter_count(&self) -> u64 {
        self.tensors.values().map(|(t, _)| t.numel() as u64).sum()
    }

    /// The tensor `name` for a graph weight of type `ty`: present, of that shape and
    /// dtype.
    pub fn bind(&self, name: &str, ty: &TensorType) -> Result<&WeightTensor, Error> {
        let Some((t, source)) = self.tensors.get(name) else {
            return Err(Error::MissingWeight {
                tensor: name.to_string(),
                file: self.origin.path(),
            });
        };
        let expected = fixed_shape(name, ty)?;
        if t.shape() != expected.as_slice() {
            return Err(Error::WrongShape {
                tensor: name.to_string(),
                file: source.path(),
                expected,
                found: t.shape().to_vec(),
            });
        }
        if t.dtype() != ty.dtype {
            return Err(Error::WrongDtype {
                tensor: name.to_string(),
                file: source.path(),
                expected: ty.dtype.to_string(),
                found: t.dtype().to_string(),
            });
        }
        Ok(t)
    }
}

/// The fixed shape of a weight type.
pub fn fixed_shape(name: &str, ty: &TensorType) -> Result<Vec<usize>, Error> {
    ty.shape
        .dims()
        .iter()
        .map(|d| d.as_fixed().and_then(|v| usize::try_from(v).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| {
            Error::InvalidGraph(format!("weight `{name}` has a symbolic shape {}", ty.shape))
        })
}

//! Value types: a tensor type (dtype and shape), or a tuple of them for the few fused
//! ops that produce several results (read with `get`).

use std::fmt;

use crate::dtype::DType;
use crate::shape::{Bindings, Shape, UnboundSymbol};

/// The type of a tensor value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Shape) -> Self {
        Self { dtype, shape }
    }

    pub fn rank(&self) -> usize {
        self.shape.rank()
    }

    /// Bytes the tensor occupies under `bindings`.
    pub fn bytes(&self, bindings: &Bindings) -> Result<u64, UnboundSymbol> {
        Ok(self.dtype.bytes_for(self.shape.numel(bindings)?))
    }

    /// The bytes one step writes into a cache of this type, grown from `past`: the
    /// new entries, `self - past`; for a sliding-window ring (a [`Dim::Window`] axis)
    /// one position along that axis, also once the ring is full and its length no
    /// longer grows.
    ///
    /// [`Dim::Window`]: crate::shape::Dim::Window
    pub fn appended_bytes(
        &self,
        past: &TensorType,
        bindings: &Bindings,
    ) -> Result<u64, UnboundSymbol> {
        let bytes = self.bytes(bindings)?;
        match self.shape.dims().iter().find(|d| d.window().is_some()) {
            Some(ring) => Ok(bytes / ring.eval(bindings)?.max(1)),
            None => Ok(bytes.saturating_sub(past.bytes(bindings)?)),
        }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

/// The type of a node's result.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Type {
    Tensor(TensorType),
    Tuple(Vec<TensorType>),
}

impl Type {
    /// The tensor type, or `None` for a tuple.
    pub fn tensor(&self) -> Option<&TensorType> {
        match self {
            Type::Tensor(t) => Some(t),
            Type::Tuple(_) => None,
        }
    }

    /// The tensors this value holds: one, or each element of a tuple.
    pub fn tensors(&self) -> &[TensorType] {
        match self {
            Type::Tensor(t) => std::slice::from_ref(t),
            Type::Tuple(ts) => ts,
        }
    }

    /// Bytes all of this value's tensors occupy under `bindings`.
    pub fn bytes(&self, bindings: &Bindings) -> Result<u64, UnboundSymbol> {
        self.tensors()
            .iter()
            .try_fold(0u64, |n, t| Ok(n.saturating_add(t.bytes(bindings)?)))
    }
}

impl From<TensorType> for Type {
    fn from(t: TensorType) -> Type {
        Type::Tensor(t)
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Tensor(t) => write!(f, "{t}"),
            Type::Tuple(ts) => {
                f.write_str("(")?;
                for (i, t) in ts.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{t}")?;
                }
                f.write_str(")")
            }
        }
    }
}

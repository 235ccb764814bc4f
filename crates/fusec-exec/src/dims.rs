//! A tensor's shape or strides held inline ([`Dims`], rank at most [`MAX_RANK`]), and
//! the error of a tensor operation that does not apply ([`TensorError`]).
//!
//! Its own module, below `crate::tensor` and the kernels' strided walks, which both
//! read shapes and strides.

use std::fmt;
use std::ops::{Deref, DerefMut};

use fusec_ir::DType;

/// The largest rank a tensor may have. The IR's decode graphs use ranks up to 5 (the
/// grouped-query `expand`); eight leaves room while keeping a tensor's header small.
pub const MAX_RANK: usize = 8;

/// A shape or strides: up to [`MAX_RANK`] sizes held inline, so that a tensor header
/// never allocates. It reads as a `&[usize]` of its own length (through `Deref`).
#[derive(Clone, Copy)]
pub struct Dims {
    len: usize,
    /// The sizes in `values[..len]`; the entries after them are always 0.
    values: [usize; MAX_RANK],
}

impl Dims {
    /// Rank 0: the shape (and strides) of a scalar.
    pub const fn new() -> Dims {
        Dims {
            len: 0,
            values: [0; MAX_RANK],
        }
    }

    /// `sizes` held inline, or [`TensorError::Rank`] when there are too many.
    pub fn from_slice(sizes: &[usize]) -> Result<Dims, TensorError> {
        let mut d = Dims::new();
        d.values
            .get_mut(..sizes.len())
            .ok_or(TensorError::Rank { rank: sizes.len() })?
            .copy_from_slice(sizes);
        d.len = sizes.len();
        Ok(d)
    }

    /// `len` copies of `value`. Every caller passes the rank of another `Dims`, so
    /// `len` never exceeds [`MAX_RANK`]; a larger one would be cut to it.
    pub(crate) fn filled(len: usize, value: usize) -> Dims {
        let len = len.min(MAX_RANK);
        let mut d = Dims::new();
        d.values[..len].fill(value);
        d.len = len;
        d
    }

    /// Appends a size; [`TensorError::Rank`] when the rank would exceed [`MAX_RANK`].
    pub fn push(&mut self, value: usize) -> Result<(), TensorError> {
        self.insert(self.len, value)
    }

    /// Inserts a size before position `index` (at most the rank);
    /// [`TensorError::Rank`] when the rank would exceed [`MAX_RANK`].
    pub fn insert(&mut self, index: usize, value: usize) -> Result<(), TensorError> {
        if self.len == MAX_RANK {
            return Err(TensorError::Rank { rank: self.len + 1 });
        }
        if index > self.len {
            return Err(TensorError::Invalid(format!(
                "cannot insert at position {index} of a rank-{} shape",
                self.len
            )));
        }
        self.values.copy_within(index..self.len, index + 1);
        self.values[index] = value;
        self.len += 1;
        Ok(())
    }

    /// Removes and returns the size at `index`, or `None` when it is out of range.
    pub fn remove(&mut self, index: usize) -> Option<usize> {
        if index >= self.len {
            return None;
        }
        let value = self.values[index];
        self.values.copy_within(index + 1..self.len, index);
        self.len -= 1;
        self.values[self.len] = 0;
        Some(value)
    }

    pub fn as_slice(&self) -> &[usize] {
        &self.values[..self.len]
    }
}

impl Default for Dims {
    fn default() -> Dims {
        Dims::new()
    }
}

impl Deref for Dims {
    type Target = [usize];

    fn deref(&self) -> &[usize] {
        self.as_slice()
    }
}

impl DerefMut for Dims {
    fn deref_mut(&mut self) -> &mut [usize] {
        &mut self.values[..self.len]
    }
}

impl<'a> IntoIterator for &'a Dims {
    type Item = &'a usize;
    type IntoIter = std::slice::Iter<'a, usize>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl PartialEq for Dims {
    fn eq(&self, other: &Dims) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Dims {}

impl PartialEq<[usize]> for Dims {
    fn eq(&self, other: &[usize]) -> bool {
        self.as_slice() == other
    }
}

impl fmt::Debug for Dims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_slice().fmt(f)
    }
}

/// Arrays of up to [`MAX_RANK`] sizes convert without a check.
macro_rules! dims_from_array {
    ($($n:literal)*) => {$(
        impl From<[usize; $n]> for Dims {
            fn from(sizes: [usize; $n]) -> Dims {
                let mut d = Dims::new();
                d.values[..$n].copy_from_slice(&sizes);
                d.len = $n;
                d
            }
        }
    )*};
}

dims_from_array!(0 1 2 3 4 5 6 7 8);

impl TryFrom<&[usize]> for Dims {
    type Error = TensorError;

    fn try_from(sizes: &[usize]) -> Result<Dims, TensorError> {
        Dims::from_slice(sizes)
    }
}

/// A tensor operation that does not apply to the given tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("{len} values do not fill shape {shape:?}")]
    Length { shape: Vec<usize>, len: usize },
    #[error("a tensor of dtype {dtype} cannot hold {what}")]
    DType { dtype: DType, what: &'static str },
    #[error("cannot view shape {shape:?} with strides {strides:?} as {target:?} without a copy")]
    NotViewable {
        shape: Vec<usize>,
        strides: Vec<usize>,
        target: Vec<usize>,
    },
    #[error("rank {rank} exceeds the CPU executor's maximum of {MAX_RANK}")]
    Rank { rank: usize },
    #[error("{0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_hold_up_to_the_maximum_rank_inline() {
        let mut d = Dims::from([2, 3]);
        d.insert(0, 1).expect("room");
        d.push(4).expect("room");
        assert_eq!(d, Dims::from([1, 2, 3, 4]));
        assert_eq!(d.remove(1), Some(2));
        assert_eq!(d.remove(3), None);
        assert_eq!(d.as_slice(), &[1, 3, 4]);
        assert_eq!(format!("{d:?}"), "[1, 3, 4]");
        // Equality ignores what lies past the rank.
        let mut e = Dims::from([1, 3, 4, 9]);
        e.remove(3);
        assert_eq!(d, e);
        let mut full = Dims::from([1; MAX_RANK]);
        assert_eq!(full.push(1), Err(TensorError::Rank { rank: MAX_RANK + 1 }));
        assert!(full.insert(0, 1).is_err());
        assert!(Dims::from_slice(&[1; MAX_RANK + 1]).is_err());
        assert!(Dims::new().insert(1, 1).is_err());
    }
}

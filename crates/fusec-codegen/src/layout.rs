//! Static layouts: every tensor value is a buffer seen through an element offset and
//! strides, resolved at compile time. Views (reshape, transpose, slice, unsqueeze,
//! expand, get) only change the layout, so a kernel reads its operands through index
//! expressions with constant strides and launches nothing for them.
//!
//! A dimension that depends on the cached length `S` has a runtime extent but a fixed
//! capacity (see [`DecodeShape::capacity`]), so strides stay constant while the extent
//! is the kernel argument `S` plus a constant.

use fusec_ir::{DType, Dim, Shape};

use crate::options::DecodeShape;
use crate::plan::{BufferId, ViewInfo};

/// The extent of one dimension at run time.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Extent {
    Fixed(u64),
    /// `S + k`.
    Past(u64),
    /// `min(S + plus, window)`: a sliding window's ring-buffer cache, which holds at
    /// most `window` positions and writes slot `S mod window`.
    Window {
        plus: u64,
        window: u64,
    },
}

impl Extent {
    /// The extent of an IR dimension: `B` is baked in; `S + k` stays symbolic.
    pub fn of(dim: &Dim, shape: &DecodeShape) -> Result<Extent, String> {
        match dim {
            Dim::Fixed(v) => Ok(Extent::Fixed(*v)),
            Dim::Sym { name, plus } if name == fusec_ir::step::BATCH => {
                Ok(Extent::Fixed(shape.batch + plus))
            }
            Dim::Sym { name, plus } if name == fusec_ir::step::PAST => Ok(Extent::Past(*plus)),
            // A paged cache's pool and table sizes are baked in like the batch.
            Dim::Sym { name, plus } if name == fusec_ir::step::POOL_BLOCKS => shape
                .paged
                .map(|p| Extent::Fixed(p.pool_blocks + plus))
                .ok_or_else(|| name.clone()),
            Dim::Sym { name, plus } if name == fusec_ir::step::MAX_BLOCKS => shape
                .paged
                .map(|p| Extent::Fixed(p.max_blocks + plus))
                .ok_or_else(|| name.clone()),
            Dim::Window { name, plus, window } if name == fusec_ir::step::PAST => {
                Ok(Extent::Window {
                    plus: *plus,
                    window: *window,
                })
            }
            Dim::Sym { name, .. } | Dim::Window { name, .. } => Err(name.clone()),
        }
    }

    /// The extent when the cache is full.
    pub fn capacity(self, shape: &DecodeShape) -> u64 {
        match self {
            Extent::Fixed(v) => v,
            Extent::Past(_) => shape.capacity(),
            Extent::Window { window, .. } => shape.capacity().min(window),
        }
    }

    pub fn fixed(self) -> Option<u64> {
        match self {
            Extent::Fixed(v) => Some(v),
            Extent::Past(_) | Extent::Window { .. } => None,
        }
    }

    /// Whether the extent depends on `S`.
    pub fn is_symbolic(self) -> bool {
        self.fixed().is_none()
    }

    /// The extent of a cache of this length after one entry is written to it: `S + k + 1`,
    /// or `min(S + k + 1, W)` for a ring.
    pub fn appended(self) -> Extent {
        match self {
            Extent::Fixed(v) => Extent::Fixed(v + 1),
            Extent::Past(k) => Extent::Past(k + 1),
            Extent::Window { plus, window } => Extent::Window {
                plus: plus + 1,
                window,
            },
        }
    }

    /// A C expression for the position a step's entry is written to in a cache of this
    /// length (`S` positions written before it): `S`, or `S mod W` for a ring.
    pub fn write_slot(self) -> String {
        match self {
            Extent::Window { window, .. } => format!("((long long)S % {window}LL)"),
            Extent::Fixed(_) | Extent::Past(_) => "(long long)S".to_string(),
        }
    }

    pub fn is_one(self) -> bool {
        self == Extent::Fixed(1)
    }

    /// A C expression for the extent (`16`, `(S + 1)`).
    pub fn c(self) -> String {
        match self {
            Extent::Fixed(v) => format!("{v}LL"),
            Extent::Past(0) => "(long long)S".to_string(),
            Extent::Past(k) => format!("((long long)S + {k}LL)"),
            Extent::Window { plus, window } => {
                let s = Extent::Past(plus).c();
                format!("({s} < {window}LL ? {s} : {window}LL)")
            }
        }
    }

    /// The extent as the IR writes it.
    pub fn ir(self) -> String {
        match self {
            Extent::Fixed(v) => v.to_string(),
            Extent::Past(0) => "S".to_string(),
            Extent::Past(k) => format!("S+{k}"),
            Extent::Window { plus: 0, window } => format!("min(S,{window})"),
            Extent::Window { plus, window } => format!("min(S+{plus},{window})"),
        }
    }
}

/// The runtime extents of an IR shape.
pub fn extents(shape: &Shape, decode: &DecodeShape) -> Result<Vec<Extent>, String> {
    shape.dims().iter().map(|d| Extent::of(d, decode)).collect()
}

/// Row-major strides over the capacities of `dims`.
pub fn dense_strides(dims: &[Extent], decode: &DecodeShape) -> Vec<u64> {
    let mut strides = vec![0; dims.len()];
    let mut s = 1u64;
    for (st, d) in strides.iter_mut().zip(dims).rev() {
        *st = s;
        s = s.saturating_mul(d.capacity(decode));
    }
    strides
}

/// A tensor as a buffer, an element offset, extents and element strides.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct View {
    pub buffer: BufferId,
    pub dtype: DType,
    pub offset: u64,
    pub dims: Vec<Extent>,
    pub strides: Vec<u64>,
}

impl View {
    /// The whole of a dense buffer.
    pub fn dense(buffer: BufferId, dtype: DType, dims: Vec<Extent>, decode: &DecodeShape) -> View {
        let strides = dense_strides(&dims, decode);
        View {
            buffer,
            dtype,
            offset: 0,
            dims,
            strides,
        }
    }

    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    /// Whether the dims are laid out row-major with no gaps at capacity (ignoring size-1
    /// dimensions, whose stride never matters).
    pub fn is_dense(&self, decode: &DecodeShape) -> bool {
        let want = dense_strides(&self.dims, decode);
        self.dims
            .iter()
            .zip(self.strides.iter().zip(&want))
            .all(|(d, (s, w))| d.is_one() || s == w)
    }

    /// The last dimension is unit-stride (or the view is a scalar).
    pub fn inner_contiguous(&self) -> bool {
        match (self.dims.last(), self.strides.last()) {
            (Some(d), Some(s)) => *s == 1 || d.is_one(),
            _ => true,
        }
    }

    /// The largest element index the view reaches when the cache is full, plus one.
    pub fn span(&self, decode: &DecodeShape) -> u64 {
        let mut last = self.offset;
        for (d, s) in self.dims.iter().zip(&self.strides) {
            let c = d.capacity(decode);
            if c == 0 {
                return self.offset;
            }
            last += (c - 1) * s;
        }
        last + 1
    }

    pub fn transpose(&self, a: usize, b: usize) -> Result<View, String> {
        if a >= self.rank() || b >= self.rank() {
            return Err(format!(
                "transpose {a},{b} out of range for rank {}",
                self.rank()
            ));
        }
        let mut v = self.clone();
        v.dims.swap(a, b);
        v.strides.swap(a, b);
        Ok(v)
    }

    pub fn slice(&self, axis: usize, start: u64, end: u64) -> Result<View, String> {
        let mut v = self.clone();
        match v.dims.get(axis) {
            Some(Extent::Fixed(n)) if start < end && end <= *n => {}
            _ => return Err(format!("slice {start}..{end} of axis {axis} is not static")),
        }
        v.offset += start * v.strides[axis];
        v.dims[axis] = Extent::Fixed(end - start);
        Ok(v)
    }

    pub fn unsqueeze(&self, axis: usize) -> Result<View, String> {
        if axis > self.rank() {
            return Err(format!(
                "unsqueeze {axis} out of range for rank {}",
                self.rank()
            ));
        }
        let mut v = self.clone();
        v.dims.insert(axis, Extent::Fixed(1));
        v.strides.insert(axis, 0);
        Ok(v)
    }

    /// Broadcasts size-1 dimensions (stride 0); `to` has the view's rank.
    pub fn expand(&self, to: &[Extent]) -> Result<View, String> {
        if to.len() != self.rank() {
            return Err(format!(
                "expand to rank {} from rank {}",
                to.len(),
                self.rank()
            ));
        }
        let mut v = self.clone();
        for (i, &t) in to.iter().enumerate() {
            if v.dims[i] != t {
                if !v.dims[i].is_one() {
                    return Err(format!("cannot expand {:?} to {:?}", self.dims, to));
                }
                v.dims[i] = t;
                v.strides[i] = 0;
            }
        }
        Ok(v)
    }

    /// This view broadcast (numpy style) to `to`: leading dimensions are added with
    /// stride 0 and size-1 dimensions broadcast.
    pub fn broadcast_to(&self, to: &[Extent]) -> Result<View, String> {
        if to.len() < self.rank() {
            return Err(format!(
                "cannot broadcast rank {} to rank {}",
                self.rank(),
                to.len()
            ));
        }
        let mut v = self.clone();
        let extra = to.len() - self.rank();
        v.dims.splice(0..0, to[..extra].iter().copied());
        v.strides.splice(0..0, std::iter::repeat_n(0, extra));
        v.expand(to)
    }

    /// A reshape that keeps the storage: dimensions merge or split only where the
    /// strides allow, and a dimension that depends on `S` must stay a dimension of its
    /// own (its capacity padding cannot merge with its neighbours).
    pub fn reshape(&self, to: &[Extent], decode: &DecodeShape) -> Result<View, String> {
        let fail = || {
            format!(
                "cannot view {:?} (strides {:?}) as {:?}",
                self.dims, self.strides, to
            )
        };
        // Work on the dimensions that are not 1: their strides matter.
        let src: Vec<(Extent, u64)> = self
            .dims
            .iter()
            .zip(&self.strides)
            .filter(|(d, _)| !d.is_one())
            .map(|(d, s)| (*d, *s))
            .collect();
        let dst: Vec<usize> = (0..to.len()).filter(|&j| !to[j].is_one()).collect();
        let mut strides = vec![0u64; to.len()];
        let (mut i, mut j) = (0usize, 0usize);
        while i < src.len() || j < dst.len() {
            if i >= src.len() || j >= dst.len() {
                return Err(fail());
            }
            if src[i].0.is_symbolic() {
                if to[dst[j]] != src[i].0 {
                    return Err(fail());
                }
                strides[dst[j]] = src[i].1;
                i += 1;
                j += 1;
                continue;
            }
            // A group of fixed source dims matching a group of fixed target dims.
            let (i0, j0) = (i, j);
            let mut ps = src[i].0.capacity(decode);
            i += 1;
            let mut pd = match to[dst[j]] {
                Extent::Fixed(v) => v,
                Extent::Past(_) | Extent::Window { .. } => return Err(fail()),
            };
            j += 1;
            while ps != pd {
                if ps < pd {
                    match src.get(i) {
                        Some((Extent::Fixed(v), _)) if *v > 0 => ps *= v,
                        _ => return Err(fail()),
                    }
                    i += 1;
                } else {
                    match dst.get(j).map(|&k| to[k]) {
                        Some(Extent::Fixed(v)) if v > 0 => pd *= v,
                        _ => return Err(fail()),
                    }
                    j += 1;
                }
            }
            // The source group must be one contiguous run of memory.
            for k in i0..i - 1 {
                if src[k].1 != src[k + 1].1 * src[k + 1].0.capacity(decode) {
                    return Err(fail());
                }
            }
            let mut s = src[i - 1].1;
            for k in (j0..j).rev() {
                strides[dst[k]] = s;
                if let Extent::Fixed(v) = to[dst[k]] {
                    s *= v;
                }
            }
        }
        Ok(View {
            buffer: self.buffer,
            dtype: self.dtype,
            offset: self.offset,
            dims: to.to_vec(),
            strides,
        })
    }

    /// The plan's description of this view.
    pub fn info(&self, decode: &DecodeShape) -> ViewInfo {
        ViewInfo {
            buffer: self.buffer,
            dtype: self.dtype,
            shape: self.dims.iter().map(|d| d.ir()).collect(),
            dims_at_capacity: self.dims.iter().map(|d| d.capacity(decode)).collect(),
            offset: self.offset,
            strides: self.strides.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: DecodeShape = DecodeShape {
        batch: 1,
        max_seq_len: 8,
        paged: None,
    };

    fn fixed(v: &[u64]) -> Vec<Extent> {
        v.iter().map(|&x| Extent::Fixed(x)).collect()
    }

    #[test]
    fn reshape_splits_and_merges_dense_dims() {
        let v = View::dense(0, DType::F32, fixed(&[1, 1, 64]), &D);
        let r = v.reshape(&fixed(&[1, 1, 4, 16]), &D).expect("viewable");
        assert_eq!(r.strides[2..], [16, 1]);
        let t = r.transpose(1, 2).expect("in range");
        assert_eq!(t.dims, fixed(&[1, 4, 1, 16]));
        let back = t.transpose(1, 2).expect("in range");
        let m = back.reshape(&fixed(&[1, 1, 64]), &D).expect("viewable");
        assert_eq!(m.strides[2], 1);
    }

    #[test]
    fn reshape_keeps_past_dims_alone() {
        let dims = vec![
            Extent::Fixed(1),
            Extent::Fixed(2),
            Extent::Fixed(2),
            Extent::Past(1),
            Extent::Fixed(16),
        ];
        let v = View::dense(0, DType::F32, dims, &D);
        let to = vec![
            Extent::Fixed(1),
            Extent::Fixed(4),
            Extent::Past(1),
            Extent::Fixed(16),
        ];
        let r = v.reshape(&to, &D).expect("viewable");
        assert_eq!(r.strides, vec![0, 128, 16, 1]);
        let merged = vec![
            Extent::Fixed(1),
            Extent::Fixed(4),
            Extent::Past(1),
            Extent::Fixed(16),
        ];
        assert!(v.transpose(2, 3).expect("ok").reshape(&merged, &D).is_err());
    }

    #[test]
    fn non_contiguous_merge_is_rejected() {
        let v = View::dense(0, DType::F32, fixed(&[4, 16]), &D)
            .transpose(0, 1)
            .expect("ok");
        assert!(v.reshape(&fixed(&[64]), &D).is_err());
    }
}

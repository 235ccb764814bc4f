//! Shapes with static and named symbolic dimensions.
//!
//! A decode step is compiled once and run at every context length, so the KV-cache
//! length is a symbol (`S`, the number of positions already cached) and so is the batch
//! (`B`). A dimension is either a constant or a symbol plus a constant offset (`S+1` is
//! the cache length after this step's append). Symbols are bound to numbers only when
//! costs are computed or a graph is run, through [`Bindings`].
//!
//! A layer with a sliding attention window of `W` positions keeps at most `W` of them:
//! its cache length is `min(S, W)` ([`Dim::Window`]), a ring buffer whose next write
//! goes to slot `S mod W` ([`Dim::ring_slot`]).

use std::collections::BTreeMap;
use std::fmt;

/// One dimension of a shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    /// A size known when the graph is built.
    Fixed(u64),
    /// A named size plus a constant offset, e.g. `S+1`.
    Sym { name: String, plus: u64 },
    /// `min(name + plus, window)`: the length of a ring buffer of `window` positions
    /// after `name + plus` writes (a sliding-window layer's KV cache).
    Window {
        name: String,
        plus: u64,
        window: u64,
    },
}

impl Dim {
    pub fn sym(name: &str) -> Dim {
        Dim::Sym {
            name: name.to_string(),
            plus: 0,
        }
    }

    /// This dimension plus `n`.
    pub fn plus(&self, n: u64) -> Dim {
        match self {
            Dim::Fixed(v) => Dim::Fixed(v + n),
            Dim::Sym { name, plus } => Dim::Sym {
                name: name.clone(),
                plus: plus + n,
            },
            // `min(S + p, W) + n = min(S + p + n, W + n)`, exactly. A ring's length
            // after an append is [`Dim::appended`] instead: it stays capped at `W`.
            Dim::Window { name, plus, window } => Dim::Window {
                name: name.clone(),
                plus: plus + n,
                window: window + n,
            },
        }
    }

    /// This dimension capped at `window` positions: `min(self, window)`.
    pub fn windowed(&self, window: u64) -> Dim {
        match self {
            Dim::Fixed(v) => Dim::Fixed((*v).min(window)),
            Dim::Sym { name, plus } => Dim::Window {
                name: name.clone(),
                plus: *plus,
                window,
            },
            Dim::Window {
                name,
                plus,
                window: w,
            } => Dim::Window {
                name: name.clone(),
                plus: *plus,
                window: window.min(*w),
            },
        }
    }

    /// The length of a cache of this length after one more entry is written: `n + 1`,
    /// or for a ring buffer `min(S + plus + 1, W)` (the entry overwrites the oldest
    /// one once the ring is full).
    pub fn appended(&self) -> Dim {
        self.appended_by(1)
    }

    /// The length of a cache of this length after `n` more entries are written (a
    /// prefill step of `n` tokens): `len + n`, or for a ring buffer
    /// `min(S + plus + n, W)`: the entries go to consecutive slots modulo `W`, each
    /// over the oldest once the ring is full.
    pub fn appended_by(&self, n: u64) -> Dim {
        match self {
            Dim::Window { name, plus, window } => Dim::Window {
                name: name.clone(),
                plus: plus + n,
                window: *window,
            },
            d => d.plus(n),
        }
    }

    /// The window of a ring buffer's length, `None` for any other dimension.
    pub fn window(&self) -> Option<u64> {
        match self {
            Dim::Window { window, .. } => Some(*window),
            Dim::Fixed(_) | Dim::Sym { .. } => None,
        }
    }

    /// The symbol this dimension depends on, if any.
    pub fn symbol(&self) -> Option<&str> {
        match self {
            Dim::Fixed(_) => None,
            Dim::Sym { name, .. } | Dim::Window { name, .. } => Some(name),
        }
    }

    /// The slot of a ring buffer of this length that the entry of the step with
    /// `written` entries before it goes to: `written mod W` (Mistral's rolling buffer
    /// cache, Jiang et al., 2023, section 2). Any other cache is written at its end,
    /// `written`.
    pub fn ring_slot(&self, written: u64) -> u64 {
        match self.window() {
            Some(w) if w > 0 => written % w,
            _ => written,
        }
    }

    pub fn as_fixed(&self) -> Option<u64> {
        match self {
            Dim::Fixed(v) => Some(*v),
            Dim::Sym { .. } | Dim::Window { .. } => None,
        }
    }

    pub fn is_one(&self) -> bool {
        *self == Dim::Fixed(1)
    }

    /// The value of this dimension under `bindings`.
    pub fn eval(&self, bindings: &Bindings) -> Result<u64, UnboundSymbol> {
        match self {
            Dim::Fixed(v) => Ok(*v),
            Dim::Sym { name, plus } => bindings
                .get(name)
                .map(|v| v.saturating_add(*plus))
                .ok_or_else(|| UnboundSymbol(name.clone())),
            Dim::Window { name, plus, window } => bindings
                .get(name)
                .map(|v| (v + plus).min(*window))
                .ok_or_else(|| UnboundSymbol(name.clone())),
        }
    }
}

impl From<u64> for Dim {
    fn from(v: u64) -> Dim {
        Dim::Fixed(v)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Sym { name, plus: 0 } => f.write_str(name),
            Dim::Sym { name, plus } => write!(f, "{name}+{plus}"),
            Dim::Window {
                name,
                plus: 0,
                window,
            } => write!(f, "min({name},{window})"),
            Dim::Window { name, plus, window } => write!(f, "min({name}+{plus},{window})"),
        }
    }
}

/// A symbol that a shape uses but the bindings do not give a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("symbolic dimension `{0}` has no value")]
pub struct UnboundSymbol(pub String);

/// Values for the symbolic dimensions, e.g. `B = 1, S = 8191`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bindings(BTreeMap<String, u64>);

impl Bindings {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, name: &str, value: u64) -> Self {
        self.set(name, value);
        self
    }

    /// Binds `name` to `value`. Rebinding a bound name copies no string, so that a
    /// decode loop can move `S` along every step without allocating.
    pub fn set(&mut self, name: &str, value: u64) {
        match self.0.get_mut(name) {
            Some(v) => *v = value,
            None => {
                self.0.insert(name.to_string(), value);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.get(name).copied()
    }
}

/// A tensor shape: a list of dimensions, outermost first, row-major.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn new(dims: impl IntoIterator<Item = Dim>) -> Shape {
        Shape(dims.into_iter().collect())
    }

    /// A shape of fixed dimensions only.
    pub fn fixed(dims: &[u64]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::Fixed(d)).collect())
    }

    pub fn scalar() -> Shape {
        Shape(Vec::new())
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    pub fn dim(&self, axis: usize) -> &Dim {
        &self.0[axis]
    }

    pub fn last(&self) -> Option<&Dim> {
        self.0.last()
    }

    /// The concrete dimensions under `bindings`.
    pub fn eval(&self, bindings: &Bindings) -> Result<Vec<u64>, UnboundSymbol> {
        self.0.iter().map(|d| d.eval(bindings)).collect()
    }

    /// The number of elements under `bindings`, saturating at `u64::MAX` rather than
    /// wrapping (the frontends' limits keep models far below; see
    /// `fusec_model::frontend::Limits`).
    pub fn numel(&self, bindings: &Bindings) -> Result<u64, UnboundSymbol> {
        Ok(self
            .eval(bindings)?
            .iter()
            .fold(1u64, |n, &d| n.saturating_mul(d)))
    }

    /// The element count as a symbolic product: the product of the fixed dimensions and
    /// the sorted list of symbolic factors. Two shapes with equal products hold the same
    /// number of elements for every binding, which is what a reshape must preserve.
    pub fn symbolic_numel(&self) -> (u64, Vec<Dim>) {
        let mut konst = 1u64;
        let mut syms = Vec::new();
        for d in &self.0 {
            match d {
                Dim::Fixed(v) => konst = konst.saturating_mul(*v),
                sym => syms.push(sym.clone()),
            }
        }
        syms.sort();
        (konst, syms)
    }

    /// Numpy/PyTorch broadcasting of two shapes; `None` where they do not broadcast.
    pub fn broadcast(a: &Shape, b: &Shape) -> Option<Shape> {
        let rank = a.rank().max(b.rank());
        let mut out = Vec::with_capacity(rank);
        for i in 0..rank {
            let da = (i + a.rank()).checked_sub(rank).map(|j| &a.0[j]);
            let db = (i + b.rank()).checked_sub(rank).map(|j| &b.0[j]);
            let d = match (da, db) {
                (Some(x), None) | (None, Some(x)) => x.clone(),
                (Some(x), Some(y)) if x == y => x.clone(),
                (Some(x), Some(y)) if x.is_one() => y.clone(),
                (Some(x), Some(y)) if y.is_one() => x.clone(),
                _ => return None,
            };
            out.push(d);
        }
        Some(Shape(out))
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(dims: &[Dim]) -> Shape {
        Shape(dims.to_vec())
    }

    #[test]
    fn broadcasting_follows_numpy() {
        let b = Dim::sym("B");
        let a = s(&[b.clone(), 1.into(), 64.into()]);
        let w = Shape::fixed(&[64]);
        assert_eq!(Shape::broadcast(&a, &w), Some(a.clone()));
        let m = s(&[b.clone(), 1.into(), 1.into()]);
        assert_eq!(Shape::broadcast(&a, &m), Some(a.clone()));
        assert_eq!(Shape::broadcast(&a, &Shape::fixed(&[63])), None);
        assert_eq!(Shape::broadcast(&Shape::scalar(), &a), Some(a));
    }

    #[test]
    fn symbolic_dims_evaluate() {
        let sh = s(&[Dim::sym("B"), 2.into(), Dim::sym("S").plus(1), 16.into()]);
        assert_eq!(sh.to_string(), "[B,2,S+1,16]");
        let bind = Bindings::new().with("B", 3).with("S", 9);
        assert_eq!(sh.eval(&bind), Ok(vec![3, 2, 10, 16]));
        assert_eq!(sh.numel(&bind), Ok(960));
        assert_eq!(
            sh.eval(&Bindings::new().with("B", 1)),
            Err(UnboundSymbol("S".into()))
        );
    }

    #[test]
    fn window_dims_cap_and_append_as_a_ring() {
        let w = Dim::sym("S").windowed(8);
        assert_eq!(w.to_string(), "min(S,8)");
        let after = w.appended();
        assert_eq!(after.to_string(), "min(S+1,8)");
        for (s, len, next) in [(0, 0, 1), (7, 7, 8), (8, 8, 8), (20, 8, 8)] {
            let b = Bindings::new().with("S", s);
            assert_eq!(w.eval(&b), Ok(len));
            assert_eq!(after.eval(&b), Ok(next));
        }
        assert_eq!(w.ring_slot(5), 5);
        assert_eq!(w.ring_slot(8), 0);
        assert_eq!(w.ring_slot(21), 5);
        assert_eq!(Dim::sym("S").ring_slot(21), 21);
    }

    #[test]
    fn symbolic_numel_compares_reshapes() {
        let b = Dim::sym("B");
        let x = s(&[b.clone(), 1.into(), 4.into(), 16.into()]);
        let y = s(&[b.clone(), 1.into(), 64.into()]);
        let z = s(&[b, 65.into()]);
        assert_eq!(x.symbolic_numel(), y.symbolic_numel());
        assert_ne!(x.symbolic_numel(), z.symbolic_numel());
    }
}

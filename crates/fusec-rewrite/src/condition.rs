//! Rule conditions: named predicates over a match, registered in Rust and called from
//! rule files as `if (name ?var $attr literal ...)`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use egg::Id;
use fusec_ir::op::{Attr, TypeError};
use fusec_ir::{DType, Dim, Shape, TensorType, Type};

use crate::analysis::FGraph;

/// An argument of a condition, resolved against a match.
#[derive(Clone, Debug, PartialEq)]
pub enum CondArg {
    /// A `?var`: an e-class.
    Class(Id),
    /// A `$var` or a literal.
    Attr(Attr),
}

/// Read access to the e-graph for conditions.
#[derive(Clone, Copy)]
pub struct CondCtx<'a> {
    pub egraph: &'a FGraph,
}

impl fmt::Debug for CondCtx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CondCtx")
    }
}

impl CondCtx<'_> {
    /// The type of an e-class.
    pub fn ty(&self, id: Id) -> Option<&Type> {
        self.egraph[id].data.ty.as_ref()
    }

    /// The tensor type of an e-class.
    pub fn tensor(&self, id: Id) -> Result<&TensorType, CondError> {
        self.ty(id)
            .and_then(Type::tensor)
            .ok_or(CondError::NotATensor)
    }

    pub fn is_state(&self, id: Id) -> bool {
        self.egraph[id].data.state
    }

    pub fn scalar(&self, id: Id) -> Option<f64> {
        self.egraph[id].data.scalar
    }
}

/// Why a condition does not hold; its text is the near miss's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CondError {
    /// Argument `index` (1-based) is not of the kind the condition takes.
    #[error("argument {index} must be {expected}")]
    Argument {
        index: usize,
        expected: &'static str,
    },
    #[error("operand is not a tensor")]
    NotATensor,
    #[error("untyped operand")]
    Untyped,
    /// A value the condition builds does not type-check.
    #[error(transparent)]
    Type(#[from] TypeError),
    /// The condition's own reason, in words.
    #[error("{0}")]
    Unmet(String),
}

impl From<String> for CondError {
    fn from(reason: String) -> Self {
        CondError::Unmet(reason)
    }
}

impl From<&str> for CondError {
    fn from(reason: &str) -> Self {
        CondError::Unmet(reason.to_string())
    }
}

/// A condition: `Ok(())` when it holds, else why not (reported as a near miss).
pub type CondFn = Arc<dyn Fn(&CondCtx<'_>, &[CondArg]) -> Result<(), CondError> + Send + Sync>;

fn argument(i: usize, expected: &'static str) -> CondError {
    CondError::Argument {
        index: i + 1,
        expected,
    }
}

fn class(args: &[CondArg], i: usize) -> Result<Id, CondError> {
    match args.get(i) {
        Some(CondArg::Class(id)) => Ok(*id),
        _ => Err(argument(i, "a ?variable")),
    }
}

fn int(args: &[CondArg], i: usize) -> Result<i64, CondError> {
    match args.get(i) {
        Some(CondArg::Attr(Attr::Int(v))) => Ok(*v),
        _ => Err(argument(i, "an integer")),
    }
}

fn shape(args: &[CondArg], i: usize) -> Result<&Shape, CondError> {
    match args.get(i) {
        Some(CondArg::Attr(Attr::Shape(s))) => Ok(s),
        _ => Err(argument(i, "a shape")),
    }
}

fn dtype(args: &[CondArg], i: usize) -> Result<DType, CondError> {
    match args.get(i) {
        Some(CondArg::Attr(Attr::DType(d))) => Ok(*d),
        _ => Err(argument(i, "a dtype")),
    }
}

/// The kind of one argument of a condition, checked when a rule is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// A `?variable`.
    Class,
    /// An integer: a literal or a `$variable`.
    Int,
    /// A shape: a literal or a `$variable`.
    Shape,
    /// A dtype: a literal or a `$variable`.
    DType,
}

impl ArgKind {
    pub fn describe(self) -> &'static str {
        match self {
            ArgKind::Class => "a ?variable",
            ArgKind::Int => "an integer",
            ArgKind::Shape => "a shape",
            ArgKind::DType => "a dtype",
        }
    }

    /// Whether a literal is of this kind.
    pub fn accepts(self, lit: &Attr) -> bool {
        matches!(
            (self, lit),
            (ArgKind::Int, Attr::Int(_))
                | (ArgKind::Shape, Attr::Shape(_))
                | (ArgKind::DType, Attr::DType(_))
        )
    }
}

/// The argument kinds of each built-in condition (see [`builtin_conditions`]).
pub fn builtin_signatures() -> BTreeMap<String, Vec<ArgKind>> {
    use ArgKind::{Class, DType as D, Int, Shape as Sh};
    [
        ("is-state", vec![Class]),
        ("grows", vec![Class]),
        ("is-scalar", vec![Class]),
        ("has-dtype", vec![Class, D]),
        ("same-type", vec![Class, Class]),
        ("norm-weight", vec![Class, Class]),
        ("gemv-out", vec![Class, Class, Class]),
        ("rotate-half", vec![Int, Int, Class]),
        ("repeat-kv", vec![Sh, Sh, Class]),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_string(), k))
    .collect()
}

/// The built-in conditions:
///
/// - `(is-state ?x)`: `?x` is KV-cache state read at the start of the step;
/// - `(grows ?x)`: `?x`'s sequence axis (-2) grows with each append, not a sliding
///   window's ring (`fusec_ir::Dim::Window`), after which `cat` and `kv.append` differ;
/// - `(is-scalar ?x)`: `?x` is a scalar (`f32[]`);
/// - `(has-dtype ?x $t)`: `?x` has dtype `$t`;
/// - `(rotate-half $h $d ?x)`: `2 * $h == $d ==` the last dimension of `?x`;
/// - `(same-type ?a ?b)`: `?a` and `?b` have the same type;
/// - `(norm-weight ?w ?x)`: `?w` is a vector as long as `?x`'s last dimension;
/// - `(gemv-out ?x ?W ?r)`: `linear(?x, ?W)` has exactly `?r`'s type;
/// - `(repeat-kv $e $s ?k)`: `$e` expands `?k` unsqueezed at axis 2 along that axis
///   only, and `$s` merges that axis into the heads: PyTorch's `repeat_kv`.
pub fn builtin_conditions() -> BTreeMap<String, CondFn> {
    let mut m: BTreeMap<String, CondFn> = BTreeMap::new();
    m.insert(
        "is-state".into(),
        Arc::new(|ctx, args| {
            if ctx.is_state(class(args, 0)?) {
                Ok(())
            } else {
                Err("the operand is not KV-cache state".into())
            }
        }),
    );
    m.insert(
        "grows".into(),
        Arc::new(|ctx, args| {
            let t = ctx.tensor(class(args, 0)?)?;
            let ring = t
                .shape
                .dims()
                .len()
                .checked_sub(2)
                .and_then(|axis| t.shape.dims()[axis].window());
            match ring {
                None => Ok(()),
                Some(w) => Err(format!(
                    "the operand is a ring of {w} positions: appending to it is not a cat"
                )
                .into()),
            }
        }),
    );
    m.insert(
        "is-scalar".into(),
        Arc::new(|ctx, args| {
            if ctx.tensor(class(args, 0)?)?.rank() == 0 {
                Ok(())
            } else {
                Err("the operand is not a scalar".into())
            }
        }),
    );
    m.insert(
        "has-dtype".into(),
        Arc::new(|ctx, args| {
            let t = ctx.tensor(class(args, 0)?)?;
            let want = dtype(args, 1)?;
            if t.dtype == want {
                Ok(())
            } else {
                Err(format!("the operand is {}, not {want}", t.dtype).into())
            }
        }),
    );
    m.insert(
        "same-type".into(),
        Arc::new(|ctx, args| {
            let (a, b) = (ctx.tensor(class(args, 0)?)?, ctx.tensor(class(args, 1)?)?);
            if a == b {
                Ok(())
            } else {
                Err(format!("{a} and {b} differ").into())
            }
        }),
    );
    m.insert(
        "norm-weight".into(),
        Arc::new(|ctx, args| {
            let (w, x) = (ctx.tensor(class(args, 0)?)?, ctx.tensor(class(args, 1)?)?);
            if w.rank() == 1 && x.shape.last() == Some(w.shape.dim(0)) && w.dtype == x.dtype {
                Ok(())
            } else {
                Err(format!("{w} is not a norm weight for {x}").into())
            }
        }),
    );
    m.insert(
        "gemv-out".into(),
        Arc::new(|ctx, args| {
            let (x, w, r) = (class(args, 0)?, class(args, 1)?, class(args, 2)?);
            let (Some(xt), Some(wt), Some(rt)) = (ctx.ty(x), ctx.ty(w), ctx.ty(r)) else {
                return Err(CondError::Untyped);
            };
            match fusec_ir::Op::Linear.infer(&[xt, wt], None) {
                Ok(t) if &t == rt => Ok(()),
                Ok(t) => Err(format!("the GEMV gives {t}, the residual is {rt}").into()),
                Err(e) => Err(e.into()),
            }
        }),
    );
    m.insert(
        "rotate-half".into(),
        Arc::new(|ctx, args| {
            let (h, d) = (int(args, 0)?, int(args, 1)?);
            let t = ctx.tensor(class(args, 2)?)?;
            let last = t.shape.last().and_then(Dim::as_fixed);
            if 2 * h == d && last == Some(d as u64) {
                Ok(())
            } else {
                Err(format!(
                    "slices at {h} and {d} do not halve the last dimension of {}",
                    t.shape
                )
                .into())
            }
        }),
    );
    m.insert(
        "repeat-kv".into(),
        Arc::new(|ctx, args| {
            let (e, s) = (shape(args, 0)?, shape(args, 1)?);
            let k = &ctx.tensor(class(args, 2)?)?.shape;
            let why = || Err(format!("{e} then {s} is not repeat_kv of {k}").into());
            if k.rank() != 4 || e.rank() != 5 || s.rank() != 4 {
                return why();
            }
            let (kd, ed, sd) = (&k.0, &e.0, &s.0);
            let n = ed[2].as_fixed();
            let heads = kd[1].as_fixed().zip(n).map(|(kv, n)| Dim::Fixed(kv * n));
            if ed[0] == kd[0]
                && ed[1] == kd[1]
                && ed[3] == kd[2]
                && ed[4] == kd[3]
                && sd[0] == kd[0]
                && Some(&sd[1]) == heads.as_ref()
                && sd[2] == kd[2]
                && sd[3] == kd[3]
            {
                Ok(())
            } else {
                why()
            }
        }),
    );
    m
}

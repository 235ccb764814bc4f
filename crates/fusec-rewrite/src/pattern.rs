//! Patterns over op tokens, and the e-matcher.
//!
//! A pattern is an s-expression whose heads are op tokens and whose leaves are
//! variables: `(binary.mul ?w (fused.rms_norm ?x ?g ?eps))`. An attribute value in a
//! left-hand side may be a literal (`axis=-1`), a bound attribute variable (`end=$d`),
//! or `_` (any value). egg's own patterns compare whole ops, so fusec matches with its
//! own small backtracking matcher, which binds both e-class variables (`?x`) and
//! attribute variables (`$d`).

use std::collections::BTreeMap;

use egg::Id;
use fusec_ir::op::{op_from_parts, Attr};
use fusec_ir::text::token::Cursor;
use fusec_ir::Op;

use crate::analysis::FGraph;

/// An attribute in a pattern.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrPat {
    Lit(Attr),
    Var(String),
    Any,
}

/// A pattern node.
#[derive(Clone, Debug, PartialEq)]
pub enum Pat {
    /// `?x`: any e-class, the same one at every occurrence.
    Var(String),
    /// An op with attribute patterns and child patterns.
    Op {
        name: String,
        attrs: Vec<(String, AttrPat)>,
        /// For `weight@name` leaves.
        weight: Option<String>,
        children: Vec<Pat>,
    },
}

/// A pattern syntax error at a byte offset of the pattern text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatError {
    pub offset: usize,
    pub message: String,
}

impl Pat {
    /// Parses one pattern from `src` starting at `*pos`, advancing it.
    pub fn parse_at(src: &str, pos: &mut usize) -> Result<Pat, PatError> {
        Self::parse_nested(src, pos, 0)
    }

    /// [`Pat::parse_at`] at nesting `depth`: deeper than [`MAX_PATTERN_DEPTH`] is an
    /// error, so that a hostile rule cannot overflow the stack.
    fn parse_nested(src: &str, pos: &mut usize, depth: usize) -> Result<Pat, PatError> {
        skip_ws(src, pos);
        let rest = &src[*pos..];
        if depth > MAX_PATTERN_DEPTH {
            return Err(PatError {
                offset: *pos,
                message: format!("the pattern nests deeper than {MAX_PATTERN_DEPTH} levels"),
            });
        }
        if rest.starts_with('(') {
            *pos += 1;
            skip_ws(src, pos);
            let head_at = *pos;
            let (
                Pat::Op {
                    name,
                    attrs,
                    weight,
                    ..
                },
                Some(op),
            ) = parse_atom(src, pos)?
            else {
                return Err(PatError {
                    offset: head_at,
                    message: "the head of a list must be an op, not a variable".into(),
                });
            };
            let mut children = Vec::new();
            loop {
                skip_ws(src, pos);
                match src[*pos..].chars().next() {
                    Some(')') => {
                        *pos += 1;
                        break;
                    }
                    Some(_) => children.push(Pat::parse_nested(src, pos, depth + 1)?),
                    None => {
                        return Err(PatError {
                            offset: *pos,
                            message: "unclosed `(`".into(),
                        })
                    }
                }
            }
            check_arity(&op, children.len(), head_at)?;
            Ok(Pat::Op {
                name,
                attrs,
                weight,
                children,
            })
        } else if rest.is_empty() {
            Err(PatError {
                offset: *pos,
                message: "expected a pattern".into(),
            })
        } else {
            let at = *pos;
            let (pat, op) = parse_atom(src, pos)?;
            if let Some(op) = op {
                check_arity(&op, 0, at)?;
            }
            Ok(pat)
        }
    }

    /// Parses a whole pattern.
    pub fn parse(src: &str) -> Result<Pat, PatError> {
        let mut pos = 0;
        let p = Pat::parse_at(src, &mut pos)?;
        skip_ws(src, &mut pos);
        if pos < src.len() {
            return Err(PatError {
                offset: pos,
                message: format!("unexpected `{}` after the pattern", &src[pos..]),
            });
        }
        Ok(p)
    }

    /// Variables (`?x`) in first-occurrence order.
    pub fn vars(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.walk(&mut |p| {
            if let Pat::Var(v) = p {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
        });
        out
    }

    /// Attribute variables (`$d`) in first-occurrence order.
    pub fn attr_vars(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.walk(&mut |p| {
            if let Pat::Op { attrs, .. } = p {
                for (_, a) in attrs {
                    if let AttrPat::Var(v) = a {
                        if !out.contains(v) {
                            out.push(v.clone());
                        }
                    }
                }
            }
        });
        out
    }

    /// The op names used, for validation.
    pub fn walk(&self, f: &mut impl FnMut(&Pat)) {
        f(self);
        if let Pat::Op { children, .. } = self {
            for c in children {
                c.walk(f);
            }
        }
    }

    /// Number of op nodes (the eager ops a match covers, at most).
    pub fn op_count(&self) -> usize {
        let mut n = 0;
        self.walk(&mut |p| {
            if matches!(p, Pat::Op { .. }) {
                n += 1;
            }
        });
        n
    }

    /// The root op's name, if the pattern is not a bare variable.
    pub fn root_name(&self) -> Option<&str> {
        match self {
            Pat::Op { name, .. } => Some(name),
            Pat::Var(_) => None,
        }
    }
}

fn skip_ws(src: &str, pos: &mut usize) {
    while let Some(c) = src[*pos..].chars().next() {
        if c.is_whitespace() {
            *pos += c.len_utf8();
        } else {
            break;
        }
    }
}

/// How deep patterns may nest: the deepest built-in rule nests 8 levels.
pub const MAX_PATTERN_DEPTH: usize = 64;

/// An op applied to `n` operands in a pattern must take `n` (the op table's arity).
fn check_arity(op: &Op, n: usize, at: usize) -> Result<(), PatError> {
    let arity = op.arity();
    if arity.accepts(n) {
        Ok(())
    } else {
        Err(PatError {
            offset: at,
            message: format!(
                "`{}` takes {arity} operand{}, the pattern gives it {n}",
                op.name(),
                if arity == fusec_ir::op::Arity::Exactly(1) {
                    ""
                } else {
                    "s"
                }
            ),
        })
    }
}

/// `?x`, or an op token whose attribute values may be `$var` or `_`, with the op it
/// names (built with placeholder attributes where the pattern has variables).
fn parse_atom(src: &str, pos: &mut usize) -> Result<(Pat, Option<Op>), PatError> {
    let start = *pos;
    let rest = &src[start..];
    if let Some(var) = rest.strip_prefix('?') {
        let len = var
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(var.len());
        if len == 0 {
            return Err(PatError {
                offset: start,
                message: "a variable needs a name after `?`".into(),
            });
        }
        *pos += 1 + len;
        return Ok((Pat::Var(var[..len].to_string()), None));
    }
    let mut c = Cursor::new(src);
    c.pos = start;
    let err = |e: fusec_ir::text::token::LexError| PatError {
        offset: e.offset,
        message: e.message,
    };
    let name = c.ident().map_err(err)?.to_string();
    let mut attrs = Vec::new();
    if c.eat("{") {
        loop {
            let key = c.ident().map_err(err)?.to_string();
            c.expect("=").map_err(err)?;
            let value = if c.eat("_") {
                AttrPat::Any
            } else if c.eat("$") {
                AttrPat::Var(c.ident().map_err(err)?.to_string())
            } else {
                let at = c.pos;
                let lit = c.attr_value().map_err(err)?;
                check_literal(&lit, at)?;
                AttrPat::Lit(lit)
            };
            attrs.push((key, value));
            if c.eat("}") {
                break;
            }
            c.expect(",").map_err(err)?;
        }
    }
    let weight = if c.eat("@") {
        Some(c.weight_name().map_err(err)?.to_string())
    } else {
        None
    };
    *pos = c.pos;
    // Validate the op name and attribute keys by building the op with placeholder
    // values of the right kind wherever the pattern has a variable or `_`.
    let mut probe = BTreeMap::new();
    for (k, v) in &attrs {
        let lit = match v {
            AttrPat::Lit(a) => a.clone(),
            AttrPat::Var(_) | AttrPat::Any => placeholder(k),
        };
        probe.insert(k.clone(), lit);
    }
    let op = op_from_parts(&name, probe, weight.clone()).map_err(|e| PatError {
        offset: start,
        message: e.to_string(),
    })?;
    Ok((
        Pat::Op {
            name,
            attrs,
            weight,
            children: Vec::new(),
        },
        Some(op),
    ))
}

/// A literal in a rule must be a value a graph can hold: no infinity or NaN (`1e999`
/// parses as infinity), which no rewrite of finite arithmetic may introduce.
pub fn check_literal(lit: &Attr, at: usize) -> Result<(), PatError> {
    match lit {
        Attr::Float(v) if !v.is_finite() => Err(PatError {
            offset: at,
            message: format!("the literal {v} is not a finite number"),
        }),
        _ => Ok(()),
    }
}

/// A value of the right kind for attribute `key` of op `name`, to validate patterns.
fn placeholder(key: &str) -> Attr {
    match key {
        "keepdim" => Attr::Bool(true),
        "shape" => Attr::Shape(fusec_ir::Shape::fixed(&[1])),
        "to" => Attr::DType(fusec_ir::DType::F32),
        "name" => Attr::Str(String::new()),
        "value" | "theta" => Attr::Float(1.0),
        _ => Attr::Int(0),
    }
}

/// One way a pattern matched.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Match {
    pub vars: BTreeMap<String, Id>,
    pub attrs: BTreeMap<String, Attr>,
    /// The e-class and op of every op node of the pattern, in pattern order.
    pub nodes: Vec<(Id, Op)>,
}

/// All ways `pat` matches e-class `class`, extending `m`; at most `limit`.
pub fn match_class(
    egraph: &FGraph,
    pat: &Pat,
    class: Id,
    m: Match,
    limit: usize,
    out: &mut Vec<Match>,
) {
    if out.len() >= limit {
        return;
    }
    let class = egraph.find(class);
    match pat {
        Pat::Var(v) => match m.vars.get(v) {
            Some(&bound) if egraph.find(bound) != class => {}
            Some(_) => out.push(m),
            None => {
                let mut m = m;
                m.vars.insert(v.clone(), class);
                out.push(m);
            }
        },
        Pat::Op {
            name,
            attrs,
            weight,
            children,
        } => {
            for node in egraph[class].nodes.iter() {
                if node.op.name() != name || node.children.len() != children.len() {
                    continue;
                }
                if let (Some(w), Op::Weight { name: n }) = (weight, &node.op) {
                    if w != n {
                        continue;
                    }
                }
                let Some(mut m) = bind_attrs(&node.op, attrs, &m) else {
                    continue;
                };
                m.nodes.push((class, node.op.clone()));
                // Match the children left to right, threading every partial match.
                let mut partial = vec![m];
                for (child_pat, &child) in children.iter().zip(&node.children) {
                    let mut next = Vec::new();
                    for pm in partial {
                        match_class(egraph, child_pat, child, pm, limit, &mut next);
                    }
                    partial = next;
                    if partial.is_empty() {
                        break;
                    }
                }
                for pm in partial {
                    if out.len() >= limit {
                        return;
                    }
                    out.push(pm);
                }
            }
        }
    }
}

/// Binds the attribute patterns against `op`'s attributes.
fn bind_attrs(op: &Op, pats: &[(String, AttrPat)], m: &Match) -> Option<Match> {
    let actual = op.attrs();
    let mut m = m.clone();
    for (key, p) in pats {
        let value = actual.iter().find(|(k, _)| k == key).map(|(_, v)| v)?;
        match p {
            AttrPat::Any => {}
            AttrPat::Lit(lit) => {
                if !attr_eq(lit, value) {
                    return None;
                }
            }
            AttrPat::Var(v) => match m.attrs.get(v) {
                Some(bound) if !attr_eq(bound, value) => return None,
                Some(_) => {}
                None => {
                    m.attrs.insert(v.clone(), value.clone());
                }
            },
        }
    }
    Some(m)
}

/// Attribute equality where an integer literal equals the same float.
pub fn attr_eq(a: &Attr, b: &Attr) -> bool {
    match (a, b) {
        (Attr::Int(x), Attr::Float(y)) | (Attr::Float(y), Attr::Int(x)) => (*x as f64) == *y,
        (Attr::Float(x), Attr::Float(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

/// Why a right-hand-side pattern node does not build an op.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstantiateError {
    #[error("attribute variable `${0}` is not bound by the left-hand side")]
    Unbound(String),
    #[error("`_` may only appear on the left-hand side")]
    Wildcard,
    /// The op and attributes do not make an op.
    #[error(transparent)]
    Op(#[from] fusec_ir::op::OpPartsError),
}

/// Builds the op of a right-hand-side pattern node under the attribute bindings.
pub fn instantiate_op(
    name: &str,
    attrs: &[(String, AttrPat)],
    weight: &Option<String>,
    bound: &BTreeMap<String, Attr>,
) -> Result<Op, InstantiateError> {
    let mut values = BTreeMap::new();
    for (k, p) in attrs {
        let v = match p {
            AttrPat::Lit(a) => a.clone(),
            AttrPat::Var(v) => bound
                .get(v)
                .cloned()
                .ok_or_else(|| InstantiateError::Unbound(v.clone()))?,
            AttrPat::Any => return Err(InstantiateError::Wildcard),
        };
        values.insert(k.clone(), v);
    }
    op_from_parts(name, values, weight.clone()).map_err(InstantiateError::Op)
}

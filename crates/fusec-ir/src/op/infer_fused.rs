//! Type rules of the fused ops ([`FusedOp`]).

use super::def::{FusedOp, Op};
use crate::dtype::DType;
use crate::shape::{Dim, Shape};
use crate::types::{TensorType, Type};

type R<T> = Result<T, String>;

fn scalar(t: &TensorType, what: &str) -> R<()> {
    if t.rank() == 0 {
        Ok(())
    } else {
        Err(format!("{what} must be a scalar, got {t}"))
    }
}

fn same_dtype(a: &TensorType, b: &TensorType) -> R<()> {
    if a.dtype == b.dtype {
        Ok(())
    } else {
        Err(format!("dtype mismatch: {} vs {}", a.dtype, b.dtype))
    }
}

/// The type of `linear(x, w)`, by the primitive op's own rule.
fn linear(x: &TensorType, w: &TensorType) -> R<TensorType> {
    match Op::Linear.infer(&[&Type::Tensor(x.clone()), &Type::Tensor(w.clone())], None) {
        Ok(Type::Tensor(t)) => Ok(t),
        Ok(Type::Tuple(_)) => Err("linear gave a tuple".into()),
        Err(e) => Err(e.message),
    }
}

/// Checks the RMSNorm operands `(x, w, eps)`.
fn norm(x: &TensorType, w: &TensorType, eps: &TensorType) -> R<()> {
    scalar(eps, "eps")?;
    same_dtype(x, w)?;
    if w.rank() != 1 || x.shape.last() != Some(w.shape.dim(0)) {
        return Err(format!(
            "norm weight {} does not match the last dimension of {}",
            w.shape, x.shape
        ));
    }
    Ok(())
}

/// Checks that `a` broadcasts to `x`'s shape without growing it.
fn broadcasts_to(a: &TensorType, x: &TensorType, what: &str) -> R<()> {
    same_dtype(x, a)?;
    match Shape::broadcast(&x.shape, &a.shape) {
        Some(s) if s == x.shape => Ok(()),
        _ => Err(format!(
            "{what} {} does not broadcast to {}",
            a.shape, x.shape
        )),
    }
}

/// `[B, heads, T, hd]`: returns (heads, T, hd).
fn heads(t: &TensorType, what: &str) -> R<(Dim, Dim, Dim)> {
    if t.rank() != 4 {
        return Err(format!(
            "{what} must be [batch, heads, len, head_dim], got {}",
            t.shape
        ));
    }
    Ok((
        t.shape.dim(1).clone(),
        t.shape.dim(2).clone(),
        t.shape.dim(3).clone(),
    ))
}

/// Query heads must be a whole multiple of KV heads.
fn gqa(q: &TensorType, k: &TensorType) -> R<()> {
    let (hq, _, dq) = heads(q, "q")?;
    let (hk, _, dk) = heads(k, "k")?;
    if dq != dk || q.shape.dim(0) != k.shape.dim(0) {
        return Err(format!(
            "q {} and k {} differ in batch or head_dim",
            q.shape, k.shape
        ));
    }
    match (hq.as_fixed(), hk.as_fixed()) {
        (Some(h), Some(kv)) if kv > 0 && h % kv == 0 => Ok(()),
        _ => Err(format!(
            "query heads {hq} are not a multiple of KV heads {hk}"
        )),
    }
}

/// The cache after appending `new` to `past` along axis -2.
fn appended(past: &TensorType, new: &TensorType) -> R<TensorType> {
    let cat = match (Op::Cat { axis: -2 }).infer(
        &[&Type::Tensor(past.clone()), &Type::Tensor(new.clone())],
        None,
    ) {
        Ok(Type::Tensor(t)) => t,
        Ok(Type::Tuple(_)) => return Err("cat gave a tuple".into()),
        Err(e) => return Err(e.message),
    };
    // A sliding-window layer's cache is a ring of `W` positions: each new entry
    // overwrites the oldest once it is full, so `T` entries (one per token of a
    // step) take its length from `min(S, W)` to `min(S+T, W)`, not to `min(S, W) + T`
    // as a `cat` would.
    let axis = past.rank() - 2;
    match (past.shape.0[axis].window(), new.shape.0[axis].as_fixed()) {
        (None, _) => Ok(cat),
        (Some(_), Some(n)) => {
            let mut shape = cat.shape;
            shape.0[axis] = past.shape.0[axis].appended_by(n);
            Ok(TensorType::new(cat.dtype, shape))
        }
        (Some(w), None) => Err(format!(
            "a cache windowed to {w} positions takes a fixed number of entries per step, not {}",
            new.shape.0[axis]
        )),
    }
}

/// The result type of a fused op; `t` has already been checked for arity.
pub(crate) fn infer(op: FusedOp, t: &[&TensorType]) -> R<Type> {
    match op {
        FusedOp::KvAppend => appended(t[0], t[1]).map(Type::Tensor),
        FusedOp::Rope => {
            let x = t[0];
            let even = x
                .shape
                .last()
                .and_then(Dim::as_fixed)
                .is_some_and(|d| d.is_multiple_of(2));
            if !even {
                return Err(format!(
                    "rotary input {} needs an even, fixed last dimension",
                    x.shape
                ));
            }
            broadcasts_to(t[1], x, "cos")?;
            broadcasts_to(t[2], x, "sin")?;
            Ok(Type::Tensor(x.clone()))
        }
        FusedOp::RmsNorm => {
            norm(t[0], t[1], t[2])?;
            Ok(Type::Tensor(t[0].clone()))
        }
        FusedOp::PostRmsNorm => {
            norm(t[0], t[1], t[2])?;
            match t.get(3..) {
                Some([]) => {}
                Some([r]) if *r == t[0] => {}
                Some([r]) => {
                    return Err(format!("residual {r} does not match the input {}", t[0]));
                }
                _ => return Err(format!("expected 3 or 4 operands, got {}", t.len())),
            }
            Ok(Type::Tensor(t[0].clone()))
        }
        FusedOp::OffsetRmsNorm => {
            norm(t[0], t[1], t[2])?;
            scalar(t[3], "offset")?;
            match t.get(4..) {
                Some([]) => {}
                Some([r]) if *r == t[0] => {}
                Some([r]) => {
                    return Err(format!("residual {r} does not match the input {}", t[0]));
                }
                _ => return Err(format!("expected 4 or 5 operands, got {}", t.len())),
            }
            Ok(Type::Tensor(t[0].clone()))
        }
        FusedOp::RmsNormLinear | FusedOp::OffsetRmsNormLinear => {
            norm(t[0], t[1], t[2])?;
            let first = if op == FusedOp::OffsetRmsNormLinear {
                scalar(t[3], "offset")?;
                4
            } else {
                3
            };
            if t.len() <= first {
                return Err("expected at least one GEMV weight".into());
            }
            let outs = t[first..]
                .iter()
                .map(|w| linear(t[0], w))
                .collect::<R<Vec<_>>>()?;
            Ok(if outs.len() == 1 {
                Type::Tensor(outs.into_iter().next().expect("one output"))
            } else {
                Type::Tuple(outs)
            })
        }
        FusedOp::MultiLinear => {
            let outs = t[1..]
                .iter()
                .map(|w| linear(t[0], w))
                .collect::<R<Vec<_>>>()?;
            Ok(Type::Tuple(outs))
        }
        FusedOp::Swiglu | FusedOp::Geglu | FusedOp::RmsNormSwiglu | FusedOp::OffsetRmsNormGeglu => {
            let (x, wg, wu) = match op {
                FusedOp::RmsNormSwiglu => {
                    norm(t[0], t[1], t[2])?;
                    (t[0], t[3], t[4])
                }
                FusedOp::OffsetRmsNormGeglu => {
                    norm(t[0], t[1], t[2])?;
                    scalar(t[3], "offset")?;
                    (t[0], t[4], t[5])
                }
                _ => (t[0], t[1], t[2]),
            };
            if wg.shape != wu.shape {
                return Err(format!(
                    "gate {} and up {} weights differ",
                    wg.shape, wu.shape
                ));
            }
            linear(x, wg).map(Type::Tensor)
        }
        FusedOp::LinearAdd | FusedOp::LinearScaleAdd => {
            let y = linear(t[0], t[1])?;
            let r = if op == FusedOp::LinearAdd {
                t[2]
            } else {
                scalar(t[2], "scale")?;
                t[3]
            };
            if &y != r {
                return Err(format!("residual {r} does not match the GEMV result {y}"));
            }
            Ok(Type::Tensor(y))
        }
        FusedOp::LinearPostRmsNorm | FusedOp::LinearOffsetRmsNorm => {
            let y = linear(t[0], t[1])?;
            norm(&y, t[2], t[3])?;
            let r = if op == FusedOp::LinearOffsetRmsNorm {
                scalar(t[4], "offset")?;
                t[5]
            } else {
                t[4]
            };
            if &y != r {
                return Err(format!("residual {r} does not match the GEMV result {y}"));
            }
            Ok(Type::Tensor(y))
        }
        FusedOp::Attention => {
            let (q, k, v, scale, mask) = (t[0], t[1], t[2], t[3], t[4]);
            gqa(q, k)?;
            if k != v {
                return Err(format!("k {k} and v {v} differ"));
            }
            same_dtype(q, k)?;
            scalar(scale, "scale")?;
            match t.get(5..) {
                Some([]) => {}
                Some([cap]) => scalar(cap, "softcap")?,
                _ => return Err(format!("expected 5 or 6 operands, got {}", t.len())),
            }
            let (_, tq, _) = heads(q, "q")?;
            let (_, len, _) = heads(k, "k")?;
            let scores = TensorType::new(
                q.dtype,
                Shape(vec![
                    q.shape.dim(0).clone(),
                    q.shape.dim(1).clone(),
                    tq,
                    len,
                ]),
            );
            broadcasts_to(mask, &scores, "mask")?;
            Ok(Type::Tensor(q.clone()))
        }
        FusedOp::DecodeAttention | FusedOp::DecodeAttentionCapped => {
            let (q, k, v, cos, sin, pk, pv, scale, mask) =
                (t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8]);
            infer(FusedOp::Rope, &[q, cos, sin])?;
            infer(FusedOp::Rope, &[k, cos, sin])?;
            // The soft-capped variant has its cap after the mask.
            let base = if op == FusedOp::DecodeAttentionCapped {
                scalar(t[9], "softcap")?;
                10
            } else {
                9
            };
            // A cache in FP8 carries a per-tensor scale for keys and one for values:
            // entries are stored as `x / scale` and read back as `q * scale`.
            let cache = pk.dtype;
            match (cache.is_fp8(), t.len() - base) {
                (false, 0) => {}
                (true, 2) => {
                    scalar(t[base], "key cache scale")?;
                    scalar(t[base + 1], "value cache scale")?;
                }
                (false, _) => {
                    return Err(format!(
                        "takes {base} operands with a {cache} cache, got {}",
                        t.len()
                    ))
                }
                (true, _) => {
                    return Err(format!(
                    "takes {} operands (the two cache scales last) with a {cache} cache, got {}",
                    base + 2,
                    t.len()
                ))
                }
            }
            if pv.dtype != cache {
                return Err(format!(
                    "key cache {} and value cache {} differ",
                    pk.dtype, pv.dtype
                ));
            }
            let as_compute = |c: &TensorType| TensorType::new(q.dtype, c.shape.clone());
            let k_all = appended(&as_compute(pk), k)?;
            let v_all = appended(&as_compute(pv), v)?;
            infer(FusedOp::Attention, &[q, &k_all, &v_all, scale, mask])?;
            let stored = |t: TensorType| TensorType::new(cache, t.shape);
            Ok(Type::Tuple(vec![q.clone(), stored(k_all), stored(v_all)]))
        }
        FusedOp::PagedDecodeAttention => {
            let (q, k, cos, sin) = (t[0], t[1], t[3], t[4]);
            infer(FusedOp::Rope, &[q, cos, sin])?;
            infer(FusedOp::Rope, &[k, cos, sin])?;
            let mut rest = vec![q, k, t[2]];
            rest.extend_from_slice(&t[5..]);
            infer(FusedOp::PagedAttention, &rest)
        }
        FusedOp::PagedAttention => {
            let (q, k, v, pk, pv, table, positions, scale) =
                (t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
            match t.get(8..) {
                Some([]) => {}
                Some([w]) => scalar(w, "window")?,
                _ => return Err(format!("expected 8 or 9 operands, got {}", t.len())),
            }
            scalar(scale, "scale")?;
            // One new position per sequence, k and v alike.
            gqa(q, k)?;
            if k != v {
                return Err(format!("k {k} and v {v} differ"));
            }
            let (_, tq, _) = heads(q, "q")?;
            let (kv, tk, hd) = heads(k, "k")?;
            if tq != Dim::Fixed(1) || tk != Dim::Fixed(1) {
                return Err(format!(
                    "paged attention decodes one position per sequence, got q {} and k {}",
                    q.shape, k.shape
                ));
            }
            same_dtype(q, k)?;
            // The pools: `[blocks, KV, block_size, head_dim]`, in the compute dtype.
            let (pkv, bs, phd) = heads(pk, "key pool")?;
            if pk != pv {
                return Err(format!("key pool {pk} and value pool {pv} differ"));
            }
            if pkv != kv || phd != hd || pk.dtype != q.dtype || bs.as_fixed().is_none() {
                return Err(format!(
                    "pool {pk} must be [blocks, {kv}, fixed block size, {hd}] in {}",
                    q.dtype
                ));
            }
            let batch = q.shape.dim(0);
            for (what, ty, width) in [
                ("block table", table, None),
                ("positions", positions, Some(Dim::Fixed(1))),
            ] {
                let ok = ty.dtype == DType::I32
                    && ty.rank() == 2
                    && ty.shape.dim(0) == batch
                    && width.as_ref().is_none_or(|w| ty.shape.dim(1) == w);
                if !ok {
                    return Err(format!("{what} must be [{batch}, ..] i32, got {ty}"));
                }
            }
            Ok(Type::Tuple(vec![q.clone(), pk.clone(), pv.clone()]))
        }
    }
}

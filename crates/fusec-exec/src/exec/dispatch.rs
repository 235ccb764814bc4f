//! Dispatch: the one place that matches on every op, from a node's operands to its
//! kernel.

use std::borrow::Cow;

use fusec_ir::op::resolve_axis;
use fusec_ir::shape::Bindings;
use fusec_ir::{FusedOp, Op, Type};

use super::check::{describe, matches_type};
use super::executor::{node_error, Planned};
use super::plan::dims;
use super::value::{StepInputs, Value};
use crate::error::Error;
use crate::kernels::attention::{self, Caches, Ring};
use crate::kernels::elementwise::Arg;
use crate::kernels::gemv::{self, GemvWeight, QuantWeight};
use crate::kernels::{elementwise, fused, gather, matmul, movement, reduce, KernelError};
use crate::tensor::{Tensor, TensorError};

/// A node's operands: borrowed from their slots, or moved into the kernel.
pub(super) struct Operands<'a, 'v> {
    pub(super) args: &'a [Option<&'v Value>],
    pub(super) owned: &'a mut [Option<Tensor>],
}

impl Operands<'_, '_> {
    fn len(&self) -> usize {
        self.args.len()
    }

    /// Operand `i` as a tensor of its own: the moved value, or a copy of the handle
    /// (which shares the buffer, so an append to it copies the cache first).
    fn take_tensor(&mut self, node: &Planned, i: usize) -> Result<Tensor, Error> {
        if let Some(t) = self.owned.get_mut(i).and_then(Option::take) {
            return Ok(t);
        }
        Ok(tensor_arg(node, operand(node, self.args, i)?, i)?.into_owned())
    }

    /// Gives a tensor taken with [`Operands::take_tensor`] back, so that the executor
    /// can keep an input's value to the end of the step.
    fn give_back(&mut self, i: usize, t: Tensor) {
        if let Some(slot) = self.owned.get_mut(i) {
            if self.args.get(i).is_some_and(Option::is_none) {
                *slot = Some(t);
            }
        }
    }
}

/// Operand `i` as borrowed from its slot: an error if it is missing or was moved into
/// the kernel.
fn operand<'v>(node: &Planned, args: &[Option<&'v Value>], i: usize) -> Result<&'v Value, Error> {
    match args.get(i) {
        Some(Some(v)) => Ok(v),
        Some(None) => Err(node_error(
            node,
            KernelError::Invalid(format!("operand {i} was moved into the kernel")),
        )),
        None => Err(node_error(
            node,
            KernelError::Invalid(format!("missing operand {i}")),
        )),
    }
}

/// What [`dispatch`] did: the value, whether a kernel ran, and the bytes it read and
/// wrote when the kernel measured them itself (an in-place append).
pub(super) struct Outcome {
    pub(super) value: Value,
    pub(super) launched: bool,
    pub(super) traffic: Option<(u64, u64)>,
}

/// An operand as a tensor: a scalar kernel argument becomes a rank-0 tensor.
fn tensor_arg<'a>(node: &Planned, v: &'a Value, i: usize) -> Result<Cow<'a, Tensor>, Error> {
    match v {
        Value::Tensor(t) => Ok(Cow::Borrowed(t)),
        Value::Scalar(v) => Ok(Cow::Owned(Tensor::scalar(*v))),
        Value::Tuple(_) => Err(node_error(
            node,
            KernelError::Invalid(format!("operand {i} is a tuple")),
        )),
        Value::Quant(_) => Err(node_error(
            node,
            KernelError::Invalid(format!(
                "operand {i} is a quantized weight, which only a GEMV can read"
            )),
        )),
    }
}

fn binary_arg<'a>(node: &Planned, v: &'a Value, i: usize) -> Result<Arg<'a>, Error> {
    match v {
        Value::Tensor(t) => Ok(Arg::Tensor(t)),
        Value::Scalar(v) => Ok(Arg::Scalar(*v)),
        _ => Err(node_error(
            node,
            KernelError::Invalid(format!("operand {i} is not a tensor")),
        )),
    }
}

/// An operand that must be one number: a scalar kernel argument or a one-element
/// tensor (a per-tensor scale weight).
fn scalar_arg(node: &Planned, v: &Value, i: usize) -> Result<f32, Error> {
    match v {
        Value::Scalar(x) => Ok(*x),
        // The one element read in place (the per-tensor scales of an FP8 graph are read
        // on every step). Every float value is exact in `f64`, so the cast is exact.
        Value::Tensor(t) if t.numel() == 1 && t.dtype().is_float() => Ok(t
            .get(&[0; crate::tensor::MAX_RANK][..t.rank()])
            .map_or(f32::NAN, |v| v as f32)),
        _ => Err(node_error(
            node,
            KernelError::Invalid(format!("operand {i} must be a scalar")),
        )),
    }
}

/// A GEMV weight operand: a plain tensor or a quantized weight.
fn gemv_arg<'a>(node: &Planned, v: &'a Value, i: usize) -> Result<GemvWeight<'a>, Error> {
    match v {
        Value::Tensor(t) => Ok(GemvWeight::Dense(t)),
        Value::Quant(q) => Ok(GemvWeight::Quant(q)),
        _ => Err(node_error(
            node,
            KernelError::Invalid(format!("operand {i} is not a GEMV weight")),
        )),
    }
}

/// The ring of a sliding-window cache that result `result` of a node of type `ty`
/// is (a `min(S+1, W)` length along its sequence axis), written at the step with `S`
/// entries before it; `None` for a cache that grows.
fn ring(ty: &Type, result: usize, b: &Bindings) -> Option<Ring> {
    let dims = ty.tensors().get(result)?.shape.dims();
    let window = dims.get(dims.len().checked_sub(2)?)?.window()?;
    Some(Ring {
        window: usize::try_from(window).ok()?,
        written: usize::try_from(b.get(fusec_ir::step::PAST)?).ok()?,
    })
}

/// The bytes an in-place append wrote into the cache `all` (`[.., len, hd]`), which held
/// `past_bytes` before: the growth, or one position of a full ring, whose length does
/// not grow.
fn appended_bytes(all: &Tensor, past_bytes: u64) -> u64 {
    let grown = all.bytes().saturating_sub(past_bytes);
    if grown > 0 {
        return grown;
    }
    let len = all
        .shape()
        .get(all.rank().wrapping_sub(2))
        .copied()
        .unwrap_or(1);
    all.bytes() / (len.max(1) as u64)
}

/// Operand lists up to this long (`cat` operands, the weights of
/// `fused.rms_norm_linear`) are gathered on the stack; longer ones, which no graph of
/// the IR's builders has, go to the heap.
const MAX_INLINE_OPERANDS: usize = 8;

/// Evaluates one node: the single place that matches on every op. Returns the value,
/// whether a kernel ran, and the traffic of kernels that measure their own.
pub(super) fn dispatch(
    node: &Planned,
    ops: &mut Operands<'_, '_>,
    inputs: &mut dyn StepInputs,
    b: &Bindings,
) -> Result<Outcome, Error> {
    let done = |value: Value, launched: bool| Outcome {
        value,
        launched,
        traffic: None,
    };
    let launch = |r: Result<Tensor, KernelError>| -> Result<Outcome, Error> {
        r.map(|t| done(Value::Tensor(t), true))
            .map_err(|e| node_error(node, e))
    };
    let view = |r: Result<Tensor, TensorError>| -> Result<Outcome, Error> {
        r.map(|t| done(Value::Tensor(t), false))
            .map_err(|e| node_error(node, e.into()))
    };
    let kernel = |e: KernelError| node_error(node, e);
    let bound = || {
        node.bound
            .clone()
            .map(|v| done(v, false))
            .ok_or_else(|| Error::InvalidGraph(format!("leaf {} was not bound at load", node.op)))
    };
    // Operands that only borrow; the caches an op appends to are taken from `ops`.
    let args = ops.args;
    let value = |i: usize| operand(node, args, i);
    let t = |i: usize| tensor_arg(node, value(i)?, i);
    let scalar = |i: usize| scalar_arg(node, value(i)?, i);
    let gemv_w = |i: usize| gemv_arg(node, value(i)?, i);
    let axis = |axis: i64, i: usize| -> Result<usize, Error> {
        let rank = value(i)?.tensor().map_or(0, Tensor::rank);
        resolve_axis(axis, rank).map_err(|m| node_error(node, KernelError::Invalid(m.to_string())))
    };
    match &node.op {
        Op::Input { name, .. } => {
            let ty = node
                .ty
                .tensor()
                .ok_or_else(|| Error::InvalidGraph(format!("input `{name}` has a tuple type")))?;
            let index = node.input.ok_or_else(|| {
                Error::InvalidGraph(format!("input `{name}` is not among the graph's inputs"))
            })?;
            let tensor = inputs
                .take_input(index, name)
                .ok_or_else(|| Error::BadInput {
                    name: name.clone(),
                    message: format!("missing (expected {ty})"),
                })?;
            if !matches_type(&tensor, ty, b)? {
                let message = format!(
                    "expected {}{:?}, got {}",
                    ty.dtype,
                    dims(&ty.shape, b)?,
                    describe(&tensor)
                );
                // The caller gets its input back (see `Executor::run_restoring`).
                inputs.restore_input(index, name, tensor);
                return Err(Error::BadInput {
                    name: name.clone(),
                    message,
                });
            }
            Ok(done(Value::Tensor(tensor), false))
        }
        Op::Weight { .. } | Op::RopeInvFreq { .. } | Op::RopeInvFreqLlama3 { .. } => bound(),
        Op::Scalar { value } => Ok(done(Value::Scalar(value.0 as f32), false)),
        Op::Unary(u) => launch(elementwise::unary(*u, &*t(0)?)),
        Op::Binary(op) => launch(elementwise::binary(
            *op,
            binary_arg(node, value(0)?, 0)?,
            binary_arg(node, value(1)?, 1)?,
        )),
        Op::Cast { to } => launch(elementwise::cast(&*t(0)?, *to)),
        Op::Reduce {
            kind,
            axis: a,
            keepdim,
        } => launch(reduce::reduce(*kind, &*t(0)?, axis(*a, 0)?, *keepdim)),
        Op::Argmax { axis: a } => launch(reduce::argmax(&*t(0)?, axis(*a, 0)?)),
        Op::Softmax { axis: a } => launch(reduce::softmax(&*t(0)?, axis(*a, 0)?)),
        Op::MatMul => launch(matmul::matmul(&*t(0)?, &*t(1)?)),
        Op::Linear => match gemv_w(1)? {
            // A plain weight runs the eager kernel itself.
            GemvWeight::Dense(w) if w.f32_buffer().is_some() => launch(matmul::linear(&*t(0)?, w)),
            // A weight in compact storage runs the GEMV core, whose results are the
            // same (see `kernels::gemv`).
            w => launch(gemv::linear(&*t(0)?, w)),
        },
        Op::Embedding => launch(gather::embedding(&*t(0)?, &*t(1)?)),
        Op::Cat { axis: a } => {
            let tensor = |i: usize| match value(i)? {
                Value::Tensor(t) => Ok(t),
                _ => Err(node_error(
                    node,
                    KernelError::Invalid(format!("operand {i} is not a tensor")),
                )),
            };
            let axis = axis(*a, 0)?;
            let n = ops.len();
            if n <= MAX_INLINE_OPERANDS {
                // The operand list on the stack: a `cat` runs on every eager step.
                let mut parts = [tensor(0)?; MAX_INLINE_OPERANDS];
                for (i, p) in parts.iter_mut().enumerate().take(n).skip(1) {
                    *p = tensor(i)?;
                }
                launch(movement::cat(&parts[..n], axis))
            } else {
                let parts = (0..n).map(tensor).collect::<Result<Vec<_>, Error>>()?;
                launch(movement::cat(&parts, axis))
            }
        }
        Op::Copy => launch(movement::copy(&*t(0)?)),
        Op::Reshape { shape } => view(t(0)?.reshape(&dims(shape, b)?)),
        Op::Transpose { a, b: c } => view(t(0)?.transpose(*a, *c)),
        Op::Slice {
            axis: a,
            start,
            end,
        } => {
            let (start, end) = (usize::try_from(*start), usize::try_from(*end));
            match (start, end) {
                (Ok(s), Ok(e)) => view(t(0)?.slice(axis(*a, 0)?, s, e)),
                _ => Err(node_error(
                    node,
                    KernelError::Invalid("slice bounds overflow".into()),
                )),
            }
        }
        Op::Unsqueeze { axis } => view(t(0)?.unsqueeze(*axis)),
        Op::Expand { shape } => view(t(0)?.expand(&dims(shape, b)?)),
        Op::Get { index } => match value(0)? {
            Value::Tuple(ts) => ts
                .get(*index)
                .map(|t| done(Value::Tensor(t.clone()), false))
                .ok_or_else(|| {
                    node_error(
                        node,
                        KernelError::Invalid(format!("no element {index} in the tuple")),
                    )
                }),
            _ => Err(node_error(
                node,
                KernelError::Invalid("operand is not a tuple".into()),
            )),
        },
        Op::Dequant { to, act } => {
            let q = QuantWeight::new(t(0)?.into_owned(), t(1)?.into_owned(), *to, *act)
                .map_err(kernel)?;
            Ok(done(Value::Quant(q), false))
        }
        Op::Fused(f) => match f {
            FusedOp::RmsNorm => launch(fused::rms_norm(&*t(0)?, &*t(1)?, scalar(2)?)),
            FusedOp::RmsNormLinear | FusedOp::OffsetRmsNormLinear => {
                // The weights follow the prologue (x, w, eps[, offset]).
                let first = if *f == FusedOp::OffsetRmsNormLinear {
                    4
                } else {
                    3
                };
                let n = ops.len().saturating_sub(first);
                // The weights on the stack when they fit, as for `cat`.
                let heap;
                let mut inline;
                let ws: &[GemvWeight<'_>] = if n == 0 {
                    &[]
                } else if n <= MAX_INLINE_OPERANDS {
                    inline = [gemv_w(first)?; MAX_INLINE_OPERANDS];
                    for (i, w) in inline.iter_mut().enumerate().take(n).skip(1) {
                        *w = gemv_w(first + i)?;
                    }
                    &inline[..n]
                } else {
                    heap = (first..ops.len())
                        .map(gemv_w)
                        .collect::<Result<Vec<_>, Error>>()?;
                    &heap
                };
                let mut outs = if first == 4 {
                    fused::offset_rms_norm_linear(&*t(0)?, &*t(1)?, scalar(2)?, scalar(3)?, ws)
                } else {
                    fused::rms_norm_linear(&*t(0)?, &*t(1)?, scalar(2)?, ws)
                }
                .map_err(kernel)?;
                let value = if outs.len() == 1 {
                    let single = outs.swap_remove(0);
                    // The emptied list goes back to the pool for the next kernel.
                    crate::recycle::give_tensors(outs);
                    Value::Tensor(single)
                } else {
                    Value::Tuple(outs)
                };
                Ok(done(value, true))
            }
            FusedOp::MultiLinear => {
                let n = ops.len().saturating_sub(1);
                // The weights on the stack when they fit, as for `rms_norm_linear`.
                let heap;
                let mut inline;
                let ws: &[GemvWeight<'_>] = if n == 0 {
                    &[]
                } else if n <= MAX_INLINE_OPERANDS {
                    inline = [gemv_w(1)?; MAX_INLINE_OPERANDS];
                    for (i, w) in inline.iter_mut().enumerate().take(n).skip(1) {
                        *w = gemv_w(1 + i)?;
                    }
                    &inline[..n]
                } else {
                    heap = (1..ops.len())
                        .map(gemv_w)
                        .collect::<Result<Vec<_>, Error>>()?;
                    &heap
                };
                let outs = fused::multi_linear(&*t(0)?, ws).map_err(kernel)?;
                Ok(done(Value::Tuple(outs), true))
            }
            FusedOp::Swiglu => launch(fused::swiglu(&*t(0)?, gemv_w(1)?, gemv_w(2)?)),
            FusedOp::Geglu => launch(fused::geglu(&*t(0)?, gemv_w(1)?, gemv_w(2)?)),
            FusedOp::OffsetRmsNormGeglu => launch(fused::offset_rms_norm_geglu(
                &*t(0)?,
                &*t(1)?,
                scalar(2)?,
                scalar(3)?,
                gemv_w(4)?,
                gemv_w(5)?,
            )),
            FusedOp::RmsNormSwiglu => launch(fused::rms_norm_swiglu(
                &*t(0)?,
                &*t(1)?,
                scalar(2)?,
                gemv_w(3)?,
                gemv_w(4)?,
            )),
            FusedOp::PostRmsNorm => {
                let residual = match ops.len() {
                    3 => None,
                    _ => Some(t(3)?),
                };
                launch(fused::post_rms_norm(
                    &*t(0)?,
                    &*t(1)?,
                    scalar(2)?,
                    residual.as_deref(),
                ))
            }
            FusedOp::OffsetRmsNorm => {
                let residual = match ops.len() {
                    4 => None,
                    _ => Some(t(4)?),
                };
                launch(fused::offset_rms_norm(
                    &*t(0)?,
                    &*t(1)?,
                    scalar(2)?,
                    scalar(3)?,
                    residual.as_deref(),
                ))
            }
            FusedOp::LinearPostRmsNorm => launch(fused::linear_post_rms_norm(
                &*t(0)?,
                gemv_w(1)?,
                &*t(2)?,
                scalar(3)?,
                &*t(4)?,
            )),
            FusedOp::LinearOffsetRmsNorm => launch(fused::linear_offset_rms_norm(
                &*t(0)?,
                gemv_w(1)?,
                &*t(2)?,
                scalar(3)?,
                scalar(4)?,
                &*t(5)?,
            )),
            FusedOp::LinearAdd => launch(fused::linear_add(&*t(0)?, gemv_w(1)?, &*t(2)?)),
            FusedOp::LinearScaleAdd => launch(fused::linear_scale_add(
                &*t(0)?,
                gemv_w(1)?,
                scalar(2)?,
                &*t(3)?,
            )),
            FusedOp::Rope => launch(fused::rope(&*t(0)?, &*t(1)?, &*t(2)?)),
            FusedOp::Attention => {
                let softcap = match ops.len() {
                    5 => None,
                    _ => Some(scalar(5)?),
                };
                launch(attention::attention_capped(
                    &*t(0)?,
                    &*t(1)?,
                    &*t(2)?,
                    scalar(3)?,
                    softcap,
                    &*t(4)?,
                    None,
                ))
            }
            FusedOp::KvAppend => {
                let new = t(1)?;
                let mut past = ops.take_tensor(node, 0)?;
                let result = attention::kv_append(&mut past, &new, ring(&node.ty, 0, b));
                let past_bytes = past.bytes();
                ops.give_back(0, past);
                let (all, copied) = result.map_err(kernel)?;
                // Only the new entries are read and written, plus any copy made to grow.
                let written = appended_bytes(&all, past_bytes) + copied;
                Ok(Outcome {
                    value: Value::Tensor(all),
                    launched: true,
                    traffic: Some((new.read_bytes() + copied, written)),
                })
            }
            FusedOp::PagedAttention | FusedOp::PagedDecodeAttention => {
                // The decode variant has RoPE's tables after v; the operands from the
                // pools on are the same, two places later.
                let (rope, o) = match f {
                    FusedOp::PagedAttention => (false, 0),
                    _ => (true, 2),
                };
                let window = match ops.len() - o {
                    8 => None,
                    _ => {
                        let w = scalar(8 + o)?;
                        // A window is a whole number of positions, at least one.
                        if !(w >= 1.0 && w.fract() == 0.0 && w < 16_777_216.0) {
                            return Err(node_error(
                                node,
                                KernelError::Invalid(format!("window {w} is not a length")),
                            ));
                        }
                        Some(w as usize)
                    }
                };
                let (q, k, v) = (t(0)?, t(1)?, t(2)?);
                let (table, positions) = (t(5 + o)?, t(6 + o)?);
                let scale = scalar(7 + o)?;
                let rotated = match rope {
                    true => {
                        let (cos, sin) = (t(3)?, t(4)?);
                        let q_rot = fused::rope(&q, &cos, &sin).map_err(kernel)?;
                        match fused::rope(&k, &cos, &sin) {
                            Ok(k_rot) => Some((q_rot, k_rot)),
                            Err(e) => {
                                crate::recycle::recycle(q_rot);
                                return Err(kernel(e));
                            }
                        }
                    }
                    false => None,
                };
                let (q_in, k_in) = match &rotated {
                    Some((q_rot, k_rot)) => (q_rot, k_rot),
                    None => (&*q, &*k),
                };
                let mut pool_k = ops.take_tensor(node, 3 + o)?;
                let mut pool_v = ops.take_tensor(node, 4 + o)?;
                let result = attention::paged_attention(
                    q_in,
                    attention::Pages {
                        k: k_in,
                        v: &v,
                        pool_k: &mut pool_k,
                        pool_v: &mut pool_v,
                        table: &table,
                        positions: &positions,
                    },
                    scale,
                    window,
                );
                // The rotated q and k are this kernel's own scratch: back to the pool.
                if let Some((q_rot, k_rot)) = rotated {
                    crate::recycle::recycle(q_rot);
                    crate::recycle::recycle(k_rot);
                }
                // The executor keeps a handle on the inputs to the end of the step (the
                // pools' buffers, now holding the new entries, are shared until then).
                ops.give_back(3 + o, pool_k.clone());
                ops.give_back(4 + o, pool_v.clone());
                let (out, copied, pools_read) = result.map_err(kernel)?;
                // The live blocks are read, the new entries written, plus any copy.
                let mut read = pools_read + copied;
                for x in [&q, &k, &v, &table, &positions] {
                    read += x.read_bytes();
                }
                if rope {
                    read += t(3)?.read_bytes() + t(4)?.read_bytes();
                }
                let written = out.bytes() + k.bytes() + v.bytes() + copied;
                let mut list = crate::recycle::tensors(3);
                list.extend([out, pool_k, pool_v]);
                Ok(Outcome {
                    value: Value::Tuple(list),
                    launched: true,
                    traffic: Some((read, written)),
                })
            }
            FusedOp::DecodeAttention | FusedOp::DecodeAttentionCapped => {
                // The soft-capped variant has its cap after the mask, before any FP8
                // cache scales.
                let (softcap, base) = if *f == FusedOp::DecodeAttentionCapped {
                    (Some(scalar(9)?), 10)
                } else {
                    (None, 9)
                };
                let fp8_scales = match ops.len() - base {
                    0 => None,
                    2 => Some((scalar(base)?, scalar(base + 1)?)),
                    _ => {
                        return Err(node_error(
                            node,
                            KernelError::Invalid(format!(
                                "takes {base} or {} operands, got {}",
                                base + 2,
                                ops.len()
                            )),
                        ))
                    }
                };
                let (q, k, v, cos, sin) = (t(0)?, t(1)?, t(2)?, t(3)?, t(4)?);
                let (scale, mask) = (scalar(7)?, t(8)?);
                let mut past_k = ops.take_tensor(node, 5)?;
                let mut past_v = ops.take_tensor(node, 6)?;
                let (past_k_bytes, past_v_bytes) = (past_k.bytes(), past_v.bytes());
                let past_bytes = past_k_bytes + past_v_bytes;
                let past_read = past_k.read_bytes() + past_v.read_bytes();
                let result = attention::decode_attention_capped(
                    &q,
                    &k,
                    &v,
                    &cos,
                    &sin,
                    Caches {
                        past_k: &mut past_k,
                        past_v: &mut past_v,
                        scales: fp8_scales,
                        ring: ring(&node.ty, 1, b),
                    },
                    (scale, softcap),
                    &mask,
                );
                ops.give_back(5, past_k);
                ops.give_back(6, past_v);
                let (results, copied) = result.map_err(kernel)?;
                let mut list = crate::recycle::tensors(results.len());
                list.extend(results);
                let value = Value::Tuple(list);
                // Attention reads the whole caches; the append writes the new entries
                // only, plus any copy made to grow.
                let read = ops.borrowed_read_bytes() + past_read + copied;
                let written = match &value {
                    Value::Tuple(list) if list.len() == 3 => {
                        list[0].bytes()
                            + appended_bytes(&list[1], past_k_bytes)
                            + appended_bytes(&list[2], past_v_bytes)
                    }
                    _ => value.bytes().saturating_sub(past_bytes),
                } + copied;
                Ok(Outcome {
                    value,
                    launched: true,
                    traffic: Some((read, written)),
                })
            }
        },
    }
}

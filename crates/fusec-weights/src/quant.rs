//! FP8 weights of a lowered graph, made from the weights of the unlowered one.
//!
//! The FP8 lowering (`fusec_rewrite::precision`) names weights that no checkpoint
//! holds, after the weight they come from (the suffixes are
//! [`fusec_ir::step::FP8_SUFFIX`] and [`fusec_ir::step::SCALE_SUFFIX`]):
//!
//! - `W.fp8 : fp8e4m3[o, i]` and `W.scale : f32[o]` (or `f32[]`), the operands of a
//!   `dequant{to=T}` that stands for the weight `W : T[o, i]`. They are made from `W` as
//!   the compute-precision graph holds it (rounded to `T`): per output channel (or per
//!   tensor for an `f32[]` scale) `s = absmax / 448` (`numerics::scale_for`; 1 for an
//!   all-zero row) and `q = e4m3(w / s)`, IEEE division then round to nearest even with
//!   saturation, exactly as a CUDA kernel converting with `__NV_SATFINITE` would.
//! - `past.L.key.scale` and `past.L.value.scale : f32[]`, the static scales of an FP8
//!   KV cache (operands 9 and 10 of `fused.decode_attention`). They depend on the
//!   activations, not on the weights, so a run calibrates them (`fusec_exec::calibrate`)
//!   and [`lower_weights`] takes them as [`KvScales`].
//!
//! [`crate::save::save_weights`] writes such weights as safetensors, which
//! [`crate::Weights::load`] reads back into the same graph bit for bit.

use std::collections::{BTreeMap, HashMap};

use fusec_ir::step::FP8_SUFFIX;
use fusec_ir::{numerics, DType, Graph, InputKind, NodeId, Op, OperandRole, TensorType};

use crate::error::Error;
use crate::rounding;
use crate::tensor::WeightTensor;
use crate::weights::{fixed_shape, WeightSource, Weights};

/// How a weight of a lowered graph is made when no checkpoint holds it.
#[derive(Clone, Debug, PartialEq)]
pub enum Derived {
    /// The values (`values`) or scales (`scale`) of the quantized weight `base`.
    Gemv {
        base: String,
        values: String,
        scale: String,
        /// The FP8 format of the values.
        format: DType,
        /// The dtype the compute-precision graph holds `base` in.
        to: DType,
        /// `[out, in]`.
        shape: Vec<usize>,
        /// One scale per output channel, else one per tensor.
        per_channel: bool,
    },
    /// The scale of the FP8 KV cache `state`, calibrated by a run.
    KvScale { state: String },
}

/// The weights of `graph` that are derived, by name.
pub fn derived_weights(graph: &Graph) -> Result<HashMap<String, Derived>, Error> {
    let weight_name = |id: NodeId| match graph.op(id) {
        Op::Weight { name } => Some(name.clone()),
        _ => None,
    };
    let mut out = HashMap::new();
    for id in graph.node_ids() {
        let operands = graph.operands(id);
        match graph.op(id) {
            Op::Dequant { to, .. } => {
                let (Some(values), Some(scale)) = (
                    operands.first().copied().and_then(weight_name),
                    operands.get(1).copied().and_then(weight_name),
                ) else {
                    continue;
                };
                let Some(base) = values.strip_suffix(FP8_SUFFIX).map(str::to_string) else {
                    continue;
                };
                let (Some(q), Some(s)) = (
                    graph.ty(operands[0]).tensor(),
                    graph.ty(operands[1]).tensor(),
                ) else {
                    continue;
                };
                let d = Derived::Gemv {
                    base,
                    values: values.clone(),
                    scale: scale.clone(),
                    format: q.dtype,
                    to: *to,
                    shape: fixed_shape(&values, q)?,
                    per_channel: s.rank() == 1,
                };
                out.insert(values, d.clone());
                out.insert(scale, d);
            }
            op => {
                // An op reading FP8 caches takes their scales as trailing operands,
                // in the order of the caches (the op table's `CacheScale` role).
                let role = |i: usize| op.operand_role(i);
                let caches = (0..operands.len())
                    .filter(|&i| matches!(role(i), Some(OperandRole::Cache { .. })));
                let scales =
                    (0..operands.len()).filter(|&i| role(i) == Some(OperandRole::CacheScale));
                for (cache, scale) in caches.zip(scales) {
                    let Op::Input {
                        name,
                        kind: InputKind::State,
                    } = graph.op(operands[cache])
                    else {
                        continue;
                    };
                    if let Some(scale) = weight_name(operands[scale]) {
                        out.insert(
                            scale,
                            Derived::KvScale {
                                state: name.clone(),
                            },
                        );
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Quantizes `w [out, in]` to `format` with per-output-channel (or per-tensor) scales
/// `absmax / max(format)`: returns the values and the scales (see the module
/// documentation).
pub fn quantize(
    w: &WeightTensor,
    format: DType,
    per_channel: bool,
) -> Result<(WeightTensor, WeightTensor), Error> {
    let bad = |message: String| Error::InvalidGraph(format!("quantize: {message}"));
    let [o, i] = w.shape() else {
        return Err(bad(format!("needs a matrix, got {:?}", w.shape())));
    };
    let (o, i) = (*o, *i);
    if !format.is_fp8() {
        return Err(bad(format!("{format} is not an FP8 format")));
    }
    let values = w.to_vec_f32();
    let absmax = |xs: &[f32]| xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scales: Vec<f32> = if per_channel {
        values
            .chunks(i.max(1))
            .take(o)
            .map(|row| numerics::scale_for(absmax(row), format))
            .collect()
    } else {
        vec![numerics::scale_for(absmax(&values), format)]
    };
    let q: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(k, &v)| {
            let s = if per_channel {
                scales[k / i.max(1)]
            } else {
                scales[0]
            };
            if format == DType::Fp8E4M3 {
                // Bit-identical to `round_to`, and several times faster on the ~10^8
                // weights of a real checkpoint.
                rounding::round_e4m3(v / s)
            } else {
                numerics::round_to(format, v / s)
            }
        })
        .collect();
    let scale_shape: &[usize] = if per_channel { &[o] } else { &[] };
    let q = WeightTensor::from_f32(format, &[o, i], q).map_err(|e| bad(e.to_string()))?;
    let s =
        WeightTensor::from_f32(DType::F32, scale_shape, scales).map_err(|e| bad(e.to_string()))?;
    Ok((q, s))
}

/// Static KV-cache scales by weight name (`past.0.key.scale`).
pub type KvScales = BTreeMap<String, f32>;

/// The weights of the lowered `graph` made from `base` (weights of the unlowered graph,
/// or any set holding the bases): a weight `base` holds is taken as it is; a quantized
/// weight is made from its base; a KV-cache scale comes from `kv`.
pub fn lower_weights(base: &Weights, graph: &Graph, kv: &KvScales) -> Result<Weights, Error> {
    let derived = derived_weights(graph)?;
    let mut out = Weights::new(base.origin().clone());
    for (id, name) in graph.weights() {
        let ty = graph
            .ty(id)
            .tensor()
            .ok_or_else(|| Error::InvalidGraph(format!("weight `{name}` has a tuple type")))?;
        if out.get(name).is_some() {
            continue;
        }
        if let Some(t) = base.get(name) {
            let source = base.source(name).cloned().unwrap_or(WeightSource::Memory);
            out.insert(name.to_string(), t.clone(), source);
            continue;
        }
        match derived.get(name) {
            Some(Derived::Gemv {
                base: b,
                values,
                scale,
                format,
                to,
                shape,
                per_channel,
            }) => {
                let Some(w) = base.get(b) else {
                    return Err(Error::Underivable {
                        tensor: name.to_string(),
                        file: base.origin().path(),
                        reason: format!("its base weight `{b}` is not in the weights"),
                    });
                };
                if w.shape() != shape.as_slice() {
                    return Err(Error::WrongShape {
                        tensor: b.clone(),
                        file: base.source(b).unwrap_or(base.origin()).path(),
                        expected: shape.clone(),
                        found: w.shape().to_vec(),
                    });
                }
                // Quantize what the compute-precision graph would hold.
                let w = WeightTensor::from_f32(*to, w.shape(), w.to_vec_f32())
                    .map_err(|e| Error::InvalidGraph(format!("weight `{b}`: {e}")))?;
                let (q, s) = quantize(&w, *format, *per_channel)?;
                let source = base.source(b).cloned().unwrap_or(WeightSource::Memory);
                out.insert(values.clone(), q, source.clone());
                out.insert(scale.clone(), s, source);
            }
            Some(Derived::KvScale { .. }) => match kv.get(name) {
                Some(&s) if s > 0.0 && s.is_finite() => {
                    out.insert(
                        name.to_string(),
                        WeightTensor::scalar(s),
                        WeightSource::Memory,
                    );
                }
                Some(&s) => {
                    return Err(Error::Underivable {
                        tensor: name.to_string(),
                        file: base.origin().path(),
                        reason: format!("its calibrated value {s} is not a positive, finite scale"),
                    })
                }
                None => {
                    return Err(Error::Uncalibrated {
                        tensor: name.to_string(),
                    })
                }
            },
            None => {
                return Err(Error::MissingWeight {
                    tensor: name.to_string(),
                    file: base.origin().path(),
                })
            }
        }
        check_type(&out, name, ty)?;
    }
    Ok(out)
}

/// Checks a derived weight against the graph's type, as binding will.
fn check_type(w: &Weights, name: &str, ty: &TensorType) -> Result<(), Error> {
    let Some(t) = w.get(name) else {
        return Ok(());
    };
    if t.dtype() != ty.dtype || t.shape() != fixed_shape(name, ty)?.as_slice() {
        return Err(Error::InvalidGraph(format!(
            "derived weight `{name}` is {}{:?}, the graph declares {ty}",
            t.dtype(),
            t.shape()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_is_per_channel_and_saturating() {
        let w = WeightTensor::from_f32(DType::F32, &[2, 3], vec![1.0, -448.0, 0.5, 0.0, 0.0, 0.0])
            .expect("sizes match");
        let (q, s) = quantize(&w, DType::Fp8E4M3, true).expect("quantizes");
        assert_eq!(
            s.to_vec_f32(),
            [1.0, 1.0],
            "absmax 448 gives 1; zeros keep 1"
        );
        assert_eq!(q.to_vec_f32(), [1.0, -448.0, 0.5, 0.0, 0.0, 0.0]);
        let w = WeightTensor::from_f32(DType::F32, &[1, 2], vec![0.1, 3.0]).expect("sizes match");
        let (q, s) = quantize(&w, DType::Fp8E4M3, false).expect("quantizes");
        assert_eq!(s.shape(), &[] as &[usize]);
        assert_eq!(s.to_vec_f32(), [3.0 / 448.0]);
        assert_eq!(q.to_vec_f32()[1], 448.0);
        // 0.1 / (3 / 448) = 14.93..., between the E4M3 values 14 and 15: nearest is 15.
        assert_eq!(q.to_vec_f32()[0], 15.0);
        assert!(quantize(&w, DType::Bf16, true).is_err());
    }
}

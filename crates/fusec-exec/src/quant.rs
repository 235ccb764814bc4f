//! FP8 weights of a lowered graph: quantized GEMV weights made at load, KV-cache
//! scales calibrated by a run, and saving them as safetensors.
//!
//! The FP8 lowering (`fusec_rewrite::precision`) names weights that no checkpoint
//! holds, after the weight they come from:
//!
//! - `W.fp8 : fp8e4m3[o, i]` and `W.scale : f32[o]` (or `f32[]`), the operands of a
//!   `dequant{to=T}` that stands for the weight `W : T[o, i]`. They are made from `W` as
//!   the compute-precision graph holds it (rounded to `T`): per output channel (or per
//!   tensor for an `f32[]` scale) `s = absmax / 448` (`numerics::scale_for`; 1 for an
//!   all-zero row) and `q = e4m3(w / s)`, IEEE division then round to nearest even with
//!   saturation, exactly as a CUDA kernel converting with `__NV_SATFINITE` would.
//! - `past.L.key.scale` and `past.L.value.scale : f32[]`, the static scales of an FP8
//!   KV cache (operands 9 and 10 of `fused.decode_attention`). They depend on the
//!   activations, not on the weights, so they are calibrated by a run
//!   ([`calibrate_kv_scales`]): the prompt goes through the unlowered graph (bf16 for
//!   FP8), and each cache's scale is `KV_SCALE_MARGIN * absmax / 448`, where `absmax` is
//!   the largest magnitude in that cache after the prompt (keys after RoPE, as cached).
//!
//! **Why a margin of 2.** A static scale must also cover the tokens generated after
//! calibration; an entry beyond `448 * scale` saturates. E4M3 is a floating-point
//! format, so a larger scale costs no relative precision for normal values: it only
//! moves the subnormal threshold (`2^-6 * scale`) up by the same factor, which with a
//! margin of 2 is still `absmax / 14336`. Indeed a power-of-two margin changes no
//! stored code except where the smaller scale would saturate (or the larger one makes
//! a value subnormal): `x / (2s)` is exactly half of `x / s`. One binade of headroom is
//! therefore nearly free, and it absorbs the growth of the caches' range measured on
//! the fixture: the absmax over all 21 positions is at most 1.24x the absmax over the
//! 5-token prompt (layer 0's keys), which a margin of 1 would saturate.
//!
//! [`save_weights`] writes every weight of a graph as safetensors, FP8 values as
//! `F8_E4M3` (their exact codes) with the `f32` scales beside them, plus metadata
//! (`fusec.*` keys) that says how they were made. [`crate::Weights::load`] reads that
//! file back into the same graph bit for bit.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use fusec_ir::step;
use fusec_ir::{numerics, DType, FusedOp, Graph, InputKind, NodeId, Op, TensorType};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::decode::Session;
use crate::error::Error;
use crate::exec::Executor;
use crate::tensor::Tensor;
use crate::weights::{fixed_shape, WeightSource, Weights};

/// The suffix of a quantized weight's values (as `fusec_rewrite::precision` names them).
pub const FP8_SUFFIX: &str = ".fp8";
/// The suffix of a scale: of a quantized weight, or of a KV cache.
pub const SCALE_SUFFIX: &str = ".scale";
/// The headroom of a calibrated KV-cache scale over the calibration run's absmax (see
/// the module documentation).
pub const KV_SCALE_MARGIN: f32 = 2.0;

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
            Op::Fused(FusedOp::DecodeAttention) if operands.len() == 11 => {
                for (cache, scale) in [(5, 9), (6, 10)] {
                    let state = match graph.op(operands[cache]) {
                        Op::Input {
                            name,
                            kind: InputKind::State,
                        } => name.clone(),
                        _ => continue,
                    };
                    if let Some(name) = weight_name(operands[scale]) {
                        out.insert(name, Derived::KvScale { state });
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Quantizes `w [out, in]` to `format` with per-output-channel (or per-tensor) scales
/// `absmax / max(format)`: returns the values and the scales (see the module
/// documentation).
pub fn quantize(w: &Tensor, format: DType, per_channel: bool) -> Result<(Tensor, Tensor), Error> {
    let bad = |message: String| Error::InvalidGraph(format!("quantize: {message}"));
    let [o, i] = w.shape() else {
        return Err(bad(format!("needs a matrix, got {:?}", w.shape())));
    };
    let (o, i) = (*o, *i);
    if !format.is_fp8() {
        return Err(bad(format!("{format} is not an FP8 format")));
    }
    let values = w
        .contiguous_f32()
        .ok_or_else(|| bad(format!("needs float values, got {}", w.dtype())))?;
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
                crate::kernels::gemv::round_e4m3(v / s)
            } else {
                numerics::round_to(format, v / s)
            }
        })
        .collect();
    let scale_shape: &[usize] = if per_channel { &[o] } else { &[] };
    let q = Tensor::from_f32(format, &[o, i], q).map_err(|e| bad(e.to_string()))?;
    let s = Tensor::from_f32(DType::F32, scale_shape, scales).map_err(|e| bad(e.to_string()))?;
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
                let w = Tensor::from_f32(*to, w.shape(), w.to_vec_f32())
                    .map_err(|e| Error::InvalidGraph(format!("weight `{b}`: {e}")))?;
                let (q, s) = quantize(&w, *format, *per_channel)?;
                let source = base.source(b).cloned().unwrap_or(WeightSource::Memory);
                out.insert(values.clone(), q, source.clone());
                out.insert(scale.clone(), s, source);
            }
            Some(Derived::KvScale { .. }) => match kv.get(name) {
                Some(&s) if s > 0.0 && s.is_finite() => {
                    out.insert(name.to_string(), Tensor::scalar(s), WeightSource::Memory);
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

/// Calibrates the KV-cache scales of `lowered` by running `prompts` (one per sequence,
/// of one length) through `graph`, the same model unlowered, with `weights` (see the
/// module documentation). Returns each scale by weight name, and each cache's absmax.
pub fn calibrate_kv_scales(
    lowered: &Graph,
    graph: &Graph,
    weights: &Weights,
    prompts: &[Vec<i32>],
) -> Result<(KvScales, BTreeMap<String, f32>), Error> {
    let wanted: Vec<(String, String, DType)> = derived_weights(lowered)?
        .into_iter()
        .filter_map(|(name, d)| match d {
            Derived::KvScale { state } => {
                let format = lowered
                    .inputs()
                    .into_iter()
                    .find(|(_, n, _)| *n == state)
                    .and_then(|(id, _, _)| lowered.ty(id).tensor().map(|t| t.dtype))
                    .unwrap_or(DType::Fp8E4M3);
                Some((name, state, format))
            }
            Derived::Gemv { .. } => None,
        })
        .collect();
    let mut scales = KvScales::new();
    let mut absmaxes = BTreeMap::new();
    if wanted.is_empty() {
        return Ok((scales, absmaxes));
    }
    let len = prompts.first().map_or(0, Vec::len);
    if len == 0 || prompts.iter().any(|p| p.len() != len) {
        return Err(Error::BadInput {
            name: step::INPUT_IDS.into(),
            message: "calibration needs non-empty prompts of one length".into(),
        });
    }
    let exec = Executor::new(graph.clone(), weights)?;
    let mut session = Session::with_capacity(exec, prompts.len(), len)?;
    let mut tokens = Vec::with_capacity(prompts.len());
    for pos in 0..len {
        tokens.clear();
        tokens.extend(prompts.iter().map(|p| p[pos]));
        session.step(&tokens)?;
    }
    for (name, state, format) in wanted {
        let cache = session.state(&state).ok_or_else(|| {
            Error::InvalidGraph(format!(
                "calibration: the unlowered graph has no cache `{state}`"
            ))
        })?;
        let absmax = cache
            .to_vec_f32()
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()));
        scales.insert(name, numerics::scale_for(absmax * KV_SCALE_MARGIN, format));
        absmaxes.insert(state, absmax);
    }
    Ok((scales, absmaxes))
}

/// The safetensors dtype a value of `dtype` is saved as.
fn file_dtype(dtype: DType) -> Option<Dtype> {
    match dtype {
        DType::F32 => Some(Dtype::F32),
        DType::F16 => Some(Dtype::F16),
        DType::Bf16 => Some(Dtype::BF16),
        DType::Fp8E4M3 => Some(Dtype::F8_E4M3),
        DType::Fp8E5M2 => Some(Dtype::F8_E5M2),
        DType::I32 => None,
    }
}

/// The little-endian bytes of `t` as stored in its dtype (FP8 values by their codes).
fn encode(t: &Tensor) -> Vec<u8> {
    let values = t.to_vec_f32();
    match t.dtype() {
        DType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::Bf16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        DType::Fp8E4M3 => values.iter().map(|&v| numerics::e4m3_encode(v)).collect(),
        DType::Fp8E5M2 => values.iter().map(|&v| numerics::e5m2_encode(v)).collect(),
        DType::F32 | DType::I32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Writes every weight of `graph` from `weights` to `dir/model.safetensors`, each in
/// its graph dtype, with `metadata` in the header (plus `fusec.format`). Returns the
/// file's path.
pub fn save_weights(
    dir: &Path,
    graph: &Graph,
    weights: &Weights,
    metadata: &BTreeMap<String, String>,
) -> Result<PathBuf, Error> {
    let path = dir.join("model.safetensors");
    let io = |source| Error::Io {
        file: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        file: dir.to_path_buf(),
        source,
    })?;
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (id, name) in graph.weights() {
        let ty = graph
            .ty(id)
            .tensor()
            .ok_or_else(|| Error::InvalidGraph(format!("weight `{name}` has a tuple type")))?;
        let t = weights.bind(name, ty)?;
        let dtype = file_dtype(t.dtype()).ok_or_else(|| {
            Error::InvalidGraph(format!("weight `{name}` has dtype {}", t.dtype()))
        })?;
        tensors.push((name.to_string(), dtype, t.shape().to_vec(), encode(&t)));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors.dedup_by(|a, b| a.0 == b.0);
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::InvalidGraph(format!("weight `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let mut info: HashMap<String, String> = metadata.clone().into_iter().collect();
    info.insert("format".into(), "pt".into());
    info.insert("fusec.format".into(), "fusec-weights/1".into());
    safetensors::serialize_to_file(views, Some(info), &path)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_is_per_channel_and_saturating() {
        let w = Tensor::from_f32(DType::F32, &[2, 3], vec![1.0, -448.0, 0.5, 0.0, 0.0, 0.0])
            .expect("sizes match");
        let (q, s) = quantize(&w, DType::Fp8E4M3, true).expect("quantizes");
        assert_eq!(
            s.to_vec_f32(),
            [1.0, 1.0],
            "absmax 448 gives 1; zeros keep 1"
        );
        assert_eq!(q.to_vec_f32(), [1.0, -448.0, 0.5, 0.0, 0.0, 0.0]);
        let w = Tensor::from_f32(DType::F32, &[1, 2], vec![0.1, 3.0]).expect("sizes match");
        let (q, s) = quantize(&w, DType::Fp8E4M3, false).expect("quantizes");
        assert_eq!(s.shape(), &[] as &[usize]);
        assert_eq!(s.to_vec_f32(), [3.0 / 448.0]);
        assert_eq!(q.to_vec_f32()[1], 448.0);
        // 0.1 / (3 / 448) = 14.93..., between the E4M3 values 14 and 15: nearest is 15.
        assert_eq!(q.to_vec_f32()[0], 15.0);
        assert!(quantize(&w, DType::Bf16, true).is_err());
    }
}

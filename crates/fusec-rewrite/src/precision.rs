//! Precision lowering to FP8, a pass over the fused graph.
//!
//! It is a pass after extraction, not rules in the e-graph, for three reasons: the
//! choice is global (one precision for the model, with per-class exceptions), not a
//! local cost trade-off; it creates new weight tensors (quantized values and scales)
//! computed from the checkpoint, which are not values of the graph; and it does not
//! change what gets fused, so it composes with any rule set.
//!
//! What it does (the f16 and bf16 precisions need no pass: the eager graph is built in
//! that dtype, as Hugging Face runs it, and fused as usual):
//! - every GEMV weight `W` of a class not kept becomes
//!   `dequant{act=fp8e4m3,to=T}(weight@W.fp8 : fp8e4m3[o,i], weight@W.scale : f32[o])`:
//!   E4M3 values with per-output-channel scales `absmax(row) / 448` (per tensor on
//!   request), computed from the weights when they are loaded; the GEMV quantizes its
//!   activations per block of 32 inputs (`numerics::FP8_ACT_BLOCK`);
//! - the KV caches become E4M3 with one static scale per layer for keys and one for
//!   values (`weight@past.L.key.scale : f32[]`), calibrated on a short run before
//!   decoding, and `fused.decode_attention` takes them as two more operands.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use fusec_ir::op::{Execution, TypeError};
use fusec_ir::{DType, FusedOp, Graph, NodeId, Op, Shape, TensorType, Type, WeightRole};

/// Groups of GEMVs (and the KV cache) that can be kept at the higher precision.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpClass {
    /// The q, k and v projections (with their norm).
    Qkv,
    /// The attention output projection.
    AttnOut,
    /// The gate and up projections (with their norm).
    MlpUp,
    /// The down projection.
    MlpDown,
    /// The output head.
    LmHead,
    /// The KV cache.
    KvCache,
}

impl OpClass {
    pub const ALL: [OpClass; 6] = [
        OpClass::Qkv,
        OpClass::AttnOut,
        OpClass::MlpUp,
        OpClass::MlpDown,
        OpClass::LmHead,
        OpClass::KvCache,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpClass::Qkv => "qkv",
            OpClass::AttnOut => "attn-out",
            OpClass::MlpUp => "mlp-up",
            OpClass::MlpDown => "mlp-down",
            OpClass::LmHead => "lm-head",
            OpClass::KvCache => "kv-cache",
        }
    }
}

impl fmt::Display for OpClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no [`OpClass`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown op class `{0}` (expected one of {names})", names = OpClass::ALL.map(OpClass::name).join(", "))]
pub struct UnknownOpClass(pub String);

impl FromStr for OpClass {
    type Err = UnknownOpClass;

    fn from_str(s: &str) -> Result<Self, UnknownOpClass> {
        OpClass::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| UnknownOpClass(s.to_string()))
    }
}

/// Why FP8 lowering failed: the fused graph broke an invariant the pass relies on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrecisionError {
    #[error(transparent)]
    Type(#[from] TypeError),
    #[error("decode attention reads a cache that is not a state input")]
    CacheNotState,
    #[error("weight `{weight}` {shape} cannot be {format}: its input dimension must be a multiple of 32 (whole blocks of 32)")]
    NotBlocks {
        weight: String,
        shape: String,
        format: IntFormat,
    },
}

/// Scale granularity of quantized weights.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum Granularity {
    #[default]
    PerChannel,
    PerTensor,
}

/// FP8 lowering options.
#[derive(Clone, Debug, Default)]
pub struct Fp8Options {
    pub granularity: Granularity,
    /// Classes left at the graph's precision.
    pub keep: BTreeSet<OpClass>,
}

/// The suffixes of derived weight names (defined with the decode-step interface, which
/// the weights that derive them read too).
pub use fusec_ir::step::{FP8_SUFFIX, Q4_0_SUFFIX, Q4_1_SUFFIX, Q8_0_SUFFIX, SCALE_SUFFIX};

/// The op class of a weight in role `role` when a GEMV multiplies by it; `None` for
/// roles that are never GEMV weights.
pub fn class_of_role(role: WeightRole) -> Option<OpClass> {
    match role {
        WeightRole::Query | WeightRole::Key | WeightRole::Value => Some(OpClass::Qkv),
        WeightRole::AttnOut => Some(OpClass::AttnOut),
        WeightRole::Gate | WeightRole::Up => Some(OpClass::MlpUp),
        WeightRole::Down => Some(OpClass::MlpDown),
        // Tied embeddings: the table multiplied as a GEMV is the output head.
        WeightRole::LmHead | WeightRole::Embedding => Some(OpClass::LmHead),
        WeightRole::Norm | WeightRole::Bias | WeightRole::Scale => None,
    }
}

/// The weight leaf under `id`, through views and a `dequant`.
fn weight_leaf(graph: &Graph, mut id: NodeId) -> Option<&str> {
    loop {
        let op = graph.op(id);
        if let Op::Weight { name } = op {
            return Some(name);
        }
        if !(op.is_view() || op.info().execution == Execution::Folded) {
            return None;
        }
        id = *graph.operands(id).first()?;
    }
}

/// The class of a GEMV-family node: the class of the role its builder recorded for
/// the weights it multiplies by (all of one class, as a fused kernel only shares a
/// prologue between projections of one class). `None` for a node that multiplies by
/// no weight, or whose weights have no recorded role (a graph parsed from text).
pub fn classify(graph: &Graph, id: NodeId) -> Option<OpClass> {
    let op = graph.op(id);
    let operands = graph.operands(id);
    let slot = op.weight_operands(operands.len()).next()?;
    let name = weight_leaf(graph, operands[slot])?;
    class_of_role(graph.weight_role(name)?)
}

fn weight(
    graph: &mut Graph,
    name: String,
    dtype: DType,
    shape: Shape,
) -> Result<NodeId, TypeError> {
    graph.add_leaf(Op::Weight { name }, TensorType::new(dtype, shape))
}

/// What one GEMV weight becomes: the dtype and name suffix of its stored values, the
/// shape of its scales, and the GEMV's activation recipe.
struct Lowered {
    suffix: &'static str,
    values: DType,
    scale: TensorType,
    act: DType,
}

/// Replaces every GEMV weight of a class not in `keep` by a `dequant` of the stored
/// values and scales `lower` says (`None`: the weight stays as it is), once per weight
/// however many GEMVs read it.
fn lower_gemv_weights(
    g: &mut Graph,
    keep: &BTreeSet<OpClass>,
    lower: impl Fn(&str, &TensorType) -> Result<Option<Lowered>, PrecisionError>,
) -> Result<(), PrecisionError> {
    let mut quantized: HashMap<NodeId, NodeId> = HashMap::new();
    let nodes: Vec<NodeId> = g.node_ids().collect();
    for id in nodes {
        let Some(class) = classify(g, id) else {
            continue;
        };
        if keep.contains(&class) {
            continue;
        }
        let operands = g.operands(id);
        let slots: Vec<usize> = g.op(id).weight_operands(operands.len()).collect();
        for slot in slots {
            let w = operands[slot];
            let Op::Weight { name } = g.op(w).clone() else {
                continue;
            };
            let Some(t) = g.ty(w).tensor().cloned() else {
                continue;
            };
            if t.rank() != 2 || !matches!(t.dtype, DType::F32 | DType::F16 | DType::Bf16) {
                continue;
            }
            let deq = match quantized.get(&w) {
                Some(&d) => d,
                None => {
                    let Some(how) = lower(&name, &t)? else {
                        continue;
                    };
                    let q_name = format!("{name}{}", how.suffix);
                    if let Some(role) = g.weight_role(&name) {
                        g.set_weight_role(q_name.clone(), role);
                    }
                    g.set_weight_role(format!("{name}{SCALE_SUFFIX}"), WeightRole::Scale);
                    let q = weight(g, q_name, how.values, t.shape.clone())?;
                    let s = weight(
                        g,
                        format!("{name}{SCALE_SUFFIX}"),
                        how.scale.dtype,
                        how.scale.shape,
                    )?;
                    let d = g.add(
                        Op::Dequant {
                            to: t.dtype,
                            act: how.act,
                        },
                        &[q, s],
                    )?;
                    let layer = g.node(id).layer;
                    for n in [q, s, d] {
                        g.node_mut(n).layer = layer;
                    }
                    quantized.insert(w, d);
                    d
                }
            };
            g.set_operand(id, slot, deq);
        }
    }
    Ok(())
}

/// The integer weight formats, stated once in the IR.
pub use fusec_ir::quant::IntFormat;

/// The `--precision` that lowers to `format`: `int8` and `int4` for Q8_0 and Q4_0 (the
/// names TensorRT-LLM's W8A16/W4A16 users know, kept for compatibility), ggml's own
/// type name for the others (`q4_1`, `q4_k`).
pub fn precision_name(format: IntFormat) -> &'static str {
    match format {
        IntFormat::Q8_0 => "int8",
        IntFormat::Q4_0 => "int4",
        f => f.name(),
    }
}

/// Lowers the GEMV weights of a fused graph to integer codes with their per-block
/// side data (`format`'s scales) (`dequant{act=i8}`: the GEMVs quantize their activations to
/// 8-bit blocks as llama.cpp does). The KV cache stays at the graph's precision.
/// Every quantized weight's input dimension must be a multiple of 32.
pub fn lower_int(
    fused: &Graph,
    format: IntFormat,
    keep: &BTreeSet<OpClass>,
) -> Result<Graph, PrecisionError> {
    lower_int_by(fused, &|_| Some(format), keep, precision_name(format))
}

/// [`lower_int`] with each GEMV weight's format chosen by name (`None`: it stays at
/// the graph's precision), as the `gguf` precision runs a file's tensors each in its
/// own format; the graph's `precision` attribute is `precision`.
pub fn lower_int_by(
    fused: &Graph,
    choose: &dyn Fn(&str) -> Option<IntFormat>,
    keep: &BTreeSet<OpClass>,
    precision: &str,
) -> Result<Graph, PrecisionError> {
    let mut g = fused.clone();
    lower_gemv_weights(&mut g, keep, |name, t| {
        let Some(format) = choose(name) else {
            return Ok(None);
        };
        let ins = t
            .shape
            .dim(1)
            .as_fixed()
            .filter(|&i| format.check_width(i).is_ok());
        let Some(ins) = ins else {
            return Err(PrecisionError::NotBlocks {
                weight: name.to_string(),
                shape: t.shape.to_string(),
                format,
            });
        };
        Ok(Some(Lowered {
            suffix: format.suffix(),
            values: format.codes(),
            scale: format.scales(t.shape.dim(0).clone(), ins),
            act: DType::I8,
        }))
    })?;
    g.reinfer_types()?;
    g.attrs.insert("precision".into(), precision.into());
    Ok(g.reordered())
}

/// Lowers the GEMV weights and the KV cache of a fused graph to FP8 E4M3.
pub fn lower_fp8(fused: &Graph, opts: &Fp8Options) -> Result<Graph, PrecisionError> {
    let mut g = fused.clone();
    lower_gemv_weights(&mut g, &opts.keep, |_, t| {
        let scale_shape = match opts.granularity {
            Granularity::PerChannel => Shape(vec![t.shape.dim(0).clone()]),
            Granularity::PerTensor => Shape::scalar(),
        };
        Ok(Some(Lowered {
            suffix: FP8_SUFFIX,
            values: DType::Fp8E4M3,
            scale: TensorType::new(DType::F32, scale_shape),
            act: DType::Fp8E4M3,
        }))
    })?;
    if !opts.keep.contains(&OpClass::KvCache) {
        let attentions: Vec<NodeId> = g
            .node_ids()
            .filter(|&n| {
                matches!(
                    g.op(n),
                    Op::Fused(FusedOp::DecodeAttention | FusedOp::DecodeAttentionCapped)
                )
            })
            .collect();
        for att in attentions {
            let operands = g.operands(att);
            // Not yet lowered: no cache scales after the mask (and the cap).
            let unscaled = match g.op(att) {
                Op::Fused(FusedOp::DecodeAttentionCapped) => 10,
                _ => 9,
            };
            if operands.len() != unscaled {
                continue;
            }
            let layer = g.node(att).layer;
            for &past in &operands[5..7] {
                let Op::Input { name, .. } = g.op(past).clone() else {
                    return Err(PrecisionError::CacheNotState);
                };
                if let Type::Tensor(t) = &mut g.node_mut(past).ty {
                    t.dtype = DType::Fp8E4M3;
                }
                g.set_weight_role(format!("{name}{SCALE_SUFFIX}"), WeightRole::Scale);
                let s = weight(
                    &mut g,
                    format!("{name}{SCALE_SUFFIX}"),
                    DType::F32,
                    Shape::scalar(),
                )?;
                g.node_mut(s).layer = layer;
                g.push_operand(att, s);
            }
        }
    }
    g.reinfer_types()?;
    g.attrs.insert("precision".into(), "fp8".into());
    Ok(g.reordered())
}

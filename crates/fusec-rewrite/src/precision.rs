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
//!   activations per token;
//! - the KV caches become E4M3 with one static scale per layer for keys and one for
//!   values (`weight@past.L.key.scale : f32[]`), calibrated on a short run before
//!   decoding, and `fused.decode_attention` takes them as two more operands.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use fusec_ir::{DType, FusedOp, Graph, NodeId, Op, Shape, TensorType, Type};

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

impl FromStr for OpClass {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        OpClass::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = OpClass::ALL.iter().map(|c| c.name()).collect();
                format!(
                    "unknown op class `{s}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
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
pub use fusec_ir::step::{FP8_SUFFIX, SCALE_SUFFIX};

/// The value a GEMV reads its activation from, through views and `get`.
fn producer(graph: &Graph, mut id: NodeId) -> NodeId {
    while graph.op(id).is_view() {
        id = graph.operands(id)[0];
    }
    id
}

/// The class of a GEMV-family node.
pub fn classify(graph: &Graph, id: NodeId) -> Option<OpClass> {
    let node = graph.node(id);
    if node.layer.is_none() {
        return matches!(node.op, Op::Linear | Op::Fused(FusedOp::RmsNormLinear))
            .then_some(OpClass::LmHead);
    }
    match node.op {
        Op::Linear | Op::Fused(FusedOp::RmsNormLinear) => Some(OpClass::Qkv),
        Op::Fused(FusedOp::Swiglu | FusedOp::RmsNormSwiglu) => Some(OpClass::MlpUp),
        Op::Fused(FusedOp::LinearAdd) => {
            let x = producer(graph, graph.operands(id)[0]);
            Some(match graph.op(x) {
                Op::Fused(FusedOp::DecodeAttention | FusedOp::Attention) => OpClass::AttnOut,
                _ => OpClass::MlpDown,
            })
        }
        _ => None,
    }
}

fn weight(graph: &mut Graph, name: String, dtype: DType, shape: Shape) -> Result<NodeId, String> {
    graph
        .add_leaf(Op::Weight { name }, TensorType::new(dtype, shape))
        .map_err(|e| e.to_string())
}

/// Lowers the GEMV weights and the KV cache of a fused graph to FP8 E4M3.
pub fn lower_fp8(fused: &Graph, opts: &Fp8Options) -> Result<Graph, String> {
    let mut g = fused.clone();
    let mut quantized: HashMap<NodeId, NodeId> = HashMap::new();
    let nodes: Vec<NodeId> = g.node_ids().collect();
    for id in nodes {
        let Some(class) = classify(&g, id) else {
            continue;
        };
        if opts.keep.contains(&class) {
            continue;
        }
        let operands = g.operands(id);
        for slot in g.op(id).weight_operands(operands.len()) {
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
                    let q = weight(
                        &mut g,
                        format!("{name}{FP8_SUFFIX}"),
                        DType::Fp8E4M3,
                        t.shape.clone(),
                    )?;
                    let scale_shape = match opts.granularity {
                        Granularity::PerChannel => Shape(vec![t.shape.dim(0).clone()]),
                        Granularity::PerTensor => Shape::scalar(),
                    };
                    let s = weight(
                        &mut g,
                        format!("{name}{SCALE_SUFFIX}"),
                        DType::F32,
                        scale_shape,
                    )?;
                    let d = g
                        .add(
                            Op::Dequant {
                                to: t.dtype,
                                act: DType::Fp8E4M3,
                            },
                            &[q, s],
                        )
                        .map_err(|e| e.to_string())?;
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
    if !opts.keep.contains(&OpClass::KvCache) {
        let attentions: Vec<NodeId> = g
            .node_ids()
            .filter(|&n| g.op(n) == &Op::Fused(FusedOp::DecodeAttention))
            .collect();
        for att in attentions {
            let operands = g.operands(att);
            if operands.len() != 9 {
                continue;
            }
            let layer = g.node(att).layer;
            for &past in &operands[5..7] {
                let Op::Input { name, .. } = g.op(past).clone() else {
                    return Err("decode attention reads a cache that is not a state input".into());
                };
                if let Type::Tensor(t) = &mut g.node_mut(past).ty {
                    t.dtype = DType::Fp8E4M3;
                }
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
    g.reinfer_types().map_err(|e| e.to_string())?;
    g.attrs.insert("precision".into(), "fp8".into());
    Ok(g.reordered())
}

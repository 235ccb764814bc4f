//! The lowering: walks the graph in canonical order, resolves every value to a view
//! of a buffer, generates one kernel per launching node, merges identical kernels,
//! and places the intermediates in an arena.

use std::collections::{BTreeMap, HashMap};

use fusec_ir::op::resolve_axis;
use fusec_ir::{verify, DType, FusedOp, Graph, InputKind, NodeId, Op, OutputKind, Type, UnaryOp};

use crate::cuda::Cuda;
use crate::emit::{
    Attention, Ctx, Decode, Epilogue, Gemv, KernelCode, KernelEmitter, NormPrologue, Operand,
    Paged, Params, NAME,
};
use crate::error::Error;
use crate::layout::{extents, Extent, View};
use crate::options::{DecodeShape, Options, PagedShape};
use crate::output::{Kernel, Output};
use crate::plan::{
    Arg, Binding, Buffer, BufferId, BufferKind, ConstantInit, Launch, LaunchPlan, PagedReads,
    StateBinding,
};

/// Arena placements are aligned for 16-byte vector loads and for coalescing.
const ALIGN: u64 = 256;

/// A resolved value.
#[derive(Clone, Debug)]
enum Val {
    One(Operand),
    Tuple(Vec<View>),
}

struct Lower<'a> {
    graph: &'a Graph,
    decode: DecodeShape,
    opts: &'a Options,
    /// The backend that renders each kernel.
    emitter: &'a dyn KernelEmitter,
    number: HashMap<NodeId, usize>,
    buffers: Vec<Buffer>,
    vals: HashMap<NodeId, Val>,
    launches: Vec<Launch>,
    /// Kernel functions by text (with the name placeholder), in order of first use.
    kernels: Vec<(String, String, &'static str, usize)>,
    by_text: HashMap<String, usize>,
    /// The split-KV workspace shared by every attention launch (they run in order).
    workspace: Option<(BufferId, BufferId)>,
}

/// Lowers `graph` to CUDA C and a launch plan. See the crate documentation.
pub fn generate(graph: &Graph, shape: &DecodeShape, options: &Options) -> Result<Output, Error> {
    options.check()?;
    verify(graph).map_err(|e| Error::InvalidGraph(e.to_string()))?;
    let shape = &with_paged_default(graph, shape);
    shape.check()?;
    let order = graph
        .topo_order()
        .map_err(|e| Error::InvalidGraph(e.to_string()))?;
    let number = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut l = Lower {
        graph,
        decode: *shape,
        opts: options,
        emitter: &Cuda,
        number,
        buffers: Vec::new(),
        vals: HashMap::new(),
        launches: Vec::new(),
        kernels: Vec::new(),
        by_text: HashMap::new(),
        workspace: None,
    };
    for &id in &order {
        let ty = graph.ty(id);
        if let Some(t) = ty.tensors().iter().find(|t| !has_kernels(t.dtype)) {
            return Err(Error::NoKernels {
                value: l.number.get(&id).copied().unwrap_or(usize::MAX),
                op: graph.op(id).to_string(),
                dtype: t.dtype.to_string(),
            });
        }
        l.node(id)?;
    }
    l.finish()
}

/// Whether the backend has kernels reading `dtype`. Exhaustive, so that a new storage
/// format meets this decision: integer codes and their side data are read by the
/// integer GEMV only (`cuda::gemv_int`), which refuses any other use of them and the
/// formats it has no kernel for.
fn has_kernels(dtype: DType) -> bool {
    match dtype {
        DType::F32
        | DType::F16
        | DType::Bf16
        | DType::Fp8E4M3
        | DType::Fp8E5M2
        | DType::I32
        | DType::I8
        | DType::I4
        | DType::U4 => true,
        // Q4_K's packed side data: no CUDA kernel reads the K-quants yet.
        DType::U8 => false,
    }
}

/// What a prefill node (more than one token per sequence) needs that the backend has
/// no prefill kernel for, if anything: integer weight codes (the integer GEMV stages
/// every activation row, and no tensor-core GEMM reads the codes), or a sliding
/// window's ring cache in the prefill attention.
fn prefill_refusal(op: &Op, ops: &[Operand]) -> Option<&'static str> {
    let rows = |i: usize, axis_from_end: usize| -> Option<u64> {
        let v = ops.get(i)?.view().ok()?;
        let r = v.rank();
        (r > axis_from_end).then(|| v.dims[r - 1 - axis_from_end].fixed())?
    };
    let int = ops
        .iter()
        .any(|o| matches!(o, Operand::Dequant { act, .. } if act.is_int_codes()));
    if int
        && ops
            .first()
            .and_then(|o| o.view().ok())
            .is_some_and(|v| v.rank() >= 3)
        && rows(0, 1).is_some_and(|t| t > 1)
    {
        return Some("integer weights (Q8_0, Q4_0, Q4_1)");
    }
    if let Op::Fused(FusedOp::KvAppend) = op {
        let ring = ops.first().and_then(|o| o.view().ok()).is_some_and(|v| {
            v.rank() >= 2 && matches!(v.dims[v.rank() - 2], Extent::Window { .. })
        });
        if ring && rows(1, 1).is_some_and(|t| t > 1) {
            return Some("sliding-window KV caches");
        }
    }
    if let Op::Fused(FusedOp::DecodeAttention | FusedOp::DecodeAttentionCapped) = op {
        let ring = ops
            .get(5)
            .and_then(|o| o.view().ok())
            .is_some_and(|v| v.rank() == 4 && matches!(v.dims[2], Extent::Window { .. }));
        if ring && rows(0, 1).is_some_and(|t| t > 1) {
            return Some("sliding-window KV caches");
        }
    }
    None
}

/// `shape`, with a paged cache covering `max_seq_len` for every sequence
/// ([`PagedShape::covering`]) when the graph attends through block tables and the
/// caller gave no paged sizes.
fn with_paged_default(graph: &Graph, shape: &DecodeShape) -> DecodeShape {
    if shape.paged.is_some() {
        return *shape;
    }
    let block_size = graph.node_ids().into_iter().find_map(|id| {
        let pool = match graph.op(id) {
            Op::Fused(FusedOp::PagedAttention) => 3,
            Op::Fused(FusedOp::PagedDecodeAttention) => 5,
            _ => return None,
        };
        let t = graph.ty(*graph.operands(id).get(pool)?).tensor()?;
        t.shape.dims().get(2)?.as_fixed()
    });
    match block_size {
        Some(bs) => shape.with_paged(PagedShape::covering(shape.batch, shape.max_seq_len, bs)),
        None => *shape,
    }
}

impl Lower<'_> {
    fn unsupported(&self, id: NodeId, message: impl Into<String>) -> Error {
        Error::Unsupported {
            value: self.number.get(&id).copied().unwrap_or(usize::MAX),
            op: self.graph.op(id).to_string(),
            message: message.into(),
        }
    }

    fn dims(&self, id: NodeId, ty: &fusec_ir::TensorType) -> Result<Vec<Extent>, Error> {
        extents(&ty.shape, &self.decode).map_err(|name| {
            let _ = id;
            Error::UnknownSymbol(name)
        })
    }

    fn add_buffer(
        &mut self,
        name: String,
        kind: BufferKind,
        dtype: DType,
        dims: &[Extent],
    ) -> BufferId {
        let cap: Vec<u64> = dims.iter().map(|d| d.capacity(&self.decode)).collect();
        // Packed: `i4` codes two a byte.
        let bytes = dtype.bytes_for(cap.iter().product::<u64>());
        self.buffers.push(Buffer {
            name,
            kind,
            dtype,
            ir_shape: format!(
                "[{}]",
                dims.iter().map(|d| d.ir()).collect::<Vec<_>>().join(",")
            ),
            dims: cap,
            bytes,
            arena_offset: None,
        });
        self.buffers.len() - 1
    }

    /// A new dense buffer for a value of `ty`.
    fn leaf(&mut self, id: NodeId, name: String, kind: BufferKind) -> Result<View, Error> {
        let ty = self
            .graph
            .ty(id)
            .tensor()
            .cloned()
            .ok_or_else(|| self.unsupported(id, "a leaf must be a tensor"))?;
        let dims = self.dims(id, &ty)?;
        let b = self.add_buffer(name, kind, ty.dtype, &dims);
        Ok(View::dense(b, ty.dtype, dims, &self.decode))
    }

    fn val(&self, id: NodeId) -> Result<&Val, Error> {
        self.vals.get(&id).ok_or_else(|| {
            Error::InvalidGraph(format!(
                "%{} used before it is defined",
                self.number.get(&id).copied().unwrap_or(0)
            ))
        })
    }

    fn view_of(&self, user: NodeId, id: NodeId) -> Result<View, Error> {
        match self.val(id)? {
            Val::One(Operand::View(v)) => Ok(v.clone()),
            _ => Err(self.unsupported(user, "operand is not a tensor in memory")),
        }
    }

    fn node(&mut self, id: NodeId) -> Result<(), Error> {
        let op = self.graph.op(id).clone();
        let operands = self.graph.operands(id);
        let n = self.number[&id];
        let val = match &op {
            Op::Input { name, kind } => {
                let kind = match kind {
                    InputKind::Data => BufferKind::Input { name: name.clone() },
                    InputKind::State => BufferKind::State { name: name.clone() },
                };
                Val::One(Operand::View(self.leaf(id, name.clone(), kind)?))
            }
            Op::Weight { name } => Val::One(Operand::View(self.leaf(
                id,
                name.clone(),
                BufferKind::Weight { name: name.clone() },
            )?)),
            Op::Scalar { value } => Val::One(Operand::Scalar(value.0 as f32)),
            Op::RopeInvFreq { theta, head_dim } => {
                let init = ConstantInit::RopeInvFreq {
                    theta: theta.0,
                    head_dim: *head_dim,
                };
                Val::One(Operand::View(self.leaf(
                    id,
                    format!("%{n} rope.inv_freq"),
                    BufferKind::Constant { init },
                )?))
            }
            Op::RopeInvFreqLlama3 {
                theta,
                head_dim,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let init = ConstantInit::RopeInvFreqLlama3 {
                    theta: theta.0,
                    head_dim: *head_dim,
                    factor: factor.0,
                    low_freq_factor: low_freq_factor.0,
                    high_freq_factor: high_freq_factor.0,
                    original_max_position_embeddings: *original_max_position_embeddings,
                };
                Val::One(Operand::View(self.leaf(
                    id,
                    format!("%{n} rope.inv_freq_llama3"),
                    BufferKind::Constant { init },
                )?))
            }
            Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Slice { .. }
            | Op::Unsqueeze { .. }
            | Op::Expand { .. } => {
                let src = self.view_of(id, operands[0])?;
                let ty = self
                    .graph
                    .ty(id)
                    .tensor()
                    .cloned()
                    .ok_or_else(|| self.unsupported(id, "a view must be a tensor"))?;
                let to = self.dims(id, &ty)?;
                let r = if let Op::Transpose { a, b } = &op {
                    src.transpose(*a, *b)
                } else if let Op::Slice { axis, start, end } = &op {
                    resolve_axis(*axis, src.rank())
                        .map_err(|e| e.to_string())
                        .and_then(|a| src.slice(a, *start, *end))
                } else if let Op::Unsqueeze { axis } = &op {
                    src.unsqueeze(*axis)
                } else if let Op::Expand { .. } = &op {
                    src.expand(&to)
                } else {
                    src.reshape(&to, &self.decode)
                };
                let v = r.map_err(|m| self.unsupported(id, m))?;
                if v.dims != to {
                    return Err(self.unsupported(
                        id,
                        format!("view gives {:?}, the IR says {:?}", v.dims, to),
                    ));
                }
                Val::One(Operand::View(v))
            }
            Op::Get { index } => match self.val(operands[0])? {
                Val::Tuple(vs) => {
                    let v = vs
                        .get(*index)
                        .cloned()
                        .ok_or_else(|| self.unsupported(id, "no such tuple element"))?;
                    Val::One(Operand::View(v))
                }
                Val::One(_) => {
                    return Err(self.unsupported(id, "get of a value that is not a tuple"))
                }
            },
            Op::Dequant { to, act } => Val::One(Operand::Dequant {
                values: self.view_of(id, operands[0])?,
                scale: self.view_of(id, operands[1])?,
                to: *to,
                act: *act,
            }),
            // Every other op launches a kernel (the op table says so; the
            // `op_table_stages` test checks that each one lowers).
            Op::Unary(_)
            | Op::Binary(_)
            | Op::Cast { .. }
            | Op::Reduce { .. }
            | Op::Argmax { .. }
            | Op::Softmax { .. }
            | Op::MatMul
            | Op::Linear
            | Op::Embedding
            | Op::Cat { .. }
            | Op::Copy
            | Op::Fused(_) => self.launch(id)?,
        };
        self.vals.insert(id, val);
        Ok(())
    }

    /// The result views of a launching node: new intermediates, or the cache it
    /// appends to in place.
    fn results(&mut self, id: NodeId) -> Result<Vec<View>, Error> {
        let n = self.number[&id];
        let op = self.graph.op(id).clone();
        let operands = self.graph.operands(id);
        let tys: Vec<fusec_ir::TensorType> = self.graph.ty(id).tensors().to_vec();
        let tuple = matches!(self.graph.ty(id), Type::Tuple(_));
        let mut out = Vec::new();
        for (i, ty) in tys.iter().enumerate() {
            let dims = self.dims(id, ty)?;
            let in_place = op
                .in_place()
                .find(|&(_, result)| result == i)
                .map(|(operand, _)| operands[operand]);
            let v = match in_place {
                Some(past) => {
                    // Appending in place overwrites nothing the step still needs only if
                    // the cache is a whole state buffer that nothing else reads.
                    if !matches!(
                        self.graph.op(past),
                        Op::Input {
                            kind: InputKind::State,
                            ..
                        }
                    ) || self.graph.users(past).len() != 1
                    {
                        return Err(self.unsupported(
                            id,
                            "an in-place append needs a state input used only here",
                        ));
                    }
                    let p = self.view_of(id, past)?;
                    View { dims, ..p }
                }
                None => {
                    let name = if tuple {
                        format!("%{n}.{i}")
                    } else {
                        format!("%{n}")
                    };
                    let b = self.add_buffer(name, BufferKind::Intermediate, ty.dtype, &dims);
                    View::dense(b, ty.dtype, dims, &self.decode)
                }
            };
            out.push(v);
        }
        Ok(out)
    }

    fn launch(&mut self, id: NodeId) -> Result<Val, Error> {
        let node = self.graph.node(id);
        let op = node.op.clone();
        let operand_ids = self.graph.operands(id);
        let mut ops = Vec::with_capacity(operand_ids.len());
        for &o in &operand_ids {
            match self.val(o)? {
                Val::One(x) => ops.push(x.clone()),
                Val::Tuple(_) => {
                    return Err(self.unsupported(id, "a tuple operand must be read through get"))
                }
            }
        }
        if let Some(what) = prefill_refusal(&op, &ops) {
            return Err(Error::NoPrefillKernels {
                value: self.number[&id],
                op: op.to_string(),
                what: what.into(),
            });
        }
        let outs = self.results(id)?;
        if let Op::Fused(f @ (FusedOp::PagedAttention | FusedOp::PagedDecodeAttention)) = op {
            return self.launch_paged(id, f, &ops, outs);
        }
        let (decode, opts) = (self.decode, self.opts);
        let mut params = Params::default();
        let e = self.emitter;
        // Every family method gets the kernel's parameters, the shape and the options.
        macro_rules! cx {
            () => {
                Ctx {
                    params: &mut params,
                    decode: &decode,
                    opts,
                }
            };
        }
        let view = |i: usize| Operand::view_at(&ops, i);
        let scalar = |i: usize| Operand::scalar_at(&ops, i);
        let axis = |a: i64| -> Result<usize, String> {
            resolve_axis(a, view(0)?.rank()).map_err(|e| e.to_string())
        };
        let out0 = outs
            .first()
            .ok_or_else(|| self.unsupported(id, "no result"))?;
        let code: Result<KernelCode, String> = match &op {
            Op::Unary(u) => e.unary(*u, &ops[0], out0, cx!()),
            Op::Binary(b) => e.binary(*b, &ops[0], &ops[1], out0, cx!()),
            Op::Cast { .. } => e.cast(&ops[0], out0, cx!()),
            Op::Copy => e.copy(&ops[0], out0, cx!()),
            Op::Reduce {
                kind,
                axis: a,
                keepdim,
            } => axis(*a).and_then(|a| e.reduce(*kind, view(0)?, (a, *keepdim), out0, cx!())),
            Op::Argmax { axis: a } => axis(*a).and_then(|a| e.argmax(view(0)?, a, out0, cx!())),
            Op::Softmax { axis: a } => axis(*a).and_then(|a| e.softmax(view(0)?, a, out0, cx!())),
            Op::MatMul => view(0).and_then(|a| e.matmul(a, view(1)?, out0, cx!())),
            Op::Embedding => view(0).and_then(|t| e.embedding(t, view(1)?, out0, cx!())),
            Op::Cat { axis: a } => {
                let parts: Result<Vec<View>, String> =
                    (0..ops.len()).map(|i| view(i).cloned()).collect();
                parts.and_then(|parts| axis(*a).and_then(|a| e.cat(&parts, a, out0, cx!())))
            }
            Op::Linear => view(0).and_then(|x| {
                e.gemv(
                    &Gemv {
                        x,
                        norm: None,
                        weights: vec![&ops[1]],
                        epilogue: Epilogue::Plain,
                        outs: &outs,
                    },
                    cx!(),
                )
            }),
            Op::Fused(f) => match f {
                FusedOp::KvAppend => view(0).and_then(|past| e.kv_append(past, view(1)?, cx!())),
                // Two kernels: see `launch_paged`, which the node took above.
                FusedOp::PagedAttention | FusedOp::PagedDecodeAttention => {
                    Err("paged attention is lowered by launch_paged".into())
                }
                FusedOp::Rope => view(0).and_then(|x| e.rope(x, &ops[1], &ops[2], out0, cx!())),
                FusedOp::RmsNorm => {
                    view(0).and_then(|x| e.rms_norm(x, view(1)?, scalar(2)?, out0, cx!()))
                }
                FusedOp::PostRmsNorm => view(0).and_then(|x| {
                    let residual = match ops.get(3) {
                        Some(_) => Some(view(3)?),
                        None => None,
                    };
                    e.post_rms_norm(x, view(1)?, scalar(2)?, None, residual, out0, cx!())
                }),
                FusedOp::OffsetRmsNorm => view(0).and_then(|x| {
                    let residual = match ops.get(4) {
                        Some(_) => Some(view(4)?),
                        None => None,
                    };
                    let offset = Some(scalar(3)?);
                    e.post_rms_norm(x, view(1)?, scalar(2)?, offset, residual, out0, cx!())
                }),
                FusedOp::RmsNormLinear => view(0).and_then(|x| {
                    let g = Gemv {
                        x,
                        norm: Some(NormPrologue {
                            weight: view(1)?,
                            eps: scalar(2)?,
                            offset: None,
                        }),
                        weights: ops[3..].iter().collect(),
                        epilogue: Epilogue::Plain,
                        outs: &outs,
                    };
                    e.gemv(&g, cx!())
                }),
                FusedOp::OffsetRmsNormLinear => view(0).and_then(|x| {
                    let g = Gemv {
                        x,
                        norm: Some(NormPrologue {
                            weight: view(1)?,
                            eps: scalar(2)?,
                            offset: Some(scalar(3)?),
                        }),
                        weights: ops[4..].iter().collect(),
                        epilogue: Epilogue::Plain,
                        outs: &outs,
                    };
                    e.gemv(&g, cx!())
                }),
                FusedOp::OffsetRmsNormGeglu => view(0).and_then(|x| {
                    let g = Gemv {
                        x,
                        norm: Some(NormPrologue {
                            weight: view(1)?,
                            eps: scalar(2)?,
                            offset: Some(scalar(3)?),
                        }),
                        weights: vec![&ops[4], &ops[5]],
                        epilogue: Epilogue::Gated(UnaryOp::GeluTanh),
                        outs: &outs,
                    };
                    e.gemv(&g, cx!())
                }),
                FusedOp::MultiLinear => view(0).and_then(|x| {
                    let g = Gemv {
                        x,
                        norm: None,
                        weights: ops[1..].iter().collect(),
                        epilogue: Epilogue::Plain,
                        outs: &outs,
                    };
                    e.gemv(&g, cx!())
                }),
                FusedOp::Swiglu => view(0).and_then(|x| {
                    let g = Gemv {
                        x,
                        norm: None,
                        weights: vec![&ops[1], &ops[2]],
                        epilogue: Epilogue::Gated(UnaryOp::Silu),
                        outs: &outs,
                    };
                    e.gemv(&g, cx!())
                }),
                FusedOp::Geglu => view(0).and_then(|x| {
                    let g = Gemv {
                        x,
                        norm: None,
                        weights: vec![&ops[1], &ops[2]],
                        epilogue: Epilogue::Gated(UnaryOp::GeluTanh),
                        outs: &outs,
                    };
                    e.gemv(&g, cx!())
                }),
                FusedOp::RmsNormSwiglu => view(0).and_then(|x| {
                    let g = Gemv {
                        x,
                        norm: Some(NormPrologue {
                            weight: view(1)?,
                            eps: scalar(2)?,
                            offset: None,
                        }),
                        weights: vec![&ops[3], &ops[4]],
                        epilogue: Epilogue::Gated(UnaryOp::Silu),
                        outs: &outs,
                    };
                    e.gemv(&g, cx!())
                }),
                FusedOp::LinearAdd => view(0).and_then(|x| {
                    let g = Gemv {
                        x,
                        norm: None,
                        weights: vec![&ops[1]],
                        epilogue: Epilogue::Residual(view(2)?),
                        outs: &outs,
                    };
                    e.gemv(&g, cx!())
                }),
                FusedOp::LinearScaleAdd => view(0).and_then(|x| {
                    let g = Gemv {
                        x,
                        norm: None,
                        weights: vec![&ops[1]],
                        epilogue: Epilogue::ScaledResidual(view(3)?, scalar(2)?),
                        outs: &outs,
                    };
                    e.gemv(&g, cx!())
                }),
                FusedOp::LinearPostRmsNorm => {
                    let (_, ticket) = self.workspace(0, 1);
                    view(0).and_then(|x| {
                        let g = Gemv {
                            x,
                            norm: None,
                            weights: vec![&ops[1]],
                            epilogue: Epilogue::PostNorm {
                                weight: view(2)?,
                                eps: scalar(3)?,
                                offset: None,
                                residual: view(4)?,
                                ticket: &ticket,
                            },
                            outs: &outs,
                        };
                        e.gemv(&g, cx!())
                    })
                }
                FusedOp::LinearOffsetRmsNorm => {
                    let (_, ticket) = self.workspace(0, 1);
                    view(0).and_then(|x| {
                        let g = Gemv {
                            x,
                            norm: None,
                            weights: vec![&ops[1]],
                            epilogue: Epilogue::PostNorm {
                                weight: view(2)?,
                                eps: scalar(3)?,
                                offset: Some(scalar(4)?),
                                residual: view(5)?,
                                ticket: &ticket,
                            },
                            outs: &outs,
                        };
                        e.gemv(&g, cx!())
                    })
                }
                FusedOp::Attention | FusedOp::DecodeAttention | FusedOp::DecodeAttentionCapped => {
                    let built = (|| -> Result<Attention<'_>, String> {
                        // The soft-capped decode attention has its cap after the mask,
                        // before any FP8 cache scales.
                        let base = if *f == FusedOp::DecodeAttentionCapped {
                            10
                        } else {
                            9
                        };
                        let dec = if *f != FusedOp::Attention {
                            let scales = match (ops.get(base), ops.get(base + 1)) {
                                (Some(k), Some(v)) => Some((k.view()?, v.view()?)),
                                _ => None,
                            };
                            Some(Decode {
                                cos: &ops[3],
                                sin: &ops[4],
                                past_k: view(5)?,
                                past_v: view(6)?,
                                scales,
                            })
                        } else {
                            None
                        };
                        let (scale_i, mask_i) = if dec.is_some() { (7, 8) } else { (3, 4) };
                        Ok(Attention {
                            q: view(0)?,
                            k: view(1)?,
                            v: view(2)?,
                            decode: dec,
                            paged: None,
                            scale: scalar(scale_i)?,
                            softcap: match (*f, ops.get(5)) {
                                (FusedOp::Attention, Some(_)) => Some(scalar(5)?),
                                (FusedOp::DecodeAttentionCapped, _) => Some(scalar(9)?),
                                _ => None,
                            },
                            mask: ops.get(mask_i).ok_or("missing mask")?,
                            out: out0,
                        })
                    })();
                    match built
                        .and_then(|a| e.attention_workspace(&a, &decode, opts).map(|w| (a, w)))
                    {
                        Ok((a, w)) => {
                            let ws = w.map(|(f, t)| self.workspace(f, t));
                            let wsv = ws.as_ref().map(|(f, t)| (f, t));
                            e.attention(&a, wsv, cx!())
                        }
                        Err(e) => Err(e),
                    }
                }
            },
            Op::Input { .. }
            | Op::Weight { .. }
            | Op::Scalar { .. }
            | Op::RopeInvFreq { .. }
            | Op::RopeInvFreqLlama3 { .. }
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Slice { .. }
            | Op::Unsqueeze { .. }
            | Op::Expand { .. }
            | Op::Get { .. }
            | Op::Dequant { .. } => Err(format!("`{}` launches no kernel", op.name())),
        };
        let code = code.map_err(|m| self.unsupported(id, m))?;
        let mut views: Vec<_> = Vec::new();
        for o in &ops {
            match o {
                Operand::View(v) => views.push(v.info(&decode)),
                Operand::Dequant { values, scale, .. } => {
                    views.push(values.info(&decode));
                    views.push(scale.info(&decode));
                }
                Operand::Scalar(_) => {}
            }
        }
        views.extend(outs.iter().map(|v| v.info(&decode)));
        self.add_launch(id, &code, &params, views);
        Ok(if matches!(self.graph.ty(id), Type::Tuple(_)) {
            Val::Tuple(outs)
        } else {
            Val::One(Operand::View(
                outs.into_iter()
                    .next()
                    .ok_or_else(|| self.unsupported(id, "no result"))?,
            ))
        })
    }

    /// `fused.paged_attention` and `fused.paged_decode_attention`: two launches, the
    /// write of every row's new key and value into its block, then the attention
    /// through the block tables (Kwon et al. 2023, "Efficient Memory Management for
    /// Large Language Model Serving with PagedAttention", section 4.1; vLLM likewise
    /// runs its `reshape_and_cache` kernel before `paged_attention`).
    ///
    /// Why two kernels: the rows of one step need not be distinct sequences. A prefill
    /// chunk run as decode rows puts one sequence in consecutive rows at positions `p`
    /// and `p + 1`, each with a copy of the sequence's block table row, and the row at
    /// `p + 1` must read the entry the row at `p` writes. Blocks of one launch have no
    /// order and cannot wait for each other, so one kernel could read a slot before the
    /// block writing it ran; two launches on one stream complete every write before any
    /// read (the CPU kernel likewise writes every row before attending).
    fn launch_paged(
        &mut self,
        id: NodeId,
        f: FusedOp,
        ops: &[Operand],
        outs: Vec<View>,
    ) -> Result<Val, Error> {
        let (decode, opts, e) = (self.decode, self.opts, self.emitter);
        // The decode variant has RoPE's tables after v; the operands from the pools on
        // are the same, two places later.
        let o = match f {
            FusedOp::PagedAttention => 0,
            _ => 2,
        };
        // No mask: the scores get `+ 0`, rounded as the CPU kernel rounds them.
        let zero = Operand::Scalar(0.0);
        let built = (|| -> Result<Attention<'_>, String> {
            let view = |i: usize| Operand::view_at(ops, i);
            let scalar = |i: usize| Operand::scalar_at(ops, i);
            let window = match ops.get(8 + o) {
                None => None,
                Some(w) => {
                    let w = w.scalar()?;
                    // A window is a whole number of positions, at least one (as the CPU
                    // executor checks it).
                    if !(w >= 1.0 && w.fract() == 0.0 && w < 16_777_216.0) {
                        return Err(format!("window {w} is not a length"));
                    }
                    Some(w as u64)
                }
            };
            let rope = match o {
                0 => None,
                _ => Some((
                    ops.get(3).ok_or("missing cos")?,
                    ops.get(4).ok_or("missing sin")?,
                )),
            };
            Ok(Attention {
                q: view(0)?,
                k: view(1)?,
                v: view(2)?,
                decode: None,
                paged: Some(Paged {
                    pool_k: view(3 + o)?,
                    pool_v: view(4 + o)?,
                    table: view(5 + o)?,
                    positions: view(6 + o)?,
                    rope,
                    window,
                }),
                scale: scalar(7 + o)?,
                softcap: None,
                mask: &zero,
                out: outs.first().ok_or("no result")?,
            })
        })()
        .map_err(|m| self.unsupported(id, m))?;
        let mut write_params = Params::default();
        let write = e
            .paged_write(
                &built,
                Ctx {
                    params: &mut write_params,
                    decode: &decode,
                    opts,
                },
            )
            .map_err(|m| self.unsupported(id, m))?;
        let ws = e
            .attention_workspace(&built, &decode, opts)
            .map_err(|m| self.unsupported(id, m))?
            .map(|(fl, t)| self.workspace(fl, t));
        let mut attend_params = Params::default();
        let attend = e
            .attention(
                &built,
                ws.as_ref().map(|(f, t)| (f, t)),
                Ctx {
                    params: &mut attend_params,
                    decode: &decode,
                    opts,
                },
            )
            .map_err(|m| self.unsupported(id, m))?;
        let mut views = Vec::new();
        for x in ops {
            if let Operand::View(v) = x {
                views.push(v.clone());
            }
        }
        views.extend(outs.iter().cloned());
        // Each launch records the views of the buffers it binds, operands first.
        for (code, params) in [(&write, &write_params), (&attend, &attend_params)] {
            let bound: Vec<_> = views
                .iter()
                .filter(|v| params.list().iter().any(|(b, _, _)| *b == v.buffer))
                .map(|v| v.info(&decode))
                .collect();
            self.add_launch(id, code, params, bound);
        }
        // The attention launch (the last) reads the pools through the tables.
        let paged = built
            .paged
            .as_ref()
            .ok_or_else(|| self.unsupported(id, "not paged"))?;
        let dim = |i: usize| paged.pool_k.dims[i].capacity(&decode);
        let reads = PagedReads {
            kv_heads: dim(1),
            head_dim: dim(3),
            element_bytes: paged.pool_k.dtype.size_bytes(),
            reach: dim(2).saturating_mul(paged.table.dims[1].capacity(&decode)),
            window: paged.window,
        };
        if let Some(l) = self.launches.last_mut() {
            l.paged = Some(reads);
        }
        Ok(Val::Tuple(outs))
    }

    /// The shared workspace (split-KV attention's partials and tickets, the post-norm
    /// GEMV's ticket), grown to hold `floats` partials and `tickets`.
    fn workspace(&mut self, floats: u64, tickets: u64) -> (View, View) {
        let (f, t) = match self.workspace {
            Some(w) => w,
            None => {
                let f = self.add_buffer(
                    "attention.partials".into(),
                    BufferKind::Workspace,
                    self.emitter.workspace_dtype(),
                    &[Extent::Fixed(0)],
                );
                let t = self.add_buffer(
                    "attention.tickets".into(),
                    BufferKind::Workspace,
                    DType::I32,
                    &[Extent::Fixed(0)],
                );
                self.workspace = Some((f, t));
                (f, t)
            }
        };
        for (b, n) in [(f, floats), (t, tickets)] {
            let buf = &mut self.buffers[b];
            if buf.dims[0] < n {
                buf.dims[0] = n;
                buf.ir_shape = format!("[{n}]");
                buf.bytes = n * buf.dtype.size_bytes();
            }
        }
        (
            View::dense(
                f,
                self.emitter.workspace_dtype(),
                vec![Extent::Fixed(floats)],
                &self.decode,
            ),
            View::dense(t, DType::I32, vec![Extent::Fixed(tickets)], &self.decode),
        )
    }

    fn add_launch(
        &mut self,
        id: NodeId,
        code: &KernelCode,
        params: &Params,
        views: Vec<crate::plan::ViewInfo>,
    ) {
        let text = self.emitter.function(code, params);
        let k = match self.by_text.get(&text) {
            Some(&k) => {
                self.kernels[k].3 += 1;
                k
            }
            None => {
                let k = self.kernels.len();
                let name = format!("fusec_k{k}_{}", code.family);
                self.kernels.push((text.clone(), name, code.family, 1));
                self.by_text.insert(text, k);
                k
            }
        };
        let node = self.graph.node(id);
        self.launches.push(Launch {
            kernel: self.kernels[k].1.clone(),
            value: self.number[&id],
            op: node.op.to_string(),
            layer: node.layer,
            grid: code.grid,
            block: [code.block, 1, 1],
            shared_bytes: code.shared,
            args: params.args(),
            views,
            paged: None,
        });
    }

    fn finish(mut self) -> Result<Output, Error> {
        let mut inputs = Vec::new();
        for (id, name, kind) in self.graph.inputs() {
            if kind == InputKind::Data {
                let v = self.view_of(id, id)?;
                inputs.push(Binding {
                    name: name.to_string(),
                    view: v.info(&self.decode),
                });
            }
        }
        let mut outputs = Vec::new();
        let mut states = Vec::new();
        for o in self.graph.outputs() {
            let v = self.view_of(o.value, o.value)?;
            let buf = &mut self.buffers[v.buffer];
            if buf.kind == BufferKind::Intermediate {
                buf.kind = match o.kind {
                    OutputKind::Data => BufferKind::Output {
                        name: o.name.clone(),
                    },
                    OutputKind::State => BufferKind::StateNext {
                        name: o.name.clone(),
                    },
                };
            }
            match o.kind {
                OutputKind::Data => outputs.push(Binding {
                    name: o.name.clone(),
                    view: v.info(&self.decode),
                }),
                OutputKind::State => {
                    let input = self.graph.input(&o.name).ok_or_else(|| {
                        Error::InvalidGraph(format!("state output `{}` has no state input", o.name))
                    })?;
                    let iv = self.view_of(input, input)?;
                    if iv.strides != v.strides || iv.offset != v.offset || iv.dtype != v.dtype {
                        return Err(self.unsupported(
                            o.value,
                            format!("state `{}` changes its layout across the step", o.name),
                        ));
                    }
                    states.push(StateBinding {
                        name: o.name.clone(),
                        input: iv.info(&self.decode),
                        output: v.info(&self.decode),
                    });
                }
            }
        }
        let arena_bytes = self.place_arena();
        let kernels = self
            .kernels
            .iter()
            .map(|(text, name, family, launches)| Kernel {
                name: name.clone(),
                family: (*family).to_string(),
                function: text.replace(NAME, name),
                launches: *launches,
            })
            .collect();
        Ok(Output {
            prelude: self.emitter.prelude(),
            kernels,
            plan: LaunchPlan {
                graph: self.graph.name.clone(),
                shape: self.decode,
                arena_bytes,
                buffers: self.buffers,
                launches: self.launches,
                inputs,
                outputs,
                states,
            },
        })
    }

    /// First-fit placement of the intermediates by liveness: a buffer is live from
    /// the launch that writes it to the last launch that reads it, and two buffers
    /// live at the same launch never overlap.
    fn place_arena(&mut self) -> u64 {
        let mut first: BTreeMap<BufferId, usize> = BTreeMap::new();
        let mut last: BTreeMap<BufferId, usize> = BTreeMap::new();
        for (i, l) in self.launches.iter().enumerate() {
            for a in &l.args {
                if let Arg::Buffer { buffer, .. } = a {
                    if self.buffers[*buffer].kind == BufferKind::Intermediate {
                        first.entry(*buffer).or_insert(i);
                        last.insert(*buffer, i);
                    }
                }
            }
        }
        let mut by_first: BTreeMap<usize, Vec<BufferId>> = BTreeMap::new();
        for (&b, &f) in &first {
            by_first.entry(f).or_default().push(b);
        }
        // Live placements: (offset, end, buffer).
        let mut live: Vec<(u64, u64, BufferId)> = Vec::new();
        let mut top = 0u64;
        for (launch, bufs) in by_first {
            live.retain(|&(_, _, b)| last[&b] >= launch);
            for b in bufs {
                let size = self.buffers[b].bytes.div_ceil(ALIGN).max(1) * ALIGN;
                live.sort_unstable();
                let mut at = 0u64;
                for &(o, e, _) in &live {
                    if o >= at + size {
                        break;
                    }
                    at = at.max(e);
                }
                live.push((at, at + size, b));
                top = top.max(at + size);
                self.buffers[b].arena_offset = Some(at);
            }
        }
        top
    }
}

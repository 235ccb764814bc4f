//! The launch plan against the IR: determinism, one launch per launching node,
//! buffers and views that hold what the IR types say, an arena without overlaps.

mod common;

use std::collections::{BTreeMap, HashMap};

use fusec_codegen::plan::{Arg, BufferKind, LaunchPlan};
use fusec_codegen::DecodeShape;
use fusec_ir::shape::Bindings;
use fusec_ir::{DType, Dim, Graph, NodeId, Op, TensorType};
use fusec_model::frontend::Precision;

fn tiny_and_8b() -> Vec<common::Case> {
    let mut cases = Vec::new();
    for (model, precisions) in [
        (
            "tiny.toml",
            &[Precision::F32, Precision::Bf16, Precision::Fp8][..],
        ),
        ("llama-3-8b.toml", &[Precision::Bf16, Precision::Fp8][..]),
    ] {
        for &p in precisions {
            cases.extend(common::cases(
                &common::root().join("examples").join(model),
                p,
            ));
        }
    }
    cases
}

#[test]
fn same_graph_gives_identical_source_and_plan() {
    for case in tiny_and_8b() {
        let (a, b) = (common::output(&case), common::output(&case));
        assert_eq!(a.source(), b.source(), "{}", case.label);
        assert_eq!(
            a.plan.to_json().expect("json"),
            b.plan.to_json().expect("json"),
            "{}",
            case.label
        );
    }
    // A graph built again from the model file, not a clone, gives the same text too.
    let path = common::root().join("examples/tiny.toml");
    let first = common::output(&common::cases(&path, Precision::Bf16).remove(1));
    let again = common::output(&common::cases(&path, Precision::Bf16).remove(1));
    assert_eq!(first.source(), again.source());
}

/// `%N` numbering of the canonical text form.
fn numbering(g: &Graph) -> (Vec<NodeId>, HashMap<NodeId, usize>) {
    let order = g.topo_order().expect("acyclic");
    let number = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    (order, number)
}

#[test]
fn one_launch_per_launching_node_in_order() {
    for path in common::examples() {
        for case in common::cases(&path, Precision::Bf16) {
            let out = common::output(&case);
            let (order, _) = numbering(&case.graph);
            let launching: Vec<usize> = order
                .iter()
                .enumerate()
                .filter(|(_, &id)| case.graph.op(id).launches_kernel())
                .map(|(i, _)| i)
                .collect();
            let launched: Vec<usize> = out.plan.launches.iter().map(|l| l.value).collect();
            assert_eq!(launched, launching, "{}", case.label);
            // Which is what the cost model counts.
            let b = Bindings::new()
                .with("B", case.shape.batch)
                .with("S", case.shape.max_seq_len - 1);
            let cost = fusec_ir::cost::graph_cost(&case.graph, &b).expect("bound");
            assert_eq!(
                out.plan.launches.len() as u64,
                cost.total.launches,
                "{}",
                case.label
            );
            let runs: usize = out.kernels.iter().map(|k| k.launches).sum();
            assert_eq!(runs, out.plan.launches.len());
            for l in &out.plan.launches {
                assert!(
                    out.kernels.iter().any(|k| k.name == l.kernel),
                    "{}: {}",
                    case.label,
                    l.kernel
                );
            }
        }
    }
}

#[test]
fn identical_layers_share_kernels() {
    let case = common::cases(
        &common::root().join("examples/llama-3-8b.toml"),
        Precision::Bf16,
    )
    .remove(1);
    let out = common::output(&case);
    // 32 layers of 5 kernels, plus the RoPE tables, the lm_head and the argmax.
    assert!(out.plan.launches.len() > 160);
    assert!(out.kernels.len() < 20, "{} kernels", out.kernels.len());
    let attention = out
        .kernels
        .iter()
        .find(|k| k.family == "decode_attention")
        .expect("attention");
    assert_eq!(attention.launches, 32);
}

/// The IR dims of a type with the batch baked in, as the plan writes them.
fn ir_dims(t: &TensorType, batch: u64) -> Vec<String> {
    t.shape
        .dims()
        .iter()
        .map(|d| match d {
            Dim::Sym { name, plus } if name == "B" => (batch + plus).to_string(),
            other => other.to_string(),
        })
        .collect()
}

fn check_plan(label: &str, g: &Graph, plan: &LaunchPlan, shape: &DecodeShape) {
    let (order, _) = numbering(g);
    let largest = Bindings::new()
        .with("B", shape.batch)
        .with("S", shape.max_seq_len - 1);
    for (i, buf) in plan.buffers.iter().enumerate() {
        assert_eq!(
            buf.bytes,
            buf.dtype.bytes_for(buf.dims.iter().product::<u64>()),
            "{label}: {}",
            buf.name
        );
        // Leaves are allocated exactly as the IR declares them, at capacity.
        let leaf = match &buf.kind {
            BufferKind::Weight { name } => g
                .weights()
                .into_iter()
                .find(|(_, n)| n == name)
                .map(|(id, _)| id),
            BufferKind::Input { name } | BufferKind::State { name } => g.input(name),
            _ => None,
        };
        if let Some(id) = leaf {
            let t = g.ty(id).tensor().expect("tensor");
            assert_eq!(t.dtype, buf.dtype, "{label}: buffer {i} {}", buf.name);
            assert!(
                buf.bytes >= t.bytes(&largest).expect("bound"),
                "{label}: {}",
                buf.name
            );
            if t.shape.dims().iter().all(|d| {
                d.as_fixed().is_some() || matches!(d, Dim::Sym { name, .. } if name == "B")
            }) {
                assert_eq!(
                    buf.bytes,
                    t.bytes(&largest).expect("bound"),
                    "{label}: {}",
                    buf.name
                );
            }
        }
    }
    for l in &plan.launches {
        let id = order[l.value];
        for a in &l.args {
            if let Arg::Buffer { buffer, .. } = a {
                assert!(
                    *buffer < plan.buffers.len(),
                    "{label}: {} binds a missing buffer",
                    l.kernel
                );
            }
        }
        // Every view fits its buffer, at capacity, and has the IR's dims and dtype.
        for v in &l.views {
            let buf = &plan.buffers[v.buffer];
            assert_eq!(v.dtype, buf.dtype, "{label}: %{}", l.value);
            let mut last = v.offset;
            for (d, s) in v.dims_at_capacity.iter().zip(&v.strides) {
                last += d.saturating_sub(1) * s;
            }
            assert!(
                buf.dtype.bytes_for(last + 1) <= buf.bytes,
                "{label}: %{} view overruns {}",
                l.value,
                buf.name
            );
            assert!(
                l.args
                    .iter()
                    .any(|a| matches!(a, Arg::Buffer { buffer, .. } if *buffer == v.buffer)),
                "{label}: %{} has a view of an unbound buffer",
                l.value
            );
        }
        let mut expected: Vec<(DType, Vec<String>)> = Vec::new();
        for o in g.operands(id) {
            match g.op(o) {
                Op::Scalar { .. } => {}
                Op::Dequant { .. } => {
                    for w in g.operands(o) {
                        let t = g.ty(w).tensor().expect("tensor");
                        expected.push((t.dtype, ir_dims(t, shape.batch)));
                    }
                }
                _ => {
                    let t = g.ty(o).tensor().expect("tensor operand");
                    expected.push((t.dtype, ir_dims(t, shape.batch)));
                }
            }
        }
        for t in g.ty(id).tensors() {
            expected.push((t.dtype, ir_dims(t, shape.batch)));
        }
        let got: Vec<(DType, Vec<String>)> =
            l.views.iter().map(|v| (v.dtype, v.shape.clone())).collect();
        // The views the kernel bakes in: operands (a mask or a RoPE table may be
        // broadcast by the kernel itself, so compare what the plan records).
        assert_eq!(got, expected, "{label}: %{} = {}", l.value, l.op);
    }
    for b in plan.inputs.iter().chain(&plan.outputs) {
        assert!(b.view.buffer < plan.buffers.len());
    }
    for s in &plan.states {
        assert_eq!(s.input.strides, s.output.strides, "{label}: {}", s.name);
        assert_eq!(s.input.dtype, s.output.dtype);
    }
}

#[test]
fn buffers_and_views_match_the_ir_types() {
    for path in common::examples() {
        for precision in common::PRECISIONS {
            for case in common::cases(&path, precision) {
                let out = common::output(&case);
                check_plan(&case.label, &case.graph, &out.plan, &case.shape);
            }
        }
    }
    for case in common::int_cases() {
        let out = common::output(&case);
        check_plan(&case.label, &case.graph, &out.plan, &case.shape);
    }
}

#[test]
fn arena_buffers_alive_together_never_overlap() {
    for case in tiny_and_8b() {
        let plan = common::output(&case).plan;
        let mut live: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for (i, l) in plan.launches.iter().enumerate() {
            for a in &l.args {
                if let Arg::Buffer { buffer, .. } = a {
                    if plan.buffers[*buffer].kind == BufferKind::Intermediate {
                        let e = live.entry(*buffer).or_insert((i, i));
                        e.1 = i;
                    }
                }
            }
        }
        let items: Vec<_> = live.iter().collect();
        for (n, (a, (af, al))) in items.iter().enumerate() {
            for (b, (bf, bl)) in &items[n + 1..] {
                if af <= bl && bf <= al {
                    let (x, y) = (&plan.buffers[**a], &plan.buffers[**b]);
                    let (xo, yo) = (
                        x.arena_offset.expect("placed"),
                        y.arena_offset.expect("placed"),
                    );
                    assert!(
                        xo + x.bytes <= yo || yo + y.bytes <= xo,
                        "{}: {} and {} overlap",
                        case.label,
                        x.name,
                        y.name
                    );
                }
            }
        }
        for b in &plan.buffers {
            if let Some(o) = b.arena_offset {
                assert!(o + b.bytes <= plan.arena_bytes);
                assert_eq!(o % 256, 0);
            }
        }
    }
}

#[test]
fn long_contexts_split_the_kv_length() {
    let big = common::output(
        &common::cases(
            &common::root().join("examples/llama-3-8b.toml"),
            Precision::Bf16,
        )
        .remove(1),
    );
    let att: Vec<_> = big
        .plan
        .launches
        .iter()
        .filter(|l| l.op == "fused.decode_attention")
        .collect();
    assert_eq!(att.len(), 32);
    assert!(att.iter().all(|l| l.grid[2] > 1), "grid {:?}", att[0].grid);
    assert!(big
        .plan
        .buffers
        .iter()
        .any(|b| b.kind == BufferKind::Workspace));
    let source = big.source();
    assert!(source.contains("atomicAdd"), "split-KV combines by ticket");
    // GQA: 32 query heads over 8 KV heads, 4 per block.
    assert!(source.contains("G = 4"));
    let tiny = common::output(
        &common::cases(&common::root().join("examples/tiny.toml"), Precision::F32).remove(1),
    );
    assert!(tiny
        .plan
        .launches
        .iter()
        .filter(|l| l.op == "fused.decode_attention")
        .all(|l| l.grid[2] == 1));
}

#[test]
fn fused_caches_append_in_place_and_eager_caches_swap() {
    let path = common::root().join("examples/tiny.toml");
    let mut cases = common::cases(&path, Precision::F32);
    let fused = common::output(&cases.remove(1)).plan;
    let eager = common::output(&cases.remove(0)).plan;
    assert_eq!(fused.states.len(), 4);
    assert!(fused
        .states
        .iter()
        .all(|s| s.input.buffer == s.output.buffer));
    assert!(eager
        .states
        .iter()
        .all(|s| s.input.buffer != s.output.buffer));
    for s in &eager.states {
        assert!(matches!(
            eager.buffers[s.output.buffer].kind,
            BufferKind::StateNext { .. }
        ));
    }
}

#[test]
fn fp8_kernels_dequantize_with_their_scales() {
    let path = common::root().join("examples/tiny.toml");
    let out = common::output(&common::cases(&path, Precision::Fp8).remove(1));
    let src = out.source();
    assert!(
        src.contains("fu_load<__nv_fp8_e4m3, 16>"),
        "16-byte FP8 weight loads"
    );
    assert!(
        src.contains("fu_act_block_scale(") && src.contains("fu_as[m * NB + k / 32]"),
        "activation scales per block of 32 inputs"
    );
    assert!(
        src.contains("kr / ksc"),
        "FP8 KV cache quantized with its scale"
    );
    let weights = out
        .plan
        .buffers
        .iter()
        .filter(|b| matches!(&b.kind, BufferKind::Weight { name } if name.ends_with(".scale")))
        .count();
    // Seven GEMV weights per layer, the lm_head, and a key and a value scale per layer.
    assert_eq!(weights, 7 * 2 + 1 + 2 * 2, "scale buffers");
}

/// Device memory on the host, launches recorded and not run.
#[derive(Default)]
struct Memory {
    blocks: BTreeMap<u64, Vec<u8>>,
    next: u64,
}

impl Memory {
    fn block(&mut self, addr: u64) -> (&mut Vec<u8>, usize) {
        let (&base, v) = self
            .blocks
            .range_mut(..=addr)
            .next_back()
            .expect("an allocated address");
        (v, (addr - base) as usize)
    }
}

impl fusec_cuda::runtime::Device for Memory {
    fn alloc(&mut self, bytes: u64) -> Result<u64, fusec_cuda::runtime::RunError> {
        let a = self.next + 256;
        self.next = a + bytes.div_ceil(256) * 256;
        self.blocks.insert(a, vec![0; bytes as usize]);
        Ok(a)
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), fusec_cuda::runtime::RunError> {
        let (v, o) = self.block(addr);
        v[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn read(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, fusec_cuda::runtime::RunError> {
        let (v, o) = self.block(addr);
        Ok(v[o..o + len].to_vec())
    }
    fn load(&mut self, _: &fusec_codegen::Output) -> Result<(), fusec_cuda::runtime::RunError> {
        Ok(())
    }
    fn launch(
        &mut self,
        _: &str,
        _: [u32; 3],
        _: [u32; 3],
        _: u32,
        _: &[u64],
        _: i32,
    ) -> Result<(), fusec_cuda::runtime::RunError> {
        Ok(())
    }
    fn sync(&mut self) -> Result<(), fusec_cuda::runtime::RunError> {
        Ok(())
    }
}

struct Zeros;

impl fusec_cuda::runtime::WeightSource for Zeros {
    fn bytes(
        &self,
        _: &str,
        dtype: DType,
        dims: &[u64],
    ) -> Result<Vec<u8>, fusec_cuda::runtime::RunError> {
        Ok(vec![
            0;
            (dims.iter().product::<u64>() * dtype.size_bytes())
                as usize
        ])
    }
}

#[test]
fn reset_zeroes_the_caches_and_the_split_kv_workspace() {
    let case = common::cases(&common::root().join("examples/tiny.toml"), Precision::F32).remove(1);
    let split = fusec_codegen::Options {
        split_kv_min_len: 2,
        split_kv_min_chunk: 2,
        ..fusec_codegen::Options::default()
    };
    let out = fusec_codegen::generate(&case.graph, &case.shape, &split).expect("generates");
    let mut runner =
        fusec_cuda::runtime::Runner::new(Memory::default(), &out, &Zeros).expect("runner");
    let plan = runner.plan().clone();
    let kept: Vec<(usize, &str)> = plan
        .buffers
        .iter()
        .enumerate()
        .filter_map(|(i, b)| match &b.kind {
            BufferKind::Workspace => Some((i, "workspace")),
            BufferKind::State { .. } => Some((i, "state")),
            _ => None,
        })
        .collect();
    assert!(
        kept.iter().any(|(_, k)| *k == "workspace"),
        "split-KV has a workspace"
    );
    // Every byte of the caches and the workspace dirtied (a step cut short leaves
    // tickets counted), then reset.
    let mem = runner.device();
    for v in mem.blocks.values_mut() {
        v.iter_mut().for_each(|x| *x = 0xab);
    }
    runner.reset().expect("reset");
    // Every workspace and state buffer reads back zero; the weights (dirtied too, and
    // not the runner's to clear) still read 0xab.
    let dirty: usize = runner
        .device()
        .blocks
        .values()
        .map(|v| v.iter().filter(|&&x| x == 0xab).count())
        .sum();
    let cleared: u64 = kept.iter().map(|&(i, _)| plan.buffers[i].bytes).sum();
    let total: usize = runner.device().blocks.values().map(Vec::len).sum();
    assert_eq!(
        total - dirty,
        cleared as usize,
        "exactly the kept buffers are zeroed"
    );
    assert_eq!(runner.past(), 0);
}

/// A paged step's plan: each paged attention node is two launches, the write into the
/// pools first (binding them read-write) and the attention through the tables after
/// it (reading them only, and recording what it reads); the pools are states updated
/// in place; the pool and table sizes are the default covering `max_seq_len`; and the
/// plan is deterministic.
#[test]
fn a_paged_step_writes_every_row_before_attending() {
    let path = common::root().join("examples/tiny.toml");
    for case in common::paged_cases(&path, Precision::Bf16) {
        let out = common::output(&case);
        let again = common::output(&case);
        assert_eq!(out.source(), again.source(), "{}", case.label);
        let plan = &out.plan;
        let paged = plan.shape.paged.expect("the default paged sizes");
        assert_eq!(paged.max_blocks, case.shape.max_seq_len.div_ceil(16));
        assert_eq!(paged.pool_blocks, case.shape.batch * paged.max_blocks);
        let family = |l: &fusec_codegen::plan::Launch| {
            out.kernels
                .iter()
                .find(|k| k.name == l.kernel)
                .map(|k| k.family.clone())
                .expect("kernel")
        };
        let mut pairs = 0;
        for (i, l) in plan.launches.iter().enumerate() {
            if family(l) != "paged_write" {
                continue;
            }
            let next = &plan.launches[i + 1];
            assert_eq!(family(next), "paged_attention", "{}", case.label);
            assert_eq!(next.value, l.value, "{}: one node", case.label);
            assert!(l.paged.is_none() && next.paged.is_some());
            let pools: Vec<usize> = plan
                .states
                .iter()
                .map(|s| {
                    assert_eq!(s.input.buffer, s.output.buffer, "{}: in place", s.name);
                    s.input.buffer
                })
                .collect();
            let access = |l: &fusec_codegen::plan::Launch, access| {
                l.args
                    .iter()
                    .filter(|a| {
                        matches!(a, Arg::Buffer { buffer, access: x } if pools.contains(buffer) && *x == access)
                    })
                    .count()
            };
            use fusec_codegen::plan::Access;
            assert_eq!(access(l, Access::ReadWrite), 2, "{}", case.label);
            assert_eq!(access(next, Access::Read), 2, "{}", case.label);
            assert_eq!(
                access(next, Access::ReadWrite) + access(next, Access::Write),
                0
            );
            pairs += 1;
        }
        let layers = plan.states.len() / 2;
        assert!(layers > 0, "{}: pools", case.label);
        assert_eq!(pairs, layers, "{}", case.label);
        // Both launches of a layer record views of the buffers they bind only.
        for l in &plan.launches {
            for v in &l.views {
                assert!(l
                    .args
                    .iter()
                    .any(|a| matches!(a, Arg::Buffer { buffer, .. } if *buffer == v.buffer)));
            }
        }
    }
}

/// The cost model counts what a paged plan launches and reads: its CUDA launches are
/// the plan's (two per paged attention), and from the rows' lengths (position + 1) it
/// reads the pools' bytes `LaunchPlan::paged_kv_bytes_read` counts for their positions.
#[test]
fn the_cost_model_counts_a_paged_plan() {
    let path = common::root().join("examples/tiny.toml");
    for case in common::paged_cases(&path, Precision::Bf16) {
        let out = common::output(&case);
        let paged = out.plan.shape.paged.expect("paged");
        let positions: [i32; 3] = [0, 37, 100];
        let lengths: Vec<u64> = positions.iter().map(|&p| p as u64 + 1).collect();
        let b = fusec_ir::step::paged_bindings(&lengths, 16, case.shape.max_seq_len);
        assert_eq!(b.get(fusec_ir::step::MAX_BLOCKS), Some(paged.max_blocks));
        let cost = fusec_ir::cost::graph_cost(&case.graph, &b).expect("bound");
        assert_eq!(
            cost.cuda_launches,
            out.plan.launches.len() as u64,
            "{}",
            case.label
        );
        assert_eq!(
            cost.floor.kv_read_bytes,
            out.plan.paged_kv_bytes_read(&positions),
            "{}",
            case.label
        );
    }
}

/// `Runner::step_paged` refuses inputs that do not fit the plan, and a dense plan.
#[test]
fn step_paged_checks_its_inputs() {
    use fusec_cuda::runtime::{PagedInputs, RunError, Runner};
    let path = common::root().join("examples/tiny.toml");
    let case = common::paged_cases(&path, Precision::F32).remove(1);
    let out = common::output(&case);
    let batch = case.shape.batch as usize;
    let width = out.plan.shape.paged.expect("paged").max_blocks as usize;
    let mut runner = Runner::new(Memory::default(), &out, &Zeros).expect("runner");
    let (tokens, positions) = (vec![1; batch], vec![0; batch]);
    let table = vec![0; batch * width];
    let ok = runner.step_paged(&PagedInputs {
        tokens: &tokens,
        positions: &positions,
        tables: &[(fusec_ir::step::BLOCK_TABLE, &table)],
    });
    assert!(ok.is_ok(), "{ok:?}");
    let bad = |r: Result<_, RunError>, what: &str| {
        assert!(
            matches!(&r, Err(RunError::Input { name, .. }) if name == what),
            "{what}: {r:?}"
        )
    };
    let short = vec![0; batch * width - 1];
    bad(
        runner.step_paged(&PagedInputs {
            tokens: &tokens,
            positions: &positions,
            tables: &[(fusec_ir::step::BLOCK_TABLE, &short)],
        }),
        fusec_ir::step::BLOCK_TABLE,
    );
    bad(
        runner.step_paged(&PagedInputs {
            tokens: &tokens,
            positions: &positions,
            tables: &[],
        }),
        fusec_ir::step::BLOCK_TABLE,
    );
    bad(
        runner.step_paged(&PagedInputs {
            tokens: &tokens,
            positions: &positions,
            tables: &[
                (fusec_ir::step::BLOCK_TABLE, &table),
                ("block_table.window8", &table),
            ],
        }),
        "block_table.window8",
    );
    bad(
        runner.step_paged(&PagedInputs {
            tokens: &[],
            positions: &positions,
            tables: &[(fusec_ir::step::BLOCK_TABLE, &table)],
        }),
        fusec_ir::step::INPUT_IDS,
    );
    bad(
        runner.step_paged(&PagedInputs {
            tokens: &[-1; 64][..batch],
            positions: &positions,
            tables: &[(fusec_ir::step::BLOCK_TABLE, &table)],
        }),
        fusec_ir::step::INPUT_IDS,
    );
    // A dense plan has no paged step.
    let dense = common::output(&common::cases(&path, Precision::F32).remove(1));
    let mut runner = Runner::new(Memory::default(), &dense, &Zeros).expect("runner");
    let r = runner.step_paged(&PagedInputs {
        tokens: &tokens,
        positions: &positions,
        tables: &[],
    });
    assert!(matches!(r, Err(RunError::Plan(_))), "{r:?}");
}

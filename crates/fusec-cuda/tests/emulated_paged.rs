//! The paged KV cache's kernels (`fused.paged_attention` lowered to a write kernel and
//! an attention kernel reading through block tables), run on the CPU emulation of
//! `tests/emulate`, against the CPU executor running the same paged step graph with
//! the same inputs: a ragged batch whose sequences have different lengths, blocks of
//! one sequence scattered over the pool, one sequence in consecutive rows at positions
//! `p` and `p + 1` (a prompt chunk decoded as rows: the later row reads the entry the
//! earlier row writes in the same step), and Gemma 3's sliding-window layers beside its
//! global ones (two block tables). Needs a C++20 compiler (`$CXX` or `g++`); without
//! one the test says so loudly and passes.

mod common;
mod emulate;

use std::collections::HashMap;
use std::path::PathBuf;

use common::stages;
use fusec_codegen::{generate, DecodeShape, LaunchPlan, Options, PagedShape};
use fusec_cuda::runtime::{CheckpointWeights, PagedInputs, Runner};
use fusec_exec::{Executor, Tensor, Value, Weights};
use fusec_ir::shape::Bindings;
use fusec_ir::{step, FusedOp, Graph, InputKind, Op, OutputKind};
use fusec_model::blocks::StepDims;
use fusec_model::frontend::Precision;
use fusec_model::Registry;

/// Positions per block, blocks per table row (so 16 positions a sequence), blocks in
/// each pool, rows per step.
const BLOCK: u64 = 4;
const WIDTH: usize = 4;
const POOL: usize = 12;
const ROWS: usize = 3;

/// Each sequence's blocks, scattered over the pool and interleaved with the others'.
const TABLES: [[i32; WIDTH]; 3] = [[5, 0, 9, 2], [1, 7, 3, 11], [4, 10, 6, 8]];

/// The steps: `(sequence, position)` per row. Sequence 0 takes consecutive rows in
/// steps 0, 2 (across a block boundary), 4 (three rows), 6 and 8; the lengths differ
/// throughout, and sequence 0 ends past Gemma 3's window of 8.
const STEPS: [[(usize, i32); ROWS]; 9] = [
    [(0, 0), (0, 1), (1, 0)],
    [(0, 2), (1, 1), (2, 0)],
    [(0, 3), (0, 4), (1, 2)],
    [(0, 5), (2, 1), (1, 3)],
    [(0, 6), (0, 7), (0, 8)],
    [(0, 9), (1, 4), (2, 2)],
    [(0, 10), (0, 11), (2, 3)],
    [(0, 12), (1, 5), (2, 4)],
    [(0, 13), (0, 14), (1, 6)],
];

/// The token sequence `s` feeds at position `p`.
fn token(s: usize, p: i32) -> i32 {
    (3 + 7 * p + 11 * s as i32) % 29 + 1
}

fn fixture(name: &str) -> PathBuf {
    common::root().join("tests/fixtures").join(name)
}

/// The paged step graph of a fixture in f32, eager or fused.
fn paged_graph(name: &str, fused: bool) -> (Graph, Weights) {
    let spec = stages::in_precision(&common::spec(&fixture(name)), Precision::F32);
    let arch = Registry::builtin()
        .architecture(&spec.architecture)
        .expect("architecture");
    let eager = arch
        .build_step(&spec.model, &StepDims::paged(BLOCK))
        .expect("builds the paged step");
    let weights = Weights::load(&fixture(name), &eager).expect("fixture weights");
    let graph = match fused {
        false => eager,
        true => {
            let rules = stages::rules().expect("rules");
            stages::fuse(&spec, &eager, &rules).expect("fuses")
        }
    };
    (graph, weights)
}

/// The table rows of one step for table input `name`: each row's sequence's blocks;
/// a sliding window's table has the blocks wholly before the window unset (`-1`), as
/// `fusec_exec::PagedSession` frees them.
fn table_rows(name: &str, rows: &[(usize, i32)]) -> Vec<i32> {
    let window = step::table_window(name)
        .expect("a block table")
        .map(|w| w as i32);
    let mut v = Vec::new();
    for &(s, p) in rows {
        let first = window.map_or(0, |w| (p + 1 - w).max(0) / BLOCK as i32);
        v.extend(
            TABLES[s]
                .iter()
                .enumerate()
                .map(|(i, &b)| if (i as i32) < first { -1 } else { b }),
        );
    }
    v
}

fn table_names(graph: &Graph) -> Vec<String> {
    graph
        .inputs()
        .into_iter()
        .filter(|(_, name, kind)| *kind == InputKind::Data && step::table_window(name).is_some())
        .map(|(_, name, _)| name.to_string())
        .collect()
}

/// The CPU executor on the paged graph, its pools carried from step to step.
struct Cpu {
    exec: Executor,
    pools: HashMap<String, Tensor>,
}

impl Cpu {
    fn new(graph: &Graph, weights: &Weights) -> Cpu {
        let exec = Executor::new(graph.clone(), weights).expect("executor");
        let mut pools = HashMap::new();
        let b = bindings(1);
        for (id, name, kind) in graph.inputs() {
            if kind == InputKind::State {
                let ty = graph.ty(id).tensor().expect("pool");
                let dims: Vec<usize> = ty
                    .shape
                    .dims()
                    .iter()
                    .map(|d| d.eval(&b).expect("bound") as usize)
                    .collect();
                pools.insert(
                    name.to_string(),
                    Tensor::zeros(ty.dtype, &dims).expect("zeros"),
                );
            }
        }
        Cpu { exec, pools }
    }

    /// One step over `rows`: each row's logits.
    fn step(&mut self, graph: &Graph, rows: &[(usize, i32)]) -> Vec<Vec<f32>> {
        let n = rows.len();
        let mut inputs: HashMap<String, Tensor> = std::mem::take(&mut self.pools);
        let ids = rows.iter().map(|&(s, p)| token(s, p)).collect();
        let pos = rows.iter().map(|&(_, p)| p).collect();
        inputs.insert(
            step::INPUT_IDS.into(),
            Tensor::from_i32(&[n, 1], ids).expect("ids"),
        );
        inputs.insert(
            step::POSITION_IDS.into(),
            Tensor::from_i32(&[n, 1], pos).expect("positions"),
        );
        for name in table_names(graph) {
            let t = Tensor::from_i32(&[n, WIDTH], table_rows(&name, rows)).expect("table");
            inputs.insert(name, t);
        }
        let out = self.exec.run(&bindings(n), inputs).expect("CPU step");
        let mut logits = Vec::new();
        for (name, kind, value) in out.outputs {
            let Value::Tensor(t) = value else { continue };
            match kind {
                OutputKind::State => {
                    self.pools.insert(name.to_string(), t);
                }
                OutputKind::Data if &*name == step::LOGITS => logits = t.to_vec_f32(),
                OutputKind::Data => {}
            }
        }
        let vocab = logits.len() / n;
        logits.chunks(vocab).map(<[f32]>::to_vec).collect()
    }
}

fn bindings(batch: usize) -> Bindings {
    Bindings::new()
        .with(step::BATCH, batch as u64)
        .with(step::POOL_BLOCKS, POOL as u64)
        .with(step::MAX_BLOCKS, WIDTH as u64)
}

fn shape() -> DecodeShape {
    DecodeShape::new(ROWS as u64, BLOCK * WIDTH as u64).with_paged(PagedShape {
        pool_blocks: POOL as u64,
        max_blocks: WIDTH as u64,
    })
}

/// The largest difference of two logit rows relative to the reference's largest
/// magnitude.
fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Runs every step of [`STEPS`] on both, comparing every row's logits; returns the
/// largest relative difference.
fn compare(cxx: &str, label: &str, graph: &Graph, weights: &Weights, options: &Options) -> f32 {
    let out = generate(graph, &shape(), options).unwrap_or_else(|e| panic!("{label}: {e}"));
    let paged_launches = out
        .plan
        .launches
        .iter()
        .filter(|l| l.paged.is_some())
        .count();
    assert!(paged_launches > 0, "{label}: paged attention launches");
    let dir = std::env::temp_dir().join(format!("fusec-emu-{}-{label}", std::process::id()));
    let dev = emulate::Emulator::new(cxx.to_string(), &dir);
    let mut gpu = Runner::new(dev, &out, &CheckpointWeights(weights))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut cpu = Cpu::new(graph, weights);
    let names = table_names(graph);
    let mut worst = 0f32;
    for (i, rows) in STEPS.iter().enumerate() {
        let tokens: Vec<i32> = rows.iter().map(|&(s, p)| token(s, p)).collect();
        let positions: Vec<i32> = rows.iter().map(|&(_, p)| p).collect();
        let values: Vec<Vec<i32>> = names.iter().map(|n| table_rows(n, rows)).collect();
        let tables: Vec<(&str, &[i32])> = names
            .iter()
            .zip(&values)
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        let got = gpu
            .step_paged(&PagedInputs {
                tokens: &tokens,
                positions: &positions,
                tables: &tables,
            })
            .unwrap_or_else(|e| panic!("{label}: step {i}: {e}"));
        let want = cpu.step(graph, rows);
        for (r, (g, w)) in got.logits.iter().zip(&want).enumerate() {
            let rel = max_rel(g, w);
            assert!(
                rel < 1e-4,
                "{label}: step {i} row {r} {:?}: relative difference {rel:.2e}",
                rows[r]
            );
            assert_eq!(got.next[r] as usize, argmax(w), "{label}: step {i} row {r}");
            worst = worst.max(rel);
        }
    }
    println!("{label}: max relative logit difference {worst:.2e}");
    let _ = std::fs::remove_dir_all(&dir);
    worst
}

fn compiler() -> Option<String> {
    emulate::compiler_or_report("the paged CUDA kernels")
}

#[test]
fn paged_kernels_match_the_cpu_executor_on_a_ragged_batch() {
    let Some(cxx) = compiler() else { return };
    for fused in [false, true] {
        let (graph, weights) = paged_graph("hf-tiny-llama-s0", fused);
        let label = format!("llama-paged-{}", if fused { "fused" } else { "eager" });
        // Fused, the RoPE is in the paged kernels (`fused.paged_decode_attention`).
        let op = if fused {
            FusedOp::PagedDecodeAttention
        } else {
            FusedOp::PagedAttention
        };
        assert!(
            graph.node_ids().any(|n| *graph.op(n) == Op::Fused(op)),
            "{label}"
        );
        compare(&cxx, &label, &graph, &weights, &Options::default());
    }
}

#[test]
fn split_kv_paged_attention_matches_the_cpu_executor() {
    let Some(cxx) = compiler() else { return };
    let (graph, weights) = paged_graph("hf-tiny-llama-s0", true);
    // Two positions per split: every row past its second position spreads over the
    // splits, each row choosing its count from its own length.
    let split = Options {
        split_kv_min_len: 4,
        split_kv_min_chunk: 2,
        target_blocks: 64,
        ..Options::default()
    };
    let out = generate(&graph, &shape(), &split).expect("generates");
    assert!(
        out.plan
            .launches
            .iter()
            .any(|l| l.paged.is_some() && l.grid[2] > 1),
        "splits"
    );
    compare(&cxx, "llama-paged-split", &graph, &weights, &split);
}

/// Gemma 3: sliding-window layers (window 8, their own block table) and global ones.
#[test]
fn sliding_window_paged_layers_match_the_cpu_executor() {
    let Some(cxx) = compiler() else { return };
    let (graph, weights) = paged_graph("hf-tiny-gemma3-s0", true);
    let names = table_names(&graph);
    assert!(
        names.contains(&step::window_block_table(8)),
        "a window's table: {names:?}"
    );
    compare(&cxx, "gemma3-paged", &graph, &weights, &Options::default());
}

/// The launch plan counts the pool bytes of the positions each row attends, as the CPU
/// kernel counts them: `2 * attended * KV * hd * 4` bytes per layer in f32.
#[test]
fn the_plan_counts_the_attended_positions() {
    let (graph, _) = paged_graph("hf-tiny-gemma3-s0", true);
    let out = generate(&graph, &shape(), &Options::default()).expect("generates");
    let plan: &LaunchPlan = &out.plan;
    let positions = [14, 3, 0];
    let mut expected = 0u64;
    for n in graph.node_ids() {
        let (pool, table, window) = match graph.op(n) {
            Op::Fused(FusedOp::PagedDecodeAttention) => (5, 7, 10),
            Op::Fused(FusedOp::PagedAttention) => (3, 5, 8),
            _ => continue,
        };
        let ops = graph.operands(n);
        let pool = graph.ty(ops[pool]).tensor().expect("pool");
        let dims: Vec<u64> = pool
            .shape
            .dims()
            .iter()
            .filter_map(|d| d.as_fixed())
            .collect();
        let (kv, hd) = (dims[0], dims[2]);
        let _ = table;
        let w = ops.get(window).map(|&s| match graph.op(s) {
            Op::Scalar { value } => value.0 as i32,
            other => panic!("window {other}"),
        });
        for &p in &positions {
            let start = w.map_or(0, |w| (p + 1 - w).max(0));
            expected += 2 * (p + 1 - start) as u64 * kv * hd * 4;
        }
    }
    assert!(expected > 0);
    assert_eq!(plan.paged_kv_bytes_read(&positions), expected);
    // A row past the table's reach reads nothing.
    assert_eq!(plan.paged_kv_bytes_read(&[16, -1, 99]), 0);
}

/// A position past the table's reach and a block id outside the pool write nothing and
/// read nothing (the CPU executor refuses such a step): the valid row of that step
/// matches the CPU executor running it alone, and the next step, whose rows read the
/// slots a wrapped position (`16 % 16 = 0`) or a wrapped block id (`13 % 12 = 1`)
/// would have hit, matches the CPU executor that never ran the bad rows.
#[test]
fn bad_positions_and_block_ids_touch_nothing() {
    let Some(cxx) = compiler() else { return };
    let (graph, weights) = paged_graph("hf-tiny-gemma3-s0", true);
    let out = generate(&graph, &shape(), &Options::default()).expect("generates");
    let dir = std::env::temp_dir().join(format!("fusec-emu-{}-paged-bad", std::process::id()));
    let dev = emulate::Emulator::new(cxx, &dir);
    let mut gpu = Runner::new(dev, &out, &CheckpointWeights(&weights)).expect("runner");
    let mut cpu = Cpu::new(&graph, &weights);
    let names = table_names(&graph);
    // One step on the device: `rows`, with `bad` replacing table row `r` entirely.
    let mut run = |rows: &[(usize, i32)], bad: Option<(usize, [i32; WIDTH])>| {
        let tokens: Vec<i32> = rows.iter().map(|&(s, p)| token(s, p)).collect();
        let positions: Vec<i32> = rows.iter().map(|&(_, p)| p).collect();
        let values: Vec<Vec<i32>> = names
            .iter()
            .map(|n| {
                let mut v = table_rows(n, rows);
                if let Some((r, row)) = bad {
                    v[r * WIDTH..(r + 1) * WIDTH].copy_from_slice(&row);
                }
                v
            })
            .collect();
        let tables: Vec<(&str, &[i32])> = names
            .iter()
            .zip(&values)
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        gpu.step_paged(&PagedInputs {
            tokens: &tokens,
            positions: &positions,
            tables: &tables,
        })
        .expect("the device runs a step with bad rows")
    };
    let first = [(0, 0), (1, 0), (2, 0)];
    let got = run(&first, None);
    let want = cpu.step(&graph, &first);
    for (g, w) in got.logits.iter().zip(&want) {
        assert!(max_rel(g, w) < 1e-4);
    }
    // Row 1 past the reach; row 2 (sequence 2 at position 0) through block 13 of 12.
    let bad = [(0, 1), (1, 16), (2, 0)];
    let got = run(&bad, Some((2, [13, 10, 6, 8])));
    let want = cpu.step(&graph, &bad[..1]);
    assert!(max_rel(&got.logits[0], &want[0]) < 1e-4, "the valid row");
    for row in &got.logits[1..] {
        assert!(row.iter().all(|x| x.is_finite()), "the bad rows' logits");
    }
    // Sequence 2 feeds position 0 again: its bad write went nowhere.
    let next = [(0, 2), (1, 1), (2, 0)];
    let got = run(&next, None);
    let want = cpu.step(&graph, &next);
    for (r, (g, w)) in got.logits.iter().zip(&want).enumerate() {
        let rel = max_rel(g, w);
        assert!(rel < 1e-4, "row {r} after the bad step: {rel:.2e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

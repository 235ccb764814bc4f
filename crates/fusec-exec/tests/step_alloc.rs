//! Heap allocations of steady-state decode steps, counted by a global allocator: a
//! steady-state step of the CPU executor allocates nothing, for the eager graph and
//! for the fused graph in `f32`, in `bf16` and lowered to FP8, whether it is driven
//! through [`Executor::run_into`] or through [`Session::step_into`], and for a ragged
//! batch over a paged KV cache through [`PagedSession::step_into`].
//!
//! This file holds a single test on purpose: the counting allocator is global to the
//! test binary, and a second test running on another thread would add its own
//! allocations to the count.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::fuse;
use fusec_exec::{
    calibrate, Executor, PagedConfig, PagedSession, PagedStep, RunOutput, Session, StepOutput,
    Tensor, Weights,
};
use fusec_ir::{DType, Graph, InputKind, OutputKind};
use fusec_model::arch::llama;
use fusec_model::blocks::StepDims;
use fusec_model::load_model;
use fusec_rewrite::precision::{lower_fp8, Fp8Options};

/// The system allocator, counting the allocations (and reallocations) made while
/// counting is on, on any thread, rayon's workers included.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is
// only a side effect.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The allocations `f` makes, on any thread.
fn count<R>(f: impl FnOnce() -> R) -> (R, usize) {
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let r = f();
    COUNTING.store(false, Ordering::SeqCst);
    (r, ALLOCATIONS.load(Ordering::SeqCst))
}

/// Decode steps run per variant, from an empty cache; the caches have room for all.
const STEPS: usize = 32;

/// The steps before this one warm the buffer pool up, and are not counted. Some
/// buffers grow with the context (the mask; in the eager graph the concatenated KV
/// caches, their grouped-query copies and the scores), and the pool's size classes
/// are powers of two, so the first step whose buffers enter a new class allocates
/// them, and so does the step after it, whose caches of the previous step are still
/// alive when it makes the new ones. With the tiny model (2 KV heads and 4 query
/// heads of 16 values), every such buffer of steps 16 to 31 (17 to 32 positions)
/// stays in one class, so from step 18 on a step must find every buffer it needs in
/// the pool.
const WARM_UP: usize = 18;

/// The data inputs of a step at `past` cached positions: every id is `past`, every
/// float input (the mask) zero. Each is also pushed to `held`: the harness holds a
/// handle on its inputs during the step, so that the executor finds their buffers
/// shared and drops them instead of giving them to its pool. A session's inputs come
/// from that pool and go back to it; buffers the harness made would instead add to it
/// every step and hide allocations the step makes.
fn data_inputs(
    graph: &Graph,
    past: usize,
    inputs: &mut HashMap<String, Tensor>,
    held: &mut Vec<Tensor>,
) {
    let b = fusec_exec::decode::bindings(1, past);
    for (id, name, kind) in graph.inputs() {
        if kind != InputKind::Data {
            continue;
        }
        let ty = graph.ty(id).tensor().expect("tensor input");
        let shape = common::input_shape(graph, id, &b);
        let n = shape.iter().product();
        let t = match ty.dtype {
            DType::I32 => Tensor::from_i32(&shape, vec![past as i32; n]),
            dtype => Tensor::zeros(dtype, &shape),
        };
        let t = t.expect("sizes match");
        held.push(t.clone());
        inputs.insert(name.to_string(), t);
    }
}

/// The allocations of each of [`STEPS`] steps of `graph` driven through
/// [`Executor::run_into`], with the inputs by name and one [`RunOutput`] reused.
fn executor_steps(graph: &Graph, weights: &Weights) -> Vec<usize> {
    let mut exec = Executor::new(graph.clone(), weights).expect("plans");
    // Empty caches with room for every step, as a session makes them.
    let b0 = fusec_exec::decode::bindings(1, 0);
    let mut inputs = HashMap::new();
    for (id, name, kind) in graph.inputs() {
        if kind != InputKind::State {
            continue;
        }
        let ty = graph.ty(id).tensor().expect("tensor state");
        let shape = common::input_shape(graph, id, &b0);
        let cache =
            Tensor::zeros_with_capacity(ty.dtype, &shape, 2, STEPS + 1).expect("cache shape");
        inputs.insert(name.to_string(), cache);
    }
    let mut out = RunOutput::new();
    let mut held = Vec::new();
    let mut counts = Vec::new();
    for past in 0..STEPS {
        // Only the step itself is counted: the harness's own inputs and the
        // bookkeeping that feeds the new caches back are not part of it.
        held.clear();
        data_inputs(graph, past, &mut inputs, &mut held);
        let b = fusec_exec::decode::bindings(1, past);
        let (result, n) = count(|| exec.run_into(&b, &mut inputs, &mut out));
        counts.push(n);
        result.expect("step runs");
        for (name, kind, value) in out.outputs.drain(..) {
            match kind {
                OutputKind::State => {
                    inputs.insert(name.to_string(), value.into_tensor().expect("cache tensor"));
                }
                // Dropped, the logits' buffer would be freed, and the next step would
                // allocate one: a decode loop gives back what it has read.
                OutputKind::Data => value.recycle(),
            }
        }
    }
    counts
}

/// The allocations of each of [`STEPS`] steps of `graph` driven through
/// [`Session::step_into`], with one [`StepOutput`] reused. Everything the session does
/// is counted, its inputs and the new caches included.
fn session_steps(graph: &Graph, weights: &Weights) -> Vec<usize> {
    let exec = Executor::new(graph.clone(), weights).expect("plans");
    let mut session = Session::with_capacity(exec, 1, STEPS + 1).expect("session");
    let mut out = StepOutput::default();
    let mut token = [1];
    let mut counts = Vec::new();
    for _ in 0..STEPS {
        let (result, n) = count(|| session.step_into(&token, &mut out));
        counts.push(n);
        result.expect("step runs");
        token = [out.next[0]];
    }
    counts
}

/// The steps of a paged session not counted: as [`WARM_UP`], and the second sequence
/// joins at step 4, so its buffers settle four steps later.
const PAGED_WARM_UP: usize = 22;

/// The allocations of each of [`STEPS`] steps of the tiny example's fused paged graph
/// driven through [`PagedSession::step_into`]: a ragged batch of two sequences, the
/// second joining at step 4, blocks of 4 positions taken from the pool as they grow.
fn paged_steps() -> Vec<usize> {
    let spec = load_model(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tiny.toml"))
        .expect("tiny example loads");
    let paged = fuse(&llama::build_with(&spec.model, &StepDims::paged(4)).expect("builds"));
    let weights = Weights::random(&paged, 0).expect("random weights");
    let exec = Executor::new(paged, &weights).expect("plans");
    let config = PagedConfig {
        pool_blocks: 32,
        max_len: STEPS + 1,
    };
    let mut session = PagedSession::new(exec, config).expect("paged session");
    session.add(&[1, 2, 3, 4, 5]).expect("joins");
    let mut out = PagedStep::default();
    let mut counts = Vec::new();
    for step in 0..STEPS {
        if step == 4 {
            session.add(&[7, 8]).expect("joins");
        }
        let (result, n) = count(|| session.step_into(&mut out));
        counts.push(n);
        result.expect("step runs");
    }
    counts
}

/// The tiny example's graphs with random weights: eager and fused in `f32`, fused in
/// `bf16`, and fused in `bf16` lowered to FP8 (weights quantized from the `bf16` ones,
/// KV-cache scales calibrated on a short prompt, as `fusec run` does).
fn variants() -> Vec<(&'static str, Graph, Weights)> {
    let spec = load_model(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tiny.toml"))
        .expect("tiny example loads");
    let eager = llama::build(&spec.model).expect("graph builds");
    let fused = fuse(&eager);
    let mut model = spec.model.clone();
    model.dtype = DType::Bf16;
    let bf16 = fuse(&llama::build(&model).expect("graph builds"));
    let fp8 = lower_fp8(&bf16, &Fp8Options::default()).expect("lowers");
    let base = Weights::random(&bf16, 0).expect("random weights");
    let (scales, _) = calibrate::calibrate_kv_scales(&fp8, &bf16, &base, &[vec![3, 1, 4, 1]])
        .expect("calibrates");
    let fp8_weights = fusec_weights::lower_weights(&base, &fp8, &scales).expect("quantizes");
    let random = |g: &Graph| Weights::random(g, 0).expect("random weights");
    vec![
        ("eager f32", eager.clone(), random(&eager)),
        ("fused f32", fused.clone(), random(&fused)),
        ("fused bf16", bf16, base),
        ("fused fp8", fp8, fp8_weights),
    ]
}

#[test]
fn a_steady_state_decode_step_allocates_nothing() {
    // The steps run inside one rayon pool, as a server's decode loop would: kernels
    // then hand their parallel work to the pool from one of its own threads, through
    // that thread's queue, where a thread outside the pool would go through rayon's
    // global queue, which allocates a block every 63 jobs (a count that varies from
    // step to step for reasons that are not the executor's).
    let threads = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("thread pool");
    let mut failures = Vec::new();
    for (name, graph, weights) in variants() {
        let (exec, session) = threads.install(|| {
            (
                executor_steps(&graph, &weights),
                session_steps(&graph, &weights),
            )
        });
        for (driver, counts) in [("executor", exec), ("session", session)] {
            let steady = &counts[WARM_UP..];
            eprintln!(
                "{name} ({driver}): allocations per steady-state step: {:?}",
                steady
            );
            if steady.iter().any(|&c| c != 0) {
                failures.push(format!(
                    "{name} ({driver}): expected 0 per steady-state step, counted {counts:?}"
                ));
            }
        }
    }
    let paged = threads.install(paged_steps);
    eprintln!(
        "fused f32 paged (paged session): allocations per steady-state step: {:?}",
        &paged[PAGED_WARM_UP..]
    );
    if paged[PAGED_WARM_UP..].iter().any(|&c| c != 0) {
        failures.push(format!(
            "fused f32 paged (paged session): expected 0 per steady-state step, counted {paged:?}"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

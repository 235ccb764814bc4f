//! Heap allocations of a steady-state decode step of the fused graph, counted by a
//! global allocator.
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
use fusec_exec::{Executor, Tensor, Weights};
use fusec_ir::build::eager_decode_graph;
use fusec_ir::frontend::load_model;
use fusec_ir::{DType, Graph, InputKind, OutputKind};

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

/// The data inputs of a step at `past` cached positions: every id is `past`, every
/// float input (the mask) zero.
fn data_inputs(graph: &Graph, past: usize, inputs: &mut HashMap<String, Tensor>) {
    let b = fusec_exec::decode::bindings(1, past);
    for (id, name, kind) in graph.inputs() {
        if kind != InputKind::Data {
            continue;
        }
        let ty = graph.ty(id).tensor().expect("tensor input");
        let shape: Vec<usize> = ty
            .shape
            .eval(&b)
            .expect("bound")
            .iter()
            .map(|&d| d as usize)
            .collect();
        let n = shape.iter().product();
        let t = match ty.dtype {
            DType::I32 => Tensor::from_i32(&shape, vec![past as i32; n]),
            dtype => Tensor::zeros(dtype, &shape),
        };
        inputs.insert(name.to_string(), t.expect("sizes match"));
    }
}

#[test]
fn a_steady_state_fused_decode_step_allocates_the_same_bounded_amount_every_step() {
    let spec = load_model(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tiny.toml"))
        .expect("tiny example loads");
    let graph = fuse(&eager_decode_graph(&spec.model).expect("graph builds"));
    let weights = Weights::random(&graph, 0).expect("random weights");
    let mut exec = Executor::new(graph.clone(), &weights).expect("plans");

    // Empty caches with room for every step, as a session makes them.
    let steps = 24;
    let b0 = fusec_exec::decode::bindings(1, 0);
    let mut inputs = HashMap::new();
    for (id, name, kind) in graph.inputs() {
        if kind != InputKind::State {
            continue;
        }
        let ty = graph.ty(id).tensor().expect("tensor state");
        let shape: Vec<usize> = ty
            .shape
            .eval(&b0)
            .expect("bound")
            .iter()
            .map(|&d| d as usize)
            .collect();
        let cache =
            Tensor::zeros_with_capacity(ty.dtype, &shape, 2, steps + 1).expect("cache shape");
        inputs.insert(name.to_string(), cache);
    }
    // The steps run inside one rayon pool, as a server's decode loop would: kernels
    // then hand their parallel work to the pool from one of its own threads, through
    // that thread's queue, where a thread outside the pool would go through rayon's
    // global queue, which allocates a block every 63 jobs (a count that varies from
    // step to step for reasons that are not the executor's).
    let threads = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("thread pool");
    let counts = threads.install(|| {
        let mut counts = Vec::new();
        for past in 0..steps {
            data_inputs(&graph, past, &mut inputs);
            let b = fusec_exec::decode::bindings(1, past);
            // Only the step itself is counted: the harness's own inputs and the
            // bookkeeping that feeds the new caches back are not part of it.
            ALLOCATIONS.store(0, Ordering::SeqCst);
            COUNTING.store(true, Ordering::SeqCst);
            let out = exec.run_restoring(&b, &mut inputs);
            COUNTING.store(false, Ordering::SeqCst);
            counts.push(ALLOCATIONS.load(Ordering::SeqCst));
            let out = out.expect("step runs");
            for (name, kind, value) in out.outputs {
                if kind == OutputKind::State {
                    inputs.insert(name.to_string(), value.into_tensor().expect("cache tensor"));
                }
            }
        }
        counts
    });
    // The first steps warm the buffer pool up; after that every step must allocate
    // the same number of times (nothing grows with the context).
    let steady = &counts[4..];
    assert!(
        steady.iter().all(|&c| c == steady[0]),
        "allocations per step vary: {counts:?}"
    );
    eprintln!("allocations per steady-state step: {}", steady[0]);
    assert!(
        steady[0] <= STEADY_STATE_ALLOCATIONS,
        "a steady-state step allocated {} times (budget {STEADY_STATE_ALLOCATIONS}): {counts:?}",
        steady[0]
    );
}

/// The allocations a steady-state step of the tiny fused f32 graph makes today. The
/// goal is zero and it is not reached: what is left is the small headers of the
/// tensors a step creates (the shape and stride vectors of every kernel result and
/// view, and of the elements a `get` takes out of a fused kernel's results), scratch
/// vectors inside a few kernels (attention rows, broadcast strides, RoPE), and the
/// step's list of outputs with their names. Kernel output buffers, their `Arc`s, the
/// bound weights' handles and the executor's per-node operand lists are reused from
/// step to step. This bound keeps the count
/// from creeping up while the rest is brought down.
const STEADY_STATE_ALLOCATIONS: usize = 262;

//! The executor's hand-written strided loops against the same loops written with
//! ndarray views, at decode shapes: `cargo bench -p fusec-exec --bench views`. It
//! prints time per call of each and their ratio, and the heap allocations of making an
//! ndarray view of rank 4 and of rank 5 (a grouped-query `expand`), which is why the
//! kernels keep their own views (see the crate documentation). Timings are
//! benchmarks, never test assertions.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use fusec_exec::kernels::elementwise::{binary, Arg};
use fusec_exec::kernels::movement::copy;
use fusec_exec::ndarray::{ArrayViewMutD, IxDyn, Zip};
use fusec_exec::{SplitMix64, Tensor, Value};
use fusec_ir::{BinaryOp, DType};

/// Counts allocations, to show which views allocate.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

#[allow(unsafe_code)]
// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn random(shape: &[usize], rng: &mut SplitMix64) -> Tensor {
    let n = shape.iter().product();
    let values = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_f32(DType::F32, shape, values).expect("sizes match")
}

/// Mean seconds per call of `f` over enough calls to take about half a second.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let mut calls = 1u32;
    loop {
        let start = Instant::now();
        for _ in 0..calls {
            f();
        }
        let secs = start.elapsed().as_secs_f64();
        if secs > 0.5 {
            return secs / f64::from(calls);
        }
        calls *= 2;
    }
}

fn report(what: &str, hand: f64, nd: f64) {
    println!(
        "{what:<48} hand-written {:>9.2} us   ndarray {:>9.2} us   ndarray/hand {:>5.2}",
        hand * 1e6,
        nd * 1e6,
        nd / hand
    );
}

fn main() {
    let mut rng = SplitMix64::new(1);
    // A KV cache of llama-125m at 164 positions, viewed transposed ([B,S,H,hd] from
    // [B,H,S,hd]): the copy a `transpose` + `copy` of the eager graph does.
    let cache = random(&[1, 12, 164, 64], &mut rng);
    let t = cache.transpose(1, 2).expect("axes in range");
    let mut out = vec![0.0f32; t.numel()];
    let hand = time(|| {
        // The result goes back to the pool, as the executor returns dead values.
        Value::Tensor(black_box(copy(black_box(&t)).expect("runs"))).recycle();
    });
    let nd = time(|| {
        let src = t.view_f32().expect("f32 values");
        let mut dst = ArrayViewMutD::from_shape(IxDyn(t.shape()), &mut out).expect("fits");
        Zip::from(&mut dst).and(&src).for_each(|d, &s| *d = s);
        black_box(&out);
    });
    report("copy of a transposed [1,164,12,64] view", hand, nd);

    // A broadcast add: [1,12,164,64] + [1,1,164,64].
    let b = random(&[1, 1, 164, 64], &mut rng);
    let hand = time(|| {
        let y = binary(BinaryOp::Add, Arg::Tensor(&cache), Arg::Tensor(&b)).expect("runs");
        Value::Tensor(black_box(y)).recycle();
    });
    // The kernel calls its op through a function pointer (one per `BinaryOp`); so does
    // this loop, so that the two differ only in how they walk the views.
    let add: fn(f32, f32) -> f32 = black_box(|u, v| u + v);
    let nd_inlined = time(|| {
        let x = cache.view_f32().expect("f32 values");
        let y = b.view_f32().expect("f32 values");
        let mut dst = ArrayViewMutD::from_shape(IxDyn(cache.shape()), &mut out).expect("fits");
        Zip::from(&mut dst)
            .and(&x)
            .and_broadcast(&y)
            .for_each(|d, &u, &v| *d = u + v);
        black_box(&out);
    });
    let nd = time(|| {
        let x = cache.view_f32().expect("f32 values");
        let y = b.view_f32().expect("f32 values");
        let mut dst = ArrayViewMutD::from_shape(IxDyn(cache.shape()), &mut out).expect("fits");
        Zip::from(&mut dst)
            .and(&x)
            .and_broadcast(&y)
            .for_each(|d, &u, &v| *d = add(u, v));
        black_box(&out);
    });
    report("broadcast add [1,12,164,64] + [1,1,164,64]", hand, nd);
    report("  the same, ndarray with the add inlined", hand, nd_inlined);

    // Allocations of making a view: ndarray's `IxDyn` holds up to four axes inline.
    for shape in [vec![1, 12, 164, 64], vec![1, 4, 3, 164, 64]] {
        let t = random(&shape, &mut rng);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..1000 {
            black_box(t.view_f32().expect("f32 values"));
        }
        let per_view = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 1000.0;
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..1000 {
            black_box(t.reshape(&shape).expect("viewable"));
        }
        let per_tensor = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 1000.0;
        println!(
            "rank {} view: {per_view} allocations per ndarray view, {per_tensor} per executor view",
            shape.len()
        );
    }
}

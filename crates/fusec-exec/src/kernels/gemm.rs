//! The prefill GEMM: `C[r, o] = sum_k X[r, k] W[o, k]` for many activation rows at
//! once (`x @ W^T` of a linear layer over `T` tokens), with `W` in any storage format
//! the GEMV reads (`f32`, the 16 bits of `bf16`/`f16`, FP8 E4M3 bytes).
//!
//! Where the GEMV streams each weight row once per token and is bound by memory, a
//! GEMM over `T` rows reuses every weight value `T` times and can be bound by the FMA
//! units instead. The structure is BLIS's (Van Zee and van de Geijn, "BLIS: A
//! Framework for Rapidly Instantiating BLAS Functionality", ACM TOMS 41(3), 2015),
//! after Goto and van de Geijn, "Anatomy of High-Performance Matrix Multiplication"
//! (ACM TOMS 34(3), 2008):
//!
//! - the activations are **packed** once per GEMM into micro-panels of `MR` rows,
//!   `k`-major (`xp[k][i]` = `X[r0 + i, k]`, zero rows past the last), so the
//!   micro-kernel's broadcasts read consecutive memory;
//! - **threads** take fixed blocks of [`OUT_BLOCK`] output features (weight rows), so
//!   each result is computed by one thread in one order whatever the thread count,
//!   and write them straight into the row-major result
//!   ([`team::for_each_column_block_mut`]): no transpose pass;
//! - a block's weight rows are **decoded once** into `f32` panels of `NR` features,
//!   `k`-major (`panel[k][j]` = `W[o0 + j, k]`, zeros past the last feature), which
//!   stay in L2 while every activation row of the step passes over them: a compact
//!   format costs one decode per weight per GEMM, not per token;
//! - the inner dimension runs in **blocks of [`KC`]**: a micro-panel of `MR` rows by
//!   [`KC`] inputs (12 KiB) stays in L1 while the block's weight panels stream past
//!   it from L2, and the results of one block are the starting values of the next;
//! - the **micro-kernel** holds `MR` rows by `NR` features of results in vector
//!   registers (12 x 32 with AVX-512: 24 of the 32 registers; 6 x 16 with AVX2: 12
//!   of 16) and per `k` loads the panel's `NR` weights once and broadcasts each row's
//!   activation into `MR * NR / lanes` fused multiply-adds: no horizontal sums.
//!
//! Each result is one chain of fused multiply-adds over `k` in order, from zero: a
//! block of [`KC`] inputs continues the chain from the stored results of the block
//! before, and storing an `f32` and loading it back is exact. The portable kernel
//! [`gemm_portable`] computes the same chains with `f32::mul_add`. That is not
//! [`super::dot::dot`]'s order, so the results differ from the GEMV's in the last
//! bits: they are checked against an `f64` reference to a tolerance, and prefill
//! against token-by-token decoding by the ids they generate. The AVX-512 path, the
//! AVX2 path and the portable one (the fallback on other machines) are chosen at run
//! time and, whatever their tile shapes, give the same results bit for bit (the same
//! operations in the same order), which the tests check.

use crate::pool;
use crate::team::{self, ColumnsMut};

use super::rowdot::Rows;

/// Output features per parallel chunk, one thread's block: four AVX-512 panels; at
/// 768 inputs they take 384 KiB, in L2, and a 768-feature projection still splits
/// into six blocks for the threads to share.
pub const OUT_BLOCK: usize = 128;
/// Inputs per block of the inner dimension: a 12-row activation micro-panel of
/// `KC` inputs is 12 KiB, in L1 beside the weights streaming past it.
pub const KC: usize = 256;

/// Work (multiply-adds) below which a GEMM runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// `[rows, outs]` row-major results of `xs` (`rows` rows of `ins`, row-major) times
/// the `outs` weight rows `w` (row-major `[outs, ins]`), each passed through
/// `finish(o, r, acc)` (a quantized weight's scales). From the pool.
pub fn gemm(
    xs: &[f32],
    rows: usize,
    ins: usize,
    w: Rows<'_>,
    outs: usize,
    finish: &(impl Fn(usize, usize, f32) -> f32 + Sync),
) -> Vec<f32> {
    gemm_with(Kernel::detect(), xs, rows, ins, w, outs, finish)
}

/// [`gemm`] on the portable kernel: the reference the vector paths equal.
pub fn gemm_portable(xs: &[f32], rows: usize, ins: usize, w: Rows<'_>, outs: usize) -> Vec<f32> {
    gemm_with(Kernel::Portable, xs, rows, ins, w, outs, &|_, _, v| v)
}

fn gemm_with(
    kernel: Kernel,
    xs: &[f32],
    rows: usize,
    ins: usize,
    w: Rows<'_>,
    outs: usize,
    finish: &(impl Fn(usize, usize, f32) -> f32 + Sync),
) -> Vec<f32> {
    let mut out = pool::zeros(outs * rows);
    if rows == 0 || outs == 0 || ins == 0 || xs.len() < rows * ins || w.len() < outs * ins {
        return out;
    }
    let (mr, nr) = kernel.shape();
    let parallel = outs * rows * ins >= PARALLEL_MIN_WORK;
    // The activations in micro-panels of `mr` rows, `k`-major, zero rows past the end.
    let tiles = rows.div_ceil(mr);
    let mut xp = pool::zeros(tiles * mr * ins);
    team::for_each_chunk_mut(&mut xp, mr * ins, parallel, |t, dst| {
        let m = mr.min(rows - t * mr);
        kernel.pack(&xs[t * mr * ins..(t * mr + m) * ins], m, ins, mr, dst);
    });
    team::for_each_column_block_mut(&mut out, outs, OUT_BLOCK, parallel, |c, mut cols| {
        let o0 = c * OUT_BLOCK;
        let n = cols.width();
        let panels = n.div_ceil(nr);
        // The block's weights, decoded and packed k-major, one panel after another.
        let mut wp = pool::zeros(panels * ins * nr);
        let mut decoded = match w {
            Rows::F32(_) => Vec::new(),
            _ => pool::zeros(nr * ins),
        };
        for (p, panel) in wp.chunks_exact_mut(ins * nr).enumerate() {
            let (j0, valid) = (o0 + p * nr, nr.min(n - p * nr));
            let src = match w {
                Rows::F32(v) => &v[j0 * ins..(j0 + valid) * ins],
                _ => {
                    decode_rows(w, j0 * ins, &mut decoded[..valid * ins]);
                    &decoded[..valid * ins]
                }
            };
            kernel.pack(src, valid, ins, nr, panel);
        }
        pool::give(decoded);
        for k0 in (0..ins).step_by(KC) {
            let kc = KC.min(ins - k0);
            let first = k0 == 0;
            // Each weight micro-panel (`KC x NR`, 32 KiB) stays in L1 while the
            // activation micro-panels stream past it from L2.
            for p in 0..panels {
                let b = &wp[p * ins * nr + k0 * nr..p * ins * nr + (k0 + kc) * nr];
                let valid = nr.min(n - p * nr);
                for t in 0..tiles {
                    let r0 = t * mr;
                    let m = mr.min(rows - r0);
                    let a = &xp[t * mr * ins + k0 * mr..t * mr * ins + (k0 + kc) * mr];
                    kernel.tile(a, b, kc, &mut cols, r0, m, p * nr, valid, first);
                }
            }
        }
        // The results are final.
        for r in 0..rows {
            for (j, v) in cols.row_mut(r).iter_mut().enumerate() {
                *v = finish(o0 + j, r, *v);
            }
        }
        pool::give(wp);
    });
    pool::give(xp);
    out
}

/// Weight values `start..start + dst.len()` decoded to `f32`.
fn decode_rows(w: Rows<'_>, start: usize, dst: &mut [f32]) {
    for (j, d) in dst.iter_mut().enumerate() {
        *d = w.value(start + j);
    }
}

/// `dst[k * lanes + i] = src[i * ins + k]` for the `rows` rows of `src` (`rows <=
/// lanes`): a micro-panel, `k`-major. The other lanes of `dst` are left as they are.
fn pack_portable(src: &[f32], rows: usize, ins: usize, lanes: usize, dst: &mut [f32]) {
    for (i, row) in src.chunks_exact(ins).take(rows).enumerate() {
        for (k, &v) in row.iter().enumerate() {
            dst[k * lanes + i] = v;
        }
    }
}

/// The micro-kernel family chosen for this machine.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

/// Rows and features of the portable kernel's tile (any shape gives the same bits).
const PORTABLE_TILE: (usize, usize) = (4, 16);

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx512() {
                return Kernel::Avx512;
            }
            if x86::has_avx2() {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// `(MR, NR)`: activation rows and output features of the register tile.
    fn shape(self) -> (usize, usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => (x86::MR512, x86::NR512),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => (x86::MR256, x86::NR256),
            Kernel::Portable => PORTABLE_TILE,
        }
    }

    /// Packs `rows` rows of `ins` values into a `k`-major micro-panel of `lanes`
    /// ([`pack_portable`]'s layout).
    fn pack(self, src: &[f32], rows: usize, ins: usize, lanes: usize, dst: &mut [f32]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => x86::pack512(src, rows, ins, lanes, dst),
            _ => pack_portable(src, rows, ins, lanes, dst),
        }
    }

    /// Rows `r0..r0 + m` by features `c0..c0 + n` of `cols`, continued over the
    /// `kc` inputs of the packed micro-panels `a` (`kc x MR`) and `b` (`kc x NR`):
    /// from zero if `first`, else from the values `cols` holds.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        self,
        a: &[f32],
        b: &[f32],
        kc: usize,
        cols: &mut ColumnsMut<'_, f32>,
        r0: usize,
        m: usize,
        c0: usize,
        n: usize,
        first: bool,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => x86::avx512(a, b, kc, cols, r0, m, c0, n, first),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => x86::avx2(a, b, kc, cols, r0, m, c0, n, first),
            Kernel::Portable => {
                let (mr, nr) = PORTABLE_TILE;
                tile_portable(mr, nr, a, b, kc, cols, r0, m, c0, n, first)
            }
        }
    }
}

/// The portable tile: each result the chain `acc = x_k * w_k + acc` over `k`, fused,
/// for packed micro-panels of `mr` rows and `nr` features.
#[allow(clippy::too_many_arguments)]
fn tile_portable(
    mr: usize,
    nr: usize,
    a: &[f32],
    b: &[f32],
    kc: usize,
    cols: &mut ColumnsMut<'_, f32>,
    r0: usize,
    m: usize,
    c0: usize,
    n: usize,
    first: bool,
) {
    for i in 0..m {
        let row = &mut cols.row_mut(r0 + i)[c0..c0 + n];
        for (j, c) in row.iter_mut().enumerate() {
            let mut acc = if first { 0.0 } else { *c };
            for k in 0..kc {
                acc = a[k * mr + i].mul_add(b[k * nr + j], acc);
            }
            *c = acc;
        }
    }
}

/// Floating-point operations per second one thread reaches with independent fused
/// multiply-adds on the widest vectors this machine has (AVX-512, else AVX2+FMA,
/// else scalar `mul_add`): the peak a GEMM is measured against. Runs `iterations`
/// rounds of 16 independent accumulators (enough to cover the FMA latency of two
/// pipes, 4 cycles each), and counts 2 operations per lane per FMA.
pub fn fma_flops_one_thread(iterations: usize) -> f64 {
    let start = std::time::Instant::now();
    let (lanes, sink) = fma_loop(iterations);
    let secs = start.elapsed().as_secs_f64().max(f64::MIN_POSITIVE);
    std::hint::black_box(sink);
    (iterations * 16 * lanes * 2) as f64 / secs
}

/// The FMA peak of `threads` threads running [`fma_flops_one_thread`] at once for
/// about 50 ms, GFLOP/s: summed over the wall clock, and the operations per second of
/// this process's CPU time per core ([`crate::cputime`]; 0 where that clock is
/// missing), which other tenants of a shared machine do not move.
pub fn fma_peak(threads: usize) -> (f64, f64) {
    let threads = threads.max(1);
    // Iterations for about 50 ms on one thread, from a short calibration run.
    let rate = fma_flops_one_thread(20_000);
    let lanes = fma_lanes() as f64;
    let iterations = ((0.05 * rate) / (16.0 * lanes * 2.0)).clamp(1e4, 1e9) as usize;
    let cpu_start = crate::cputime::process_cpu_seconds();
    let wall = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(move || fma_flops_one_thread(iterations)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(0.0))
            .sum::<f64>()
    }) / 1e9;
    // The work done is known: the rate one core does it at per CPU-second.
    let flops = (threads * iterations) as f64 * 16.0 * lanes * 2.0;
    let per_cpu = match (cpu_start, crate::cputime::process_cpu_seconds()) {
        (Some(a), Some(b)) if b > a => flops / (b - a) / 1e9,
        _ => 0.0,
    };
    (wall, per_cpu)
}

/// Lanes per vector of the FMA loop [`fma_flops_one_thread`] runs on this machine.
pub fn fma_lanes() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::has_avx512() {
            return 16;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return 8;
        }
    }
    1
}

/// Runs the FMA loop; returns the lanes per vector and a value that depends on it.
fn fma_loop(iterations: usize) -> (usize, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(r) = x86::fma_loop(iterations) {
            return r;
        }
    }
    let mut acc = [1.0f32; 16];
    let (a, b) = (
        std::hint::black_box(0.999_999f32),
        std::hint::black_box(1e-7f32),
    );
    for _ in 0..iterations {
        for v in &mut acc {
            *v = v.mul_add(a, b);
        }
    }
    (1, acc.iter().sum())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! `unsafe` is confined to this module: the micro-kernels carry
    //! `#[target_feature]` and are called only after the features are detected, and
    //! their pointer arithmetic stays inside slices whose lengths are checked first.
    #![allow(unsafe_code)]

    use std::arch::x86_64::*;

    use super::ColumnsMut;

    /// The AVX-512 register tile: 12 rows by 32 features, 24 accumulators.
    pub(super) const MR512: usize = 12;
    pub(super) const NR512: usize = 32;
    /// Steps of `k` ahead at which the 12 x 32 tile prefetches its activations.
    const PREFETCH_K: usize = 16;
    /// The AVX2 register tile: 6 rows by 16 features, 12 accumulators.
    pub(super) const MR256: usize = 6;
    pub(super) const NR256: usize = 16;

    /// Whether AVX2 and FMA are present.
    pub(super) fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// The AVX-512 tile, or the portable one where AVX-512F is missing.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn avx512(
        a: &[f32],
        b: &[f32],
        kc: usize,
        cols: &mut ColumnsMut<'_, f32>,
        r0: usize,
        m: usize,
        c0: usize,
        n: usize,
        first: bool,
    ) {
        let ld = cols.stride();
        match cols.tile_ptr(r0, m, c0, n) {
            Some(c)
                if has_avx512()
                    && a.len() >= kc * MR512
                    && b.len() >= kc * NR512
                    && m <= MR512
                    && n <= NR512 =>
            {
                // SAFETY: AVX-512F is detected; the packed panels hold `kc` steps of
                // the tile (checked above), and the `m x n` tile from `c` lies inside
                // the block that `cols` borrows exclusively (`tile_ptr`).
                unsafe { tile512(a.as_ptr(), b.as_ptr(), kc, c, ld, m, n, first) }
            }
            _ => super::tile_portable(MR512, NR512, a, b, kc, cols, r0, m, c0, n, first),
        }
    }

    /// The AVX2 tile, or the portable one where AVX2 or FMA is missing.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn avx2(
        a: &[f32],
        b: &[f32],
        kc: usize,
        cols: &mut ColumnsMut<'_, f32>,
        r0: usize,
        m: usize,
        c0: usize,
        n: usize,
        first: bool,
    ) {
        let ld = cols.stride();
        match cols.tile_ptr(r0, m, c0, n) {
            Some(c)
                if has_avx2()
                    && a.len() >= kc * MR256
                    && b.len() >= kc * NR256
                    && m <= MR256
                    && n == NR256 =>
            {
                // SAFETY: AVX2 and FMA are detected; the packed panels hold `kc`
                // steps of the tile (checked above), and the `m x 16` tile from `c`
                // lies inside the block that `cols` borrows exclusively (`tile_ptr`).
                unsafe { tile256(a.as_ptr(), b.as_ptr(), kc, c, ld, m, first) }
            }
            // A last panel narrower than the vectors: the portable tile, the same
            // chains.
            _ => super::tile_portable(MR256, NR256, a, b, kc, cols, r0, m, c0, n, first),
        }
    }

    /// [`super::pack_portable`] by 16 x 16 transposes in registers (the portable
    /// one's scattered scalar stores took a quarter of the GEMM's time), or the
    /// portable one where AVX-512F is missing.
    pub(super) fn pack512(src: &[f32], rows: usize, ins: usize, lanes: usize, dst: &mut [f32]) {
        if has_avx512() && rows <= lanes && src.len() >= rows * ins && dst.len() >= ins * lanes {
            // SAFETY: AVX-512F is detected, and the slices hold every value read and
            // written (checked above).
            unsafe { pack16(src.as_ptr(), rows, ins, lanes, dst.as_mut_ptr()) }
        } else {
            super::pack_portable(src, rows, ins, lanes, dst)
        }
    }

    /// Groups of 16 rows, 16 inputs at a time: load the rows, transpose, store each
    /// input's 16 (or fewer) lanes.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack16(src: *const f32, rows: usize, ins: usize, lanes: usize, dst: *mut f32) {
        for g in (0..rows).step_by(16) {
            let rg = (rows - g).min(16);
            let store = lanes_mask((lanes - g).min(16));
            for k0 in (0..ins).step_by(16) {
                let kv = (ins - k0).min(16);
                let load = lanes_mask(kv);
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, v) in r.iter_mut().enumerate().take(rg) {
                    let row = src.add((g + i) * ins);
                    // The weights come from memory, sixteen rows at a time: fetch
                    // each row's lines well ahead (a prefetch never faults).
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(k0 + 128).cast());
                    *v = _mm512_maskz_loadu_ps(load, row.add(k0));
                }
                let cols = transpose16(r);
                for (kk, v) in cols.iter().enumerate().take(kv) {
                    _mm512_mask_storeu_ps(dst.add((k0 + kk) * lanes + g), store, *v);
                }
            }
        }
    }

    /// The 16 x 16 transpose: unpack pairs of rows, then shuffle 4 x 4 blocks within
    /// 128-bit lanes, then 128-bit lanes across registers.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // `u[4 g + j]`, lane `L`: column `4 L + j` of rows `4 g .. 4 g + 4`.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let b = 4 * g;
            u[b] = _mm512_shuffle_ps::<0x44>(t[b], t[b + 2]);
            u[b + 1] = _mm512_shuffle_ps::<0xEE>(t[b], t[b + 2]);
            u[b + 2] = _mm512_shuffle_ps::<0x44>(t[b + 1], t[b + 3]);
            u[b + 3] = _mm512_shuffle_ps::<0xEE>(t[b + 1], t[b + 3]);
        }
        let mut c = [_mm512_setzero_ps(); 16];
        for j in 0..4 {
            let v = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
            let w = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
            c[j] = _mm512_shuffle_f32x4::<0x88>(v, w);
            c[8 + j] = _mm512_shuffle_f32x4::<0xDD>(v, w);
            let v = _mm512_shuffle_f32x4::<0xDD>(u[j], u[4 + j]);
            let w = _mm512_shuffle_f32x4::<0xDD>(u[8 + j], u[12 + j]);
            c[4 + j] = _mm512_shuffle_f32x4::<0x88>(v, w);
            c[12 + j] = _mm512_shuffle_f32x4::<0xDD>(v, w);
        }
        c
    }

    /// Lane mask of the first `n` of 16 lanes.
    fn lanes_mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// The 12 x 32 tile: `kc` steps of two weight loads and 12 broadcasts into 24
    /// fused multiply-adds, continuing from `c` (rows `ld` apart) unless `first`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile512(
        a: *const f32,
        b: *const f32,
        kc: usize,
        c: *mut f32,
        ld: usize,
        m: usize,
        n: usize,
        first: bool,
    ) {
        let (m0, m1) = (lanes_mask(n), lanes_mask(n.saturating_sub(16)));
        // Loops over all `MR512` rows (a constant bound, unrolled) with the row
        // count as a condition, so that the accumulators stay in registers.
        let mut acc = [[_mm512_setzero_ps(); 2]; MR512];
        if !first {
            for (i, a) in acc.iter_mut().enumerate() {
                if i < m {
                    let row = c.add(i * ld);
                    a[0] = _mm512_maskz_loadu_ps(m0, row);
                    a[1] = _mm512_maskz_loadu_ps(m1, row.add(16));
                }
            }
        }
        // One step of `k`: the panel's 32 weights, each row's activation broadcast.
        macro_rules! step {
            ($k:expr) => {{
                let k = $k;
                let w0 = _mm512_loadu_ps(b.add(k * NR512));
                let w1 = _mm512_loadu_ps(b.add(k * NR512 + 16));
                let x = a.add(k * MR512);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_ps(*x.add(i));
                    acc[0] = _mm512_fmadd_ps(xb, w0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(xb, w1, acc[1]);
                }
            }};
        }
        // Four steps per iteration: the loop's integer work issues on the ports
        // that also run the 512-bit FMAs, so it is spread over more of them.
        let mut k = 0;
        while k + 4 <= kc {
            // The activation micro-panel streams from L2 (the weights' stays in L1):
            // ask for it a few hundred cycles ahead. A prefetch never faults, so
            // running past the panel's end is harmless.
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add((k + PREFETCH_K) * MR512).cast());
            step!(k);
            step!(k + 1);
            step!(k + 2);
            step!(k + 3);
            k += 4;
        }
        while k < kc {
            step!(k);
            k += 1;
        }
        for (i, a) in acc.iter().enumerate() {
            if i < m {
                let row = c.add(i * ld);
                _mm512_mask_storeu_ps(row, m0, a[0]);
                _mm512_mask_storeu_ps(row.add(16), m1, a[1]);
            }
        }
    }

    /// The 6 x 16 tile: `kc` steps of two weight loads and 6 broadcasts into 12
    /// fused multiply-adds, continuing from `c` (rows `ld` apart) unless `first`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile256(
        a: *const f32,
        b: *const f32,
        kc: usize,
        c: *mut f32,
        ld: usize,
        m: usize,
        first: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR256];
        if !first {
            for (i, a) in acc.iter_mut().enumerate() {
                if i < m {
                    let row = c.add(i * ld);
                    a[0] = _mm256_loadu_ps(row);
                    a[1] = _mm256_loadu_ps(row.add(8));
                }
            }
        }
        for k in 0..kc {
            let w0 = _mm256_loadu_ps(b.add(k * NR256));
            let w1 = _mm256_loadu_ps(b.add(k * NR256 + 8));
            let x = a.add(k * MR256);
            for (i, acc) in acc.iter_mut().enumerate() {
                let xb = _mm256_broadcast_ss(&*x.add(i));
                acc[0] = _mm256_fmadd_ps(xb, w0, acc[0]);
                acc[1] = _mm256_fmadd_ps(xb, w1, acc[1]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            if i < m {
                let row = c.add(i * ld);
                _mm256_storeu_ps(row, a[0]);
                _mm256_storeu_ps(row.add(8), a[1]);
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// [`super::fma_loop`] on AVX-512 or AVX2+FMA; `None` without either.
    pub(super) fn fma_loop(iterations: usize) -> Option<(usize, f32)> {
        if has_avx512() {
            // SAFETY: AVX-512F is detected.
            return Some((16, unsafe { fma512(iterations) }));
        }
        if has_avx2() {
            // SAFETY: AVX2 and FMA are detected.
            return Some((8, unsafe { fma256(iterations) }));
        }
        None
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn fma512(iterations: usize) -> f32 {
        let a = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm512_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); 16];
        for _ in 0..iterations {
            for v in &mut acc {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma256(iterations: usize) -> f32 {
        let a = _mm256_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm256_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); 16];
        for _ in 0..iterations {
            for v in &mut acc {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        acc.iter().map(|&v| hsum256(v)).sum()
    }

    /// Whether the AVX-512 path runs here.
    pub(super) fn has_avx512() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }
}

#[cfg(test)]
mod tests {
    use fusec_ir::DType;
    use proptest::prelude::*;

    use super::*;
    use crate::rounding;

    /// The `f64` reference of `x @ W^T`, with the weights' decoded values.
    fn reference(xs: &[f32], rows: usize, ins: usize, w: Rows<'_>, outs: usize) -> Vec<f64> {
        let mut out = vec![0.0; rows * outs];
        for r in 0..rows {
            for o in 0..outs {
                out[r * outs + o] = (0..ins)
                    .map(|k| xs[r * ins + k] as f64 * w.value(o * ins + k) as f64)
                    .sum();
            }
        }
        out
    }

    /// Within the error bound of an `f32` sum of `ins` products (Higham, "Accuracy and
    /// Stability of Numerical Algorithms", 2nd ed., section 3.1): `ins * u * sum |x w|`
    /// with a margin.
    fn close(got: &[f32], want: &[f64], xs: &[f32], rows: usize, ins: usize, w: Rows<'_>) {
        let outs = want.len() / rows.max(1);
        for r in 0..rows {
            for o in 0..outs {
                let mag: f64 = (0..ins)
                    .map(|k| (xs[r * ins + k] as f64 * w.value(o * ins + k) as f64).abs())
                    .sum();
                let bound = 2.0 * ins as f64 * f32::EPSILON as f64 * mag + 1e-30;
                let (g, e) = (got[r * outs + o] as f64, want[r * outs + o]);
                assert!(
                    (g - e).abs() <= bound,
                    "[{r},{o}]: {g} vs {e} (bound {bound:e})"
                );
            }
        }
    }

    fn bits(dtype: DType, v: &[f32]) -> Vec<u16> {
        v.iter()
            .map(|&x| match dtype {
                DType::F16 => half::f16::from_f32(x).to_bits(),
                _ => half::bf16::from_f32(x).to_bits(),
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Every storage format and shape (tiles and panels with remainders, inner
        /// dimensions past a block of `KC`), on this machine's kernel, on every vector
        /// kernel it can run, and on the portable one.
        #[test]
        fn gemm_matches_f64(
            rows in 1usize..60,
            outs in 1usize..300,
            ins in prop_oneof![1usize..70, 200usize..600],
            seed in any::<u64>(),
            format in 0usize..4,
        ) {
            let mut rng = fusec_weights::SplitMix64::new(seed);
            let xs: Vec<f32> = (0..rows * ins).map(|_| rng.normal() as f32).collect();
            let wf: Vec<f32> = (0..outs * ins).map(|_| rng.normal() as f32).collect();
            let (u16s, u8s);
            let w = match format {
                0 => Rows::F32(&wf),
                1 => { u16s = bits(DType::Bf16, &wf); Rows::Bf16(&u16s) }
                2 => { u16s = bits(DType::F16, &wf); Rows::F16(&u16s) }
                _ => {
                    u8s = wf.iter().map(|&v| fusec_ir::numerics::e4m3_encode(rounding::round(DType::Fp8E4M3, v))).collect::<Vec<u8>>();
                    Rows::E4M3(&u8s)
                }
            };
            let want = reference(&xs, rows, ins, w, outs);
            let got = gemm(&xs, rows, ins, w, outs, &|_, _, v| v);
            close(&got, &want, &xs, rows, ins, w);
            let portable = gemm_portable(&xs, rows, ins, w, outs);
            // The vector kernels run the portable kernel's operations in its order.
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&got), bits(&portable));
            for kernel in vector_kernels() {
                let other = gemm_with(kernel, &xs, rows, ins, w, outs, &|_, _, v| v);
                prop_assert_eq!(bits(&other), bits(&portable), "{:?}", kernel);
            }
        }
    }

    /// The vector kernels this machine runs.
    fn vector_kernels() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx512() {
                kernels.push(Kernel::Avx512);
            }
            if x86::has_avx2() {
                kernels.push(Kernel::Avx2);
            }
        }
        kernels
    }

    /// `finish` sees each result once, with its feature and row, after the last block
    /// of inputs.
    #[test]
    fn finish_gets_each_final_result() {
        let (rows, ins, outs) = (29, 600, 70);
        let mut rng = fusec_weights::SplitMix64::new(3);
        let xs: Vec<f32> = (0..rows * ins).map(|_| rng.normal() as f32).collect();
        let wf: Vec<f32> = (0..outs * ins).map(|_| rng.normal() as f32).collect();
        let plain = gemm(&xs, rows, ins, Rows::F32(&wf), outs, &|_, _, v| v);
        let tagged = |o: usize, r: usize, v: f32| v * 2.0 + (o * 1000 + r) as f32;
        let finished = gemm(&xs, rows, ins, Rows::F32(&wf), outs, &tagged);
        for r in 0..rows {
            for o in 0..outs {
                let i = r * outs + o;
                assert_eq!(finished[i], tagged(o, r, plain[i]), "[{r},{o}]");
            }
        }
    }

    /// The result does not depend on the thread count: blocks of outputs are computed
    /// by one thread each, in one order.
    #[test]
    fn threads_do_not_change_results() {
        let (rows, ins, outs) = (37, 200, 150);
        let mut rng = fusec_weights::SplitMix64::new(7);
        let xs: Vec<f32> = (0..rows * ins).map(|_| rng.normal() as f32).collect();
        let wf: Vec<f32> = (0..outs * ins).map(|_| rng.normal() as f32).collect();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool");
        let a = one.install(|| gemm(&xs, rows, ins, Rows::F32(&wf), outs, &|_, _, v| v));
        let b = gemm(&xs, rows, ins, Rows::F32(&wf), outs, &|_, _, v| v);
        assert_eq!(a, b);
    }

    #[test]
    fn fma_loop_counts_work() {
        // 1 + small increments stay finite and near 1 per lane: the loop really ran.
        let (lanes, sum) = fma_loop(1000);
        assert!(lanes >= 1 && sum.is_finite() && sum > 0.0);
        assert!(fma_flops_one_thread(1000) > 0.0);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn reports_its_kernel() {
        // The detected kernel is the widest this machine has.
        let k = Kernel::detect();
        assert_eq!(k == Kernel::Avx512, x86::has_avx512());
    }
}

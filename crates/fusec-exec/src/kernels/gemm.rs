//! The prefill GEMM: `C[r, o] = sum_k X[r, k] W[o, k]` for many activation rows at
//! once (`x @ W^T` of a linear layer over `T` tokens), with `W` in any storage format
//! the GEMV reads (`f32`, the 16 bits of `bf16`/`f16`, FP8 E4M3 bytes).
//!
//! Where the GEMV streams each weight row once per token and is bound by memory, a
//! GEMM over `T` rows reuses every weight value `T` times and can be bound by the FMA
//! units instead. The structure follows Goto and van de Geijn, "Anatomy of
//! High-Performance Matrix Multiplication" (ACM TOMS 34(3), 2008), and BLIS's
//! micro-kernel split (Van Zee and van de Geijn, ACM TOMS 41(3), 2015):
//!
//! - **threads** take fixed blocks of [`OUT_BLOCK`] output features (weight rows), so
//!   each result is computed by one thread in one order whatever the thread count;
//! - a block's weight rows are **decoded once** into `f32` panels of [`NR`] output
//!   features, packed `k`-major (`panel[k][j]` = `W[o0 + j, k]`, zeros past the last
//!   feature), which then stay in L2 while every activation row of the step passes
//!   over them, in blocks of [`ROW_BLOCK`] rows that stay in L2 too; a compact format
//!   costs one decode per weight per GEMM, not per token;
//! - the **micro-kernel** holds `MR` rows by [`NR`] features of results in vector
//!   registers (8 x 32 with AVX-512: 16 accumulators; 2 x 32 with AVX2: 8) and per
//!   `k` loads the panel's [`NR`] weights once, broadcasts each row's activation and
//!   adds `MR * NR` products with fused multiply-adds: no horizontal sums, and
//!   `MR * NR / 16` FMAs per `NR / 16 + MR` loads.
//!
//! Each result is one chain of fused multiply-adds over `k` in order, from zero (the
//! portable kernel [`gemm_portable`] computes the same chain with `f32::mul_add`). That
//! is not [`super::dot::dot`]'s order, so the results differ from the GEMV's in the
//! last bits: they are checked against an `f64` reference to a tolerance, and prefill
//! against token-by-token decoding by the ids they generate. The AVX-512 path, the
//! AVX2 path and the portable one (the fallback on other machines) are chosen at run
//! time, and give the same results bit for bit (the same operations in the same
//! order), which the tests check.

use crate::pool;
use crate::team;

use super::rowdot::Rows;

/// Output features per packed panel: two AVX-512 vectors, four AVX2 vectors.
pub const NR: usize = 32;
/// Output features per parallel chunk, one thread's block: two panels; at 768
/// inputs they take 192 KiB, in L2.
pub const OUT_BLOCK: usize = 2 * NR;
/// Activation rows per pass over a block's panels (768 inputs: 192 KiB).
pub const ROW_BLOCK: usize = 64;

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
    // Feature-major `[outs, rows]` while computing (a thread's block is contiguous),
    // row-major after.
    let mut by_feature = pool::zeros(outs * rows);
    if rows == 0 || outs == 0 || xs.len() < rows * ins || w.len() < outs * ins {
        return by_feature;
    }
    let x = &xs[..rows * ins];
    let parallel = outs * rows * ins >= PARALLEL_MIN_WORK;
    team::for_each_chunk_mut(&mut by_feature, OUT_BLOCK * rows, parallel, |c, block| {
        let o0 = c * OUT_BLOCK;
        let n = block.len() / rows;
        let panels = n.div_ceil(NR);
        // The block's weights, decoded and packed k-major, one panel after another.
        let mut packed = pool::zeros(panels * ins * NR);
        let mut row = pool::zeros(ins);
        for j in 0..n {
            decode_row(w, (o0 + j) * ins, &mut row);
            let (p, jj) = (j / NR, j % NR);
            let panel = &mut packed[p * ins * NR..(p + 1) * ins * NR];
            for (k, &v) in row.iter().enumerate() {
                panel[k * NR + jj] = v;
            }
        }
        pool::give(row);
        for r0 in (0..rows).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(rows);
            for p in 0..panels {
                let panel = &packed[p * ins * NR..(p + 1) * ins * NR];
                let valid = (n - p * NR).min(NR);
                let dst = &mut block[p * NR * rows..(p * NR + valid) * rows];
                kernel.panel(x, ins, r0, r1, panel, valid, dst, rows);
            }
        }
        for (j, col) in block.chunks_exact_mut(rows).enumerate() {
            for (r, v) in col.iter_mut().enumerate() {
                *v = finish(o0 + j, r, *v);
            }
        }
        pool::give(packed);
    });
    if rows == 1 {
        return by_feature;
    }
    let mut out = pool::zeros(outs * rows);
    transpose(&by_feature, rows, outs, &mut out, parallel);
    pool::give(by_feature);
    out
}

/// Activation rows per chunk of [`transpose`]: each chunk reads one 64-byte line of
/// every feature's column and writes its rows whole.
const TRANSPOSE_ROWS: usize = 16;

/// `out[r * outs + o] = by_feature[o * rows + r]`, in parallel chunks of
/// [`TRANSPOSE_ROWS`] output rows. Done element by element on one thread, this
/// scattered one store per result `outs * 4` bytes apart and took about as long as
/// the GEMM's arithmetic at 512 rows.
fn transpose(by_feature: &[f32], rows: usize, outs: usize, out: &mut [f32], parallel: bool) {
    team::for_each_chunk_mut(out, TRANSPOSE_ROWS * outs, parallel, |c, chunk| {
        let r0 = c * TRANSPOSE_ROWS;
        let n = chunk.len() / outs;
        for (o, col) in by_feature.chunks_exact(rows).enumerate() {
            for (i, &v) in col[r0..r0 + n].iter().enumerate() {
                chunk[i * outs + o] = v;
            }
        }
    });
}

/// Weight values `start..start + dst.len()` decoded to `f32`.
fn decode_row(w: Rows<'_>, start: usize, dst: &mut [f32]) {
    match w {
        Rows::F32(v) => dst.copy_from_slice(&v[start..start + dst.len()]),
        _ => {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = w.value(start + j);
            }
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

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// Results of rows `r0..r1` against one packed `panel` (`ins x NR`), for its
    /// first `valid` features, into `dst` (feature-major, `[valid, rows]`).
    #[allow(clippy::too_many_arguments)]
    fn panel(
        self,
        x: &[f32],
        ins: usize,
        r0: usize,
        r1: usize,
        panel: &[f32],
        valid: usize,
        dst: &mut [f32],
        rows: usize,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => x86::avx512(x, ins, r0, r1, panel, valid, dst, rows),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => x86::avx2(x, ins, r0, r1, panel, valid, dst, rows),
            Kernel::Portable => panel_portable(x, ins, r0, r1, panel, valid, dst, rows),
        }
    }
}

/// The portable panel: each result the chain `acc = x_k * w_k + acc` over `k`, fused.
#[allow(clippy::too_many_arguments)]
fn panel_portable(
    x: &[f32],
    ins: usize,
    r0: usize,
    r1: usize,
    panel: &[f32],
    valid: usize,
    dst: &mut [f32],
    rows: usize,
) {
    for r in r0..r1 {
        let xr = &x[r * ins..(r + 1) * ins];
        let mut acc = [0.0f32; NR];
        for (k, &xv) in xr.iter().enumerate() {
            let wk = &panel[k * NR..(k + 1) * NR];
            for (a, &wv) in acc.iter_mut().zip(wk) {
                *a = xv.mul_add(wv, *a);
            }
        }
        for (j, &a) in acc.iter().take(valid).enumerate() {
            dst[j * rows + r] = a;
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

    use super::{panel_portable, NR};

    /// Whether a panel call's slices hold everything it reads and writes.
    fn fits(
        x: &[f32],
        ins: usize,
        r1: usize,
        panel: &[f32],
        valid: usize,
        dst: &[f32],
        rows: usize,
    ) -> bool {
        x.len() >= r1 * ins
            && panel.len() >= ins * NR
            && valid <= NR
            && dst.len() >= valid * rows
            && r1 <= rows
    }

    /// The AVX-512 panel, or the portable one where AVX-512F is missing.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn avx512(
        x: &[f32],
        ins: usize,
        r0: usize,
        r1: usize,
        panel: &[f32],
        valid: usize,
        dst: &mut [f32],
        rows: usize,
    ) {
        if fits(x, ins, r1, panel, valid, dst, rows) && has_avx512() {
            // SAFETY: AVX-512F is detected, and the slices hold every row the
            // kernel reads and writes (checked by `fits`).
            unsafe { panel_avx512(x, ins, r0, r1, panel, valid, dst, rows) }
        } else {
            panel_portable(x, ins, r0, r1, panel, valid, dst, rows)
        }
    }

    /// The AVX2 panel, or the portable one where AVX2 or FMA is missing.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn avx2(
        x: &[f32],
        ins: usize,
        r0: usize,
        r1: usize,
        panel: &[f32],
        valid: usize,
        dst: &mut [f32],
        rows: usize,
    ) {
        if fits(x, ins, r1, panel, valid, dst, rows)
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA are detected, and the slices hold every row the
            // kernel reads and writes (checked by `fits`).
            unsafe { panel_avx2(x, ins, r0, r1, panel, valid, dst, rows) }
        } else {
            panel_portable(x, ins, r0, r1, panel, valid, dst, rows)
        }
    }

    /// `M` rows from `r` against the panel: 2 x `M` accumulators of 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn micro512<const M: usize>(
        x: *const f32,
        ins: usize,
        panel: *const f32,
        out: &mut [[f32; NR]; M],
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        for k in 0..ins {
            let w0 = _mm512_loadu_ps(panel.add(k * NR));
            let w1 = _mm512_loadu_ps(panel.add(k * NR + 16));
            for (i, a) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(*x.add(i * ins + k));
                a[0] = _mm512_fmadd_ps(xb, w0, a[0]);
                a[1] = _mm512_fmadd_ps(xb, w1, a[1]);
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn panel_avx512(
        x: &[f32],
        ins: usize,
        r0: usize,
        r1: usize,
        panel: &[f32],
        valid: usize,
        dst: &mut [f32],
        rows: usize,
    ) {
        const MR: usize = 8;
        let mut r = r0;
        while r < r1 {
            let m = (r1 - r).min(MR);
            let xp = x.as_ptr().add(r * ins);
            let mut out = [[0.0f32; NR]; MR];
            macro_rules! run {
                ($m:literal) => {{
                    let mut o = [[0.0f32; NR]; $m];
                    micro512::<$m>(xp, ins, panel.as_ptr(), &mut o);
                    out[..$m].copy_from_slice(&o);
                }};
            }
            match m {
                8 => run!(8),
                7 => run!(7),
                6 => run!(6),
                5 => run!(5),
                4 => run!(4),
                3 => run!(3),
                2 => run!(2),
                _ => run!(1),
            }
            for (i, o) in out.iter().take(m).enumerate() {
                for (j, &v) in o.iter().take(valid).enumerate() {
                    dst[j * rows + r + i] = v;
                }
            }
            r += m;
        }
    }

    /// `M` rows from `r` against the panel: 4 x `M` accumulators of 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn micro256<const M: usize>(
        x: *const f32,
        ins: usize,
        panel: *const f32,
        out: &mut [[f32; NR]; M],
    ) {
        let mut acc = [[_mm256_setzero_ps(); 4]; M];
        for k in 0..ins {
            let mut xb = [_mm256_setzero_ps(); M];
            for (i, b) in xb.iter_mut().enumerate() {
                *b = _mm256_set1_ps(*x.add(i * ins + k));
            }
            let w: [__m256; 4] =
                std::array::from_fn(|j| _mm256_loadu_ps(panel.add(k * NR + 8 * j)));
            for (a, &b) in acc.iter_mut().zip(&xb) {
                for (aj, &wj) in a.iter_mut().zip(&w) {
                    *aj = _mm256_fmadd_ps(b, wj, *aj);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            for (j, &v) in a.iter().enumerate() {
                _mm256_storeu_ps(o.as_mut_ptr().add(8 * j), v);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn panel_avx2(
        x: &[f32],
        ins: usize,
        r0: usize,
        r1: usize,
        panel: &[f32],
        valid: usize,
        dst: &mut [f32],
        rows: usize,
    ) {
        const MR: usize = 3;
        let mut r = r0;
        while r < r1 {
            let m = (r1 - r).min(MR);
            let xp = x.as_ptr().add(r * ins);
            let mut out = [[0.0f32; NR]; MR];
            macro_rules! run {
                ($m:literal) => {{
                    let mut o = [[0.0f32; NR]; $m];
                    micro256::<$m>(xp, ins, panel.as_ptr(), &mut o);
                    out[..$m].copy_from_slice(&o);
                }};
            }
            match m {
                3 => run!(3),
                2 => run!(2),
                _ => run!(1),
            }
            for (i, o) in out.iter().take(m).enumerate() {
                for (j, &v) in o.iter().take(valid).enumerate() {
                    dst[j * rows + r + i] = v;
                }
            }
            r += m;
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
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
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

        /// Every storage format and shape (tiles and panels with remainders, rows
        /// past a row block), on this machine's kernel and the portable one.
        #[test]
        fn gemm_matches_f64(
            rows in 1usize..140,
            outs in 1usize..140,
            ins in 1usize..70,
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
            prop_assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
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

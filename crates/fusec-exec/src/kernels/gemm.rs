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
//! - a block's weight rows are **decoded once** into an `f32` panel (zero-padded to a
//!   multiple of the vector width), which then stays in L2 while every activation
//!   row of the step passes over it, in blocks of [`ROW_BLOCK`] rows that stay in L2
//!   too; a compact format costs one decode per weight per GEMM, not per token;
//! - the **micro-kernel** holds an `MR x NR` tile of results in registers, one vector
//!   accumulator per result whose lanes take the `k` that are equal modulo the vector
//!   width, and adds `MR * NR` fused multiply-adds per `MR + NR` vector loads (4 x 4
//!   with AVX-512's 32 registers, 2 x 4 with AVX2's 16); each accumulator is reduced
//!   to one value at the end of the row.
//!
//! The summation order is the GEMM's own, not [`super::dot::dot`]'s (fused
//! multiply-adds over 16 or 8 lanes), so its results differ from the GEMV's in the
//! last bits: they are checked against an `f64` reference to a tolerance, and prefill
//! against token-by-token decoding by the ids they generate. The AVX-512 path, the
//! AVX2 path and the portable one ([`gemm_portable`], the same lanes and order
//! without the vector instructions, and the fallback on other machines) are chosen at
//! run time.

use super::dot::dot;
use super::rowdot::Rows;
use crate::pool;
use crate::team;

/// Output features per parallel chunk: one thread's block of weight rows. A multiple
/// of every micro-kernel's `NR`; at 768 inputs its decoded panel is 96 KiB, in L2.
pub const OUT_BLOCK: usize = 32;
/// Activation rows per pass over a block's weight panel (768 inputs: 192 KiB).
pub const ROW_BLOCK: usize = 64;
/// Lanes of the widest vector, the panel's padding along `k`.
const PAD: usize = 16;

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
    // Feature-major `[outs, rows]` while computing (a thread's block is contiguous),
    // row-major after.
    let mut by_feature = pool::zeros(outs * rows);
    if rows == 0 || outs == 0 {
        return by_feature;
    }
    let kp = ins.next_multiple_of(PAD);
    // The activations padded to `kp` per row (zeros), so that the micro-kernels read
    // whole vectors; a copy of `rows * ins` values, small beside the work.
    let padded = (kp != ins).then(|| {
        let mut p = pool::zeros(rows * kp);
        for (dst, src) in p.chunks_exact_mut(kp).zip(xs.chunks_exact(ins)) {
            dst[..ins].copy_from_slice(src);
        }
        p
    });
    let x: &[f32] = padded.as_deref().unwrap_or(&xs[..rows * ins]);
    let kernel = Kernel::detect();
    let parallel = outs * rows * ins >= PARALLEL_MIN_WORK;
    team::for_each_chunk_mut(&mut by_feature, OUT_BLOCK * rows, parallel, |c, block| {
        let o0 = c * OUT_BLOCK;
        let n = block.len() / rows;
        // The block's weight rows decoded to `f32`, each padded to `kp` with zeros.
        let mut panel = pool::zeros(n * kp);
        for (i, dst) in panel.chunks_exact_mut(kp).enumerate() {
            decode_row(w, (o0 + i) * ins, &mut dst[..ins]);
        }
        for r0 in (0..rows).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(rows);
            kernel.tile(x, kp, r0, r1, &panel, n, block, rows);
        }
        for (i, col) in block.chunks_exact_mut(rows).enumerate() {
            for (r, v) in col.iter_mut().enumerate() {
                *v = finish(o0 + i, r, *v);
            }
        }
        pool::give(panel);
    });
    if let Some(p) = padded {
        pool::give(p);
    }
    if rows == 1 {
        return by_feature;
    }
    let mut out = pool::zeros(outs * rows);
    for (o, col) in by_feature.chunks_exact(rows).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            out[r * outs + o] = v;
        }
    }
    pool::give(by_feature);
    out
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

    /// Results of rows `r0..r1` against the `n` weight rows of `panel` (each `kp`
    /// long), into the feature-major `block` (`[n, rows]`).
    #[allow(clippy::too_many_arguments)]
    fn tile(
        self,
        x: &[f32],
        kp: usize,
        r0: usize,
        r1: usize,
        panel: &[f32],
        n: usize,
        block: &mut [f32],
        rows: usize,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => x86::avx512(x, kp, r0, r1, panel, n, block, rows),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => x86::avx2(x, kp, r0, r1, panel, n, block, rows),
            Kernel::Portable => tile_portable(x, kp, r0, r1, panel, n, block, rows),
        }
    }
}

/// The portable tile: each result one [`dot`] of the padded rows.
#[allow(clippy::too_many_arguments)]
fn tile_portable(
    x: &[f32],
    kp: usize,
    r0: usize,
    r1: usize,
    panel: &[f32],
    n: usize,
    block: &mut [f32],
    rows: usize,
) {
    for o in 0..n {
        let wrow = &panel[o * kp..(o + 1) * kp];
        for r in r0..r1 {
            block[o * rows + r] = dot(&x[r * kp..(r + 1) * kp], wrow);
        }
    }
}

/// [`gemm`] on the portable kernel alone: the reference the vector paths are
/// tested against (to a tolerance: their lanes and fused multiply-adds differ).
pub fn gemm_portable(xs: &[f32], rows: usize, ins: usize, w: Rows<'_>, outs: usize) -> Vec<f32> {
    let kp = ins.next_multiple_of(PAD);
    let mut x = vec![0.0; rows * kp];
    for (dst, src) in x.chunks_exact_mut(kp).zip(xs.chunks_exact(ins)) {
        dst[..ins].copy_from_slice(src);
    }
    let mut block = vec![0.0; outs * rows];
    let mut panel = vec![0.0; outs * kp];
    for (i, dst) in panel.chunks_exact_mut(kp).enumerate() {
        decode_row(w, i * ins, &mut dst[..ins]);
    }
    tile_portable(&x, kp, 0, rows, &panel, outs, &mut block, rows);
    let mut out = vec![0.0; outs * rows];
    for (o, col) in block.chunks_exact(rows.max(1)).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            out[r * outs + o] = v;
        }
    }
    out
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

    use super::tile_portable;

    /// The AVX-512 tile, or the portable one where AVX-512F is missing.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn avx512(
        x: &[f32],
        kp: usize,
        r0: usize,
        r1: usize,
        panel: &[f32],
        n: usize,
        block: &mut [f32],
        rows: usize,
    ) {
        let fits = kp.is_multiple_of(16)
            && x.len() >= r1 * kp
            && panel.len() >= n * kp
            && block.len() >= n * rows
            && r1 <= rows;
        if fits && has_avx512() {
            // SAFETY: AVX-512F is detected, and the slices hold every row the tile
            // reads and writes (checked above).
            unsafe { tile_avx512(x, kp, r0, r1, panel, n, block, rows) }
        } else {
            tile_portable(x, kp, r0, r1, panel, n, block, rows)
        }
    }

    /// The AVX2 tile, or the portable one where AVX2 or FMA is missing.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn avx2(
        x: &[f32],
        kp: usize,
        r0: usize,
        r1: usize,
        panel: &[f32],
        n: usize,
        block: &mut [f32],
        rows: usize,
    ) {
        let fits = kp.is_multiple_of(8)
            && x.len() >= r1 * kp
            && panel.len() >= n * kp
            && block.len() >= n * rows
            && r1 <= rows;
        if fits && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA are detected, and the slices hold every row the
            // tile reads and writes (checked above).
            unsafe { tile_avx2(x, kp, r0, r1, panel, n, block, rows) }
        } else {
            tile_portable(x, kp, r0, r1, panel, n, block, rows)
        }
    }

    /// Rows per AVX-512 tile and weight rows per tile: 16 accumulators and 8 loaded
    /// vectors of the 32 registers.
    const MR512: usize = 4;
    const NR512: usize = 4;

    /// One `m x nr` tile (`m <= MR512`, `nr <= NR512`) of AVX-512 accumulators over
    /// `kp` (a multiple of 16): `out[i][j] = sum x_i * w_j`.
    #[inline(always)]
    unsafe fn micro512<const M: usize, const N: usize>(
        x: [*const f32; M],
        w: [*const f32; N],
        kp: usize,
    ) -> [[f32; N]; M] {
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        let mut k = 0;
        while k < kp {
            let mut wv = [_mm512_setzero_ps(); N];
            for j in 0..N {
                wv[j] = _mm512_loadu_ps(w[j].add(k));
            }
            for i in 0..M {
                let xv = _mm512_loadu_ps(x[i].add(k));
                for j in 0..N {
                    acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
                }
            }
            k += 16;
        }
        let mut out = [[0.0f32; N]; M];
        for i in 0..M {
            for j in 0..N {
                out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_avx512(
        x: &[f32],
        kp: usize,
        r0: usize,
        r1: usize,
        panel: &[f32],
        n: usize,
        block: &mut [f32],
        rows: usize,
    ) {
        debug_assert!(x.len() >= r1 * kp && panel.len() >= n * kp && kp % 16 == 0);
        debug_assert!(block.len() >= n * rows);
        let xp = x.as_ptr();
        let wp = panel.as_ptr();
        let mut o = 0;
        while o < n {
            let nr = (n - o).min(NR512);
            let mut r = r0;
            while r < r1 {
                let m = (r1 - r).min(MR512);
                // SAFETY (of the pointer arithmetic): rows `r..r + m` of `x` and
                // weight rows `o..o + nr` of `panel` are inside the slices, each `kp`
                // long, as asserted above.
                macro_rules! run {
                    ($m:literal, $n:literal) => {{
                        let xs: [*const f32; $m] = std::array::from_fn(|i| xp.add((r + i) * kp));
                        let ws: [*const f32; $n] = std::array::from_fn(|j| wp.add((o + j) * kp));
                        let t = micro512::<$m, $n>(xs, ws, kp);
                        for i in 0..$m {
                            for j in 0..$n {
                                block[(o + j) * rows + r + i] = t[i][j];
                            }
                        }
                    }};
                }
                match (m, nr) {
                    (4, 4) => run!(4, 4),
                    (4, 3) => run!(4, 3),
                    (4, 2) => run!(4, 2),
                    (4, 1) => run!(4, 1),
                    (3, 4) => run!(3, 4),
                    (3, 3) => run!(3, 3),
                    (3, 2) => run!(3, 2),
                    (3, 1) => run!(3, 1),
                    (2, 4) => run!(2, 4),
                    (2, 3) => run!(2, 3),
                    (2, 2) => run!(2, 2),
                    (2, 1) => run!(2, 1),
                    (1, 4) => run!(1, 4),
                    (1, 3) => run!(1, 3),
                    (1, 2) => run!(1, 2),
                    _ => run!(1, 1),
                }
                r += m;
            }
            o += nr;
        }
    }

    /// Rows and weight rows per AVX2 tile: 8 accumulators and 6 loaded vectors of 16.
    const MR256: usize = 2;
    const NR256: usize = 4;

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn micro256<const M: usize, const N: usize>(
        x: [*const f32; M],
        w: [*const f32; N],
        kp: usize,
    ) -> [[f32; N]; M] {
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        let mut k = 0;
        while k < kp {
            let mut wv = [_mm256_setzero_ps(); N];
            for j in 0..N {
                wv[j] = _mm256_loadu_ps(w[j].add(k));
            }
            for i in 0..M {
                let xv = _mm256_loadu_ps(x[i].add(k));
                for j in 0..N {
                    acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
                }
            }
            k += 8;
        }
        let mut out = [[0.0f32; N]; M];
        for i in 0..M {
            for j in 0..N {
                out[i][j] = hsum256(acc[i][j]);
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2(
        x: &[f32],
        kp: usize,
        r0: usize,
        r1: usize,
        panel: &[f32],
        n: usize,
        block: &mut [f32],
        rows: usize,
    ) {
        debug_assert!(x.len() >= r1 * kp && panel.len() >= n * kp && kp % 8 == 0);
        debug_assert!(block.len() >= n * rows);
        let xp = x.as_ptr();
        let wp = panel.as_ptr();
        let mut o = 0;
        while o < n {
            let nr = (n - o).min(NR256);
            let mut r = r0;
            while r < r1 {
                let m = (r1 - r).min(MR256);
                macro_rules! run {
                    ($m:literal, $n:literal) => {{
                        let xs: [*const f32; $m] = std::array::from_fn(|i| xp.add((r + i) * kp));
                        let ws: [*const f32; $n] = std::array::from_fn(|j| wp.add((o + j) * kp));
                        let t = micro256::<$m, $n>(xs, ws, kp);
                        for i in 0..$m {
                            for j in 0..$n {
                                block[(o + j) * rows + r + i] = t[i][j];
                            }
                        }
                    }};
                }
                match (m, nr) {
                    (2, 4) => run!(2, 4),
                    (2, 3) => run!(2, 3),
                    (2, 2) => run!(2, 2),
                    (2, 1) => run!(2, 1),
                    (1, 4) => run!(1, 4),
                    (1, 3) => run!(1, 3),
                    (1, 2) => run!(1, 2),
                    _ => run!(1, 1),
                }
                r += m;
            }
            o += nr;
        }
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
            rows in 1usize..70,
            outs in 1usize..40,
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
            close(&portable, &want, &xs, rows, ins, w);
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

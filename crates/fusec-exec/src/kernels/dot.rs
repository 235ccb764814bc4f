//! The one summation order of every dot product: [`dot`], and [`dot_by`] for a second
//! operand decoded on the fly.
//!
//! `linear`, every fused GEMV, the AVX2 and AVX-512 row dots (`super::rowdot`),
//! matmul and attention's scores all sum in this order, so that their results are
//! bit-identical. It lives apart from the kernels that use it, which therefore depend
//! on it and not on each other.
//!
//! **Fused multiply-add.** Each product is added to its accumulator by one fused
//! multiply-add (`acc = fma(x, y, acc)`, the product and the sum rounded once, IEEE
//! 754-2008 fusedMultiplyAdd), not by a multiply and an add each rounded: one vector
//! instruction per product where there were two, which is what a batched decode step's
//! multi-row kernel issues most of (each weight multiplied into up to eight activation
//! rows; BENCHMARKS.md, "CPU batched decode", for what it measured). One rounding per
//! term is also never less accurate: the classic bound of a sum of `n` rounded
//! products (Higham, "Accuracy and Stability of Numerical Algorithms", 2002, §3.1)
//! holds with one rounding fewer per term. The vector kernels require FMA besides AVX2
//! (both arrived with Intel's Haswell and AMD's Excavator), and the portable path
//! computes the same fused operation with [`f32::mul_add`].

use std::sync::OnceLock;

/// Values per accumulator lane group: one AVX vector of `f32`.
pub const LANES: usize = 8;

/// Independent accumulators of [`LANES`] lanes in [`dot`]. One accumulator makes
/// every addition wait for the previous one (a dependency chain as long as the row,
/// paced by the add latency); four let a core keep four additions in flight, which is
/// what lets the fast row-dot kernels stream weights at memory speed.
pub const ACCUMULATORS: usize = 4;

/// The dot product of two equally long slices (the shorter length if they differ).
///
/// This is the one summation order that `linear`, every fused GEMV and the vector
/// row-dot kernels share, so that they all give bit-identical results:
///
/// 1. chunk `c` of [`LANES`] values (`c = 0, 1, ...`, full chunks only) adds its
///    products lane by lane into accumulator `c % ACCUMULATORS`, each by one fused
///    multiply-add (`acc = fma(x, y, acc)`, rounded once);
/// 2. the four accumulators are combined lane by lane as `(a0 + a1) + (a2 + a3)`;
/// 3. the eight lanes `v` are reduced as `((v0 + v4) + (v1 + v5)) + ((v2 + v6) + (v3 + v7))`;
/// 4. the products of the last `len % LANES` values are added in order, each by one
///    fused multiply-add (`s = fma(x, y, s)`).
///
/// Never inlined: inlined into the eager `linear`'s per-feature closure, LLVM kept the
/// 32 accumulator lanes in spilled registers and the loop ran at half the speed
/// (`fusec bench`, eager f32: 14.5 against 26 tokens/s out of line). On x86-64 the
/// body runs compiled for FMA where the CPU has it (detected once): compiled without
/// it, [`f32::mul_add`] is a call into the C library per product.
#[inline(never)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if fma::available() {
            return fma::dot(a, b);
        }
    }
    dot_body(a, b)
}

/// [`dot`]'s order, to be inlined into a caller compiled with or without FMA.
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [[0.0f32; LANES]; ACCUMULATORS];
    let (ca, cb) = (
        a.chunks_exact(LANES * ACCUMULATORS),
        b.chunks_exact(LANES * ACCUMULATORS),
    );
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for (k, lanes) in acc.iter_mut().enumerate() {
            for (i, l) in lanes.iter_mut().enumerate() {
                *l = x[k * LANES + i].mul_add(y[k * LANES + i], *l);
            }
        }
    }
    // The remaining full chunks (at most three) continue the round-robin at
    // accumulator 0, since the chunks before them filled whole rounds.
    let (ca, cb) = (ra.chunks_exact(LANES), rb.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for ((x, y), lanes) in ca.zip(cb).zip(acc.iter_mut()) {
        for (i, l) in lanes.iter_mut().enumerate() {
            *l = x[i].mul_add(y[i], *l);
        }
    }
    let mut s = reduce_accumulators(&acc);
    for (x, y) in ta.iter().zip(tb) {
        s = x.mul_add(*y, s);
    }
    s
}

/// Steps 2 and 3 of [`dot`]'s order: the accumulators combined, then the lanes reduced.
#[inline]
pub fn reduce_accumulators(acc: &[[f32; LANES]; ACCUMULATORS]) -> f32 {
    let v: [f32; LANES] =
        std::array::from_fn(|i| (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i]));
    ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
}

/// [`dot`]'s order over `n` pairs of factors given by `factors(i)`: the reference for
/// dot products whose second operand is decoded on the fly (compact weights).
#[inline]
pub fn dot_by(n: usize, factors: impl Fn(usize) -> (f32, f32)) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if fma::available() {
            return fma::dot_by(n, factors);
        }
    }
    dot_by_body(n, factors)
}

/// [`dot_by`]'s order, to be inlined into a caller compiled with or without FMA.
#[inline(always)]
fn dot_by_body(n: usize, factors: impl Fn(usize) -> (f32, f32)) -> f32 {
    let mut acc = [[0.0f32; LANES]; ACCUMULATORS];
    let main = n - n % LANES;
    for j in (0..main).step_by(LANES) {
        let lanes = &mut acc[(j / LANES) % ACCUMULATORS];
        for (i, l) in lanes.iter_mut().enumerate() {
            let (x, y) = factors(j + i);
            *l = x.mul_add(y, *l);
        }
    }
    let mut s = reduce_accumulators(&acc);
    for j in main..n {
        let (x, y) = factors(j);
        s = x.mul_add(y, s);
    }
    s
}

/// Whether this CPU has FMA, detected once: the vector kernels of `super::rowdot` and
/// `super::attention`, which use FMA instructions, ask this too.
pub fn fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        fma::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod fma {
    //! [`super::dot`] and [`super::dot_by`] compiled for FMA: the same code, whose
    //! `mul_add` then becomes the `vfmadd` instruction (the same correctly rounded
    //! operation as the C library's `fmaf`, so the results are identical).
    //!
    //! `unsafe` is confined to this module: the functions below carry
    //! `#[target_feature]`, so they run only after `available()` said yes.
    #![allow(unsafe_code)]

    use super::OnceLock;

    pub(super) fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("fma"))
    }

    /// The caller has checked [`available`].
    pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `available()` returned true, so the CPU runs FMA instructions.
        unsafe { dot_fma(a, b) }
    }

    #[target_feature(enable = "fma")]
    fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
        super::dot_body(a, b)
    }

    /// The caller has checked [`available`].
    #[inline]
    pub(super) fn dot_by(n: usize, factors: impl Fn(usize) -> (f32, f32)) -> f32 {
        // SAFETY: `available()` returned true, so the CPU runs FMA instructions.
        unsafe { dot_by_fma(n, factors) }
    }

    #[target_feature(enable = "fma")]
    fn dot_by_fma(n: usize, factors: impl Fn(usize) -> (f32, f32)) -> f32 {
        super::dot_by_body(n, factors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The FMA-compiled bodies give the portable ones' results bit for bit (the
    /// portable `mul_add` is the C library's correctly rounded `fmaf`).
    #[test]
    fn the_fma_build_equals_the_portable_one() {
        let mut seed = 0x2545_f491u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed as f32 / u32::MAX as f32 - 0.5) * 3.0
        };
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 40, 63, 64, 100, 777] {
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let want = dot_body(&a, &b).to_bits();
            assert_eq!(dot(&a, &b).to_bits(), want, "dot, n {n}");
            assert_eq!(dot_by(n, |i| (a[i], b[i])).to_bits(), want, "dot_by, n {n}");
            assert_eq!(
                dot_by_body(n, |i| (a[i], b[i])).to_bits(),
                want,
                "dot_by_body, n {n}"
            );
        }
    }

    /// A product that a separate multiply would round away shows the fused order: with
    /// `x = 1 + 2^-12`, `x * x = 1 + 2^-11 + 2^-24` needs 25 bits, and `-(1 + 2^-11) +
    /// x * x` is `2^-24` fused but 0 with the product rounded first.
    #[test]
    fn products_are_fused() {
        let x = 1.0 + 2.0f32.powi(-12);
        let c = -(1.0 + 2.0f32.powi(-11));
        assert_eq!(dot(&[c, x], &[1.0, x]), 2.0f32.powi(-24));
        let mut a = vec![0.0f32; 9];
        let mut b = vec![0.0f32; 9];
        (a[0], b[0], a[8], b[8]) = (c, 1.0, x, x);
        // The tail's product too is fused into the reduced sum.
        assert_eq!(dot(&a, &b), 2.0f32.powi(-24));
    }
}

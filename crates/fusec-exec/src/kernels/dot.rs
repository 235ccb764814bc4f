//! The one summation order of every dot product: [`dot`], and [`dot_by`] for a second
//! operand decoded on the fly.
//!
//! `linear`, every fused GEMV, the AVX2 and portable row dots (`super::rowdot`) and
//! attention's scores all sum in this order, so that their results are bit-identical.
//! It lives apart from the kernels that use it, which therefore depend on it and not on
//! each other.

/// Values per accumulator lane group: one AVX vector of `f32`.
pub const LANES: usize = 8;

/// Independent accumulators of [`LANES`] lanes in [`dot`]. One accumulator makes
/// every addition wait for the previous one (a dependency chain as long as the row,
/// paced by the add latency); four let a core keep four additions in flight, which is
/// what lets the fast row-dot kernels stream weights at memory speed.
pub const ACCUMULATORS: usize = 4;

/// The dot product of two equally long slices (the shorter length if they differ).
///
/// This is the one summation order that `linear`, every fused GEMV and the AVX2
/// row-dot kernels share, so that they all give bit-identical results:
///
/// 1. chunk `c` of [`LANES`] values (`c = 0, 1, ...`, full chunks only) adds its
///    products lane by lane into accumulator `c % ACCUMULATORS`, each product and sum
///    rounded separately;
/// 2. the four accumulators are combined lane by lane as `(a0 + a1) + (a2 + a3)`;
/// 3. the eight lanes `v` are reduced as `((v0 + v4) + (v1 + v5)) + ((v2 + v6) + (v3 + v7))`;
/// 4. the products of the last `len % LANES` values are added in order.
///
/// Never inlined: inlined into the eager `linear`'s per-feature closure, LLVM kept the
/// 32 accumulator lanes in spilled registers and the loop ran at half the speed
/// (`fusec bench`, eager f32: 14.5 against 26 tokens/s out of line).
#[inline(never)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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
                *l += x[k * LANES + i] * y[k * LANES + i];
            }
        }
    }
    // The remaining full chunks (at most three) continue the round-robin at
    // accumulator 0, since the chunks before them filled whole rounds.
    let (ca, cb) = (ra.chunks_exact(LANES), rb.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for ((x, y), lanes) in ca.zip(cb).zip(acc.iter_mut()) {
        for (i, l) in lanes.iter_mut().enumerate() {
            *l += x[i] * y[i];
        }
    }
    let mut s = reduce_accumulators(&acc);
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
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

/// [`dot`]'s order over `n` products given by `product(i)`: the reference for dot
/// products whose second operand is decoded on the fly (compact weights).
#[inline]
pub fn dot_by(n: usize, product: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [[0.0f32; LANES]; ACCUMULATORS];
    let main = n - n % LANES;
    for j in (0..main).step_by(LANES) {
        let lanes = &mut acc[(j / LANES) % ACCUMULATORS];
        for (i, l) in lanes.iter_mut().enumerate() {
            *l += product(j + i);
        }
    }
    let mut s = reduce_accumulators(&acc);
    for j in main..n {
        s += product(j);
    }
    s
}

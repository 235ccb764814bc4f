//! Dot products of one activation row with consecutive rows of a weight matrix held in
//! any of the executor's storage formats: `f32`, the 16 bits of `bf16` or `f16`, or
//! the byte of FP8 E4M3. Compact weights are decoded in registers, eight values at a
//! time, and never into a temporary copy of the weights.
//!
//! Every path sums in exactly the order of [`super::dot::dot`] (four independent
//! 8-lane accumulators taking the chunks of eight round-robin, each product added by
//! one fused multiply-add, a fixed reduction tree, then the tail in order, fused too),
//! so a fast path gives bit-identical results to the portable one and to the eager
//! `linear`.
//!
//! On x86-64 with AVX2, F16C and FMA (detected at run time) each row is four 8-lane
//! vector accumulators over the row, read as one sequential stream; four accumulators keep
//! four additions in flight where one made a single add-latency chain, which capped
//! the E4M3 kernel at about 9.5 GB/s per thread. Processing four rows at
//! once (four streams, the activations loaded once for four rows) was measured faster
//! when the weights sit in cache (89 against 36 GB/s for f32 on one thread) but much
//! slower from memory (12.5 against 19.4 GB/s for f32, 8 against 21 for bf16, 4
//! against 8 for E4M3) on the 2-core AMD EPYC this was tuned on, and decode weights
//! never fit in cache.
//!
//! **Decoding E4M3 in registers.** An E4M3 weight is 1 byte, so the E4M3 kernel is
//! bound by the instructions that widen bytes to `f32`, not by memory. Two decodings
//! are used, both exact:
//!
//! - With FP8-exact activations (the FP8 GEMV's case), a byte `s eeee mmm` is
//!   sign-extended to 32 bits, shifted left 20 and masked to `s 0000eeee mmm 0..0`:
//!   the `f32` whose value is the E4M3 value times `2^-120`, subnormals included (an
//!   E4M3 subnormal lands on an `f32` subnormal with the same factor). Three
//!   instructions per eight weights. The activations are pre-scaled by `2^110` (exact),
//!   so every product is the true product times `2^-10`, exact and normal, and the
//!   row's sum is multiplied by `2^10` at the end. Because all these factors are powers
//!   of two and no value leaves the normal range ([`e4m3_products_exact`]), every
//!   fused multiply-add rounds exactly as the unscaled one: the kernel stays
//!   bit-identical to [`dots_portable`].
//! - Otherwise a byte is sign-extended to 16 bits, shifted left 7 and masked to the
//!   `f16` bits `s 0eeee mmm0000000`, and converted by `vcvtph2ps`: the E4M3 value
//!   times `2^-8` (the `f16` exponent bias is 15, E4M3's 7), subnormals included; the
//!   row's sum is multiplied by 256 at the end (the same power-of-two argument, for
//!   activations of ordinary magnitude). Sixteen bytes are widened at once.
//!
//! Measured in cache on one thread of that machine (thread CPU time, so other tenants
//! do not count): the `f16` decoding at 11.6 GB/s with eight bytes per load and 16.0
//! with sixteen, the `f32` decoding at 20.9 GB/s. Two threads of the latter outrun the
//! machine's read bandwidth.
//!
//! **Several activation rows at once** ([`Activations::dots_rows`]: a batched decode
//! step, one row per sequence). Each weight row is decoded once per block of
//! activation rows and multiplied into every row of the block, whose accumulators stay
//! in registers: the register blocking of Goto and van de Geijn ("Anatomy of
//! High-Performance Matrix Multiplication", ACM TOMS 34(3), 2008) along the rows only,
//! since a decode step's few rows fit in L1 while the weights stream past once. Each
//! result is still one row's dot product in the order of [`super::dot::dot`], so a
//! sequence in a batch gets bit for bit the results it gets alone. On AVX-512 a
//! 16-lane register holds two of the order's 8-lane accumulators (chunks `c` and
//! `c + 1` of a round are 16 consecutive values), so a row needs two registers and a
//! block of 8 rows 16 of the 32; the last chunks and the reduction run on their 8-lane
//! halves, exactly as the AVX2 kernel does. On AVX2 (16 registers) a block is 3 rows
//! of 4 accumulators. `f32` weights on AVX-512 go in tiles instead: 4 activation rows
//! by 2 weight rows (16 accumulator registers), each activation vector loaded once for
//! both weight rows and each weight vector once for the 4 activation rows, so the
//! loads per fused multiply-add fall from 9 per 8 to 6 per 8; the second tile over the
//! same two weight rows finds them in L1, and the first asks for them 8 KiB ahead. In
//! `perf`'s share of a batch-8 step against the single-row kernel the tiles take
//! 1.17x to 1.26x, the blocks 1.32x to 1.36x (BENCHMARKS.md, "The f32 multi-row kernel
//! in tiles"). Weights are read once from memory whatever the batch, so a step
//! of `B` sequences costs about one step of one until the multiplies bind: one fused
//! multiply-add per weight and row (see `super::dot`). `cargo bench -p fusec-exec
//! --bench rowdot` times 8 rows against 1 from memory and in L2.

use std::sync::OnceLock;

use fusec_ir::DType;

use super::dot::{dot, dot_by};
use crate::rounding;

/// Consecutive weight rows in one storage format.
#[derive(Copy, Clone, Debug)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
    E4M3(&'a [u8]),
}

impl<'a> Rows<'a> {
    /// Stored values.
    pub fn len(&self) -> usize {
        match self {
            Rows::F32(w) => w.len(),
            Rows::Bf16(w) | Rows::F16(w) => w.len(),
            Rows::E4M3(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `start..end`.
    pub fn range(&self, start: usize, end: usize) -> Rows<'a> {
        match *self {
            Rows::F32(w) => Rows::F32(&w[start..end]),
            Rows::Bf16(w) => Rows::Bf16(&w[start..end]),
            Rows::F16(w) => Rows::F16(&w[start..end]),
            Rows::E4M3(w) => Rows::E4M3(&w[start..end]),
        }
    }

    /// Bytes per stored value.
    pub fn value_bytes(&self) -> usize {
        match self {
            Rows::F32(_) => 4,
            Rows::Bf16(_) | Rows::F16(_) => 2,
            Rows::E4M3(_) => 1,
        }
    }

    /// The value at index `i`, decoded.
    #[inline]
    pub(crate) fn value(&self, i: usize) -> f32 {
        match self {
            Rows::F32(w) => w[i],
            Rows::Bf16(w) => rounding::from_u16_bits(DType::Bf16, w[i]),
            Rows::F16(w) => rounding::from_u16_bits(DType::F16, w[i]),
            Rows::E4M3(w) => e4m3_table()[usize::from(w[i])],
        }
    }
}

/// The 256 E4M3 values, for the portable path (and attention's, over compact caches).
pub(crate) fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0.0f32; 256];
        for (b, v) in t.iter_mut().enumerate() {
            *v = rounding::e4m3_value(b as u8);
        }
        t
    })
}

/// `out[o] = dot(x, row o of w)` for the `out.len()` rows of `x.len()` values that `w`
/// holds, on the fastest path this machine has.
pub fn dots(x: &[f32], w: Rows<'_>, out: &mut [f32]) {
    Activations::new(x, w).row(0, x.len()).dots(w, out);
}

/// Activation rows prepared once for every row-dot of a GEMV: the checks and the
/// scaled copy that the E4M3 kernel's `f32` decoding needs are made here, once,
/// rather than in each of the many chunks a GEMV is split into.
#[derive(Debug)]
pub struct Activations<'a> {
    /// The rows, row-major.
    x: &'a [f32],
    /// `x` times `2^110`, when the weights are E4M3 and the `f32` decoding applies (see
    /// the module documentation); a buffer of the executor's pool.
    scaled: Option<Vec<f32>>,
}

/// One row of [`Activations`].
#[derive(Copy, Clone, Debug)]
pub struct Row<'a> {
    x: &'a [f32],
    scaled: Option<&'a [f32]>,
}

impl<'a> Activations<'a> {
    /// Prepares the rows `x` (row-major) for dots with weight rows stored like `w`.
    pub fn new(x: &'a [f32], w: Rows<'_>) -> Self {
        Activations::prepare(x, w, e4m3_products_exact)
    }

    fn prepare(x: &'a [f32], w: Rows<'_>, exact: impl Fn(&[f32]) -> bool) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if matches!(w, Rows::E4M3(_)) && avx2::available() && exact(x) {
                let mut scaled = crate::pool::take(x.len());
                scaled.extend(x.iter().map(|&v| v * avx2::X_SCALE));
                return Activations {
                    x,
                    scaled: Some(scaled),
                };
            }
        }
        let _ = (w, exact);
        Activations { x, scaled: None }
    }

    /// Row `r` of the rows of `len` values.
    pub fn row(&self, r: usize, len: usize) -> Row<'_> {
        let range = r * len..(r + 1) * len;
        Row {
            x: &self.x[range.clone()],
            scaled: self.scaled.as_deref().map(|s| &s[range]),
        }
    }
}

impl Activations<'_> {
    /// `out[r * k + o] = dot(row r, row o of w)` for every row `r` of these activations
    /// (`rows` rows of `n` values) and each of the `k` rows of `n` values `w` holds:
    /// the rows' results side by side, `k` apart. Bit-identical to [`Row::dots`] row
    /// by row, on every path (see the module documentation).
    pub fn dots_rows(&self, rows: usize, n: usize, w: Rows<'_>, out: &mut [f32]) {
        let k = w.len().checked_div(n).unwrap_or(0);
        if rows == 1 {
            self.row(0, n).dots(w, &mut out[..k]);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if avx512::available() {
                avx512::dots_rows(self.x, self.scaled.as_deref(), rows, n, w, out);
                return;
            }
            if avx2::available() {
                avx2::dots_rows(self.x, self.scaled.as_deref(), rows, n, w, out);
                return;
            }
        }
        dots_rows_portable(self.x, rows, n, w, out);
    }
}

/// [`Activations::dots_rows`] in portable Rust: [`dots_portable`] for each row.
pub fn dots_rows_portable(x: &[f32], rows: usize, n: usize, w: Rows<'_>, out: &mut [f32]) {
    let k = w.len().checked_div(n).unwrap_or(0);
    for r in 0..rows {
        dots_portable(&x[r * n..(r + 1) * n], w, &mut out[r * k..(r + 1) * k]);
    }
}

/// The scaled copy goes back to the pool when the activations are dropped, as
/// `gemv::QuantRows` does with its buffers.
impl Drop for Activations<'_> {
    fn drop(&mut self) {
        if let Some(v) = self.scaled.take() {
            crate::pool::give(v);
        }
    }
}

impl Row<'_> {
    /// `out[o] = dot(x, row o of w)`, as [`dots`]; `w` must be stored like the rows
    /// these activations were prepared for.
    pub fn dots(&self, w: Rows<'_>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::available() {
                avx2::dots(self.x, self.scaled, w, out);
                return;
            }
        }
        dots_portable(self.x, w, out);
    }
}

/// Whether a multi-row call's operands hold every value its vector kernels touch:
/// `rows` rows of `n` in `x` (and in its scaled copy), `k` weight rows of `n` and
/// `rows * k` results. Where they do not, the kernels fall back to the portable path,
/// which indexes with bounds checks.
#[cfg(target_arch = "x86_64")]
fn rows_fit(
    x: &[f32],
    scaled: Option<&[f32]>,
    rows: usize,
    n: usize,
    w: Rows<'_>,
    out: &[f32],
) -> bool {
    let k = w.len().checked_div(n).unwrap_or(0);
    n != 0
        && x.len() >= rows * n
        && out.len() >= rows * k
        && scaled.is_none_or(|s| s.len() == x.len())
}

/// [`dots`] in portable Rust: the reference the fast paths are tested against.
pub fn dots_portable(x: &[f32], w: Rows<'_>, out: &mut [f32]) {
    let n = x.len();
    if let Rows::F32(ws) = w {
        for (o, y) in out.iter_mut().enumerate() {
            *y = dot(x, &ws[o * n..(o + 1) * n]);
        }
        return;
    }
    for (o, y) in out.iter_mut().enumerate() {
        let base = o * n;
        *y = dot_by(n, |j| (x[j], w.value(base + j)));
    }
}

/// Whether the E4M3 kernel may take its fast path, the `f32` decoding, over `x`: every
/// product of a value of `x` with an E4M3 value must be exact in `f32`, and stay exact
/// and normal after the kernel's power-of-two scalings (`x` times `2^110`, the weight
/// times `2^-120`; see the module documentation), so that every partial sum is a
/// multiple of the same small power of two in both domains and rounds alike. E4M3
/// values have at most 4 significant bits and magnitudes in `[2^-9, 448]`, so it
/// holds when each `x` is zero or has at most 20 significant bits (the low 4 mantissa
/// bits clear) and a magnitude in `[2^-90, 2^17]`. FP8-quantized activations (at most 448) always qualify.
pub fn e4m3_products_exact(x: &[f32]) -> bool {
    const LOW: f32 = 1.0 / (1u128 << 90) as f32;
    const HIGH: f32 = (1u32 << 17) as f32;
    x.iter().all(|&v| {
        let a = v.abs();
        a == 0.0 || (v.to_bits() & 0xF == 0 && (LOW..=HIGH).contains(&a))
    })
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 + F16C path; see the module documentation above.
    //!
    //! `unsafe` is confined to this module: the functions below carry
    //! `#[target_feature]`, so they may only run after `available()` said yes, and
    //! their loads are unaligned loads of eight values inside slices whose lengths
    //! were checked first.
    #![allow(unsafe_code)]

    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::Rows;

    /// Whether this CPU has AVX2, F16C and FMA (the order's fused multiply-add),
    /// detected once.
    pub(super) fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("f16c")
                && crate::kernels::dot::fma_available()
        })
    }

    /// The factor the `f32`-decoding E4M3 kernel's activations are scaled by, `2^110`,
    /// and the one its sums are scaled back by, `2^10` (the weights come out of the
    /// decoding times `2^-120`).
    pub(super) const X_SCALE: f32 = (1u128 << 110) as f32;
    pub(super) const SUM_SCALE: f32 = 1024.0;

    /// `super::dots` on AVX2; the caller has checked [`available`]. `scaled` is `x`
    /// times [`X_SCALE`] when the E4M3 kernel's `f32` decoding applies (see
    /// `super::Activations::new`).
    pub(super) fn dots(x: &[f32], scaled: Option<&[f32]>, w: Rows<'_>, out: &mut [f32]) {
        let n = x.len();
        if w.len() < out.len() * n || scaled.is_some_and(|s| s.len() != n) {
            // Not reachable from the GEMV, which sizes both; the portable path indexes
            // with bounds checks and reports the bug as a panic there instead of
            // reading out of bounds here.
            super::dots_portable(x, w, out);
            return;
        }
        // SAFETY: `available()` returned true (the caller checks it), so the CPU runs
        // AVX2, F16C and FMA instructions; `w` holds at least `out.len() * n` values,
        // which is every value the kernels read.
        unsafe {
            match (w, scaled) {
                (Rows::F32(ws), _) => rows_f32(x, ws, out),
                (Rows::Bf16(ws), _) => rows_bf16(x, ws, out),
                (Rows::F16(ws), _) => rows_f16(x, ws, out),
                (Rows::E4M3(ws), Some(xs)) => rows_e4m3_f32(xs, ws, out),
                (Rows::E4M3(ws), None) => rows_e4m3(x, ws, out),
            }
        }
    }

    /// Steps 2 and 3 of `dot::dot`'s order: the accumulators combined as
    /// `(a0 + a1) + (a2 + a3)`, then the lanes `v` reduced as
    /// `((v0 + v4) + (v1 + v5)) + ((v2 + v6) + (v3 + v7))`.
    #[inline(always)]
    pub(super) unsafe fn reduce(a0: __m256, a1: __m256, a2: __m256, a3: __m256) -> f32 {
        let acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let h = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(h) + _mm_cvtss_f32(_mm_shuffle_ps::<1>(h, h))
    }

    /// Bytes ahead of the weights being multiplied that the multi-row kernels ask
    /// the cache for. A block of rows spends a dozen instructions per cache line of
    /// weights, so the core's out-of-order window reaches far fewer lines ahead than
    /// the single-row kernel's does, and `perf` put 60% of the AVX-512 kernel's
    /// samples on its weight load without this; 2 KiB is a few memory latencies'
    /// worth of lines at the per-core bandwidth.
    pub(super) const PREFETCH_BYTES: usize = 2048;

    /// Asks for the cache lines of the 32 weights [`PREFETCH_BYTES`] past `p` (a
    /// hint: it never faults, so the address may run past the weights).
    #[inline(always)]
    pub(super) unsafe fn prefetch<T>(p: *const T) {
        let bytes = 32 * std::mem::size_of::<T>();
        let at = p.cast::<i8>().wrapping_add(PREFETCH_BYTES);
        let mut off = 0;
        while off < bytes {
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(off));
            off += 64;
        }
    }

    /// `acc + x * w` rounded once: the order's step.
    #[inline(always)]
    pub(super) unsafe fn mul_add(acc: __m256, x: __m256, w: __m256) -> __m256 {
        _mm256_fmadd_ps(x, w, acc)
    }

    /// Generates a kernel over one storage format, one row at a time, in the order of
    /// `dot::dot`: four independent accumulators take the chunks of eight values
    /// round-robin, so four additions are in flight instead of one chain. `$load(p)`
    /// loads eight decoded values from `p`, `$madd` accumulates one chunk, `$value(w,
    /// i)` decodes one value for the tail, and `$post` scales each finished sum.
    macro_rules! kernel {
        ($name:ident, $features:literal, $elem:ty, $load:expr, $madd:expr, $value:expr, $post:expr) => {
            #[target_feature(enable = $features)]
            unsafe fn $name(x: &[f32], w: &[$elem], out: &mut [f32]) {
                let n = x.len();
                let main = n - n % 8;
                let quad = n - n % 32;
                let xp = x.as_ptr();
                let rows = out.len();
                let mut o = 0;
                while o < rows {
                    let pr = w.as_ptr().add(o * n);
                    let mut a0 = _mm256_setzero_ps();
                    let mut a1 = _mm256_setzero_ps();
                    let mut a2 = _mm256_setzero_ps();
                    let mut a3 = _mm256_setzero_ps();
                    let mut j = 0;
                    while j < quad {
                        a0 = $madd(a0, _mm256_loadu_ps(xp.add(j)), $load(pr.add(j)));
                        a1 = $madd(a1, _mm256_loadu_ps(xp.add(j + 8)), $load(pr.add(j + 8)));
                        a2 = $madd(a2, _mm256_loadu_ps(xp.add(j + 16)), $load(pr.add(j + 16)));
                        a3 = $madd(a3, _mm256_loadu_ps(xp.add(j + 24)), $load(pr.add(j + 24)));
                        j += 32;
                    }
                    // The last full chunks (at most three) go to accumulators 0, 1, 2.
                    if j < main {
                        a0 = $madd(a0, _mm256_loadu_ps(xp.add(j)), $load(pr.add(j)));
                        j += 8;
                    }
                    if j < main {
                        a1 = $madd(a1, _mm256_loadu_ps(xp.add(j)), $load(pr.add(j)));
                        j += 8;
                    }
                    if j < main {
                        a2 = $madd(a2, _mm256_loadu_ps(xp.add(j)), $load(pr.add(j)));
                    }
                    let mut s = reduce(a0, a1, a2, a3);
                    let row = &w[o * n..(o + 1) * n];
                    for t in main..n {
                        s = x[t].mul_add($value(row, t), s);
                    }
                    out[o] = $post(s);
                    o += 1;
                }
            }
        };
    }

    #[inline(always)]
    pub(super) unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    /// bf16 bits are the high half of the `f32` bits.
    #[inline(always)]
    pub(super) unsafe fn load_bf16(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p.cast());
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    #[inline(always)]
    pub(super) unsafe fn load_f16(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    /// Eight E4M3 bytes as their values times `2^-8` (see the module documentation):
    /// sign-extended, `ssss ssss seee emmm` shifted left 7 gives
    /// `ssee eemm m000 0000`, and the mask clears the second sign copy.
    #[inline(always)]
    pub(super) unsafe fn load_e4m3(p: *const u8) -> __m256 {
        let h = _mm_slli_epi16::<7>(_mm_cvtepi8_epi16(_mm_loadl_epi64(p.cast())));
        _mm256_cvtph_ps(_mm_and_si128(h, _mm_set1_epi16(0xbf80u16 as i16)))
    }

    /// Eight E4M3 bytes as the `f32` values times `2^-120` (see the module
    /// documentation): sign-extended to 32 bits, shifted left 20, and masked to the sign,
    /// the four exponent bits and the three mantissa bits.
    #[inline(always)]
    pub(super) unsafe fn load_e4m3_f32(p: *const u8) -> __m256 {
        let d = _mm256_slli_epi32::<20>(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast())));
        _mm256_castsi256_ps(_mm256_and_si256(
            d,
            _mm256_set1_epi32(0x87F0_0000u32 as i32),
        ))
    }

    pub(super) fn value_f32(w: &[f32], i: usize) -> f32 {
        w[i]
    }

    pub(super) fn value_bf16(w: &[u16], i: usize) -> f32 {
        Rows::Bf16(w).value(i)
    }

    pub(super) fn value_f16(w: &[u16], i: usize) -> f32 {
        Rows::F16(w).value(i)
    }

    /// The tail in the same `2^-8` domain as the vector body.
    pub(super) fn value_e4m3(w: &[u8], i: usize) -> f32 {
        Rows::E4M3(w).value(i) * (1.0 / 256.0)
    }

    /// The tail in the same `2^-120` domain as the `f32`-decoding kernel's body; exact,
    /// since an E4M3 value's 4 significant bits stay above the `f32` subnormal quantum.
    pub(super) fn value_e4m3_f32(w: &[u8], i: usize) -> f32 {
        Rows::E4M3(w).value(i) * (1.0 / (1u128 << 120) as f32)
    }

    pub(super) fn times_1024(s: f32) -> f32 {
        s * SUM_SCALE
    }

    pub(super) fn same(s: f32) -> f32 {
        s
    }

    pub(super) fn times_256(s: f32) -> f32 {
        s * 256.0
    }

    kernel!(
        rows_f32,
        "avx2,f16c,fma",
        f32,
        load_f32,
        mul_add,
        value_f32,
        same
    );
    kernel!(
        rows_bf16,
        "avx2,f16c,fma",
        u16,
        load_bf16,
        mul_add,
        value_bf16,
        same
    );
    kernel!(
        rows_f16,
        "avx2,f16c,fma",
        u16,
        load_f16,
        mul_add,
        value_f16,
        same
    );
    kernel!(
        rows_e4m3,
        "avx2,f16c,fma",
        u8,
        load_e4m3,
        mul_add,
        value_e4m3,
        times_256
    );
    kernel!(
        rows_e4m3_f32,
        "avx2,f16c,fma",
        u8,
        load_e4m3_f32,
        mul_add,
        value_e4m3_f32,
        times_1024
    );

    /// Activation rows per register block of the multi-row kernels: 3 rows of four
    /// 8-lane accumulators are 12 of the 16 registers, leaving the decoded weights and
    /// a product.
    const BLOCK_ROWS: usize = 3;

    /// `super::Activations::dots_rows` on AVX2; the caller has checked [`available`].
    pub(super) fn dots_rows(
        x: &[f32],
        scaled: Option<&[f32]>,
        rows: usize,
        n: usize,
        w: Rows<'_>,
        out: &mut [f32],
    ) {
        if !super::rows_fit(x, scaled, rows, n, w, out) {
            // Not reachable from the GEMV, which sizes every operand (see `dots`).
            super::dots_rows_portable(x, rows, n, w, out);
            return;
        }
        // SAFETY: `available()` returned true (the caller checks it), so the CPU runs
        // AVX2, F16C and FMA instructions; `x` holds
        // `rows * n` values, `w` holds `k` rows of `n` and `out` `rows * k` results,
        // which is every value the kernels touch.
        unsafe {
            match (w, scaled) {
                (Rows::F32(ws), _) => multi_f32(x, rows, n, ws, out),
                (Rows::Bf16(ws), _) => multi_bf16(x, rows, n, ws, out),
                (Rows::F16(ws), _) => multi_f16(x, rows, n, ws, out),
                (Rows::E4M3(ws), Some(xs)) => multi_e4m3_f32(xs, rows, n, ws, out),
                (Rows::E4M3(ws), None) => multi_e4m3(x, rows, n, ws, out),
            }
        }
    }

    /// Generates a multi-row kernel over one storage format (see the module
    /// documentation): `$block::<R>` multiplies one weight row into `R` activation
    /// rows, each in the order of `dot::dot` with its own four accumulators, and
    /// `$name` runs it over every weight row and every block of rows. The arguments
    /// are those of `kernel!`.
    macro_rules! multi_kernel {
        ($name:ident, $block:ident, $features:literal, $elem:ty, $load:expr, $madd:expr, $value:expr, $post:expr) => {
            /// Weight row `w` (`n` values) times the `R` rows of `x` (`n` apart), the
            /// results to `out`, `k` apart.
            #[target_feature(enable = $features)]
            unsafe fn $block<const R: usize>(
                x: &[f32],
                n: usize,
                w: &[$elem],
                out: *mut f32,
                k: usize,
            ) {
                let main = n - n % 8;
                let quad = n - n % 32;
                let (xp, pr) = (x.as_ptr(), w.as_ptr());
                let mut acc = [[_mm256_setzero_ps(); 4]; R];
                let mut j = 0;
                while j < quad {
                    prefetch(pr.add(j));
                    for c in 0..4 {
                        let wv = $load(pr.add(j + 8 * c));
                        for (r, a) in acc.iter_mut().enumerate() {
                            a[c] = $madd(a[c], _mm256_loadu_ps(xp.add(r * n + j + 8 * c)), wv);
                        }
                    }
                    j += 32;
                }
                // The last full chunks (at most three) go to accumulators 0, 1, 2.
                for c in 0..3 {
                    if j < main {
                        let wv = $load(pr.add(j));
                        for (r, a) in acc.iter_mut().enumerate() {
                            a[c] = $madd(a[c], _mm256_loadu_ps(xp.add(r * n + j)), wv);
                        }
                        j += 8;
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    let mut s = reduce(a[0], a[1], a[2], a[3]);
                    let xr = &x[r * n..(r + 1) * n];
                    for t in main..n {
                        s = xr[t].mul_add($value(w, t), s);
                    }
                    *out.add(r * k) = $post(s);
                }
            }

            /// `out[r * k + o]` for every row `r` of `x` and row `o` of `w`.
            #[target_feature(enable = $features)]
            unsafe fn $name(x: &[f32], rows: usize, n: usize, w: &[$elem], out: &mut [f32]) {
                let k = w.len() / n;
                let o_ptr = out.as_mut_ptr();
                for o in 0..k {
                    let wr = &w[o * n..(o + 1) * n];
                    let mut r = 0;
                    while r + BLOCK_ROWS <= rows {
                        $block::<BLOCK_ROWS>(&x[r * n..], n, wr, o_ptr.add(r * k + o), k);
                        r += BLOCK_ROWS;
                    }
                    match rows - r {
                        1 => $block::<1>(&x[r * n..], n, wr, o_ptr.add(r * k + o), k),
                        2 => $block::<2>(&x[r * n..], n, wr, o_ptr.add(r * k + o), k),
                        _ => {}
                    }
                }
            }
        };
    }

    multi_kernel!(
        multi_f32,
        block_f32,
        "avx2,f16c,fma",
        f32,
        load_f32,
        mul_add,
        value_f32,
        same
    );
    multi_kernel!(
        multi_bf16,
        block_bf16,
        "avx2,f16c,fma",
        u16,
        load_bf16,
        mul_add,
        value_bf16,
        same
    );
    multi_kernel!(
        multi_f16,
        block_f16,
        "avx2,f16c,fma",
        u16,
        load_f16,
        mul_add,
        value_f16,
        same
    );
    multi_kernel!(
        multi_e4m3,
        block_e4m3,
        "avx2,f16c,fma",
        u8,
        load_e4m3,
        mul_add,
        value_e4m3,
        times_256
    );
    multi_kernel!(
        multi_e4m3_f32,
        block_e4m3_f32,
        "avx2,f16c,fma",
        u8,
        load_e4m3_f32,
        mul_add,
        value_e4m3_f32,
        times_1024
    );
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 multi-row kernels; see the module documentation above. A 16-lane
    //! register holds accumulators `c` and `c + 1` of `dot::dot`'s order (the chunks of
    //! a round are consecutive), so the main loop takes 32 values per row in two
    //! registers; the last chunks, the reduction and the tail run on the 8-lane halves
    //! with the AVX2 kernels' own steps, so every result is theirs bit for bit.
    //!
    //! `unsafe` is confined to this module, as in `avx2`: the kernels carry
    //! `#[target_feature]` and run only after `available()` said yes, and they read
    //! inside slices whose lengths were checked first.
    #![allow(unsafe_code)]

    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::avx2::{
        load_bf16, load_e4m3, load_e4m3_f32, load_f16, load_f32, mul_add, reduce, same, times_1024,
        times_256, value_bf16, value_e4m3, value_e4m3_f32, value_f16, value_f32,
    };
    use super::Rows;

    /// Whether this CPU has AVX-512F besides the AVX2 kernels' features, detected once.
    pub(super) fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| super::avx2::available() && is_x86_feature_detected!("avx512f"))
    }

    /// Activation rows per register block: 8 rows of two 16-lane accumulators are 16
    /// of the 32 registers, leaving room for the two decoded weight registers and the
    /// products.
    const BLOCK_ROWS: usize = 8;

    /// `super::Activations::dots_rows` on AVX-512; the caller has checked
    /// [`available`].
    pub(super) fn dots_rows(
        x: &[f32],
        scaled: Option<&[f32]>,
        rows: usize,
        n: usize,
        w: Rows<'_>,
        out: &mut [f32],
    ) {
        if !super::rows_fit(x, scaled, rows, n, w, out) {
            super::dots_rows_portable(x, rows, n, w, out);
            return;
        }
        // SAFETY: as in `avx2::dots_rows`, with AVX-512F checked by `available()`.
        unsafe {
            match (w, scaled) {
                // One weight row makes no tile.
                (Rows::F32(ws), _) if ws.len() < TILE_WEIGHT_ROWS * n => {
                    multi_f32(x, rows, n, ws, out)
                }
                (Rows::F32(ws), _) => tiles_f32(x, rows, n, ws, out),
                (Rows::Bf16(ws), _) => multi_bf16(x, rows, n, ws, out),
                (Rows::F16(ws), _) => multi_f16(x, rows, n, ws, out),
                (Rows::E4M3(ws), Some(xs)) => multi_e4m3_f32(xs, rows, n, ws, out),
                (Rows::E4M3(ws), None) => multi_e4m3(x, rows, n, ws, out),
            }
        }
    }

    /// Activation rows of a tile of [`tiles_f32`]: 4 rows by [`TILE_WEIGHT_ROWS`]
    /// weight rows are 16 accumulator registers, besides the 2 weight registers and
    /// the activation one.
    const TILE_ROWS: usize = 4;

    /// Weight rows of a tile of [`tiles_f32`]. Three (24 accumulators, 4 activation
    /// rows) spend fewer loads per multiply-add still, but measured slower in the
    /// decode step (BENCHMARKS.md, "The f32 multi-row kernel in tiles").
    const TILE_WEIGHT_ROWS: usize = 2;

    /// Bytes ahead of its weights that a tile's first pass asks for, one cache line
    /// per line it loads, in each of its weight rows. In `perf`'s share of the batch-8
    /// step against the single-row kernel's (alternating runs), 2 KiB (the blocks'
    /// [`super::avx2::PREFETCH_BYTES`]) gave the tiles 1.52x, 4 and 8 KiB 1.20x to
    /// 1.26x, 16 KiB 1.30x, and no hint at all 1.71x: each weight row is a stream
    /// of its own, so the hints must cover a memory latency of two streams' lines.
    /// The packed weights lie on 2 MiB pages (`crate::pack`), so a hint past a 4 KiB
    /// boundary costs no page walk of its own.
    const TILE_PREFETCH_BYTES: usize = 8192;

    /// `W` weight rows of `f32` (`n` values, `n` apart from `w`) times `R` activation
    /// rows of `x` (`n` apart), each result in `dot::dot`'s order; result `(r, i)` to
    /// `out[r * k + i]`. Each activation vector is loaded once for the `W` weight rows
    /// and each weight vector once for the `R` activation rows, so a tile of 4 by 2
    /// spends 6 loads per 8 fused multiply-adds where a block of 8 rows of one weight
    /// row spends 9 per 8. `PF`: ask for the weights [`TILE_PREFETCH_BYTES`] ahead (the
    /// first tile over these weight rows; the next finds them in L1).
    #[target_feature(enable = "avx512f,avx2,f16c,fma")]
    unsafe fn tile_f32<const R: usize, const W: usize, const PF: bool>(
        x: &[f32],
        n: usize,
        w: &[f32],
        out: *mut f32,
        k: usize,
    ) {
        let main = n - n % 8;
        let quad = n - n % 32;
        let (xp, pr) = (x.as_ptr(), w.as_ptr());
        // acc[r][i][h]: accumulators 2h and 2h + 1 of result (r, i).
        let mut acc = [[[_mm512_setzero_ps(); 2]; W]; R];
        let mut j = 0;
        while j < quad {
            for h in 0..2 {
                let at = j + 16 * h;
                let mut wv = [_mm512_setzero_ps(); W];
                for (i, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(pr.add(i * n + at));
                }
                for (r, ar) in acc.iter_mut().enumerate() {
                    if PF && r < W {
                        _mm_prefetch::<_MM_HINT_T0>(
                            pr.add(r * n + at)
                                .cast::<i8>()
                                .wrapping_add(TILE_PREFETCH_BYTES),
                        );
                    }
                    let xv = _mm512_loadu_ps(xp.add(r * n + at));
                    for (a, &wi) in ar.iter_mut().zip(&wv) {
                        a[h] = _mm512_fmadd_ps(xv, wi, a[h]);
                    }
                }
            }
            j += 32;
        }
        // The last full chunks (at most three) go to accumulators 0, 1, 2, the 8-lane
        // halves of the two registers; then the reduction and the tail, as in the
        // blocks of `multi_kernel!`.
        let left = (main - j) / 8;
        for r in 0..R {
            let xs = &x[r * n..(r + 1) * n];
            for i in 0..W {
                let ws = &w[i * n..(i + 1) * n];
                let (mut a0, mut a1) = halves(acc[r][i][0]);
                let (mut a2, a3) = halves(acc[r][i][1]);
                let (xr, wr) = (xs.as_ptr().add(j), ws.as_ptr().add(j));
                if left > 0 {
                    a0 = mul_add(a0, _mm256_loadu_ps(xr), load_f32(wr));
                }
                if left > 1 {
                    a1 = mul_add(a1, _mm256_loadu_ps(xr.add(8)), load_f32(wr.add(8)));
                }
                if left > 2 {
                    a2 = mul_add(a2, _mm256_loadu_ps(xr.add(16)), load_f32(wr.add(16)));
                }
                let mut s = reduce(a0, a1, a2, a3);
                for t in main..n {
                    s = xs[t].mul_add(ws[t], s);
                }
                *out.add(r * k + i) = s;
            }
        }
    }

    /// `multi_f32` in tiles of [`TILE_ROWS`] activation rows by [`TILE_WEIGHT_ROWS`]
    /// weight rows (see the module documentation): each group of weight rows is read
    /// from memory by its first tile and from L1 by the others; a last weight row
    /// left over goes to the blocks of `block_f32`, as in `multi_f32`. Every result
    /// is the one `multi_f32` gives, bit for bit: only the order in which the results
    /// are computed changes, not any result's sum.
    #[target_feature(enable = "avx512f,avx2,f16c,fma")]
    unsafe fn tiles_f32(x: &[f32], rows: usize, n: usize, w: &[f32], out: &mut [f32]) {
        const W: usize = TILE_WEIGHT_ROWS;
        let k = w.len() / n;
        let groups = k / W;
        let o_ptr = out.as_mut_ptr();
        for g in 0..groups {
            let o = g * W;
            let wr = &w[o * n..(o + W) * n];
            let mut r = 0;
            while r < rows {
                let (xr, dst) = (&x[r * n..], o_ptr.add(r * k + o));
                let first = r == 0;
                match (rows - r).min(TILE_ROWS) {
                    4 if first => tile_f32::<4, W, true>(xr, n, wr, dst, k),
                    4 => tile_f32::<4, W, false>(xr, n, wr, dst, k),
                    3 if first => tile_f32::<3, W, true>(xr, n, wr, dst, k),
                    3 => tile_f32::<3, W, false>(xr, n, wr, dst, k),
                    2 if first => tile_f32::<2, W, true>(xr, n, wr, dst, k),
                    2 => tile_f32::<2, W, false>(xr, n, wr, dst, k),
                    _ if first => tile_f32::<1, W, true>(xr, n, wr, dst, k),
                    _ => tile_f32::<1, W, false>(xr, n, wr, dst, k),
                }
                r += TILE_ROWS;
            }
        }
        for o in groups * W..k {
            let wr = &w[o * n..(o + 1) * n];
            let mut r = 0;
            while r + BLOCK_ROWS <= rows {
                block_f32::<BLOCK_ROWS>(&x[r * n..], n, wr, o_ptr.add(r * k + o), k);
                r += BLOCK_ROWS;
            }
            let (xr, dst) = (&x[r * n..], o_ptr.add(r * k + o));
            match rows - r {
                1 => block_f32::<1>(xr, n, wr, dst, k),
                2 => block_f32::<2>(xr, n, wr, dst, k),
                3 => block_f32::<3>(xr, n, wr, dst, k),
                4 => block_f32::<4>(xr, n, wr, dst, k),
                5 => block_f32::<5>(xr, n, wr, dst, k),
                6 => block_f32::<6>(xr, n, wr, dst, k),
                7 => block_f32::<7>(xr, n, wr, dst, k),
                _ => {}
            }
        }
    }

    /// `multi_f32` alone (blocks of 8 activation rows of one weight row), for the
    /// tests that compare the tiles with it.
    #[cfg(test)]
    pub(super) fn blocks_f32(x: &[f32], rows: usize, n: usize, w: &[f32], out: &mut [f32]) {
        assert!(available() && super::rows_fit(x, None, rows, n, Rows::F32(w), out));
        // SAFETY: AVX-512F and the AVX2 kernels' features were detected, and every
        // operand holds what the kernel touches (both asserted above).
        unsafe { multi_f32(x, rows, n, w, out) }
    }

    /// The low and high 8 lanes of `v`.
    #[inline(always)]
    unsafe fn halves(v: __m512) -> (__m256, __m256) {
        let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v));
        (_mm512_castps512_ps256(v), _mm256_castpd_ps(hi))
    }

    /// `acc + x * w` rounded once, as `avx2::mul_add`.
    #[inline(always)]
    unsafe fn mul_add16(acc: __m512, x: __m512, w: __m512) -> __m512 {
        _mm512_fmadd_ps(x, w, acc)
    }

    #[inline(always)]
    unsafe fn load16_f32(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }

    /// bf16 bits are the high half of the `f32` bits.
    #[inline(always)]
    unsafe fn load16_bf16(p: *const u16) -> __m512 {
        let h = _mm256_loadu_si256(p.cast());
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    #[inline(always)]
    unsafe fn load16_f16(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }

    /// Sixteen E4M3 bytes as their values times `2^-8`, as `avx2::load_e4m3`.
    #[inline(always)]
    unsafe fn load16_e4m3(p: *const u8) -> __m512 {
        let h = _mm256_slli_epi16::<7>(_mm256_cvtepi8_epi16(_mm_loadu_si128(p.cast())));
        _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(0xbf80u16 as i16)))
    }

    /// Sixteen E4M3 bytes as their values times `2^-120`, as `avx2::load_e4m3_f32`.
    #[inline(always)]
    unsafe fn load16_e4m3_f32(p: *const u8) -> __m512 {
        let d = _mm512_slli_epi32::<20>(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast())));
        _mm512_castsi512_ps(_mm512_and_si512(
            d,
            _mm512_set1_epi32(0x87F0_0000u32 as i32),
        ))
    }

    /// The row of a block at which [`prefetch_half`] asks for the first half of the
    /// weights ahead; the second half is asked for two rows before the block's last.
    /// Both hints at the top of the row loop (where the compiler puts
    /// `avx2::prefetch`'s two) made the fused loop stall on the second and on the weight
    /// load after it, and stream from memory slower than the unfused loop did, whose
    /// hints the compiler had spread among its multiplies; spread by hand, the two
    /// stream alike (BENCHMARKS.md, "dot's order with fused multiply-add").
    const FIRST_HINT_ROW: usize = 1;

    /// Half `h` (0 or 1) of `avx2::prefetch` for the 32 weights at `p`: the cache
    /// lines of its 16 weights `16 h..16 h + 16`, [`avx2::PREFETCH_BYTES`] ahead.
    #[inline(always)]
    unsafe fn prefetch_half<T>(p: *const T, h: usize) {
        let bytes = 16 * std::mem::size_of::<T>();
        let at = p
            .cast::<i8>()
            .wrapping_add(super::avx2::PREFETCH_BYTES + h * bytes);
        let mut off = 0;
        while off < bytes {
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(off));
            off += 64;
        }
    }

    /// Generates a multi-row kernel: `$load16`/`$madd16` for the main loop, and the
    /// AVX2 kernel's `$load`, `$madd`, `$value` and `$post` for the rest.
    macro_rules! multi_kernel {
        ($name:ident, $block:ident, $elem:ty, $load16:expr, $madd16:expr, $load:expr, $madd:expr, $value:expr, $post:expr) => {
            /// Weight row `w` (`n` values) times the `R` rows of `x` (`n` apart), the
            /// results to `out`, `k` apart.
            #[target_feature(enable = "avx512f,avx2,f16c,fma")]
            unsafe fn $block<const R: usize>(
                x: &[f32],
                n: usize,
                w: &[$elem],
                out: *mut f32,
                k: usize,
            ) {
                let main = n - n % 8;
                let quad = n - n % 32;
                let (xp, pr) = (x.as_ptr(), w.as_ptr());
                let mut a01 = [_mm512_setzero_ps(); R];
                let mut a23 = [_mm512_setzero_ps(); R];
                let mut j = 0;
                while j < quad {
                    let w01 = $load16(pr.add(j));
                    let w23 = $load16(pr.add(j + 16));
                    for r in 0..R {
                        let xr = xp.add(r * n + j);
                        if r == FIRST_HINT_ROW.min(R - 1) {
                            prefetch_half(pr.add(j), 0);
                        }
                        a01[r] = $madd16(a01[r], _mm512_loadu_ps(xr), w01);
                        if r + 2 == R.max(2) {
                            prefetch_half(pr.add(j), 1);
                        }
                        a23[r] = $madd16(a23[r], _mm512_loadu_ps(xr.add(16)), w23);
                    }
                    j += 32;
                }
                // The last full chunks (at most three) go to accumulators 0, 1, 2,
                // the 8-lane halves of the two registers.
                let left = (main - j) / 8;
                let lw = [
                    if left > 0 {
                        $load(pr.add(j))
                    } else {
                        _mm256_setzero_ps()
                    },
                    if left > 1 {
                        $load(pr.add(j + 8))
                    } else {
                        _mm256_setzero_ps()
                    },
                    if left > 2 {
                        $load(pr.add(j + 16))
                    } else {
                        _mm256_setzero_ps()
                    },
                ];
                for r in 0..R {
                    let (mut a0, mut a1) = halves(a01[r]);
                    let (mut a2, a3) = halves(a23[r]);
                    let xr = xp.add(r * n + j);
                    if left > 0 {
                        a0 = $madd(a0, _mm256_loadu_ps(xr), lw[0]);
                    }
                    if left > 1 {
                        a1 = $madd(a1, _mm256_loadu_ps(xr.add(8)), lw[1]);
                    }
                    if left > 2 {
                        a2 = $madd(a2, _mm256_loadu_ps(xr.add(16)), lw[2]);
                    }
                    let mut s = reduce(a0, a1, a2, a3);
                    let xs = &x[r * n..(r + 1) * n];
                    for t in main..n {
                        s = xs[t].mul_add($value(w, t), s);
                    }
                    *out.add(r * k) = $post(s);
                }
            }

            /// `out[r * k + o]` for every row `r` of `x` and row `o` of `w`.
            #[target_feature(enable = "avx512f,avx2,f16c,fma")]
            unsafe fn $name(x: &[f32], rows: usize, n: usize, w: &[$elem], out: &mut [f32]) {
                let k = w.len() / n;
                let o_ptr = out.as_mut_ptr();
                for o in 0..k {
                    let wr = &w[o * n..(o + 1) * n];
                    let mut r = 0;
                    while r + BLOCK_ROWS <= rows {
                        $block::<BLOCK_ROWS>(&x[r * n..], n, wr, o_ptr.add(r * k + o), k);
                        r += BLOCK_ROWS;
                    }
                    let (xr, dst) = (&x[r * n..], o_ptr.add(r * k + o));
                    match rows - r {
                        1 => $block::<1>(xr, n, wr, dst, k),
                        2 => $block::<2>(xr, n, wr, dst, k),
                        3 => $block::<3>(xr, n, wr, dst, k),
                        4 => $block::<4>(xr, n, wr, dst, k),
                        5 => $block::<5>(xr, n, wr, dst, k),
                        6 => $block::<6>(xr, n, wr, dst, k),
                        7 => $block::<7>(xr, n, wr, dst, k),
                        _ => {}
                    }
                }
            }
        };
    }

    multi_kernel!(
        multi_f32, block_f32, f32, load16_f32, mul_add16, load_f32, mul_add, value_f32, same
    );
    multi_kernel!(
        multi_bf16,
        block_bf16,
        u16,
        load16_bf16,
        mul_add16,
        load_bf16,
        mul_add,
        value_bf16,
        same
    );
    multi_kernel!(
        multi_f16, block_f16, u16, load16_f16, mul_add16, load_f16, mul_add, value_f16, same
    );
    multi_kernel!(
        multi_e4m3,
        block_e4m3,
        u8,
        load16_e4m3,
        mul_add16,
        load_e4m3,
        mul_add,
        value_e4m3,
        times_256
    );
    multi_kernel!(
        multi_e4m3_f32,
        block_e4m3_f32,
        u8,
        load16_e4m3_f32,
        mul_add16,
        load_e4m3_f32,
        mul_add,
        value_e4m3_f32,
        times_1024
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusec_weights::SplitMix64;

    /// Random exact values of `dtype` and their stored forms.
    fn weights(rng: &mut SplitMix64, n: usize) -> (Vec<f32>, Vec<u16>, Vec<u16>, Vec<u8>) {
        let raw: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let w32 = raw.clone();
        let wb = raw
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let wh = raw
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
        let w8 = raw
            .iter()
            .map(|&v| {
                let q = fusec_ir::numerics::round_to(DType::Fp8E4M3, v * 40.0);
                rounding::e4m3_bits(q).expect("rounded")
            })
            .collect();
        (w32, wb, wh, w8)
    }

    #[test]
    fn fast_paths_match_the_portable_kernel_bit_for_bit() {
        let mut rng = SplitMix64::new(7);
        // Widths below, at and off the vector width and the 32 values of one round of
        // the four accumulators (one, two and three leftover chunks, with and without a
        // tail); row counts off the block of 4. Each shape runs with FP8-exact
        // activations (the E4M3 kernel's `f32` decoding) and with arbitrary ones (its
        // `f16` decoding).
        let shapes = [
            (1, 1),
            (3, 7),
            (4, 8),
            (5, 9),
            (9, 17),
            (2, 24),
            (3, 31),
            (4, 32),
            (2, 33),
            (3, 40),
            (2, 56),
            (5, 63),
            (13, 64),
            (7, 131),
            (3, 773),
        ];
        for (&(rows, n), exact) in shapes.iter().flat_map(|s| [(s, true), (s, false)]) {
            let x: Vec<f32> = (0..n)
                .map(|_| {
                    let v = rng.normal() as f32;
                    if exact {
                        fusec_ir::numerics::round_to(DType::Fp8E4M3, v)
                    } else {
                        v
                    }
                })
                .collect();
            if exact {
                assert!(e4m3_products_exact(&x));
            }
            let (w32, wb, wh, w8) = weights(&mut rng, rows * n);
            for w in [
                Rows::F32(&w32),
                Rows::Bf16(&wb),
                Rows::F16(&wh),
                Rows::E4M3(&w8),
            ] {
                let (mut fast, mut slow) = (vec![0.0; rows], vec![0.0; rows]);
                dots(&x, w, &mut fast);
                dots_portable(&x, w, &mut slow);
                assert_eq!(
                    fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    slow.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{w:?} rows {rows} n {n} exact {exact}"
                );
                // The portable kernel is `dot::dot` over the decoded values.
                for (o, &y) in slow.iter().enumerate() {
                    let decoded: Vec<f32> = (o * n..(o + 1) * n).map(|i| w.value(i)).collect();
                    assert_eq!(y.to_bits(), dot(&x, &decoded).to_bits());
                }
            }
        }
    }

    /// Every multi-row path (the one this machine dispatches to, AVX2's and AVX-512's
    /// where the CPU has them, and the portable one) against each row alone on the
    /// single-row path, bit for bit: row counts across and off the register blocks,
    /// widths off the vector width and the 32 values of a round, every storage, with
    /// FP8-exact activations and arbitrary ones.
    #[test]
    fn multi_row_kernels_give_each_row_its_single_row_results_bit_for_bit() {
        let mut rng = SplitMix64::new(19);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for rows in [2, 3, 4, 5, 7, 8, 9, 11, 16, 17] {
            for (k, n) in [
                (3, 7),
                (5, 8),
                (2, 33),
                (4, 40),
                (3, 56),
                (6, 64),
                (2, 131),
                (3, 768),
            ] {
                for exact in [true, false] {
                    let x: Vec<f32> = (0..rows * n)
                        .map(|_| {
                            let v = rng.normal() as f32;
                            match exact {
                                true => fusec_ir::numerics::round_to(DType::Fp8E4M3, v),
                                false => v,
                            }
                        })
                        .collect();
                    let (w32, wb, wh, w8) = weights(&mut rng, k * n);
                    for w in [
                        Rows::F32(&w32),
                        Rows::Bf16(&wb),
                        Rows::F16(&wh),
                        Rows::E4M3(&w8),
                    ] {
                        let acts = Activations::new(&x, w);
                        let mut alone = vec![0.0; rows * k];
                        for (r, y) in alone.chunks_mut(k).enumerate() {
                            acts.row(r, n).dots(w, y);
                        }
                        let mut all = vec![0.0; rows * k];
                        acts.dots_rows(rows, n, w, &mut all);
                        let what = format!("{w:?} rows {rows} k {k} n {n} exact {exact}");
                        assert_eq!(bits(&all), bits(&alone), "dispatched: {what}");
                        let mut portable = vec![0.0; rows * k];
                        dots_rows_portable(&x, rows, n, w, &mut portable);
                        assert_eq!(bits(&portable), bits(&alone), "portable: {what}");
                        #[cfg(target_arch = "x86_64")]
                        {
                            let scaled = acts.scaled.as_deref();
                            if avx2::available() {
                                let mut y = vec![0.0; rows * k];
                                avx2::dots_rows(&x, scaled, rows, n, w, &mut y);
                                assert_eq!(bits(&y), bits(&alone), "avx2: {what}");
                            }
                            if avx512::available() {
                                let mut y = vec![0.0; rows * k];
                                avx512::dots_rows(&x, scaled, rows, n, w, &mut y);
                                assert_eq!(bits(&y), bits(&alone), "avx512: {what}");
                            }
                        }
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// The multi-row kernel against an `f64` reference: each result within the
        /// classic bound of a recursive sum of `n` rounded products, `n u sum |x w|`
        /// (Higham, "Accuracy and Stability of Numerical Algorithms", 2002, §3.1),
        /// with `u = 2^-24`, and bit-identical to the row alone.
        #[test]
        fn multi_row_kernel_is_within_the_dot_product_bound_of_an_f64_reference(
            rows in 1usize..=16,
            k in 1usize..6,
            n in 1usize..200,
            seed in 0u64..1_000_000,
        ) {
            let mut rng = SplitMix64::new(seed);
            let x: Vec<f32> = (0..rows * n).map(|_| rng.normal() as f32).collect();
            let (w32, wb, _, _) = weights(&mut rng, k * n);
            for w in [Rows::F32(&w32), Rows::Bf16(&wb)] {
                let acts = Activations::new(&x, w);
                let mut y = vec![0.0; rows * k];
                acts.dots_rows(rows, n, w, &mut y);
                for r in 0..rows {
                    let mut alone = vec![0.0; k];
                    acts.row(r, n).dots(w, &mut alone);
                    for o in 0..k {
                        let (mut exact, mut magnitude) = (0.0f64, 0.0f64);
                        for j in 0..n {
                            let p = f64::from(x[r * n + j]) * f64::from(w.value(o * n + j));
                            exact += p;
                            magnitude += p.abs();
                        }
                        let got = y[r * k + o];
                        let bound = (n + 2) as f64 * f64::from(f32::EPSILON / 2.0) * magnitude;
                        proptest::prop_assert!(
                            (f64::from(got) - exact).abs() <= bound,
                            "row {} out {}: {} against {} (bound {})", r, o, got, exact, bound
                        );
                        proptest::prop_assert_eq!(got.to_bits(), alone[o].to_bits());
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]

        /// The `f32` multi-row path a batched step takes (on AVX-512, tiles of 4
        /// activation rows by 2 weight rows, and the blocks of one weight row for an
        /// odd last one) against `dots_portable` of each row alone, bit for bit, and
        /// against the blocks of 8 rows it replaced: row counts across and off the
        /// tiles, even and odd weight-row counts, widths off the vector width and the
        /// 32 values of a round, and values of wide range.
        #[test]
        fn f32_multi_row_tiles_equal_each_row_alone_bit_for_bit(
            rows in 2usize..=16,
            k in 1usize..10,
            n in 1usize..300,
            seed in 0u64..1_000_000,
        ) {
            let mut rng = SplitMix64::new(seed);
            let mut value = || (rng.normal() * 2f64.powi((rng.normal() * 8.0) as i32)) as f32;
            let x: Vec<f32> = (0..rows * n).map(|_| value()).collect();
            let w: Vec<f32> = (0..k * n).map(|_| value()).collect();
            let mut all = vec![0.0f32; rows * k];
            Activations::new(&x, Rows::F32(&w)).dots_rows(rows, n, Rows::F32(&w), &mut all);
            for r in 0..rows {
                let mut alone = vec![0.0f32; k];
                dots_portable(&x[r * n..(r + 1) * n], Rows::F32(&w), &mut alone);
                for o in 0..k {
                    proptest::prop_assert_eq!(
                        all[r * k + o].to_bits(),
                        alone[o].to_bits(),
                        "row {} out {}", r, o
                    );
                }
            }
            #[cfg(target_arch = "x86_64")]
            {
                if avx512::available() {
                    let mut blocks = vec![0.0f32; rows * k];
                    avx512::blocks_f32(&x, rows, n, &w, &mut blocks);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    proptest::prop_assert_eq!(bits(&all), bits(&blocks));
                }
            }
        }
    }

    #[test]
    fn e4m3_kernels_decode_every_byte_exactly() {
        // Every finite E4M3 byte (subnormals and both zeros included) in every lane
        // position: 254 bytes in rows of 37, so each byte meets many columns, against
        // FP8-exact activations at the edges of the fast path's range and arbitrary
        // ones.
        let bytes: Vec<u8> = (0..=255u8).filter(|b| b & 0x7f != 0x7f).collect();
        let n = 37;
        let rows = 2 * bytes.len();
        let w: Vec<u8> = (0..rows * n)
            .map(|i| bytes[(i * 7) % bytes.len()])
            .collect();
        let mut rng = SplitMix64::new(3);
        let low = 1.0 / (1u128 << 90) as f32;
        let activations: [Vec<f32>; 3] = [
            (0..n)
                .map(|i| {
                    fusec_ir::numerics::round_to(DType::Fp8E4M3, rng.normal() as f32)
                        * [1.0, -2.0, 0.5][i % 3]
                })
                .collect(),
            (0..n)
                .map(|i| if i % 2 == 0 { low } else { -131072.0 })
                .collect(),
            (0..n).map(|_| rng.normal() as f32).collect(),
        ];
        for x in &activations {
            let (mut fast, mut slow) = (vec![0.0; rows], vec![0.0; rows]);
            dots(x, Rows::E4M3(&w), &mut fast);
            dots_portable(x, Rows::E4M3(&w), &mut slow);
            assert_eq!(
                fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                slow.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        assert!(e4m3_products_exact(&activations[0]));
        assert!(e4m3_products_exact(&activations[1]));
    }

    #[test]
    fn e4m3_exactness_is_detected() {
        assert!(e4m3_products_exact(&[0.0, -0.0, 1.0, -448.0, 0.001953125]));
        // 24 significant bits: a product with a 4-bit weight may round.
        assert!(!e4m3_products_exact(&[1.0 + f32::EPSILON]));
        assert!(!e4m3_products_exact(&[f32::MIN_POSITIVE / 2.0]));
        assert!(!e4m3_products_exact(&[f32::INFINITY]));
        // Outside the range the scaled kernel keeps normal and finite.
        assert!(!e4m3_products_exact(&[262144.0]));
        assert!(!e4m3_products_exact(&[1.0 / (1u128 << 100) as f32]));
        assert!(!e4m3_products_exact(&[f32::NAN]));
    }

    #[test]
    fn dot_by_follows_dot() {
        let mut rng = SplitMix64::new(11);
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 47, 64, 95, 100, 777] {
            let a: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            assert_eq!(
                dot(&a, &b).to_bits(),
                dot_by(n, |i| (a[i], b[i])).to_bits(),
                "n {n}"
            );
            // The order written out: chunk c into accumulator c % 4 by fused
            // multiply-adds, the tree, the tail fused in order.
            let mut acc = [[0.0f32; 8]; 4];
            let main = n - n % 8;
            for j in 0..main {
                let l = &mut acc[(j / 8) % 4][j % 8];
                *l = a[j].mul_add(b[j], *l);
            }
            let v: Vec<f32> = (0..8)
                .map(|i| (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i]))
                .collect();
            let mut s = ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
            for j in main..n {
                s = a[j].mul_add(b[j], s);
            }
            assert_eq!(dot(&a, &b).to_bits(), s.to_bits(), "n {n}");
        }
    }
}

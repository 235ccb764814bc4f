//! Dot products of one activation row with consecutive rows of a weight matrix held in
//! any of the executor's storage formats: `f32`, the 16 bits of `bf16` or `f16`, or
//! the byte of FP8 E4M3. Compact weights are decoded in registers, eight values at a
//! time, and never into a temporary copy of the weights.
//!
//! Every path sums in exactly the order of [`super::matmul::dot`] (eight lanes over
//! chunks of eight, the same pairwise reduction of the lanes, then the tail in order,
//! each product and sum rounded separately, never fused), so a fast path gives
//! bit-identical results to the portable one and to the eager `linear`.
//!
//! On x86-64 with AVX2 and F16C (detected at run time) each row is one 8-lane vector
//! accumulator over the row, read as one sequential stream. Processing four rows at
//! once (four streams, the activations loaded once for four rows) was measured faster
//! when the weights sit in cache (89 against 36 GB/s for f32 on one thread) but much
//! slower from memory (12.5 against 19.4 GB/s for f32, 8 against 21 for bf16, 4
//! against 8 for E4M3) on the 2-core AMD EPYC this was tuned on, and decode weights
//! never fit in cache. An E4M3 byte `s eeee mmm` is widened to the `f16` bits
//! `s 0eeee mmm0000000` with two shifts and a mask and converted by `vcvtph2ps`;
//! that value is the E4M3 value times `2^-8` (the `f16` exponent bias is 15, E4M3's 7),
//! subnormals included, so the row's sum is multiplied by 256 at the end, which is
//! exact.

use std::sync::OnceLock;

use fusec_ir::DType;

use super::matmul::dot;
use crate::dtype;

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
    fn value(&self, i: usize) -> f32 {
        match self {
            Rows::F32(w) => w[i],
            Rows::Bf16(w) => dtype::from_u16_bits(DType::Bf16, w[i]),
            Rows::F16(w) => dtype::from_u16_bits(DType::F16, w[i]),
            Rows::E4M3(w) => e4m3_table()[usize::from(w[i])],
        }
    }
}

/// The 256 E4M3 values, for the portable path.
fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0.0f32; 256];
        for (b, v) in t.iter_mut().enumerate() {
            *v = dtype::e4m3_value(b as u8);
        }
        t
    })
}

/// `out[o] = dot(x, row o of w)` for the `out.len()` rows of `x.len()` values that `w`
/// holds, on the fastest path this machine has.
pub fn dots(x: &[f32], w: Rows<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            avx2::dots(x, w, out);
            return;
        }
    }
    dots_portable(x, w, out);
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
        let main = n - n % 8;
        let mut acc = [0.0f32; 8];
        for j in (0..main).step_by(8) {
            for (i, a) in acc.iter_mut().enumerate() {
                *a += x[j + i] * w.value(base + j + i);
            }
        }
        let mut s =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (j, &xj) in x.iter().enumerate().skip(main) {
            s += xj * w.value(base + j);
        }
        *y = s;
    }
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

    /// Whether this CPU has AVX2 and F16C, detected once.
    pub(super) fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c"))
    }

    /// `super::dots` on AVX2; the caller has checked [`available`].
    pub(super) fn dots(x: &[f32], w: Rows<'_>, out: &mut [f32]) {
        let n = x.len();
        if w.len() < out.len() * n {
            // Not reachable from the GEMV, which sizes both; the portable path indexes
            // with bounds checks and reports the bug as a panic there instead of
            // reading out of bounds here.
            super::dots_portable(x, w, out);
            return;
        }
        // SAFETY: `available()` returned true (the caller checks it), so the CPU runs
        // AVX2 and F16C instructions; `w` holds at least `out.len() * n` values, which
        // is every value the kernels read.
        unsafe {
            match w {
                Rows::F32(ws) => rows_f32(x, ws, out),
                Rows::Bf16(ws) => rows_bf16(x, ws, out),
                Rows::F16(ws) => rows_f16(x, ws, out),
                Rows::E4M3(ws) => rows_e4m3(x, ws, out),
            }
        }
    }

    /// The lanes of `acc` reduced in the order of `matmul::dot`:
    /// `((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))`.
    #[inline(always)]
    unsafe fn reduce(acc: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let h = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(h) + _mm_cvtss_f32(_mm_shuffle_ps::<1>(h, h))
    }

    /// Generates a kernel over one storage format, one row at a time: `$load(p)`
    /// loads eight decoded values from `p`, `$value(w, i)` decodes one value for the
    /// tail, and `$post` scales each finished sum.
    macro_rules! kernel {
        ($name:ident, $elem:ty, $load:expr, $value:expr, $post:expr) => {
            #[target_feature(enable = "avx2,f16c")]
            unsafe fn $name(x: &[f32], w: &[$elem], out: &mut [f32]) {
                let n = x.len();
                let main = n - n % 8;
                let xp = x.as_ptr();
                let rows = out.len();
                let mut o = 0;
                while o < rows {
                    let pr = w.as_ptr().add(o * n);
                    let mut acc = _mm256_setzero_ps();
                    let mut j = 0;
                    while j < main {
                        let xv = _mm256_loadu_ps(xp.add(j));
                        acc = _mm256_add_ps(acc, _mm256_mul_ps(xv, $load(pr.add(j))));
                        j += 8;
                    }
                    let mut s = reduce(acc);
                    let row = &w[o * n..(o + 1) * n];
                    for t in main..n {
                        s += x[t] * $value(row, t);
                    }
                    out[o] = $post(s);
                    o += 1;
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    /// bf16 bits are the high half of the `f32` bits.
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p.cast());
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    /// Eight E4M3 bytes as their values times `2^-8` (see the module documentation):
    /// `0000 0000 seee emmm` shifted left 8, then arithmetically right 1, gives
    /// `ssee eemm m000 0000`, and the mask clears the second sign copy.
    #[inline(always)]
    unsafe fn load_e4m3(p: *const u8) -> __m256 {
        let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(p.cast()));
        let h = _mm_srai_epi16::<1>(_mm_slli_epi16::<8>(b));
        _mm256_cvtph_ps(_mm_and_si128(h, _mm_set1_epi16(0xbf80u16 as i16)))
    }

    fn value_f32(w: &[f32], i: usize) -> f32 {
        w[i]
    }

    fn value_bf16(w: &[u16], i: usize) -> f32 {
        Rows::Bf16(w).value(i)
    }

    fn value_f16(w: &[u16], i: usize) -> f32 {
        Rows::F16(w).value(i)
    }

    /// The tail in the same `2^-8` domain as the vector body.
    fn value_e4m3(w: &[u8], i: usize) -> f32 {
        Rows::E4M3(w).value(i) * (1.0 / 256.0)
    }

    fn same(s: f32) -> f32 {
        s
    }

    fn times_256(s: f32) -> f32 {
        s * 256.0
    }

    kernel!(rows_f32, f32, load_f32, value_f32, same);
    kernel!(rows_bf16, u16, load_bf16, value_bf16, same);
    kernel!(rows_f16, u16, load_f16, value_f16, same);
    kernel!(rows_e4m3, u8, load_e4m3, value_e4m3, times_256);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::SplitMix64;

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
                dtype::e4m3_bits(q).expect("rounded")
            })
            .collect();
        (w32, wb, wh, w8)
    }

    #[test]
    fn fast_paths_match_the_portable_kernel_bit_for_bit() {
        let mut rng = SplitMix64::new(7);
        // Widths below, at and off the vector width; row counts off the block of 4.
        for &(rows, n) in &[(1, 1), (3, 7), (4, 8), (5, 9), (9, 17), (13, 64), (7, 131)] {
            let x: Vec<f32> = (0..n)
                .map(|_| fusec_ir::numerics::round_to(DType::Fp8E4M3, rng.normal() as f32))
                .collect();
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
                    "{w:?} rows {rows} n {n}"
                );
                // The portable kernel is `matmul::dot` over the decoded values.
                for (o, &y) in slow.iter().enumerate() {
                    let decoded: Vec<f32> = (o * n..(o + 1) * n).map(|i| w.value(i)).collect();
                    assert_eq!(y.to_bits(), dot(&x, &decoded).to_bits());
                }
            }
        }
    }
}

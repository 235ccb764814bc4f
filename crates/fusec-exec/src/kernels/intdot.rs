//! Dot products of activations quantized to 8 bits per block of 32 with weight rows of
//! integer codes (`i8`, GGUF's Q8_0; `i4`, Q4_0) with one scale per block of 32, as
//! llama.cpp multiplies them (`ggml_vec_dot_q8_0_q8_0` and `ggml_vec_dot_q4_0_q8_0` in
//! ggml-cpu's quants.c, after `quantize_row_q8_0` of the activations).
//!
//! **The arithmetic** ([`dots_reference`]), for a weight row `w` and the activations
//! `x`, over the blocks `b` in order:
//!
//! ```text
//! sumi = Σ_j xq[b][j] * wq[b][j]          exact, in i32 (|sumi| <= 32 * 127 * 128)
//! acc  = acc + (sumi as f32) * (dw[b] * dx[b])   each product and the sum rounded
//! ```
//!
//! where `xq`, `dx` are the activation codes and their `f16` block scale (as `f32`),
//! `wq`, `dw` the weight's, and `acc` starts at 0. It is llama.cpp's scalar reference
//! operation for operation. Its SIMD paths sum each block's products across lanes in
//! another order, which for integers changes nothing, but accumulate the blocks in
//! lanes before one final reduction, so their last bits differ from the scalar code;
//! here every path accumulates a row's blocks in order, so every path is bit-identical
//! to the reference (checked by the tests on every code).
//!
//! **The kernels** run four weight rows at a time, one lane per row: each block's
//! 32 products of a row are summed as integers in one 256-bit vector (`vpdpbusd` with
//! AVX-512 VNNI; `vpmaddubsw` then `vpmaddwd` with AVX2), the four rows' vectors are
//! reduced to one lane each by horizontal adds, and the four accumulators advance by
//! one block in the order above. Both instructions multiply an unsigned byte by a
//! signed one, so a Q8_0 block multiplies `|w|` by `x` carrying the sign of `w` (the
//! sign trick of llama.cpp's AVX2 code; `|-128|` is 128 as an unsigned byte, and the
//! activation codes lie in `[-127, 127]`, so no product overflows and no pair of
//! products saturates 16 bits: `2 * 128 * 127 < 2^15`), and a Q4_0 block multiplies
//! its unsigned nibbles `n` by `x` and subtracts `8 * Σ x` (precomputed per activation
//! block): `Σ (n - 8) x = Σ n x - 8 Σ x`.

use super::KernelError;
use crate::pool;

/// Elements per block (`QK8_0`, `QK4_0` in ggml-common.h).
pub const BLOCK: usize = 32;

/// Consecutive weight rows of integer codes with their per-block scales.
#[derive(Copy, Clone, Debug)]
pub enum IntRows<'a> {
    /// One `i8` code per weight (the bytes of the two's complement codes).
    Q8 { codes: &'a [u8], scales: &'a [f32] },
    /// Two codes per byte in Q4_0's block order (`fusec_weights::tensor::i4_code`).
    Q4 { packed: &'a [u8], scales: &'a [f32] },
}

impl<'a> IntRows<'a> {
    /// Weights held.
    pub fn len(&self) -> usize {
        match self {
            IntRows::Q8 { codes, .. } => codes.len(),
            IntRows::Q4 { packed, .. } => packed.len() * 2,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Weights `start..end`, both multiples of [`BLOCK`].
    pub fn range(&self, start: usize, end: usize) -> IntRows<'a> {
        let blocks = start / BLOCK..end / BLOCK;
        match *self {
            IntRows::Q8 { codes, scales } => IntRows::Q8 {
                codes: &codes[start..end],
                scales: &scales[blocks],
            },
            IntRows::Q4 { packed, scales } => IntRows::Q4 {
                packed: &packed[start / 2..end / 2],
                scales: &scales[blocks],
            },
        }
    }

    /// Bytes a row of `ins` weights streams: its codes and its scales as GGUF stores
    /// them (`f16`).
    pub fn row_bytes(&self, ins: usize) -> usize {
        let blocks = ins / BLOCK;
        match self {
            IntRows::Q8 { .. } => blocks * (BLOCK + 2),
            IntRows::Q4 { .. } => blocks * (BLOCK / 2 + 2),
        }
    }

    fn scales(&self) -> &'a [f32] {
        match *self {
            IntRows::Q8 { scales, .. } | IntRows::Q4 { scales, .. } => scales,
        }
    }

    /// The codes of block `b` of the rows, as `i8` values.
    fn block(&self, b: usize) -> [i8; BLOCK] {
        let mut out = [0i8; BLOCK];
        match *self {
            IntRows::Q8 { codes, .. } => {
                for (o, &c) in out.iter_mut().zip(&codes[b * BLOCK..(b + 1) * BLOCK]) {
                    *o = c as i8;
                }
            }
            IntRows::Q4 { packed, .. } => {
                let bytes = &packed[b * BLOCK / 2..(b + 1) * BLOCK / 2];
                for (j, &byte) in bytes.iter().enumerate() {
                    out[j] = (byte & 0x0F) as i8 - 8;
                    out[j + 16] = (byte >> 4) as i8 - 8;
                }
            }
        }
        out
    }
}

/// Rows of activations quantized to 8-bit blocks: codes, each block's scale, and each
/// block's sum of codes (for the Q4_0 kernel), row-major. The vectors come from the
/// executor's pool and go back to it on drop.
#[derive(Debug)]
pub struct Q8Acts {
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub sums: Vec<i32>,
}

/// One row of [`Q8Acts`].
#[derive(Copy, Clone, Debug)]
pub struct Q8Row<'a> {
    pub codes: &'a [i8],
    pub scales: &'a [f32],
    pub sums: &'a [i32],
}

impl Q8Acts {
    /// Row `r` of the rows of `len` activations.
    pub fn row(&self, r: usize, len: usize) -> Q8Row<'_> {
        let blocks = len / BLOCK;
        Q8Row {
            codes: &self.codes[r * len..(r + 1) * len],
            scales: &self.scales[r * blocks..(r + 1) * blocks],
            sums: &self.sums[r * blocks..(r + 1) * blocks],
        }
    }
}

impl Drop for Q8Acts {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.codes));
        pool::give(std::mem::take(&mut self.scales));
        pool::give(std::mem::take(&mut self.sums));
    }
}

/// Quantizes rows of activations (row-major, row length a multiple of [`BLOCK`]) to
/// 8 bits per block as `quantize_row_q8_0_ref` (ggml-quants.c) does: the same
/// arithmetic as [`fusec_weights::quant::q8_0_block`], whose `f16` scales are kept as
/// `f32` values.
pub fn quantize_q8(x: &[f32]) -> Result<Q8Acts, KernelError> {
    if x.len() % BLOCK != 0 {
        return Err(KernelError::Invalid(format!(
            "integer GEMV: {} activations are not whole blocks of {BLOCK}",
            x.len()
        )));
    }
    let blocks = x.len() / BLOCK;
    let mut acts = Q8Acts {
        codes: pool::zeros(x.len()),
        scales: pool::take(blocks),
        sums: pool::take(blocks),
    };
    for (xb, qb) in x.chunks_exact(BLOCK).zip(acts.codes.chunks_exact_mut(BLOCK)) {
        let d = fusec_weights::quant::q8_0_block(xb, qb);
        acts.scales.push(d.to_f32());
        acts.sums.push(qb.iter().map(|&q| i32::from(q)).sum());
    }
    Ok(acts)
}

/// `out[o]` = the arithmetic of the module documentation for row `o` of `w`, on the
/// fastest path this machine has. `w` holds `out.len()` rows of `acts.codes.len()`
/// weights.
pub fn dots(acts: Q8Row<'_>, w: IntRows<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::path() != x86::Path::None && x86::dots(acts, w, out) {
            return;
        }
    }
    dots_reference(acts, w, out);
}

/// The plain reference of the arithmetic (see the module documentation).
pub fn dots_reference(acts: Q8Row<'_>, w: IntRows<'_>, out: &mut [f32]) {
    let blocks = acts.scales.len();
    let scales = w.scales();
    for (o, y) in out.iter_mut().enumerate() {
        let mut acc = 0.0f32;
        for b in 0..blocks {
            let wq = w.block(o * blocks + b);
            let xq = &acts.codes[b * BLOCK..(b + 1) * BLOCK];
            let sumi: i32 = wq
                .iter()
                .zip(xq)
                .map(|(&a, &c)| i32::from(a) * i32::from(c))
                .sum();
            acc += sumi as f32 * (scales[o * blocks + b] * acts.scales[b]);
        }
        *y = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX-512 VNNI and AVX2 kernels; see the module documentation above.
    //!
    //! `unsafe` is confined to this module: the kernels carry `#[target_feature]` and
    //! run only after [`path`] detected those features, and every load is an unaligned
    //! load of 16 or 32 bytes inside slices whose lengths [`dots`] checked first.
    #![allow(unsafe_code)]

    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::{IntRows, Q8Row, BLOCK};

    #[derive(Copy, Clone, Debug, PartialEq, Eq)]
    pub(super) enum Path {
        Vnni,
        Avx2,
        None,
    }

    /// The best path this CPU runs, detected once.
    pub(super) fn path() -> Path {
        static PATH: OnceLock<Path> = OnceLock::new();
        *PATH.get_or_init(|| {
            if is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx2")
            {
                Path::Vnni
            } else if is_x86_feature_detected!("avx2") {
                Path::Avx2
            } else {
                Path::None
            }
        })
    }

    /// Runs the kernel of [`path`]; `false` (nothing written) when the lengths do not
    /// fit, which the GEMV never gives, so that the reference reports it.
    pub(super) fn dots(acts: Q8Row<'_>, w: IntRows<'_>, out: &mut [f32]) -> bool {
        dots_with(path(), acts, w, out)
    }

    pub(super) fn dots_with(path: Path, acts: Q8Row<'_>, w: IntRows<'_>, out: &mut [f32]) -> bool {
        let blocks = acts.scales.len();
        let ins = blocks * BLOCK;
        let fits = acts.codes.len() == ins
            && acts.sums.len() == blocks
            && w.len() >= out.len() * ins
            && w.scales().len() >= out.len() * blocks;
        if !fits {
            return false;
        }
        // SAFETY: the features of `path` were detected (`path()` returned it, or a
        // test checked it), and the lengths were checked above.
        unsafe {
            match path {
                Path::Vnni => kernel_vnni(acts, w, out),
                Path::Avx2 => kernel_avx2(acts, w, out),
                Path::None => return false,
            }
        }
        true
    }

    /// One block of row `r` of the rows as a vector of 32 unsigned bytes and the
    /// activations as 32 signed bytes whose products are the block's products (Q8_0:
    /// `|w|` and `x` with the sign of `w`; Q4_0: the nibbles `n` and `x`).
    #[inline(always)]
    unsafe fn operands(w: IntRows<'_>, row_block: usize, x: __m256i) -> (__m256i, __m256i) {
        match w {
            IntRows::Q8 { codes, .. } => {
                let q = _mm256_loadu_si256(codes.as_ptr().add(row_block * BLOCK) as *const __m256i);
                (_mm256_abs_epi8(q), _mm256_sign_epi8(x, q))
            }
            IntRows::Q4 { packed, .. } => {
                let q = _mm_loadu_si128(packed.as_ptr().add(row_block * BLOCK / 2) as *const __m128i);
                let both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
                (_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), x)
            }
        }
    }

    /// The four rows' eight-lane integer sums reduced to one lane per row, in row order.
    #[inline(always)]
    unsafe fn reduce4(v: [__m256i; 4]) -> __m128i {
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))
    }

    macro_rules! kernel {
        ($name:ident, $features:literal, $sum:ident) => {
            #[target_feature(enable = $features)]
            unsafe fn $name(acts: Q8Row<'_>, w: IntRows<'_>, out: &mut [f32]) {
                let blocks = acts.scales.len();
                let scales = w.scales();
                let q4 = matches!(w, IntRows::Q4 { .. });
                let groups = out.len() / 4;
                for g in 0..groups {
                    let o = 4 * g;
                    let mut acc = _mm_setzero_ps();
                    for b in 0..blocks {
                        let x = _mm256_loadu_si256(acts.codes.as_ptr().add(b * BLOCK) as *const __m256i);
                        let mut v = [_mm256_setzero_si256(); 4];
                        for (r, v) in v.iter_mut().enumerate() {
                            let (a, s) = operands(w, (o + r) * blocks + b, x);
                            *v = $sum(a, s);
                        }
                        let mut sumi = reduce4(v);
                        if q4 {
                            sumi = _mm_sub_epi32(sumi, _mm_set1_epi32(8 * acts.sums[b]));
                        }
                        let dw = _mm_set_ps(
                            scales[(o + 3) * blocks + b],
                            scales[(o + 2) * blocks + b],
                            scales[(o + 1) * blocks + b],
                            scales[o * blocks + b],
                        );
                        let d = _mm_mul_ps(dw, _mm_set1_ps(acts.scales[b]));
                        acc = _mm_add_ps(acc, _mm_mul_ps(_mm_cvtepi32_ps(sumi), d));
                    }
                    _mm_storeu_ps(out.as_mut_ptr().add(o), acc);
                }
                // The last rows, fewer than four, by the reference (the same arithmetic).
                let done = 4 * groups;
                let rest = w.range(done * blocks * BLOCK, out.len() * blocks * BLOCK);
                super::dots_reference(acts, rest, &mut out[done..]);
            }
        };
    }

    /// `vpdpbusd`: the 32 byte products summed four at a time into eight lanes.
    #[inline(always)]
    unsafe fn sum_vnni(a: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, s)
    }

    /// `vpmaddubsw` (pairs, exact: see the module documentation) then `vpmaddwd`.
    #[inline(always)]
    unsafe fn sum_avx2(a: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, s), _mm256_set1_epi16(1))
    }

    kernel!(kernel_vnni, "avx2,avx512f,avx512vl,avx512vnni", sum_vnni);
    kernel!(kernel_avx2, "avx2", sum_avx2);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusec_weights::SplitMix64;
    use proptest::prelude::*;

    fn q4_pack(codes: &[i8]) -> Vec<u8> {
        codes
            .chunks(BLOCK)
            .flat_map(|b| (0..16).map(move |j| ((b[j] + 8) as u8) | (((b[j + 16] + 8) as u8) << 4)))
            .collect()
    }

    /// Every path this machine has, against the reference, bit for bit.
    fn check_all_paths(acts: Q8Row<'_>, w: IntRows<'_>, rows: usize) {
        let mut want = vec![0.0f32; rows];
        dots_reference(acts, w, &mut want);
        let mut got = vec![0.0f32; rows];
        dots(acts, w, &mut got);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "dispatched path");
        #[cfg(target_arch = "x86_64")]
        {
            let mut paths = vec![];
            if is_x86_feature_detected!("avx2") {
                paths.push(x86::Path::Avx2);
            }
            if x86::path() == x86::Path::Vnni {
                paths.push(x86::Path::Vnni);
            }
            for p in paths {
                let mut got = vec![f32::NAN; rows];
                assert!(x86::dots_with(p, acts, w, &mut got));
                assert_eq!(bits(&got), bits(&want), "{p:?}");
            }
        }
    }

    /// Each weight row's result against the dequantized dot product in f64: the
    /// reference really computes Σ (dw q_w) (dx q_x).
    fn check_meaning(acts: Q8Row<'_>, codes: &[u8], dw: &[f32], rows: usize, ins: usize) {
        let mut got = vec![0.0f32; rows];
        let blocks = ins / BLOCK;
        let w = IntRows::Q8 { codes, scales: dw };
        dots_reference(acts, w, &mut got);
        for (o, &y) in got.iter().enumerate() {
            let exact: f64 = (0..ins)
                .map(|j| {
                    f64::from(codes[o * ins + j] as i8)
                        * f64::from(dw[o * blocks + j / BLOCK])
                        * f64::from(acts.codes[j])
                        * f64::from(acts.scales[j / BLOCK])
                })
                .sum();
            let mag: f64 = (0..ins)
                .map(|j| {
                    (f64::from(codes[o * ins + j] as i8)
                        * f64::from(dw[o * blocks + j / BLOCK])
                        * f64::from(acts.codes[j])
                        * f64::from(acts.scales[j / BLOCK]))
                    .abs()
                })
                .sum();
            assert!((f64::from(y) - exact).abs() <= 1e-5 * mag + 1e-30, "{y} {exact}");
        }
    }

    #[test]
    fn every_code_of_both_formats_matches_the_reference() {
        let mut rng = SplitMix64::new(11);
        // Q8_0: every byte, -128 included, against every activation code.
        let ins = 256;
        let rows = 7;
        let x: Vec<f32> = (0..ins).map(|j| (j as f32 - 127.5) * 0.37).collect();
        let acts = quantize_q8(&x).expect("blocks");
        let codes: Vec<u8> = (0..rows * ins).map(|k| (k % 256) as u8).collect();
        let dw: Vec<f32> = (0..rows * ins / BLOCK).map(|_| rng.normal() as f32).collect();
        let a = acts.row(0, ins);
        check_all_paths(a, IntRows::Q8 { codes: &codes, scales: &dw }, rows);
        check_meaning(a, &codes, &dw, rows, ins);
        // Extreme activation codes (±127) against extreme weights (-128).
        let x: Vec<f32> = (0..ins).map(|j| if j % 2 == 0 { 5.0 } else { -5.0 }).collect();
        let acts = quantize_q8(&x).expect("blocks");
        assert!(acts.codes.iter().all(|&c| c.abs() == 127));
        let codes = vec![0x80u8; rows * ins];
        check_all_paths(acts.row(0, ins), IntRows::Q8 { codes: &codes, scales: &dw }, rows);
        // Q4_0: every code -8..=7 in every position.
        let codes: Vec<i8> = (0..rows * ins).map(|k| (k % 16) as i8 - 8).collect();
        let packed = q4_pack(&codes);
        let w = IntRows::Q4 { packed: &packed, scales: &dw };
        for (k, &c) in codes.iter().enumerate() {
            assert_eq!(fusec_weights::tensor::i4_code(&packed, k), c);
        }
        let a = acts.row(0, ins);
        check_all_paths(a, w, rows);
        let mut from_q4 = vec![0.0f32; rows];
        dots_reference(a, w, &mut from_q4);
        let bytes: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
        let mut from_q8 = vec![0.0f32; rows];
        dots_reference(a, IntRows::Q8 { codes: &bytes, scales: &dw }, &mut from_q8);
        assert_eq!(from_q4, from_q8, "Q4_0 rows mean their codes");
    }

    #[test]
    fn activations_are_quantized_as_ggml_does() {
        let x: Vec<f32> = (0..64).map(|j| (j as f32 - 20.0) * 0.5).collect();
        let acts = quantize_q8(&x).expect("blocks");
        // Block 0: absmax 10, d = 10 / 127; x = 0 at j = 20 gives 0.
        assert_eq!(acts.scales[0], half::f16::from_f32(10.0 / 127.0).to_f32());
        assert_eq!(acts.codes[0], -127);
        assert_eq!(acts.codes[20], 0);
        assert_eq!(acts.sums[0], acts.codes[..32].iter().map(|&c| i32::from(c)).sum::<i32>());
        let zeros = quantize_q8(&[0.0; 32]).expect("blocks");
        assert_eq!((zeros.scales[0], zeros.codes[5]), (0.0, 0));
        let err = quantize_q8(&[1.0; 40]).unwrap_err().to_string();
        assert!(err.contains("blocks of 32"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_rows_match_the_reference(
            seed in any::<u64>(),
            blocks in 1usize..12,
            rows in 1usize..13,
            scale in -20i32..20,
        ) {
            let mut rng = SplitMix64::new(seed);
            let ins = blocks * BLOCK;
            let s = 2f32.powi(scale);
            let x: Vec<f32> = (0..ins).map(|_| rng.normal() as f32 * s).collect();
            let acts = quantize_q8(&x).expect("blocks");
            let codes: Vec<u8> = (0..rows * ins).map(|_| (rng.next_u64() >> 56) as u8).collect();
            let dw: Vec<f32> = (0..rows * blocks)
                .map(|_| half::f16::from_f32(rng.normal() as f32 * 0.01).to_f32())
                .collect();
            let a = acts.row(0, ins);
            check_all_paths(a, IntRows::Q8 { codes: &codes, scales: &dw }, rows);
            let c4: Vec<i8> = codes.iter().map(|&c| (c as i8) >> 4).collect();
            let packed = q4_pack(&c4);
            check_all_paths(a, IntRows::Q4 { packed: &packed, scales: &dw }, rows);
        }
    }
}

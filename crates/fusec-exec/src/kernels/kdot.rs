//! Dot products of activations quantized to 8 bits per super-block of 256 (llama.cpp's
//! Q8_K) with weight rows of Q4_K codes, as llama.cpp multiplies them
//! (`ggml_vec_dot_q4_K_q8_K` in ggml-cpu's quants.c, after `quantize_row_q8_K`).
//!
//! A Q4_K weight is `d * sc[j] * q - dmin * m[j]` in sub-block `j` of a super-block
//! (`fusec_ir::quant`), so a super-block's dot with activations `dx * xq` is
//! `d dx Σ_j sc[j] Σ q xq - dmin dx Σ_j m[j] Σ xq`, where both sums over `j` are
//! exact integers (`|Σ_j sc Σ q xq| <= 8 * 63 * 32 * 15 * 127 < 2^25`).
//!
//! **The arithmetic** ([`dots_reference`]): per super-block `s` of a row, in order,
//!
//! ```text
//! a = a + (d[s] * dx[s]) * (Σ_j sc[j] Σ_{32} q xq  as f32)
//! b = b + (dmin[s] * dx[s]) * (Σ_j m[j] bsum[j]      as f32)
//! y = a - b
//! ```
//!
//! with `bsum[j]` the activation codes' sum over sub-block `j`. Only the integer sums
//! are vectorized (AVX-512 VNNI: two sub-blocks per `vpdpbusd`, the nibbles unsigned as
//! they are; AVX2: one per `vpmaddubsw`), and integer sums do not depend on their
//! order, so every path is bit-identical to the reference. A short last super-block
//! (fusec's extension for rows that are not whole super-blocks, see `fusec_ir::quant`)
//! has fewer sub-blocks and its own activation scale, over its own elements.

use fusec_ir::quant::{q4k_scale_min, Q4K_SIDE_BYTES, SUPER_BLOCK};

use super::KernelError;
use crate::pool;

/// Elements per sub-block.
pub const SUB: usize = 32;
/// Elements per super-block.
pub const SUPER: usize = SUPER_BLOCK as usize;
const SIDE: usize = Q4K_SIDE_BYTES as usize;

/// Consecutive rows of `ins` Q4_K weights: codes in Q4_0's nibble order and each
/// super-block's 16 bytes of side data.
#[derive(Copy, Clone, Debug)]
pub struct KRows<'a> {
    pub packed: &'a [u8],
    pub side: &'a [u8],
    pub ins: usize,
}

impl<'a> KRows<'a> {
    /// Super-blocks per row.
    pub fn supers(&self) -> usize {
        self.ins.div_ceil(SUPER)
    }

    /// Weights held.
    pub fn len(&self) -> usize {
        self.packed.len() * 2
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Weights `start..end`, both on row boundaries.
    pub fn range(&self, start: usize, end: usize) -> KRows<'a> {
        let ins = self.ins.max(1);
        let per = self.supers() * SIDE;
        KRows {
            packed: &self.packed[start / 2..end / 2],
            side: &self.side[start / ins * per..end / ins * per],
            ins: self.ins,
        }
    }

    /// Bytes a row streams: its codes and its side data, as GGUF stores them.
    pub fn row_bytes(&self) -> usize {
        self.ins / 2 + self.supers() * SIDE
    }

    /// Super-block `s` of row `o`: `d`, `dmin`, the 8 scales and minimums.
    fn header(&self, o: usize, s: usize) -> (f32, f32, [i32; 8], [i32; 8]) {
        let h = &self.side[(o * self.supers() + s) * SIDE..][..SIDE];
        let f = |k: usize| half::f16::from_le_bytes([h[k], h[k + 1]]).to_f32();
        let (mut sc, mut m) = ([0i32; 8], [0i32; 8]);
        for j in 0..8 {
            let (a, b) = q4k_scale_min(j, &h[4..]);
            sc[j] = i32::from(a);
            m[j] = i32::from(b);
        }
        (f(0), f(2), sc, m)
    }
}

/// Rows of activations quantized to Q8_K, row-major: the codes, each super-block's
/// scale, and each sub-block's code sum. From the executor's pool, back to it on drop.
#[derive(Debug)]
pub struct Q8KActs {
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub sums: Vec<i32>,
}

/// One row of [`Q8KActs`].
#[derive(Copy, Clone, Debug)]
pub struct Q8KRow<'a> {
    pub codes: &'a [i8],
    pub scales: &'a [f32],
    pub sums: &'a [i32],
}

impl Q8KActs {
    /// Row `r` of the rows of `len` activations.
    pub fn row(&self, r: usize, len: usize) -> Q8KRow<'_> {
        let (supers, subs) = (len.div_ceil(SUPER), len / SUB);
        Q8KRow {
            codes: &self.codes[r * len..(r + 1) * len],
            scales: &self.scales[r * supers..(r + 1) * supers],
            sums: &self.sums[r * subs..(r + 1) * subs],
        }
    }
}

impl Drop for Q8KActs {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.codes));
        pool::give(std::mem::take(&mut self.scales));
        pool::give(std::mem::take(&mut self.sums));
    }
}

/// Quantizes `rows` rows of activations (each a multiple of [`SUB`]) to Q8_K as
/// `quantize_row_q8_K_ref` (ggml-quants.c) does, per super-block of each row (a short
/// last one over its own elements): the value of largest magnitude `max` (the first on
/// ties) gives `iscale = -127 / max`, codes `min(127, nearest_int(iscale * x))`, the
/// scale `1 / iscale` kept in `f32`; all zeros give scale 0 and codes 0.
pub fn quantize_q8k(x: &[f32], rows: usize) -> Result<Q8KActs, KernelError> {
    let len = x.len().checked_div(rows).unwrap_or(0);
    if rows == 0 || !len.is_multiple_of(SUB) || len * rows != x.len() {
        return Err(KernelError::Invalid(format!(
            "Q4_K GEMV: {} activations are not {rows} rows of whole blocks of {SUB}",
            x.len()
        )));
    }
    let mut acts = Q8KActs {
        codes: pool::zeros(x.len()),
        scales: pool::take(rows * len.div_ceil(SUPER)),
        sums: pool::take(x.len() / SUB),
    };
    for (xr, qr) in x.chunks_exact(len).zip(acts.codes.chunks_exact_mut(len)) {
        for (xs, qs) in xr.chunks(SUPER).zip(qr.chunks_mut(SUPER)) {
            let (mut amax, mut max) = (0.0f32, 0.0f32);
            for &v in xs {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax == 0.0 {
                acts.scales.push(0.0);
            } else {
                let iscale = -127.0 / max;
                for (q, &v) in qs.iter_mut().zip(xs) {
                    *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
                }
                acts.scales.push(1.0 / iscale);
            }
            acts.sums.extend(
                qs.chunks_exact(SUB)
                    .map(|b| b.iter().map(|&q| i32::from(q)).sum::<i32>()),
            );
        }
    }
    Ok(acts)
}

/// `out[o]` = the arithmetic of the module documentation for row `o` of `w`, on the
/// fastest path this machine has.
pub fn dots(acts: Q8KRow<'_>, w: KRows<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::path() != x86::Path::None && x86::dots(acts, w, out) {
            return;
        }
    }
    dots_reference(acts, w, out);
}

/// The row's result from each super-block's two integer sums (shared by every path).
#[inline(always)]
fn finish(acts: Q8KRow<'_>, w: KRows<'_>, o: usize, isum: impl Fn(usize, &[i32; 8]) -> i32) -> f32 {
    let (mut a, mut b) = (0.0f32, 0.0f32);
    for s in 0..w.supers() {
        let (d, dmin, sc, m) = w.header(o, s);
        let subs = (w.ins - s * SUPER).min(SUPER) / SUB;
        let summ: i32 = (0..subs).map(|j| m[j] * acts.sums[s * 8 + j]).sum();
        let dx = acts.scales[s];
        a += (d * dx) * isum(s, &sc) as f32;
        b += (dmin * dx) * summ as f32;
    }
    a - b
}

/// The plain reference of the arithmetic (see the module documentation).
pub fn dots_reference(acts: Q8KRow<'_>, w: KRows<'_>, out: &mut [f32]) {
    let ins = w.ins;
    for (o, y) in out.iter_mut().enumerate() {
        *y = finish(acts, w, o, |s, sc| {
            let mut sumi = 0i32;
            let subs = (ins - s * SUPER).min(SUPER) / SUB;
            for (j, &scale) in sc.iter().enumerate().take(subs) {
                let at = s * SUPER + j * SUB;
                let mut dot = 0i32;
                for k in 0..SUB {
                    let i = o * ins + at + k;
                    let byte = w.packed[i / SUB * 16 + k % 16];
                    let q = if k < 16 { byte & 0x0F } else { byte >> 4 };
                    dot += i32::from(q) * i32::from(acts.codes[at + k]);
                }
                sumi += scale * dot;
            }
            sumi
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX-512 VNNI and AVX2 integer sums; see the module documentation above.
    //!
    //! `unsafe` is confined to this module: the kernels carry `#[target_feature]` and
    //! run only after [`path`] detected those features, and every load is an unaligned
    //! load inside slices whose lengths [`dots_with`] checked first.
    #![allow(unsafe_code)]

    use std::arch::x86_64::*;

    use super::{finish, KRows, Q8KRow, SIDE, SUB, SUPER};
    pub(super) use crate::kernels::intdot::x86::{path, Path};

    pub(super) fn dots(acts: Q8KRow<'_>, w: KRows<'_>, out: &mut [f32]) -> bool {
        dots_with(path(), acts, w, out)
    }

    pub(super) fn dots_with(path: Path, acts: Q8KRow<'_>, w: KRows<'_>, out: &mut [f32]) -> bool {
        let ins = w.ins;
        let fits = ins.is_multiple_of(SUB)
            && acts.codes.len() == ins
            && acts.sums.len() == ins / SUB
            && acts.scales.len() == w.supers()
            && w.packed.len() >= out.len() * ins / 2
            && w.side.len() >= out.len() * w.supers() * SIDE;
        if !fits {
            return false;
        }
        // SAFETY: the features of `path` were detected, and the lengths checked above.
        unsafe {
            match path {
                Path::Vnni => vnni(acts, w, out),
                Path::Avx2 => avx2(acts, w, out),
                Path::None => return false,
            }
        }
        true
    }

    /// Eight lanes of four-product sums of one sub-block's nibbles (Q4_0 order) with
    /// its 32 activation codes.
    #[inline(always)]
    unsafe fn sub_avx2(packed: *const u8, x: *const i8) -> __m256i {
        let q = _mm_loadu_si128(packed as *const _);
        let both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
        let n = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
        let x = _mm256_loadu_si256(x as *const _);
        _mm256_madd_epi16(_mm256_maddubs_epi16(n, x), _mm256_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256i) -> i32 {
        let a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0b01_00_11_10));
        let a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0b10_11_00_01));
        _mm_cvtsi128_si32(a)
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn vnni(acts: Q8KRow<'_>, w: KRows<'_>, out: &mut [f32]) {
        let ins = w.ins;
        // The 16-bit lanes of sub-blocks j and j + 1 (j = 2k): the permutation taking
        // their scales from the eight scales, lanes 0..16 then 16..32.
        let idx: [__m512i; 4] = std::array::from_fn(|k| {
            let (a, b) = (2 * k as i16, 2 * k as i16 + 1);
            _mm512_inserti64x4(_mm512_set1_epi16(a), _mm256_set1_epi16(b), 1)
        });
        for (o, y) in out.iter_mut().enumerate() {
            let row = w.packed.as_ptr().add(o * ins / 2);
            *y = finish(acts, w, o, |s, sc| {
                let subs = (ins - s * SUPER).min(SUPER) / SUB;
                let scales = _mm_setr_epi16(
                    sc[0] as i16,
                    sc[1] as i16,
                    sc[2] as i16,
                    sc[3] as i16,
                    sc[4] as i16,
                    sc[5] as i16,
                    sc[6] as i16,
                    sc[7] as i16,
                );
                let scales = _mm512_castsi128_si512(scales);
                let mut acc = _mm512_setzero_si512();
                let mut j = 0;
                while j + 2 <= subs {
                    let at = s * SUPER + j * SUB;
                    // Sub-blocks j and j + 1: low nibbles are elements 0..16 of each,
                    // high nibbles 16..32 (as `intdot`'s Q4_0 pairs).
                    let q = _mm256_loadu_si256(row.add(at / 2) as *const _);
                    let lo = _mm256_and_si256(q, _mm256_set1_epi8(0x0F));
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), _mm256_set1_epi8(0x0F));
                    let both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                    let n = _mm512_shuffle_i64x2(both, both, 0b11_01_10_00);
                    let x = _mm512_loadu_si512(acts.codes.as_ptr().add(at) as *const _);
                    // Pairs of products in 16 bits (at most 2 * 15 * 127), then times
                    // the sub-block's 6-bit scale and paired again into 32 bits.
                    let pairs = _mm512_maddubs_epi16(n, x);
                    let scale = _mm512_permutexvar_epi16(idx[j / 2], scales);
                    acc = _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, scale));
                    j += 2;
                }
                let mut sumi = _mm512_reduce_add_epi32(acc);
                if j < subs {
                    let at = s * SUPER + j * SUB;
                    let dot = sub_avx2(row.add(at / 2), acts.codes.as_ptr().add(at));
                    sumi += sc[j] * hsum256(dot);
                }
                sumi
            });
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn avx2(acts: Q8KRow<'_>, w: KRows<'_>, out: &mut [f32]) {
        let ins = w.ins;
        for (o, y) in out.iter_mut().enumerate() {
            let row = w.packed.as_ptr().add(o * ins / 2);
            *y = finish(acts, w, o, |s, sc| {
                let subs = (ins - s * SUPER).min(SUPER) / SUB;
                let mut acc = _mm256_setzero_si256();
                for (j, &scale) in sc.iter().enumerate().take(subs) {
                    let at = s * SUPER + j * SUB;
                    let dot = sub_avx2(row.add(at / 2), acts.codes.as_ptr().add(at));
                    acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(dot, _mm256_set1_epi32(scale)));
                }
                hsum256(acc)
            });
        }
    }

    #[cfg(test)]
    pub(super) fn paths() -> Vec<Path> {
        let mut p = vec![];
        if is_x86_feature_detected!("avx2") {
            p.push(Path::Avx2);
        }
        if path() == Path::Vnni {
            p.push(Path::Vnni);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusec_weights::SplitMix64;
    use proptest::prelude::*;

    /// Every path against the reference, bit for bit, and the reference against the
    /// dequantized weights times the dequantized activations in f64.
    fn check(acts: Q8KRow<'_>, w: KRows<'_>, rows: usize) {
        let mut want = vec![0.0f32; rows];
        dots_reference(acts, w, &mut want);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut got = vec![0.0f32; rows];
        dots(acts, w, &mut got);
        assert_eq!(bits(&got), bits(&want), "dispatched path");
        #[cfg(target_arch = "x86_64")]
        for p in x86::paths() {
            let mut got = vec![f32::NAN; rows];
            assert!(x86::dots_with(p, acts, w, &mut got));
            assert_eq!(bits(&got), bits(&want), "{p:?}");
        }
        let ins = w.ins;
        for (o, &y) in want.iter().enumerate() {
            let (mut exact, mut mag) = (0.0f64, 0.0f64);
            for i in 0..ins {
                let (s, j) = (i / SUPER, i % SUPER / SUB);
                let (d, dmin, sc, m) = w.header(o, s);
                let q = fusec_weights::tensor::nibble(w.packed, o * ins + i);
                let wv = f64::from(d) * f64::from(sc[j]) * f64::from(q)
                    - f64::from(dmin) * f64::from(m[j]);
                let t = wv * f64::from(acts.codes[i]) * f64::from(acts.scales[s]);
                exact += t;
                mag += t.abs();
            }
            assert!(
                (f64::from(y) - exact).abs() <= 1e-5 * mag + 1e-30,
                "{y} {exact}"
            );
        }
    }

    fn random_side(rng: &mut SplitMix64, n: usize) -> Vec<u8> {
        let mut side: Vec<u8> = (0..n * SIDE).map(|_| rng.below(256) as u8).collect();
        for h in side.chunks_mut(SIDE) {
            let d = half::f16::from_f32(rng.normal() as f32 * 0.01);
            let dmin = half::f16::from_f32(rng.normal() as f32 * 0.01);
            h[..2].copy_from_slice(&d.to_le_bytes());
            h[2..4].copy_from_slice(&dmin.to_le_bytes());
        }
        side
    }

    #[test]
    fn every_code_and_scale_matches_the_reference() {
        let mut rng = SplitMix64::new(5);
        // Every nibble in every position, every 6-bit scale and minimum (random side
        // bytes cover all 64 of each across the super-blocks), extreme activations.
        for ins in [256usize, 512, 576, 96, 32] {
            let rows = 5;
            let packed: Vec<u8> = (0..rows * ins / 2).map(|k| (k * 37 % 256) as u8).collect();
            let side = random_side(&mut rng, rows * ins.div_ceil(SUPER));
            let w = KRows {
                packed: &packed,
                side: &side,
                ins,
            };
            let x: Vec<f32> = (0..ins).map(|j| (j as f32 - 100.5) * 0.3).collect();
            let acts = quantize_q8k(&x, 1).expect("blocks");
            check(acts.row(0, ins), w, rows);
            let x: Vec<f32> = (0..ins)
                .map(|j| if j % 2 == 0 { 3.0 } else { -3.0 })
                .collect();
            let acts = quantize_q8k(&x, 1).expect("blocks");
            assert!(acts.codes.iter().all(|&c| c.abs() == 127));
            check(acts.row(0, ins), w, rows);
        }
    }

    #[test]
    fn activations_are_quantized_as_ggml_does() {
        let x: Vec<f32> = (0..288).map(|j| (j as f32 - 20.0) * 0.5).collect();
        let acts = quantize_q8k(&x, 1).expect("blocks");
        // Super-block 0: the largest magnitude is x[255] = 117.5: iscale = -127 / 117.5.
        let row = acts.row(0, 288);
        assert_eq!(row.scales[0], 1.0 / (-127.0f32 / 117.5));
        assert_eq!(acts.codes[255], -127);
        assert_eq!(acts.codes[20], 0);
        // The short super-block 1 (32 values) has its own scale.
        assert_eq!(row.scales[1], 1.0 / (-127.0f32 / 133.5));
        assert_eq!(
            row.sums[1],
            acts.codes[32..64]
                .iter()
                .map(|&c| i32::from(c))
                .sum::<i32>()
        );
        let zeros = quantize_q8k(&[0.0; 32], 1).expect("blocks");
        assert_eq!((zeros.scales[0], zeros.codes[5]), (0.0, 0));
        let err = quantize_q8k(&[1.0; 40], 1).unwrap_err().to_string();
        assert!(err.contains("blocks of 32"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_rows_match_the_reference(
            seed in any::<u64>(),
            subs in 1usize..20,
            rows in 1usize..6,
            scale in -20i32..20,
        ) {
            let mut rng = SplitMix64::new(seed);
            let ins = subs * SUB;
            let s = 2f32.powi(scale);
            let x: Vec<f32> = (0..ins).map(|_| rng.normal() as f32 * s).collect();
            let acts = quantize_q8k(&x, 1).expect("blocks");
            let packed: Vec<u8> = (0..rows * ins / 2).map(|_| rng.below(256) as u8).collect();
            let side = random_side(&mut rng, rows * ins.div_ceil(SUPER));
            check(acts.row(0, ins), KRows { packed: &packed, side: &side, ins }, rows);
        }
    }
}

//! Dot products of activations quantized to 8 bits per block of 32 with weight rows of
//! integer codes (`i8`, GGUF's Q8_0; `i4`, Q4_0; `u4`, Q4_1) with one scale (and for
//! Q4_1 one minimum) per block of 32, as llama.cpp multiplies them
//! (`ggml_vec_dot_q8_0_q8_0`, `ggml_vec_dot_q4_0_q8_0` and `ggml_vec_dot_q4_1_q8_1` in
//! ggml-cpu's quants.c, after `quantize_row_q8_0` or `quantize_row_q8_1` of the
//! activations, which give the same codes and scales).
//!
//! **The arithmetic** ([`dots_reference`]). The products of a block are summed in
//! groups of four consecutive elements (`g = 0..8`), exactly, in `i32`; each group's
//! sum is scaled by the product of the two blocks' scales and accumulated in one of 16
//! `f32` lanes: lane `g` for the even blocks, lane `8 + g` for the odd ones, in block
//! order; the 16 lanes are then summed by a fixed tree (`k` and `k + 8`, then `k` and
//! `k + 4`, `k` and `k + 2`, the last two):
//!
//! ```text
//! s    = Σ_{j<4} xq[b][4g + j] * wq[b][4g + j]          exact, in i32
//! lane = lane + (s as f32) * (dw[b] * dx[b])            each product and sum rounded
//! ```
//!
//! where `xq`, `dx` are the activation codes and their `f16` block scale (as `f32`),
//! `wq`, `dw` the weight's.
//!
//! **Q4_1's minimum.** A Q4_1 weight is `dw * q + mw` with `q` in `0..16`, so its dot
//! is `Σ_b dw dx Σ q xq + Σ_b mw (dx Σ xq)`: the first sum is the lanes above with the
//! nibbles as codes, and the second takes each activation block's `sx = f16(dx' *
//! Σ xq)` (Q8_1's `s`, with `dx'` the unrounded scale), summed in block order in one
//! `f32` and added to the lanes' total at the end:
//!
//! ```text
//! m = m + mw[b] * sx[b]                                 in block order
//! y = reduce16(lanes) + m
//! ``` This is the shape of llama.cpp's AVX2 `ggml_vec_dot_q8_0_q8_0`
//! (eight lanes of four-product sums scaled per block and accumulated across blocks,
//! one reduction at the end), with a second set of eight lanes for odd blocks so that
//! one 512-bit instruction takes two blocks, and without its fused multiply-add (a
//! rounded product, then a rounded sum, as the float kernels do). Every path computes
//! exactly this, so all are bit-identical to the reference (checked on every code).
//!
//! **The kernels** take eight weight rows at a time with AVX-512 and four with AVX2,
//! each activation load feeding all of them (as llama.cpp's repacked
//! `ggml_gemv_q4_0_8x8_q8_0` in ggml-cpu/repack.cpp does, here without repacking: a
//! weight's rows are consecutive, so the rows taken together are still one stream),
//! two blocks per step with AVX-512 (`vpdpbusd` on 64 bytes gives the 16 lanes'
//! integer sums at once) and one block per step with AVX2 (`vpmaddubsw` then
//! `vpmaddwd`). The VNNI kernel multiplies the scales of 16 blocks of a row with one
//! instruction, and takes a pair of 4-bit blocks in an interleaved lane order (lane
//! `2 g + p` for group `g` of block `p` of the pair, against activations laid out the
//! same way, [`Q8Row::pair_codes`]) so that a 64-bit broadcast load gives the pair's
//! two scale products their lanes; the lanes are put back in the order above before
//! the reduction. Both instructions multiply an
//! unsigned byte by a signed one. With VNNI the weight is made unsigned by an offset
//! that is taken back per group: a Q8_0 code `w` as the byte `w + 128` (`w ^ 0x80`),
//! `Σ (w + 128) x - 128 Σ x`, and a Q4_0 nibble `n` as it is, `Σ n x - 8 Σ x`, with the
//! activations' four-element sums `Σ x` computed once per GEMV. `vpmaddubsw` adds pairs
//! of products in saturating 16 bits, so with AVX2 a Q8_0 block multiplies `|w|` by `x`
//! carrying the sign of `w` instead (llama.cpp's AVX2 sign trick; `|-128|` is 128 as an
//! unsigned byte and the activation codes lie in `[-127, 127]`, so a pair stays within
//! `2 * 128 * 127 < 2^15`), and Q4_0 nibbles as they are (`2 * 15 * 127`). Q4_1's
//! nibbles are its codes: both instructions take them as they are, with no offset.

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
    /// Q4_1: two codes per byte in the same order, each nibble its code, and per block
    /// its scale and its minimum, interleaved (`[d0, m0, d1, m1, ...]`).
    Q41 { packed: &'a [u8], scales: &'a [f32] },
}

impl<'a> IntRows<'a> {
    /// Weights held.
    pub fn len(&self) -> usize {
        match self {
            IntRows::Q8 { codes, .. } => codes.len(),
            IntRows::Q4 { packed, .. } | IntRows::Q41 { packed, .. } => packed.len() * 2,
        }
    }

    /// Side values per block: a scale, or a scale and a minimum.
    fn per_block(&self) -> usize {
        match self {
            IntRows::Q41 { .. } => 2,
            IntRows::Q8 { .. } | IntRows::Q4 { .. } => 1,
        }
    }

    /// The scale of block `b`.
    #[inline]
    fn scale(&self, b: usize) -> f32 {
        self.scales()[b * self.per_block()]
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
            IntRows::Q41 { packed, scales } => IntRows::Q41 {
                packed: &packed[start / 2..end / 2],
                scales: &scales[2 * blocks.start..2 * blocks.end],
            },
        }
    }

    /// Bytes a row of `ins` weights streams: its codes and its scales as GGUF stores
    /// them (`f16`).
    pub fn row_bytes(&self, ins: usize) -> usize {
        let blocks = ins / BLOCK;
        let side = 2 * self.per_block();
        match self {
            IntRows::Q8 { .. } => blocks * (BLOCK + side),
            IntRows::Q4 { .. } | IntRows::Q41 { .. } => blocks * (BLOCK / 2 + side),
        }
    }

    fn scales(&self) -> &'a [f32] {
        match *self {
            IntRows::Q8 { scales, .. }
            | IntRows::Q4 { scales, .. }
            | IntRows::Q41 { scales, .. } => scales,
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
            IntRows::Q4 { packed, .. } | IntRows::Q41 { packed, .. } => {
                let offset = if matches!(self, IntRows::Q4 { .. }) {
                    8
                } else {
                    0
                };
                let bytes = &packed[b * BLOCK / 2..(b + 1) * BLOCK / 2];
                for (j, &byte) in bytes.iter().enumerate() {
                    out[j] = (byte & 0x0F) as i8 - offset;
                    out[j + 16] = (byte >> 4) as i8 - offset;
                }
            }
        }
        out
    }
}

/// Rows of activations quantized to 8-bit blocks, row-major: the codes, each block's
/// scale (`scales`) and the same repeated for its eight lanes (`scales8`), each group of four codes' sum
/// (`sums4`, for the offsets of the VNNI kernel), each block's scaled sum (`sums`,
/// Q8_1's `s` for Q4_1's minimums), and the codes and group sums of each row's pairs
/// of blocks again with the two blocks' groups interleaved (`pair_codes`,
/// `pair_sums4`: group `g` of block `2p` then group `g` of block `2p + 1`, for `g` in
/// `0..8`), the order in which the VNNI kernel unpacks a pair of 4-bit blocks. The
/// vectors come from the executor's pool and go back to it on drop.
#[derive(Debug)]
pub struct Q8Acts {
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub scales8: Vec<f32>,
    pub sums4: Vec<i32>,
    pub sums: Vec<f32>,
    pub pair_codes: Vec<i8>,
    pub pair_sums4: Vec<i32>,
}

/// One row of [`Q8Acts`].
#[derive(Copy, Clone, Debug)]
pub struct Q8Row<'a> {
    pub codes: &'a [i8],
    pub scales: &'a [f32],
    pub scales8: &'a [f32],
    pub sums4: &'a [i32],
    pub sums: &'a [f32],
    pub pair_codes: &'a [i8],
    pub pair_sums4: &'a [i32],
}

impl Q8Row<'_> {
    /// Blocks in the row.
    pub fn blocks(&self) -> usize {
        self.codes.len() / BLOCK
    }

    /// The scale of block `b`.
    pub fn scale(&self, b: usize) -> f32 {
        self.scales[b]
    }
}

impl Q8Acts {
    /// Row `r` of the rows of `len` activations.
    pub fn row(&self, r: usize, len: usize) -> Q8Row<'_> {
        let groups = len / 4;
        let blocks = len / BLOCK;
        let pair_len = blocks / 2 * 2 * BLOCK;
        let pair_groups = pair_len / 4;
        Q8Row {
            codes: &self.codes[r * len..(r + 1) * len],
            scales: &self.scales[r * blocks..(r + 1) * blocks],
            scales8: &self.scales8[r * groups..(r + 1) * groups],
            sums4: &self.sums4[r * groups..(r + 1) * groups],
            sums: &self.sums[r * blocks..(r + 1) * blocks],
            pair_codes: &self.pair_codes[r * pair_len..(r + 1) * pair_len],
            pair_sums4: &self.pair_sums4[r * pair_groups..(r + 1) * pair_groups],
        }
    }
}

impl Drop for Q8Acts {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.codes));
        pool::give(std::mem::take(&mut self.scales));
        pool::give(std::mem::take(&mut self.scales8));
        pool::give(std::mem::take(&mut self.sums4));
        pool::give(std::mem::take(&mut self.sums));
        pool::give(std::mem::take(&mut self.pair_codes));
        pool::give(std::mem::take(&mut self.pair_sums4));
    }
}

/// Quantizes rows of activations (row-major, row length a multiple of [`BLOCK`]) to
/// 8 bits per block as `quantize_row_q8_0_ref` (ggml-quants.c) does: the same
/// arithmetic as [`fusec_weights::quant::q8_0_block`], whose `f16` scales are kept as
/// `f32` values; and each block's `s` as `quantize_row_q8_1_ref` computes it,
/// `f16(Σ xq * d)` with the unrounded `d = absmax / 127`. `x` holds rows of `len`
/// activations.
pub fn quantize_q8(x: &[f32], len: usize) -> Result<Q8Acts, KernelError> {
    let rows_fit = match len {
        0 => x.is_empty(),
        _ => x.len().is_multiple_of(len),
    };
    if !len.is_multiple_of(BLOCK) || !rows_fit {
        return Err(KernelError::Invalid(format!(
            "integer GEMV: {} activations are not rows of whole blocks of {BLOCK} ({len} a row)",
            x.len()
        )));
    }
    let groups = x.len() / 4;
    let mut acts = Q8Acts {
        codes: pool::zeros(x.len()),
        scales: pool::take(x.len() / BLOCK),
        scales8: pool::take(groups),
        sums4: pool::take(groups),
        sums: pool::take(x.len() / BLOCK),
        pair_codes: pool::take(x.len()),
        pair_sums4: pool::take(groups),
    };
    for (xb, qb) in x
        .chunks_exact(BLOCK)
        .zip(acts.codes.chunks_exact_mut(BLOCK))
    {
        let d = fusec_weights::quant::q8_0_block(xb, qb).to_f32();
        acts.scales.push(d);
        acts.scales8.extend([d; 8]);
        let unrounded = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
        let sum: i32 = qb.iter().map(|&q| i32::from(q)).sum();
        acts.sums
            .push(half::f16::from_f32(sum as f32 * unrounded).to_f32());
        acts.sums4.extend(
            qb.chunks_exact(4)
                .map(|g| g.iter().map(|&q| i32::from(q)).sum::<i32>()),
        );
    }
    // Each row's whole pairs of blocks, their groups interleaved.
    for (row, sums) in acts
        .codes
        .chunks_exact(len.max(BLOCK))
        .zip(acts.sums4.chunks_exact(len.max(BLOCK) / 4))
    {
        for (pair, psums) in row
            .chunks_exact(2 * BLOCK)
            .zip(sums.chunks_exact(2 * BLOCK / 4))
        {
            for g in 0..8 {
                for b in 0..2 {
                    let at = b * BLOCK + 4 * g;
                    acts.pair_codes.extend_from_slice(&pair[at..at + 4]);
                    acts.pair_sums4.push(psums[b * 8 + g]);
                }
            }
        }
    }
    Ok(acts)
}

/// The fixed reduction tree of the 16 lanes (see the module documentation).
#[inline]
fn reduce16(acc: &[f32; 16]) -> f32 {
    let mut a8 = [0.0f32; 8];
    for k in 0..8 {
        a8[k] = acc[k] + acc[k + 8];
    }
    let a4 = [a8[0] + a8[4], a8[1] + a8[5], a8[2] + a8[6], a8[3] + a8[7]];
    let a2 = [a4[0] + a4[2], a4[1] + a4[3]];
    a2[0] + a2[1]
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
    let blocks = acts.blocks();
    let scales = w.scales();
    for (o, y) in out.iter_mut().enumerate() {
        let mut acc = [0.0f32; 16];
        let mut mins = 0.0f32;
        for b in 0..blocks {
            let wb = o * blocks + b;
            let wq = w.block(wb);
            let xq = &acts.codes[b * BLOCK..(b + 1) * BLOCK];
            let d = w.scale(wb) * acts.scale(b);
            for g in 0..8 {
                let s: i32 = (4 * g..4 * g + 4)
                    .map(|j| i32::from(wq[j]) * i32::from(xq[j]))
                    .sum();
                let lane = 8 * (b % 2) + g;
                acc[lane] += s as f32 * d;
            }
            if let IntRows::Q41 { .. } = w {
                mins += scales[2 * wb + 1] * acts.sums[b];
            }
        }
        *y = match w {
            IntRows::Q41 { .. } => reduce16(&acc) + mins,
            IntRows::Q8 { .. } | IntRows::Q4 { .. } => reduce16(&acc),
        };
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! The AVX-512 VNNI and AVX2 kernels; see the module documentation above.
    //!
    //! `unsafe` is confined to this module: the kernels carry `#[target_feature]` and
    //! run only after [`path`] detected those features, and every load is an unaligned
    //! load inside slices whose lengths [`dots_with`] checked first.
    #![allow(unsafe_code)]

    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::{IntRows, Q8Row, BLOCK};

    /// The integer kernels' paths (shared with `super::super::kdot`).
    #[derive(Copy, Clone, Debug, PartialEq, Eq)]
    pub(crate) enum Path {
        Vnni,
        Avx2,
        None,
    }

    /// The best path this CPU runs, detected once.
    pub(crate) fn path() -> Path {
        static PATH: OnceLock<Path> = OnceLock::new();
        *PATH.get_or_init(|| {
            // Every feature the VNNI kernel's `target_feature` list enables.
            if is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
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
        let blocks = acts.blocks();
        let ins = blocks * BLOCK;
        let fits = acts.codes.len() == ins
            && acts.sums4.len() == ins / 4
            && acts.scales8.len() == ins / 4
            && acts.scales.len() == blocks
            && acts.sums.len() == blocks
            && acts.pair_codes.len() == blocks / 2 * 2 * BLOCK
            && acts.pair_sums4.len() == blocks / 2 * 16
            && w.len() >= out.len() * ins
            && w.scales().len() >= out.len() * blocks * w.per_block();
        if !fits {
            return false;
        }
        // SAFETY: the features of `path` were detected (`path()` returned it, or a
        // test checked it), and the lengths were checked above.
        unsafe {
            match path {
                Path::Vnni => vnni(acts, w, out),
                Path::Avx2 => avx2(acts, w, out),
                Path::None => return false,
            }
        }
        true
    }

    /// The tree of `super::reduce16` on the lanes `lo` (0..8) and `hi` (8..16).
    #[inline(always)]
    unsafe fn reduce(lo: __m256, hi: __m256) -> f32 {
        let a8 = _mm256_add_ps(lo, hi);
        let a4 = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1));
        let a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
        _mm_cvtss_f32(_mm_add_ss(a2, _mm_shuffle_ps(a2, a2, 1)))
    }

    /// The integer lane sums of two blocks of a row of Q8_0 codes plus `init`, in the
    /// module documentation's lane order: `init` is [`offset_vnni`]'s value, the
    /// offset that makes the weight bytes unsigned taken back (`vpdpbusd` adds its
    /// four products to each lane of `init` in wrapping `i32`, so adding the negated
    /// offset first gives the same sum as subtracting it after).
    #[inline(always)]
    unsafe fn pair_q8(codes: &[u8], row_block: usize, x: __m512i, init: __m512i) -> __m512i {
        let q = _mm512_loadu_si512(codes.as_ptr().add(row_block * BLOCK) as *const _);
        let u = _mm512_xor_si512(q, _mm512_set1_epi8(-128));
        _mm512_dpbusd_epi32(init, u, x)
    }

    /// The integer lane sums of two blocks of a row of 4-bit codes plus `init` (as
    /// [`pair_q8`]), in the interleaved lane order of [`Q8Row::pair_codes`]: lane
    /// `2 g + p` holds group `g` of block `row_block + p`. Group `g < 4` of a block is
    /// the low nibbles of its bytes `4g..4g + 4`, group `g >= 4` the high nibbles of
    /// bytes `4(g - 4)..`: one shuffle of 32-bit words puts word `g % 4` of block `p`
    /// in lane `2 g + p`, and the upper eight lanes are shifted right by 4.
    #[inline(always)]
    unsafe fn pair_nibbles(packed: &[u8], row_block: usize, x: __m512i, init: __m512i) -> __m512i {
        let q = _mm512_castsi256_si512(_mm256_loadu_si256(
            packed.as_ptr().add(row_block * BLOCK / 2) as *const _,
        ));
        let words = _mm512_set_epi32(7, 3, 6, 2, 5, 1, 4, 0, 7, 3, 6, 2, 5, 1, 4, 0);
        let spread = _mm512_permutexvar_epi32(words, q);
        let shifted = _mm512_mask_srli_epi16(spread, 0xFFFF_0000, spread, 4);
        let n = _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F));
        _mm512_dpbusd_epi32(init, n, x)
    }

    /// The negated offset of [`pair_q8`] and [`pair_nibbles`] for two blocks whose activations' group
    /// sums are `sums`: `-128 Σ x` for a Q8_0 code `w` read as `w + 128`, `-8 Σ x` for
    /// a Q4_0 nibble, none for Q4_1's nibbles (they are the codes).
    #[inline(always)]
    unsafe fn offset_vnni(w: IntRows<'_>, sums: __m512i) -> __m512i {
        let shift = match w {
            IntRows::Q8 { .. } => 7,
            IntRows::Q4 { .. } => 3,
            IntRows::Q41 { .. } => return _mm512_setzero_si512(),
        };
        _mm512_sub_epi32(
            _mm512_setzero_si512(),
            _mm512_sll_epi32(sums, _mm_cvtsi32_si128(shift)),
        )
    }

    /// One block of a row: eight lanes of four-product sums, before [`offset_avx2`].
    #[inline(always)]
    unsafe fn block_avx2(w: IntRows<'_>, row_block: usize, x: __m256i) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        match w {
            IntRows::Q8 { codes, .. } => {
                let q = _mm256_loadu_si256(codes.as_ptr().add(row_block * BLOCK) as *const _);
                let p = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q));
                _mm256_madd_epi16(p, ones)
            }
            IntRows::Q4 { packed, .. } | IntRows::Q41 { packed, .. } => {
                let q = _mm_loadu_si128(packed.as_ptr().add(row_block * BLOCK / 2) as *const _);
                let both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
                let n = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
                _mm256_madd_epi16(_mm256_maddubs_epi16(n, x), ones)
            }
        }
    }

    /// The offset [`block_avx2`]'s sums carry, to subtract: `8 Σ x` for Q4_0's
    /// nibbles; none for Q8_0 (the sign trick) and Q4_1.
    #[inline(always)]
    unsafe fn offset_avx2(w: IntRows<'_>, sums: __m256i) -> __m256i {
        match w {
            IntRows::Q4 { .. } => _mm256_slli_epi32(sums, 3),
            IntRows::Q8 { .. } | IntRows::Q41 { .. } => _mm256_setzero_si256(),
        }
    }

    /// Q4_1's minimums of a row, in block order (see the module documentation); `0`
    /// and unused for the formats without them.
    #[inline(always)]
    fn mins(acts: Q8Row<'_>, w: IntRows<'_>, row: usize) -> f32 {
        let mut m = 0.0f32;
        if let IntRows::Q41 { scales, .. } = w {
            for (b, &s) in acts.sums.iter().enumerate() {
                m += scales[2 * (row + b) + 1] * s;
            }
        }
        m
    }

    /// The row's total: the lanes' tree, plus Q4_1's minimums.
    #[inline(always)]
    unsafe fn finish(w: IntRows<'_>, lo: __m256, hi: __m256, mins: f32) -> f32 {
        let y = reduce(lo, hi);
        match w {
            IntRows::Q41 { .. } => y + mins,
            IntRows::Q8 { .. } | IntRows::Q4 { .. } => y,
        }
    }

    /// Weight rows the kernels take at once. Each step loads one pair of activation
    /// blocks (codes, group sums, scales) and multiplies it into this many rows, each
    /// with its own accumulators, as llama.cpp's repacked `ggml_gemv_q4_0_8x8_q8_0`
    /// (ggml-cpu/repack.cpp) feeds one activation load to several rows. The rows of a
    /// weight are consecutive in memory, so the rows taken together are still one
    /// sequential stream. Eight rows need 8 of AVX-512's 32 registers for the
    /// accumulators; AVX2 has 16 registers and two accumulators per row, so it takes
    /// four.
    const ROWS_VNNI: usize = 8;
    const ROWS_AVX2: usize = 4;

    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn vnni(acts: Q8Row<'_>, w: IntRows<'_>, out: &mut [f32]) {
        let mut chunks = out.chunks_exact_mut(ROWS_VNNI);
        let mut first = 0;
        for ys in &mut chunks {
            vnni_rows::<ROWS_VNNI>(acts, w, first, ys);
            first += ROWS_VNNI;
        }
        // A decode chunk is a multiple of four rows: the rest by four, then one.
        let mut rest = chunks.into_remainder().chunks_exact_mut(4);
        for ys in &mut rest {
            vnni_rows::<4>(acts, w, first, ys);
            first += 4;
        }
        for y in rest.into_remainder() {
            vnni_rows::<1>(acts, w, first, std::slice::from_mut(y));
            first += 1;
        }
    }

    /// How far ahead of the rows it multiplies a kernel asks for weight rows: the
    /// rows taken together read several short runs at once, which the hardware
    /// prefetchers follow less far ahead than one long run.
    const PREFETCH_ROWS: usize = 16;

    /// Asks for the cache line holding the codes of block `row_block` to be brought
    /// into the cache (called for even blocks: a pair of Q8_0 blocks fills a line of
    /// 64 bytes; for 4-bit codes only every other pair asks).
    /// No access, so an address past the weight is harmless.
    #[inline(always)]
    unsafe fn prefetch_codes(w: IntRows<'_>, row_block: usize) {
        let at = match w {
            IntRows::Q8 { codes, .. } => codes.as_ptr().wrapping_add(row_block * BLOCK),
            IntRows::Q4 { packed, .. } | IntRows::Q41 { packed, .. } => {
                if !row_block.is_multiple_of(4) {
                    return;
                }
                packed.as_ptr().wrapping_add(row_block * BLOCK / 2)
            }
        };
        _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
    }

    /// [`prefetch_codes`] for the side values of a span of [`SPAN`] blocks from
    /// `row_block`: one line of 16 scales, two of Q4_1's scales and minimums.
    #[inline(always)]
    unsafe fn prefetch_scales(w: IntRows<'_>, row_block: usize) {
        let per = w.per_block();
        let at = w.scales().as_ptr().wrapping_add(row_block * per);
        _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
        if per == 2 {
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(SPAN) as *const i8);
        }
    }

    /// Blocks whose scale products one step of [`vnni_rows`] computes together.
    const SPAN: usize = 16;

    /// The weight scales of blocks `at..at + count` of a row (`count <= 16`), in
    /// lanes `0..count`, zero beyond: every other side value for Q4_1, whose minimums
    /// are interleaved with them.
    #[inline(always)]
    unsafe fn weight_scales(w: IntRows<'_>, at: usize, count: usize) -> __m512 {
        let scales = w.scales();
        match w.per_block() {
            1 => _mm512_maskz_loadu_ps(lanes(count), scales.as_ptr().add(at)),
            _ => {
                let p = scales.as_ptr().add(2 * at);
                let lo = _mm512_maskz_loadu_ps(lanes((2 * count).min(16)), p);
                let hi = _mm512_maskz_loadu_ps(lanes(2 * count.saturating_sub(8)), p.add(16));
                let even =
                    _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
                _mm512_permutex2var_ps(lo, even, hi)
            }
        }
    }

    /// The mask of lanes `0..count` (`count <= 16`).
    #[inline(always)]
    fn lanes(count: usize) -> __mmask16 {
        ((1u32 << count) - 1) as __mmask16
    }

    /// Rows `first..first + R` of `w` into `ys` (see [`vnni`]).
    ///
    /// The blocks go by spans of [`SPAN`]: for each row, one multiplication gives the
    /// scale products `dw[b] * dx[b]` of the span's sixteen blocks (each rounded once,
    /// as the reference rounds it); for Q8_0 one permutation per pair of blocks puts
    /// the pair's two products in its lanes, for 4-bit codes a broadcast load.
    #[inline(always)]
    unsafe fn vnni_rows<const R: usize>(
        acts: Q8Row<'_>,
        w: IntRows<'_>,
        first: usize,
        ys: &mut [f32],
    ) {
        let blocks = acts.blocks();
        let pairs = blocks / 2;
        let mut acc = [_mm512_setzero_ps(); R];
        let mut b0 = 0;
        while b0 < 2 * pairs {
            let count = (2 * pairs - b0).min(SPAN);
            let dx = _mm512_maskz_loadu_ps(lanes(count), acts.scales.as_ptr().add(b0));
            let mut d = [_mm512_setzero_ps(); R];
            for (r, dr) in d.iter_mut().enumerate() {
                let row = (first + r) * blocks;
                prefetch_scales(w, row + PREFETCH_ROWS * blocks + b0);
                *dr = _mm512_mul_ps(weight_scales(w, row + b0, count), dx);
            }
            if let IntRows::Q4 { packed, .. } | IntRows::Q41 { packed, .. } = w {
                // 4-bit codes: the pair's groups interleaved (see `pair_nibbles`), so
                // that the lanes alternate between the two blocks and one 64-bit
                // broadcast of the pair's two scale products (a load, no shuffle)
                // scales them.
                let mut dm = [[0.0f32; SPAN]; R];
                for (dst, dr) in dm.iter_mut().zip(&d) {
                    _mm512_storeu_ps(dst.as_mut_ptr(), *dr);
                }
                for b in (b0..b0 + count).step_by(2) {
                    let x = _mm512_loadu_si512(acts.pair_codes.as_ptr().add(b * BLOCK) as *const _);
                    let sums = _mm512_loadu_si512(acts.pair_sums4.as_ptr().add(b * 8) as *const _);
                    let init = offset_vnni(w, sums);
                    for r in 0..R {
                        let row = (first + r) * blocks;
                        prefetch_codes(w, row + PREFETCH_ROWS * blocks + b);
                        let s = pair_nibbles(packed, row + b, x, init);
                        let at = dm[r].as_ptr().add(b - b0) as *const f64;
                        let dr = _mm512_castpd_ps(_mm512_set1_pd(at.read_unaligned()));
                        acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_cvtepi32_ps(s), dr));
                    }
                }
                b0 += count;
                continue;
            }
            let IntRows::Q8 { codes, .. } = w else {
                // The 4-bit formats took the branch above.
                b0 += count;
                continue;
            };
            // Lanes 0..8 take the pair's first product, 8..16 its second.
            let mut idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
            for b in (b0..b0 + count).step_by(2) {
                let x = _mm512_loadu_si512(acts.codes.as_ptr().add(b * BLOCK) as *const _);
                let sums = _mm512_loadu_si512(acts.sums4.as_ptr().add(b * 8) as *const _);
                let init = offset_vnni(w, sums);
                for r in 0..R {
                    let row = (first + r) * blocks;
                    prefetch_codes(w, row + PREFETCH_ROWS * blocks + b);
                    let s = pair_q8(codes, row + b, x, init);
                    let dr = _mm512_permutexvar_ps(idx, d[r]);
                    acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_cvtepi32_ps(s), dr));
                }
                idx = _mm512_add_epi32(idx, _mm512_set1_epi32(2));
            }
            b0 += count;
        }
        if let IntRows::Q4 { .. } | IntRows::Q41 { .. } = w {
            // Back from the interleaved lanes: lane `8 p + g` of the module
            // documentation is lane `2 g + p` here.
            let back = _mm512_set_epi32(15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0);
            for a in acc.iter_mut() {
                *a = _mm512_permutexvar_ps(back, *a);
            }
        }
        for (r, (a, y)) in acc.iter().zip(ys.iter_mut()).enumerate() {
            let row = (first + r) * blocks;
            // The upper eight lanes, with AVX-512F's 64-bit extract (the 32-bit one
            // is AVX-512DQ's, which this path does not require).
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(*a), 1));
            let mut lo = _mm512_castps512_ps256(*a);
            if blocks % 2 == 1 {
                // The last block, even-numbered: lanes 0..8.
                let b = blocks - 1;
                let x = _mm256_loadu_si256(acts.codes.as_ptr().add(b * BLOCK) as *const _);
                let sums = _mm256_loadu_si256(acts.sums4.as_ptr().add(b * 8) as *const _);
                let s = _mm256_sub_epi32(block_avx2(w, row + b, x), offset_avx2(w, sums));
                let d = _mm256_set1_ps(w.scale(row + b) * acts.scale(b));
                lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_cvtepi32_ps(s), d));
            }
            *y = finish(w, lo, hi, mins(acts, w, row));
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn avx2(acts: Q8Row<'_>, w: IntRows<'_>, out: &mut [f32]) {
        let mut chunks = out.chunks_exact_mut(ROWS_AVX2);
        let mut first = 0;
        for ys in &mut chunks {
            avx2_rows::<ROWS_AVX2>(acts, w, first, ys);
            first += ROWS_AVX2;
        }
        for y in chunks.into_remainder() {
            avx2_rows::<1>(acts, w, first, std::slice::from_mut(y));
            first += 1;
        }
    }

    /// Rows `first..first + R` of `w` into `ys` (see [`avx2`]).
    #[inline(always)]
    unsafe fn avx2_rows<const R: usize>(
        acts: Q8Row<'_>,
        w: IntRows<'_>,
        first: usize,
        ys: &mut [f32],
    ) {
        // SSSE3's `_mm256_sign_epi8` and friends are AVX2 instructions; this runs
        // inside `avx2`'s target feature.
        let blocks = acts.blocks();
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for b in 0..blocks {
            let x = _mm256_loadu_si256(acts.codes.as_ptr().add(b * BLOCK) as *const _);
            let sums = _mm256_loadu_si256(acts.sums4.as_ptr().add(b * 8) as *const _);
            let off = offset_avx2(w, sums);
            let dx = acts.scale(b);
            for (r, a) in acc.iter_mut().enumerate() {
                let row = (first + r) * blocks;
                if b.is_multiple_of(2) {
                    prefetch_codes(w, row + PREFETCH_ROWS * blocks + b);
                }
                let s = _mm256_sub_epi32(block_avx2(w, row + b, x), off);
                let d = _mm256_set1_ps(w.scale(row + b) * dx);
                let lane = &mut a[b % 2];
                *lane = _mm256_add_ps(*lane, _mm256_mul_ps(_mm256_cvtepi32_ps(s), d));
            }
        }
        for (r, (a, y)) in acc.iter().zip(ys.iter_mut()).enumerate() {
            *y = finish(w, a[0], a[1], mins(acts, w, (first + r) * blocks));
        }
    }
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
                        * f64::from(acts.scale(j / BLOCK))
                })
                .sum();
            let mag: f64 = (0..ins)
                .map(|j| {
                    (f64::from(codes[o * ins + j] as i8)
                        * f64::from(dw[o * blocks + j / BLOCK])
                        * f64::from(acts.codes[j])
                        * f64::from(acts.scale(j / BLOCK)))
                    .abs()
                })
                .sum();
            assert!(
                (f64::from(y) - exact).abs() <= 1e-5 * mag + 1e-30,
                "{y} {exact}"
            );
        }
    }

    #[test]
    fn every_code_of_both_formats_matches_the_reference() {
        let mut rng = SplitMix64::new(11);
        // Q8_0: every byte, -128 included, against every activation code.
        // 33 blocks: two spans of the VNNI kernel's scale products, the second
        // partial, and an odd block last; 19 rows: two groups of its eight rows and
        // three more, four of the AVX2 kernel's four and three more.
        let ins = 33 * BLOCK;
        let rows = 19;
        let x: Vec<f32> = (0..ins).map(|j| (j as f32 - 127.5) * 0.37).collect();
        let acts = quantize_q8(&x, x.len()).expect("blocks");
        let codes: Vec<u8> = (0..rows * ins).map(|k| (k % 256) as u8).collect();
        let dw: Vec<f32> = (0..rows * ins / BLOCK)
            .map(|_| rng.normal() as f32)
            .collect();
        let a = acts.row(0, ins);
        check_all_paths(
            a,
            IntRows::Q8 {
                codes: &codes,
                scales: &dw,
            },
            rows,
        );
        check_meaning(a, &codes, &dw, rows, ins);
        // Extreme activation codes (±127) against extreme weights (-128).
        let x: Vec<f32> = (0..ins)
            .map(|j| if j % 2 == 0 { 5.0 } else { -5.0 })
            .collect();
        let acts = quantize_q8(&x, x.len()).expect("blocks");
        assert!(acts.codes.iter().all(|&c| c.abs() == 127));
        let codes = vec![0x80u8; rows * ins];
        check_all_paths(
            acts.row(0, ins),
            IntRows::Q8 {
                codes: &codes,
                scales: &dw,
            },
            rows,
        );
        // Q4_0: every code -8..=7 in every position.
        let codes: Vec<i8> = (0..rows * ins).map(|k| (k % 16) as i8 - 8).collect();
        let packed = q4_pack(&codes);
        let w = IntRows::Q4 {
            packed: &packed,
            scales: &dw,
        };
        for (k, &c) in codes.iter().enumerate() {
            assert_eq!(fusec_weights::tensor::i4_code(&packed, k), c);
        }
        let a = acts.row(0, ins);
        check_all_paths(a, w, rows);
        let mut from_q4 = vec![0.0f32; rows];
        dots_reference(a, w, &mut from_q4);
        let bytes: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
        let mut from_q8 = vec![0.0f32; rows];
        dots_reference(
            a,
            IntRows::Q8 {
                codes: &bytes,
                scales: &dw,
            },
            &mut from_q8,
        );
        assert_eq!(from_q4, from_q8, "Q4_0 rows mean their codes");
        // Q4_1: every nibble 0..=15 in every position, with random scales and minimums.
        let codes: Vec<i8> = (0..rows * ins).map(|k| (k % 16) as i8).collect();
        let packed = q4_pack(&codes.iter().map(|&c| c - 8).collect::<Vec<_>>());
        let sides: Vec<f32> = (0..2 * rows * ins / BLOCK)
            .map(|_| half::f16::from_f32(rng.normal() as f32).to_f32())
            .collect();
        for (k, &c) in codes.iter().enumerate() {
            assert_eq!(
                fusec_weights::tensor::nibble_code(fusec_ir::DType::U4, &packed, k),
                c
            );
        }
        let w = IntRows::Q41 {
            packed: &packed,
            scales: &sides,
        };
        check_all_paths(a, w, rows);
        check_q4_1_meaning(a, &codes, &sides, rows, ins);
    }

    /// Q4_1 rows against `Σ_b (dw dx Σ q xq + mw sx)` in f64: the reference computes
    /// the weight `dw q + mw` times the activations, with Q8_1's block sums.
    fn check_q4_1_meaning(acts: Q8Row<'_>, codes: &[i8], sides: &[f32], rows: usize, ins: usize) {
        let packed = q4_pack(&codes.iter().map(|&c| c - 8).collect::<Vec<_>>());
        let mut got = vec![0.0f32; rows];
        dots_reference(
            acts,
            IntRows::Q41 {
                packed: &packed,
                scales: sides,
            },
            &mut got,
        );
        let blocks = ins / BLOCK;
        for (o, &y) in got.iter().enumerate() {
            let (mut exact, mut mag) = (0.0f64, 0.0f64);
            for b in 0..blocks {
                let (dw, mw) = (
                    f64::from(sides[2 * (o * blocks + b)]),
                    f64::from(sides[2 * (o * blocks + b) + 1]),
                );
                for j in b * BLOCK..(b + 1) * BLOCK {
                    let t = dw
                        * f64::from(codes[o * ins + j])
                        * f64::from(acts.codes[j])
                        * f64::from(acts.scale(b));
                    exact += t;
                    mag += t.abs();
                }
                let m = mw * f64::from(acts.sums[b]);
                exact += m;
                mag += m.abs();
            }
            assert!(
                (f64::from(y) - exact).abs() <= 1e-5 * mag + 1e-30,
                "{y} {exact}"
            );
        }
    }

    #[test]
    fn activations_are_quantized_as_ggml_does() {
        let x: Vec<f32> = (0..64).map(|j| (j as f32 - 20.0) * 0.5).collect();
        let acts = quantize_q8(&x, x.len()).expect("blocks");
        // Block 0: absmax 10, d = 10 / 127; x = 0 at j = 20 gives 0.
        let row = acts.row(0, 64);
        assert_eq!(row.scale(0), half::f16::from_f32(10.0 / 127.0).to_f32());
        assert_eq!(row.scales8[..8], [row.scale(0); 8]);
        assert_eq!(acts.codes[0], -127);
        assert_eq!(acts.codes[20], 0);
        assert_eq!(
            acts.sums4[1],
            acts.codes[4..8].iter().map(|&c| i32::from(c)).sum::<i32>()
        );
        // Q8_1's s: the codes' sum times the unrounded scale, rounded to f16.
        let sum: i32 = acts.codes[..32].iter().map(|&c| i32::from(c)).sum();
        assert_eq!(
            row.sums[0],
            half::f16::from_f32(sum as f32 * (10.0 / 127.0)).to_f32()
        );
        let zeros = quantize_q8(&[0.0; 32], 32).expect("blocks");
        assert_eq!((zeros.row(0, 32).scale(0), zeros.codes[5]), (0.0, 0));
        let err = quantize_q8(&[1.0; 40], 40).unwrap_err().to_string();
        assert!(err.contains("blocks of 32"), "{err}");
    }

    #[test]
    fn pairs_interleave_the_groups_of_each_rows_blocks() {
        // Two rows of three blocks: one whole pair each, the odd block left out.
        let len = 3 * BLOCK;
        let x: Vec<f32> = (0..2 * len).map(|j| (j as f32 * 0.77).sin()).collect();
        let acts = quantize_q8(&x, len).expect("rows of blocks");
        assert_eq!(acts.pair_codes.len(), 2 * 2 * BLOCK);
        for r in 0..2 {
            let row = acts.row(r, len);
            let alone = quantize_q8(&x[r * len..(r + 1) * len], len).expect("blocks");
            assert_eq!(row.codes, &alone.codes[..]);
            assert_eq!(row.pair_codes, &alone.pair_codes[..]);
            for g in 0..8 {
                for b in 0..2 {
                    let lane = 2 * g + b;
                    assert_eq!(
                        row.pair_codes[4 * lane..4 * lane + 4],
                        row.codes[b * BLOCK + 4 * g..b * BLOCK + 4 * g + 4]
                    );
                    assert_eq!(row.pair_sums4[lane], row.sums4[8 * b + g]);
                }
            }
        }
        let err = quantize_q8(&x[..len + BLOCK], len).unwrap_err().to_string();
        assert!(err.contains("rows of whole blocks"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_rows_match_the_reference(
            seed in any::<u64>(),
            blocks in 1usize..40,
            rows in 1usize..20,
            scale in -20i32..20,
        ) {
            let mut rng = SplitMix64::new(seed);
            let ins = blocks * BLOCK;
            let s = 2f32.powi(scale);
            let x: Vec<f32> = (0..ins).map(|_| rng.normal() as f32 * s).collect();
            let acts = quantize_q8(&x, x.len()).expect("blocks");
            let codes: Vec<u8> = (0..rows * ins).map(|_| (rng.next_u64() >> 56) as u8).collect();
            let dw: Vec<f32> = (0..rows * blocks)
                .map(|_| half::f16::from_f32(rng.normal() as f32 * 0.01).to_f32())
                .collect();
            let a = acts.row(0, ins);
            check_all_paths(a, IntRows::Q8 { codes: &codes, scales: &dw }, rows);
            check_meaning(a, &codes, &dw, rows, ins);
            let c4: Vec<i8> = codes.iter().map(|&c| (c as i8) >> 4).collect();
            let packed = q4_pack(&c4);
            check_all_paths(a, IntRows::Q4 { packed: &packed, scales: &dw }, rows);
            // The Q4_0 rows mean their codes: the same results as those codes in i8.
            let mut from_q4 = vec![0.0f32; rows];
            dots(a, IntRows::Q4 { packed: &packed, scales: &dw }, &mut from_q4);
            let bytes: Vec<u8> = c4.iter().map(|&c| c as u8).collect();
            let mut from_q8 = vec![0.0f32; rows];
            dots(a, IntRows::Q8 { codes: &bytes, scales: &dw }, &mut from_q8);
            prop_assert_eq!(from_q4, from_q8);
            // Q4_1: the same nibbles as codes 0..=15, a scale and a minimum per block.
            // (Q8_1's f16 block sums overflow for activations beyond about 2^11 per
            // element, as they do in ggml; those rows have no finite result to check.)
            prop_assume!(a.sums.iter().all(|s| s.is_finite()));
            let u4: Vec<i8> = c4.iter().map(|&c| c + 8).collect();
            let sides: Vec<f32> = (0..2 * rows * blocks)
                .map(|_| half::f16::from_f32(rng.normal() as f32 * 0.01).to_f32())
                .collect();
            let w = IntRows::Q41 { packed: &packed, scales: &sides };
            check_all_paths(a, w, rows);
            check_q4_1_meaning(a, &u4, &sides, rows, ins);
        }
    }
}

//! The attention passes compiled for AVX2, with the two inner loops written with
//! intrinsics: the dot product in the order of `dot::dot` (the compiler does
//! not vectorize that order by itself once it is inlined into the passes), and the
//! weighted sum of value rows with the output row held in registers across all
//! keys, where the compiler's loop loaded and stored it once per key. The dot
//! product fuses each multiply and add, as `dot::dot`'s order does; the weighted sum
//! rounds each product and sum separately, as the portable loop does (its order is
//! its own, not a dot product's), so this path rounds exactly as the portable one.
//!
//! `unsafe` is confined to this module: the `#[target_feature]` functions run only
//! after run-time detection said the CPU has AVX2, and their loads and stores are
//! unaligned accesses of eight values inside slices whose lengths were checked
//! first.
#![allow(unsafe_code)]

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::super::dot;
use super::inner::Inner;
use super::plan::Plan;
use super::portable::Portable;
use super::storage::Kv;

/// Whether this CPU has AVX2 and FMA (`dot::dot`'s fused multiply-add), detected
/// once.
pub(super) fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && dot::fma_available())
}

/// `Plan::chunk_body` on AVX2; the caller has checked [`available`].
pub(super) fn chunk<T: Kv>(plan: &Plan<'_, T>, index: usize, out: &mut [f32]) {
    // SAFETY: `available()` returned true (the caller checks it), so this CPU runs
    // the AVX2 and FMA instructions `chunk_avx2` contains.
    unsafe { chunk_avx2(plan, index, out) }
}

#[target_feature(enable = "avx2,fma")]
fn chunk_avx2<T: Kv>(plan: &Plan<'_, T>, index: usize, out: &mut [f32]) {
    plan.chunk_body(index, out, &Avx2);
}

/// The AVX2 inner loops; only made where [`available`] said yes.
struct Avx2;

impl Inner for Avx2 {
    #[inline(always)]
    fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: an `Avx2` exists only inside `chunk_avx2`, which runs on CPUs
        // with AVX2 and FMA.
        unsafe { dot(a, b) }
    }

    #[inline(always)]
    fn dots(&self, q: &[f32], k: &[f32], base: usize, stride: usize, out: &mut [f32]) {
        // SAFETY: as for `dot`; `dots` checks that every key row it reads lies
        // inside `k`.
        unsafe { dots(q, k, base, stride, out) }
    }

    #[inline(always)]
    fn accumulate(&self, out: &mut [f32], probs: &[f32], v: &[f32], base: usize, stride: usize) {
        checked_accumulate::<f32, false>(out, probs, v, base, stride);
    }

    #[inline(always)]
    fn has_e4m3_nan(&self, codes: &[u8]) -> bool {
        let main = codes.len() - codes.len() % 32;
        // SAFETY: as for `dot`; every load reads `j..j + 32` with
        // `j + 32 <= main <= codes.len()`.
        let any = unsafe {
            let low = _mm256_set1_epi8(0x7f);
            let mut any = _mm256_setzero_si256();
            for j in (0..main).step_by(32) {
                let c = _mm256_loadu_si256(codes.as_ptr().add(j).cast());
                any = _mm256_or_si256(any, _mm256_cmpeq_epi8(_mm256_and_si256(c, low), low));
            }
            _mm256_movemask_epi8(any) != 0
        };
        any || Portable.has_e4m3_nan(&codes[main..])
    }

    #[inline(always)]
    fn decode_e4m3(&self, codes: &[u8], out: &mut [f32], nan: bool) {
        if nan {
            decode::<true>(codes, out);
        } else {
            decode::<false>(codes, out);
        }
    }

    #[inline(always)]
    fn accumulate_e4m3(
        &self,
        out: &mut [f32],
        probs: &[f32],
        v: &[u8],
        base: usize,
        stride: usize,
        nan: bool,
    ) {
        if nan {
            checked_accumulate::<u8, true>(out, probs, v, base, stride);
        } else {
            checked_accumulate::<u8, false>(out, probs, v, base, stride);
        }
    }
}

/// `Inner::decode_e4m3` on AVX2, minding NaN codes when `NAN`.
#[inline(always)]
fn decode<const NAN: bool>(codes: &[u8], out: &mut [f32]) {
    let n = codes.len().min(out.len());
    let main = n - n % 8;
    for j in (0..main).step_by(8) {
        // SAFETY: as for `dot`; `j + 8 <= main <= n` keeps the eight bytes read
        // and the eight values written inside both slices.
        unsafe {
            let v = u8::load8::<NAN>(codes.as_ptr().add(j));
            _mm256_storeu_ps(out.as_mut_ptr().add(j), v);
        }
    }
    Portable.decode_e4m3(&codes[main..n], &mut out[main..n], NAN);
}

/// `Inner::accumulate` on AVX2 over value rows stored as `T`, after checking that
/// every row read lies inside `v`.
#[inline(always)]
fn checked_accumulate<T: Load, const NAN: bool>(
    out: &mut [f32],
    probs: &[f32],
    v: &[T],
    base: usize,
    stride: usize,
) {
    let hd = out.len();
    let last = probs.len().checked_sub(1).map(|j| base + j * stride + hd);
    if last.is_some_and(|end| end > v.len()) {
        // Not reachable for a valid view; the portable loop's bounds checks
        // report the bug as a panic instead of reading out of bounds here.
        T::portable(out, probs, v, base, stride);
        return;
    }
    // SAFETY: an `Avx2` exists only inside `chunk_avx2`, which runs on CPUs with
    // AVX2, and this is only called by its methods; every value row read,
    // `v[base + j * stride..][..hd]` for `j < probs.len()`, lies inside `v`
    // (checked above).
    unsafe { accumulate::<T, NAN>(out, probs, v, base, stride) }
}

/// Eight stored values as `f32`, exactly, and the portable loops over them.
trait Load: Kv {
    /// The eight values at `p`; unless `NAN`, the caller has checked that they
    /// hold no NaN code, and one may read as any value.
    ///
    /// # Safety
    /// The CPU has AVX2 and `p..p + 8` lies inside one slice.
    unsafe fn load8<const NAN: bool>(p: *const Self) -> __m256;

    /// `Portable`'s weighted sum over rows of this storage.
    fn portable(out: &mut [f32], probs: &[f32], v: &[Self], base: usize, stride: usize);
}

impl Load for f32 {
    #[inline(always)]
    unsafe fn load8<const NAN: bool>(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    fn portable(out: &mut [f32], probs: &[f32], v: &[f32], base: usize, stride: usize) {
        Portable.accumulate(out, probs, v, base, stride);
    }
}

impl Load for u8 {
    /// Eight E4M3 bytes decoded exactly: each byte sign-extended to 32 bits,
    /// shifted left 20 and masked to the sign, the four exponent bits and the three
    /// mantissa bits is the `f32` whose value is the E4M3 value times `2^-120`
    /// (subnormals included, which land on `f32` subnormals with the same factor;
    /// see `rowdot`), and the product by `2^120` restores the value exactly. The
    /// NaN codes (`s 1111 111`), which that would read as 480, are replaced by NaN.
    #[inline(always)]
    unsafe fn load8<const NAN: bool>(p: *const u8) -> __m256 {
        let wide = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()));
        let bits = _mm256_and_si256(
            _mm256_slli_epi32::<20>(wide),
            _mm256_set1_epi32(0x87F0_0000u32 as i32),
        );
        let value = _mm256_mul_ps(
            _mm256_castsi256_ps(bits),
            _mm256_set1_ps(f32::from_bits((127 + 120) << 23)),
        );
        if !NAN {
            return value;
        }
        // All ones, which OR makes the result, is a NaN.
        let low = _mm256_set1_epi32(0x7f);
        let nan = _mm256_cmpeq_epi32(_mm256_and_si256(wide, low), low);
        _mm256_or_ps(value, _mm256_castsi256_ps(nan))
    }

    fn portable(out: &mut [f32], probs: &[f32], v: &[u8], base: usize, stride: usize) {
        Portable.accumulate_e4m3(out, probs, v, base, stride, true);
    }
}

/// `dot::dot` on AVX2: chunk `c` of eight values goes to accumulator `c % 4` by
/// fused multiply-adds, the accumulators are combined as `(a0 + a1) + (a2 + a3)`, the
/// lanes reduced as `((v0 + v4) + (v1 + v5)) + ((v2 + v6) + (v3 + v7))`, then the
/// tail's products fused into the sum in order.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let main = n - n % 8;
    // SAFETY: `a` and `b` hold at least `n` values each.
    let acc = combined(a.as_ptr(), b.as_ptr(), n);
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let h = _mm_hadd_ps(s, s);
    let mut s = _mm_cvtss_f32(h) + _mm_cvtss_f32(_mm_shuffle_ps::<1>(h, h));
    for t in main..n {
        s = a[t].mul_add(b[t], s);
    }
    s
}

/// Steps 1 and 2 of `dot::dot`'s order over the full chunks of eight of the first `n`
/// values at `pa` and `pb`: the four accumulators, combined as `(a0 + a1) + (a2 + a3)`.
///
/// # Safety
/// The CPU has AVX2 and FMA, and `pa` and `pb` point to at least `n` readable values each.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn combined(pa: *const f32, pb: *const f32, n: usize) -> __m256 {
    let (main, quad) = (n - n % 8, n - n % 32);
    // Every load reads `j..j + 8` with `j + 8 <= main <= n`.
    let madd = |acc: __m256, j: usize| {
        _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(j)), _mm256_loadu_ps(pb.add(j)), acc)
    };
    let (mut a0, mut a1, mut a2, mut a3) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    let mut j = 0;
    while j < quad {
        a0 = madd(a0, j);
        a1 = madd(a1, j + 8);
        a2 = madd(a2, j + 16);
        a3 = madd(a3, j + 24);
        j += 32;
    }
    // The last full chunks (at most three) go to accumulators 0, 1, 2.
    if j < main {
        a0 = madd(a0, j);
        j += 8;
    }
    if j < main {
        a1 = madd(a1, j);
        j += 8;
    }
    if j < main {
        a2 = madd(a2, j);
    }
    _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))
}

/// Step 3 of `dot::dot`'s order for eight dot products at once: lane `i` of the
/// result is `((v0 + v4) + (v1 + v5)) + ((v2 + v6) + (v3 + v7))` of `v[i]`, the
/// horizontal sums of the eight registers transposed into one (four cross-lane
/// shuffles and adds, three horizontal adds and a permutation, instead of eight
/// separate reductions to a scalar).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn reduce8(v: [__m256; 8]) -> __m256 {
    // `[va0 + va4, .., va3 + va7, vb0 + vb4, .., vb3 + vb7]`.
    let halves = |a: __m256, b: __m256| {
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        )
    };
    let (w01, w23) = (halves(v[0], v[1]), halves(v[2], v[3]));
    let (w45, w67) = (halves(v[4], v[5]), halves(v[6], v[7]));
    // Pairs: `[w0_0 + w0_1, w0_2 + w0_3, w2.., w2.., w1.., w1.., w3.., w3..]`.
    let (p0123, p4567) = (_mm256_hadd_ps(w01, w23), _mm256_hadd_ps(w45, w67));
    // Sums in the order `[0, 2, 4, 6, 1, 3, 5, 7]`, then in key order.
    let s = _mm256_hadd_ps(p0123, p4567);
    _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// `Inner::dots` on AVX2: eight key rows at a time, each row's accumulators as in
/// [`dot`] and the eight reduced together by [`reduce8`], then each row's tail
/// added in order; the keys after the last eight by [`dot`].
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dots(q: &[f32], k: &[f32], base: usize, stride: usize, out: &mut [f32]) {
    let (hd, keys) = (q.len(), out.len());
    let main = hd - hd % 8;
    if keys > 0 && base + (keys - 1) * stride + hd > k.len() {
        // Not reachable for a valid view; the portable loop's bounds checks report
        // the bug as a panic instead of reading out of bounds here.
        Portable.dots(q, k, base, stride, out);
        return;
    }
    let pq = q.as_ptr();
    let mut j = 0;
    while j + 8 <= keys {
        let mut v = [_mm256_setzero_ps(); 8];
        for (i, acc) in v.iter_mut().enumerate() {
            *acc = combined(pq, k.as_ptr().add(base + (j + i) * stride), hd);
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(j), reduce8(v));
        if main < hd {
            for (i, s) in out[j..j + 8].iter_mut().enumerate() {
                let at = base + (j + i) * stride;
                for (x, y) in q[main..].iter().zip(&k[at + main..at + hd]) {
                    *s = x.mul_add(*y, *s);
                }
            }
        }
        j += 8;
    }
    for (i, s) in out[j..].iter_mut().enumerate() {
        let at = base + (j + i) * stride;
        *s = dot(q, &k[at..at + hd]);
    }
}

/// Keys per block of [`accumulate`]: the value rows of a block (16 KB at a
/// `head_dim` of 128) stay in L1 while each strip of the output row goes over them.
const KEY_BLOCK: usize = 32;

/// `Inner::accumulate` on AVX2: for each block of [`KEY_BLOCK`] keys, the output
/// row in strips of up to 64 values, each strip held in eight registers while every
/// key's value strip is added to it, then the last `hd % 8` values in order. A row
/// of up to 64 values is one strip, read once; a longer one is read once per strip,
/// which the key blocks keep in L1. The caller has checked that every value row
/// read lies inside `v`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn accumulate<T: Load, const NAN: bool>(
    out: &mut [f32],
    probs: &[f32],
    v: &[T],
    base: usize,
    stride: usize,
) {
    let hd = out.len();
    let main = hd - hd % 8;
    for (block, ps) in probs.chunks(KEY_BLOCK).enumerate() {
        let from = base + block * KEY_BLOCK * stride;
        let mut d = 0;
        while d + 64 <= main {
            strip::<T, NAN, 8>(out, ps, v, from + d, stride, d);
            d += 64;
        }
        while d + 32 <= main {
            strip::<T, NAN, 4>(out, ps, v, from + d, stride, d);
            d += 32;
        }
        while d < main {
            strip::<T, NAN, 1>(out, ps, v, from + d, stride, d);
            d += 8;
        }
        if main < hd {
            for (j, &p) in ps.iter().enumerate() {
                if p != 0.0 {
                    let row = &v[from + j * stride + main..from + j * stride + hd];
                    for (a, &x) in out[main..].iter_mut().zip(row) {
                        *a += p * x.value();
                    }
                }
            }
        }
    }
}

/// Values `d..d + 8 N` of the output row, accumulated over every key in registers:
/// `out[d + i] += probs[j] * v[from + j * stride + i]`, in key order.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn strip<T: Load, const NAN: bool, const N: usize>(
    out: &mut [f32],
    probs: &[f32],
    v: &[T],
    from: usize,
    stride: usize,
    d: usize,
) {
    let po = out.as_mut_ptr().add(d);
    let mut acc = [_mm256_setzero_ps(); N];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = _mm256_loadu_ps(po.add(8 * i));
    }
    let pv = v.as_ptr().add(from);
    for (j, &p) in probs.iter().enumerate() {
        if p != 0.0 {
            let pp = _mm256_set1_ps(p);
            let row = pv.add(j * stride);
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(pp, T::load8::<NAN>(row.add(8 * i))));
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(po.add(8 * i), *a);
    }
}

#[cfg(test)]
mod tests {
    use super::{dot, Avx2, Inner, Portable};

    fn values(n: usize, seed: &mut u32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 17;
                *seed ^= *seed << 5;
                (*seed as f32 / u32::MAX as f32 - 0.5) * 3.0
            })
            .collect()
    }

    #[test]
    fn the_avx2_loops_equal_the_portable_ones() {
        if !super::available() {
            return;
        }
        let mut seed = 0x9e37_79b9u32;
        for n in 0..140 {
            let (a, b) = (values(n, &mut seed), values(n, &mut seed));
            let fast = Avx2.dot(&a, &b);
            assert_eq!(fast.to_bits(), dot::dot(&a, &b).to_bits(), "dot, n = {n}");
        }
        for (hd, keys) in [
            (1, 13),
            (7, 40),
            (8, 13),
            (9, 13),
            (31, 70),
            (32, 13),
            (40, 33),
            (64, 13),
            (72, 65),
            (100, 13),
            (128, 40),
            (131, 13),
        ] {
            let stride = hd + 5;
            let v = values(3 + keys * stride, &mut seed);
            let mut probs = values(keys, &mut seed);
            probs[4] = 0.0;
            let init = values(hd, &mut seed);
            let (mut fast, mut slow) = (init.clone(), init);
            Avx2.accumulate(&mut fast, &probs, &v, 3, stride);
            Portable.accumulate(&mut slow, &probs, &v, 3, stride);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "accumulate, hd = {hd}");
            // The same over E4M3 bytes, every code (NaNs included) among them.
            let codes: Vec<u8> = (0..v.len()).map(|i| (i * 37 + hd) as u8).collect();
            let init = values(hd, &mut seed);
            let (mut fast, mut slow) = (init.clone(), init);
            Avx2.accumulate_e4m3(&mut fast, &probs, &codes, 3, stride, true);
            Portable.accumulate_e4m3(&mut slow, &probs, &codes, 3, stride, true);
            let canonical = |x: &[f32]| {
                x.iter()
                    .map(|v| if v.is_nan() { f32::NAN } else { *v }.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(canonical(&fast), canonical(&slow), "e4m3, hd = {hd}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// The scores of several key rows at once (eight reduced together, then the
        /// rest one by one) are bit for bit `dot::dot` of each row alone, on AVX2
        /// and on the portable path, for every `head_dim` remainder and key count.
        #[test]
        fn several_scores_at_once_equal_each_dot_alone(
            hd in 1usize..140,
            keys in 0usize..40,
            pad in 0usize..9,
            base in 0usize..5,
            seed in 1u32..u32::MAX,
        ) {
            let mut seed = seed;
            let stride = hd + pad;
            let q = values(hd, &mut seed);
            let k = values(base + keys * stride, &mut seed);
            let want: Vec<u32> = (0..keys)
                .map(|j| dot::dot(&q, &k[base + j * stride..][..hd]).to_bits())
                .collect();
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let mut slow = vec![f32::NAN; keys];
            Portable.dots(&q, &k, base, stride, &mut slow);
            proptest::prop_assert_eq!(bits(&slow), want.clone());
            if super::available() {
                let mut fast = vec![f32::NAN; keys];
                Avx2.dots(&q, &k, base, stride, &mut fast);
                proptest::prop_assert_eq!(bits(&fast), want);
            }
        }
    }

    #[test]
    fn the_avx2_e4m3_decoding_is_exact_for_every_byte() {
        if !super::available() {
            return;
        }
        let codes: Vec<u8> = (0..=255).chain(0..=6).collect();
        let (mut fast, mut slow) = (vec![0.0; codes.len()], vec![0.0; codes.len()]);
        Avx2.decode_e4m3(&codes, &mut fast, true);
        Portable.decode_e4m3(&codes, &mut slow, true);
        // Without NaN codes, the fast decoding is exact too.
        let finite: Vec<u8> = codes.iter().copied().filter(|c| c & 0x7f != 0x7f).collect();
        let mut quick = vec![0.0; finite.len()];
        Avx2.decode_e4m3(&finite, &mut quick, false);
        for (&c, q) in finite.iter().zip(&quick) {
            assert_eq!(
                q.to_bits(),
                crate::rounding::e4m3_value(c).to_bits(),
                "{c:#04x}"
            );
        }
        for (at, code) in [(0, 0x7f), (31, 0xff), (32, 0x7f), (40, 0xff)] {
            let mut bytes = vec![0x3cu8; 41];
            assert!(!Avx2.has_e4m3_nan(&bytes));
            bytes[at] = code;
            assert!(Avx2.has_e4m3_nan(&bytes), "{at}");
        }
        for (i, (&c, (f, s))) in codes.iter().zip(fast.iter().zip(&slow)).enumerate() {
            let want = crate::rounding::e4m3_value(c);
            assert_eq!(s.to_bits(), want.to_bits(), "portable, byte {c:#04x}");
            if want.is_nan() {
                assert!(f.is_nan(), "byte {c:#04x} at {i}");
            } else {
                assert_eq!(f.to_bits(), want.to_bits(), "byte {c:#04x} at {i}");
            }
        }
    }
}

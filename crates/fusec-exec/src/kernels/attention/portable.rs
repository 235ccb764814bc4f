//! The portable inner loops: plain loops in the summation order of `dot::dot`, and
//! E4M3 bytes decoded by table.

use super::super::dot::dot;
use super::super::rowdot::e4m3_table;
use super::inner::Inner;

/// The portable inner loops.
pub(super) struct Portable;

impl Inner for Portable {
    #[inline(always)]
    fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }

    #[inline(always)]
    fn accumulate(&self, out: &mut [f32], probs: &[f32], v: &[f32], base: usize, stride: usize) {
        let hd = out.len();
        for (j, &p) in probs.iter().enumerate() {
            if p != 0.0 {
                let row = &v[base + j * stride..base + j * stride + hd];
                for (a, &x) in out.iter_mut().zip(row) {
                    *a += p * x;
                }
            }
        }
    }

    #[inline(always)]
    fn has_e4m3_nan(&self, codes: &[u8]) -> bool {
        codes.iter().any(|&c| c & 0x7f == 0x7f)
    }

    #[inline(always)]
    fn decode_e4m3(&self, codes: &[u8], out: &mut [f32], _: bool) {
        let table = e4m3_table();
        for (o, &c) in out.iter_mut().zip(codes) {
            *o = table[usize::from(c)];
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
        _: bool,
    ) {
        let (hd, table) = (out.len(), e4m3_table());
        for (j, &p) in probs.iter().enumerate() {
            if p != 0.0 {
                let row = &v[base + j * stride..base + j * stride + hd];
                for (a, &x) in out.iter_mut().zip(row) {
                    *a += p * table[usize::from(x)];
                }
            }
        }
    }
}

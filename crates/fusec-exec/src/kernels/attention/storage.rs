//! How attention's keys and values are stored (`f32` values or E4M3 bytes), and a
//! `[batch, heads, len, head_dim]` operand viewed through its strides.

use fusec_ir::DType;

use super::super::rowdot::e4m3_table;
use super::super::KernelError;
use super::inner::Inner;
use crate::tensor::{Buffer, Tensor};

/// How an attention operand's values are stored: `f32` values, or the bytes of E4M3
/// values (a cache in compact storage). The passes read keys and values through this,
/// so that a compact cache is read at one byte per value and decoded in registers.
pub(super) trait Kv: Copy + Send + Sync + 'static {
    /// Whether this is compact storage, decoded before use.
    const COMPACT: bool;

    /// `t`'s buffer, if it has this storage.
    fn buffer(t: &Tensor) -> Option<&[Self]>;

    /// The value of one stored entry.
    fn value(self) -> f32;

    /// `data` itself when it holds `f32` values (no decoding needed).
    fn as_f32(data: &[Self]) -> Option<&[f32]>;

    /// Whether `data` may hold a NaN code, which the fast decoding does not read as NaN
    /// (always false for `f32` values, which need no decoding).
    fn may_hold_nan(inner: &impl Inner, data: &[Self]) -> bool;

    /// `row` as `f32` values: `row` itself, or decoded by `inner` into `tmp` (at least
    /// `row.len()` long), minding NaN codes when `nan` says they may occur.
    fn values<'s>(inner: &impl Inner, row: &'s [Self], tmp: &'s mut [f32], nan: bool) -> &'s [f32];

    /// [`Inner::accumulate`] over value rows of this storage, minding NaN codes when
    /// `nan` says they may occur.
    #[allow(clippy::too_many_arguments)]
    fn accumulate(
        inner: &impl Inner,
        out: &mut [f32],
        probs: &[f32],
        v: &[Self],
        base: usize,
        stride: usize,
        nan: bool,
    );
}

impl Kv for f32 {
    const COMPACT: bool = false;

    fn buffer(t: &Tensor) -> Option<&[f32]> {
        t.f32_buffer()
    }

    #[inline(always)]
    fn value(self) -> f32 {
        self
    }

    #[inline(always)]
    fn as_f32(data: &[f32]) -> Option<&[f32]> {
        Some(data)
    }

    fn may_hold_nan(_: &impl Inner, _: &[f32]) -> bool {
        false
    }

    #[inline(always)]
    fn values<'s>(_: &impl Inner, row: &'s [f32], _: &'s mut [f32], _: bool) -> &'s [f32] {
        row
    }

    #[inline(always)]
    fn accumulate(
        inner: &impl Inner,
        out: &mut [f32],
        probs: &[f32],
        v: &[f32],
        base: usize,
        stride: usize,
        _: bool,
    ) {
        inner.accumulate(out, probs, v, base, stride);
    }
}

impl Kv for u8 {
    const COMPACT: bool = true;

    fn buffer(t: &Tensor) -> Option<&[u8]> {
        match t.buffer() {
            Buffer::U8(b) if t.dtype() == DType::Fp8E4M3 => Some(b),
            _ => None,
        }
    }

    #[inline(always)]
    fn value(self) -> f32 {
        e4m3_table()[usize::from(self)]
    }

    #[inline(always)]
    fn as_f32(_: &[u8]) -> Option<&[f32]> {
        None
    }

    #[inline(always)]
    fn may_hold_nan(inner: &impl Inner, data: &[u8]) -> bool {
        inner.has_e4m3_nan(data)
    }

    #[inline(always)]
    fn values<'s>(inner: &impl Inner, row: &'s [u8], tmp: &'s mut [f32], nan: bool) -> &'s [f32] {
        let tmp = &mut tmp[..row.len()];
        inner.decode_e4m3(row, tmp, nan);
        tmp
    }

    #[inline(always)]
    fn accumulate(
        inner: &impl Inner,
        out: &mut [f32],
        probs: &[f32],
        v: &[u8],
        base: usize,
        stride: usize,
        nan: bool,
    ) {
        inner.accumulate_e4m3(out, probs, v, base, stride, nan);
    }
}

/// A `[batch, heads, len, head_dim]` operand as a strided view of its buffer.
#[derive(Copy, Clone)]
pub(super) struct View4<'a, T> {
    pub(super) data: &'a [T],
    pub(super) shape: [usize; 4],
    pub(super) strides: [usize; 4],
    pub(super) offset: usize,
}

impl<'a, T: Kv> View4<'a, T> {
    pub(super) fn new(t: &'a Tensor, what: &str) -> Result<Self, KernelError> {
        let data = T::buffer(t).ok_or_else(|| {
            KernelError::Invalid(format!(
                "attention needs {what} stored as f32 values or E4M3 bytes, got {}",
                t.dtype()
            ))
        })?;
        match (t.shape(), t.strides()) {
            ([a, b, c, d], [sa, sb, sc, sd]) => Ok(View4 {
                data,
                shape: [*a, *b, *c, *d],
                strides: [*sa, *sb, *sc, *sd],
                offset: t.offset(),
            }),
            _ => Err(KernelError::Invalid(format!(
                "attention: {what} must be [batch, heads, len, head_dim], got {:?}",
                t.shape()
            ))),
        }
    }

    /// The buffer offset of row `[b, h, i, :]`.
    #[inline(always)]
    pub(super) fn base(&self, b: usize, h: usize, i: usize) -> usize {
        self.offset + b * self.strides[0] + h * self.strides[1] + i * self.strides[2]
    }

    /// Whether rows `[b, h, :, :]` may hold a NaN code (see [`Kv::may_hold_nan`]); a
    /// view with strided rows reads them exactly, so it answers false.
    #[inline(always)]
    pub(super) fn may_hold_nan(&self, inner: &impl Inner, b: usize, h: usize) -> bool {
        let [len, hd] = [self.shape[2], self.shape[3]];
        if !T::COMPACT || self.strides[3] != 1 || len == 0 || hd == 0 {
            return false;
        }
        let base = self.base(b, h, 0);
        if self.strides[2] == hd {
            T::may_hold_nan(inner, &self.data[base..base + len * hd])
        } else {
            (0..len).any(|j| {
                let at = base + j * self.strides[2];
                T::may_hold_nan(inner, &self.data[at..at + hd])
            })
        }
    }

    /// Row `[b, h, i, :]` as `f32` values: read in place when its values are
    /// contiguous `f32`s (a cache's rows always are contiguous), else decoded by
    /// `inner` (minding NaN codes when `nan`) or gathered into `tmp` (`head_dim`
    /// long).
    #[inline(always)]
    pub(super) fn row<'s>(
        &'s self,
        inner: &impl Inner,
        (b, h, i): (usize, usize, usize),
        tmp: &'s mut [f32],
        nan: bool,
    ) -> &'s [f32] {
        let base = self.base(b, h, i);
        let n = self.shape[3];
        if self.strides[3] == 1 {
            T::values(inner, &self.data[base..base + n], tmp, nan)
        } else {
            let sd = self.strides[3];
            for (j, t) in tmp.iter_mut().enumerate() {
                *t = self.data[base + j * sd].value();
            }
            tmp
        }
    }
}

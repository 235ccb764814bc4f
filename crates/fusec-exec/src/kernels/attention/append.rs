//! The in-place KV append: new entries written past the end of a cache's view, into
//! its buffer's spare capacity (see the module documentation of `super`).

use fusec_ir::{numerics, DType};

use super::super::gemv::round_e4m3;
use super::super::strided::walk;
use super::super::{float_buffer, KernelError};
use crate::rounding::{self, round};
use crate::tensor::{Buffer, Tensor};

/// The smallest capacity, in positions, of a cache that has to be copied to grow.
pub(super) const MIN_CAPACITY: usize = 16;

/// A sliding window's ring-buffer cache (see `fusec_ir::Dim::Window`): at most
/// `window` positions; the entry of the step with `written` entries before it goes to
/// slot `written mod window`, over the entry that has left the window once the ring
/// is full.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    pub window: usize,
    pub written: usize,
}

/// `past` with `new` appended along `axis`: written in place into `past`'s buffer when
/// it has room and is not shared, else into a new buffer with room. Values of `new`
/// are stored through `store` (the cache's rounding, or FP8 quantization); a cache in
/// compact E4M3 storage (`Buffer::U8`) gets the byte of the stored value, which
/// `store` has made an E4M3 value. Returns the appended view and the bytes of `past`
/// copied (0 in place). `past` is left viewing the buffer the result shares (a copy of
/// its values if it was copied).
///
/// With a `ring` that is full (`past` holds `window` positions) the entry is written
/// over slot `written mod window` instead, and the result has `past`'s length.
pub fn append(
    past: &mut Tensor,
    new: &Tensor,
    axis: usize,
    store: impl Fn(f32) -> f32,
    ring: Option<Ring>,
) -> Result<(Tensor, u64), KernelError> {
    let op = "kv.append";
    let compact = matches!(past.buffer(), Buffer::U8(_));
    if compact && past.dtype() != DType::Fp8E4M3 {
        return Err(KernelError::Invalid(format!(
            "{op}: a {} cache cannot have byte storage",
            past.dtype()
        )));
    }
    if !compact {
        float_buffer(past, op)?;
    }
    let src = float_buffer(new, op)?;
    let agrees = past.rank() == new.rank()
        && axis < past.rank()
        && past
            .shape()
            .iter()
            .zip(new.shape())
            .enumerate()
            .all(|(d, (a, b))| d == axis || a == b);
    if !agrees {
        return Err(KernelError::Invalid(format!(
            "{op}: cannot append {:?} to {:?} along axis {axis}",
            new.shape(),
            past.shape()
        )));
    }
    let (len, n) = (past.shape()[axis], new.shape()[axis]);
    // Where the entries go, and the length after them. A ring that fills (or is full)
    // takes entry `i` at slot `(written + i) mod W`, over the oldest; a prefill step of
    // more than `W` tokens overwrites its own first entries, as the last `W` are what
    // the window keeps.
    let wraps = ring.filter(|r| len + n > r.window);
    let (at, grown) = match wraps {
        Some(r) => {
            if len != r.written.min(r.window) {
                return Err(KernelError::Invalid(format!(
                    "{op}: a ring of {} positions holds {len} after {} entries",
                    r.window, r.written
                )));
            }
            (r.written % r.window.max(1), r.window)
        }
        None => (len, len + n),
    };
    let mut copied = 0;
    let room = past.capacity_along(axis).is_some_and(|c| c >= grown);
    if !room || !past.is_unique() {
        copied = past.bytes();
        let mut capacity = (2 * grown).max(MIN_CAPACITY);
        if let Some(r) = ring {
            capacity = capacity.min(r.window).max(grown);
        }
        *past = past.with_capacity(axis, capacity)?;
    }
    let capacity = past.capacity_along(axis).ok_or_else(|| {
        KernelError::Invalid(format!("{op}: the grown cache is not a prefix view"))
    })?;
    let outer: usize = past.shape()[..axis].iter().product();
    let block: usize = past.shape()[axis + 1..].iter().product();
    // One run of consecutive slots, or for a wrapping ring one run per entry (an
    // entry along `axis` of `new`, each to its slot).
    let shared = || KernelError::Invalid(format!("{op}: the cache buffer is shared after copying"));
    let mut write = |part: &Tensor, slot: usize| -> Result<(), KernelError> {
        let entries = Entries {
            new: part,
            src,
            outer,
            span: part.shape()[axis] * block,
            capacity,
            len: slot,
            block,
        };
        if compact {
            let buf = past.unique_u8_mut().ok_or_else(shared)?;
            entries.write(buf, |v| e4m3_code(store(v)));
        } else {
            let buf = past.unique_f32_mut().ok_or_else(shared)?;
            entries.write(buf, &store);
        }
        Ok(())
    };
    match wraps {
        None => write(new, at)?,
        Some(r) => {
            for i in n - n.min(r.window)..n {
                let row = new
                    .slice(axis, i, i + 1)
                    .map_err(|e| KernelError::Invalid(format!("{op}: {e}")))?;
                write(&row, (r.written + i) % r.window)?;
            }
        }
    }
    let mut shape = past.dims();
    shape[axis] = grown;
    Ok((past.with_layout(shape, past.stride_dims(), 0), copied))
}

/// The byte of an E4M3 value (the result of [`round_e4m3`], which saturates, so every
/// value but NaN is one); a NaN becomes the E4M3 NaN of its sign, whose value reads
/// back as NaN (its payload is not kept).
#[inline]
pub(super) fn e4m3_code(x: f32) -> u8 {
    rounding::e4m3_bits_nan(x).unwrap_or_else(|| numerics::e4m3_encode(x))
}

/// The entries of `new` to append, and where they go in a cache's buffer.
pub(super) struct Entries<'a> {
    pub(super) new: &'a Tensor,
    pub(super) src: &'a [f32],
    pub(super) outer: usize,
    /// Values of `new` per outer index.
    pub(super) span: usize,
    pub(super) capacity: usize,
    /// The position along the appended axis the first entry goes to.
    pub(super) len: usize,
    pub(super) block: usize,
}

impl Entries<'_> {
    /// Writes `put(v)` for every value `v` of `new` at its place in `buf`. The new
    /// entries are read in place through their strides (no gathered copy).
    pub(super) fn write<T>(&self, buf: &mut [T], put: impl Fn(f32) -> T) {
        let (span, new, src) = (self.span, self.new, self.src);
        if span == 0 || self.outer == 0 {
            return;
        }
        // Element `e` of `new` in row-major order is entry `rest` of outer index `o`.
        let dst = |e: usize| (e / span * self.capacity + self.len) * self.block + e % span;
        if new.is_contiguous() {
            let values = &src[new.offset()..new.offset() + self.outer * span];
            for (o, from) in values.chunks_exact(span).enumerate() {
                let at = dst(o * span);
                for (d, &v) in buf[at..at + span].iter_mut().zip(from) {
                    *d = put(v);
                }
            }
        } else {
            // A row along the last axis lies inside one outer index (the last axis is
            // the appended one or one after it), so its destination is contiguous.
            let rank = new.rank();
            let (inner, step) = (new.shape()[rank - 1], new.strides()[rank - 1]);
            let mut first = 0;
            walk(
                &new.shape()[..rank - 1],
                [&new.strides()[..rank - 1]],
                [new.offset()],
                |[from]| {
                    let at = dst(first);
                    for (i, d) in buf[at..at + inner].iter_mut().enumerate() {
                        *d = put(src[from + i * step]);
                    }
                    first += inner;
                },
            );
        }
    }
}

/// How a cache's values are stored: rounded to its dtype, or for an FP8 cache
/// quantized as `fp8(x / scale)`. E4M3 takes [`round_e4m3`], which equals the generic
/// `numerics::round_to` bit for bit at a fraction of its cost, and `f32` is stored as
/// it is, without a call to the generic rounding per value.
pub(super) fn storer(dtype: DType, scale: Option<f32>) -> impl Fn(f32) -> f32 {
    let scale = scale.filter(|_| dtype.is_fp8());
    move |x| match (dtype, scale) {
        (DType::F32, _) => x,
        (DType::Fp8E4M3, Some(s)) => round_e4m3(x / s),
        (DType::Fp8E4M3, None) => round_e4m3(x),
        (_, Some(s)) => numerics::round_to(dtype, x / s),
        (_, None) => round(dtype, x),
    }
}

/// `kv.append(past, new)` along axis -2, in place (see [`append`]); into a sliding
/// window's `ring`, if the cache is one.
pub fn kv_append(
    past: &mut Tensor,
    new: &Tensor,
    ring: Option<Ring>,
) -> Result<(Tensor, u64), KernelError> {
    if past.dtype() != new.dtype() || past.rank() < 2 {
        return Err(KernelError::Invalid(format!(
            "kv.append: cannot append {}{:?} to {}{:?}",
            new.dtype(),
            new.shape(),
            past.dtype(),
            past.shape()
        )));
    }
    let axis = past.rank() - 2;
    let dtype = past.dtype();
    append(past, new, axis, storer(dtype, None), ring)
}

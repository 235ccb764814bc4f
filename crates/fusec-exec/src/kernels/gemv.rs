//! The GEMV core shared by `linear` and every fused GEMV kernel, for plain weights
//! and for quantized (`dequant`) ones.
//!
//! A plain weight is multiplied exactly as `super::matmul::linear` does (the same
//! [`dot`] per output element), so a fused kernel gives bit-identical GEMV results to
//! the eager `linear` it replaces.
//!
//! A quantized weight `W = q * s_w` ([`QuantWeight`]) is never expanded into a
//! dequantized copy: each output reads the stored FP8 values of its row, and the scales
//! are applied once per output in the epilogue. With `act` an FP8 format the
//! activations are quantized too, per block of [`numerics::FP8_ACT_BLOCK`] inputs of a
//! row, as the CUDA kernels do it:
//!
//! 1. `s_b = absmax(x_block) / max(act)` rounded up to 16 significant bits
//!    (`numerics::act_block_scale`; 1 for an all-zero block);
//! 2. `x̂ = act(x / s_b) * s_b`: IEEE division, round to nearest even with saturation,
//!    then the product, exact in `f32` (a CUDA kernel must divide with `__fdiv_rn`,
//!    not multiply by `1 / s_b`, to match element by element). The block scales are
//!    applied to the activations before the dot rather than to partial sums after
//!    it, so every GEMV kernel (row dots, the batched rows, the prefill GEMM) takes
//!    them unchanged;
//! 3. `acc = sum(x̂ * q)` in `f32`, in the order of [`dot`]: `x̂` has at most 20
//!    significant bits and `q` 4, so every product is exact and only the order of
//!    the sum can differ from a GPU's (and [`rowdot`]'s exact E4M3 path applies);
//! 4. `y = acc * s_w[o]`.
//!
//! With `act` equal to the weight's compute dtype, activations stay as they are and
//! `y = acc * s_w[o]` too.
//!
//! A weight of integer codes (`i8`, `i4`, `u4`) with one scale (and minimum) per block
//! of 32 inputs is multiplied as llama.cpp multiplies GGUF's Q8_0, Q4_0 and Q4_1
//! weights: the activations are
//! quantized once per GEMV to 8 bits per block of 32 ([`intdot::quantize_q8`]) and
//! each output is [`intdot`]'s arithmetic, the block scales applied inside the dot.

use std::borrow::Cow;

use fusec_ir::quant::IntFormat;
use fusec_ir::{numerics, DType};

#[cfg(doc)]
use super::dot::dot;
use super::gemm;
use super::intdot::{self, IntRows, Q8Acts};
use super::kdot::{self, KRows, Q8KActs};
use super::rowdot::{self, Rows};
use super::{float_buffer, KernelError};
use crate::pool;
use crate::team;
use crate::tensor::{Buffer, Tensor};

/// Multiply-adds below which a GEMV runs on the calling thread (as in `matmul`).
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// The most activation rows that run as row dots in the order of [`dot`]
/// (bit-identical to the eager reference and to each row alone): a batched decode
/// step's sequences, up to 16 of them, or a prefill chunk that short. Each weight row
/// is read from memory once for all the rows ([`rowdot::Activations::dots_rows`]).
pub const MAX_ROW_DOT_ROWS: usize = 16;

/// Activation rows from which a linear layer runs as a GEMM ([`gemm::gemm`], its own
/// summation order, checked to a tolerance) rather than as row dots: a prefill step's
/// `T` tokens, whose rows reuse each weight enough to pay for packing it into panels.
pub const GEMM_MIN_ROWS: usize = MAX_ROW_DOT_ROWS + 1;

/// A quantized GEMV weight: the value of a `dequant` node. It launches nothing and is
/// read by the GEMV that consumes it.
#[derive(Clone, Debug)]
pub struct QuantWeight {
    /// The FP8 values `[out, in]` (an FP8 dtype, values exact in that format), or the
    /// integer codes (`i8`, `i4`).
    pub values: Tensor,
    /// `f32[out]` (per output channel) or `f32[]` (per tensor); for integer codes
    /// `f16[out, in / 32]`, one per block.
    pub scale: Tensor,
    /// The compute dtype the weight stands for.
    pub to: DType,
    /// How the consuming GEMV treats its activations: an FP8 format quantizes them per
    /// row; `to` keeps them.
    pub act: DType,
}

impl QuantWeight {
    /// Checks the parts against each other, as the IR's type rule for `dequant` does.
    pub fn new(values: Tensor, scale: Tensor, to: DType, act: DType) -> Result<Self, KernelError> {
        if values.dtype().is_int_codes() {
            return QuantWeight::new_int(values, scale, to, act);
        }
        if !values.dtype().is_fp8() || values.rank() != 2 {
            return Err(KernelError::Invalid(format!(
                "dequant: values must be an FP8 matrix, got {}{:?}",
                values.dtype(),
                values.shape()
            )));
        }
        let per_channel = scale.rank() == 1 && scale.shape()[0] == values.shape()[0];
        if scale.dtype() != DType::F32 || !(scale.rank() == 0 || per_channel) {
            return Err(KernelError::Invalid(format!(
                "dequant: scales must be f32[] or f32[{}], got {}{:?}",
                values.shape()[0],
                scale.dtype(),
                scale.shape()
            )));
        }
        if act != to && !act.is_fp8() {
            return Err(KernelError::Invalid(format!(
                "dequant: activations are {to} or FP8, not {act}"
            )));
        }
        Ok(QuantWeight {
            values,
            scale,
            to,
            act,
        })
    }

    /// [`QuantWeight::new`] for integer codes.
    fn new_int(values: Tensor, scale: Tensor, to: DType, act: DType) -> Result<Self, KernelError> {
        let &[o, i] = values.shape() else {
            return Err(KernelError::Invalid(format!(
                "dequant: {} codes must be a matrix, got {:?}",
                values.dtype(),
                values.shape()
            )));
        };
        if !i.is_multiple_of(intdot::BLOCK) {
            return Err(KernelError::Invalid(format!(
                "dequant: {} codes need an input dimension that is a multiple of {}, got {i}",
                values.dtype(),
                intdot::BLOCK
            )));
        }
        let format = IntFormat::of(values.dtype(), scale.dtype()).ok_or_else(|| {
            KernelError::Invalid(format!(
                "dequant: {} codes with {} side data are no block format",
                values.dtype(),
                scale.dtype()
            ))
        })?;
        let want = format.scales(fusec_ir::Dim::Fixed(o as u64), i as u64);
        let want_shape: Vec<usize> = want
            .shape
            .dims()
            .iter()
            .filter_map(|d| d.as_fixed().map(|v| v as usize))
            .collect();
        if scale.dtype() != want.dtype || scale.shape() != want_shape.as_slice() {
            return Err(KernelError::Invalid(format!(
                "dequant: scales of {format} codes must be {want}, got {}{:?}",
                scale.dtype(),
                scale.shape()
            )));
        }
        if act != DType::I8 {
            return Err(KernelError::Invalid(format!(
                "dequant: {} codes multiply i8 activations, not {act}",
                values.dtype()
            )));
        }
        Ok(QuantWeight {
            values,
            scale,
            to,
            act,
        })
    }

    /// `[out, in]`.
    pub fn shape(&self) -> &[usize] {
        self.values.shape()
    }

    /// Whether the values are integer codes with block scales.
    fn is_int(&self) -> bool {
        self.values.dtype().is_int_codes()
    }

    /// Whether the weight is Q4_K (codes with super-block side data in bytes).
    fn is_k(&self) -> bool {
        IntFormat::of(self.values.dtype(), self.scale.dtype()) == Some(IntFormat::Q4K)
    }

    /// The codes and side data of a Q4_K weight, borrowed from their buffers.
    fn k_rows(&self) -> Result<KRows<'_>, KernelError> {
        let bad = || {
            KernelError::Invalid(
                "dequant: Q4_K codes and their side data must be bound whole and contiguous".into(),
            )
        };
        let (v, s) = (&self.values, &self.scale);
        let (Buffer::U8(codes), Buffer::U8(side)) = (v.buffer(), s.buffer()) else {
            return Err(bad());
        };
        if !v.is_contiguous() || !s.is_contiguous() || !v.offset().is_multiple_of(2) {
            return Err(bad());
        }
        Ok(KRows {
            packed: codes
                .get(v.offset() / 2..(v.offset() + v.numel()) / 2)
                .ok_or_else(bad)?,
            side: side
                .get(s.offset()..s.offset() + s.numel())
                .ok_or_else(bad)?,
            ins: self.shape()[1],
        })
    }

    /// The codes and block scales of an integer weight, borrowed from their buffers.
    fn int_rows(&self) -> Result<IntRows<'_>, KernelError> {
        let bad = || {
            KernelError::Invalid(format!(
                "dequant: {} codes and their scales must be bound whole and contiguous",
                self.values.dtype()
            ))
        };
        let v = &self.values;
        let s = &self.scale;
        let (Buffer::U8(codes), Buffer::F32(scales)) = (v.buffer(), s.buffer()) else {
            return Err(bad());
        };
        if !v.is_contiguous() || !s.is_contiguous() {
            return Err(bad());
        }
        let scales = scales
            .get(s.offset()..s.offset() + s.numel())
            .ok_or_else(bad)?;
        match v.dtype() {
            DType::I8 => Ok(IntRows::Q8 {
                codes: codes
                    .get(v.offset()..v.offset() + v.numel())
                    .ok_or_else(bad)?,
                scales,
            }),
            DType::I4 if v.offset().is_multiple_of(2) => Ok(IntRows::Q4 {
                packed: codes
                    .get(v.offset() / 2..(v.offset() + v.numel()) / 2)
                    .ok_or_else(bad)?,
                scales,
            }),
            DType::U4 if v.offset().is_multiple_of(2) => Ok(IntRows::Q41 {
                packed: codes
                    .get(v.offset() / 2..(v.offset() + v.numel()) / 2)
                    .ok_or_else(bad)?,
                scales,
            }),
            _ => Err(bad()),
        }
    }

    /// Bytes a GEMV reads: the stored values and the scales.
    pub fn read_bytes(&self) -> u64 {
        self.values.read_bytes() + self.scale.read_bytes()
    }

    /// The scale of output channel `o`.
    fn scale_of(scales: &[f32], o: usize) -> f32 {
        if scales.len() == 1 {
            scales[0]
        } else {
            scales[o]
        }
    }
}

/// A GEMV weight operand: a plain `[out, in]` tensor or a quantized one.
#[derive(Copy, Clone, Debug)]
pub enum GemvWeight<'a> {
    Dense(&'a Tensor),
    Quant(&'a QuantWeight),
}

impl GemvWeight<'_> {
    /// `[out, in]`.
    pub fn shape(&self) -> &[usize] {
        match self {
            GemvWeight::Dense(t) => t.shape(),
            GemvWeight::Quant(q) => q.shape(),
        }
    }

    /// The dtype of the weight as the graph sees it (the compute dtype of a quantized
    /// one).
    pub fn dtype(&self) -> DType {
        match self {
            GemvWeight::Dense(t) => t.dtype(),
            GemvWeight::Quant(q) => q.to,
        }
    }
}

/// Activations quantized to an FP8 format per block of inputs, as `f32` values (see
/// the module documentation). The vector comes from the buffer pool and goes back to
/// it when this is dropped.
#[derive(Debug)]
pub struct QuantRows {
    pub values: Vec<f32>,
}

impl Drop for QuantRows {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.values));
    }
}

/// Quantizes each row of `xs` (`rows x ins`, row-major) to `act`, each block of
/// [`numerics::FP8_ACT_BLOCK`] inputs with its own dynamic scale `absmax / max(act)`
/// (see the module documentation).
pub fn quantize_rows(xs: &[f32], ins: usize, act: DType) -> QuantRows {
    let rows = xs.len().checked_div(ins).unwrap_or(0);
    let mut values = pool::take(xs.len());
    for row in xs.chunks(ins.max(1)).take(rows) {
        for block in row.chunks(numerics::FP8_ACT_BLOCK) {
            let absmax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s = numerics::act_block_scale(absmax, act);
            if act == DType::Fp8E4M3 && !block.iter().any(|v| v.is_nan()) {
                values.extend(block.iter().map(|&v| round_e4m3_finite(v / s) * s));
            } else if act == DType::Fp8E4M3 {
                values.extend(block.iter().map(|&v| round_e4m3(v / s) * s));
            } else {
                values.extend(block.iter().map(|&v| numerics::round_to(act, v / s) * s));
            }
        }
    }
    QuantRows { values }
}

pub use crate::rounding::round_e4m3;

/// [`round_e4m3`] for a value that is not NaN, bit for bit, without branches, so that
/// the activation quantization loop vectorizes: the value saturates to `±448` first
/// (which is what the generic conversion does past it), both roundings are computed,
/// and the magnitude picks one. The subnormal rounding adds and subtracts `1.5 * 2^23`,
/// which rounds a magnitude below `2^22` to an integer, ties to even, in the default
/// rounding mode; the sign is put back after, so that `-0.0` stays `-0.0`.
#[inline]
fn round_e4m3_finite(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let c = x.clamp(-448.0, 448.0);
    let sign = c.to_bits() & 0x8000_0000;
    let a = c.abs();
    let sub = ((a * 512.0 + MAGIC) - MAGIC) * (1.0 / 512.0);
    let bits = c.to_bits();
    let normal = (bits + 0x7_FFFF + ((bits >> 20) & 1)) & !0xF_FFFF;
    let magnitude = if a < 1.0 / 64.0 {
        sub.to_bits()
    } else {
        normal & 0x7FFF_FFFF
    };
    f32::from_bits(magnitude | sign)
}

/// Checks that `w` multiplies rows of `ins` features of `dtype`.
pub fn check(op: &str, dtype: DType, ins: usize, w: GemvWeight<'_>) -> Result<(), KernelError> {
    let shape = w.shape();
    if shape.len() != 2 || shape[1] != ins {
        return Err(KernelError::Invalid(format!(
            "{op}: weight {shape:?} does not take {ins} input features"
        )));
    }
    if w.dtype() != dtype {
        return Err(KernelError::Invalid(format!(
            "{op}: dtype mismatch: activations {dtype}, weight {}",
            w.dtype()
        )));
    }
    Ok(())
}

/// `x @ W^T` for `rows` rows of `ins` values (`xs`, row-major), unrounded: the `f32`
/// results `[rows, out]`, row-major. `act` holds the rows already quantized for a
/// quantized weight with FP8 activations (computed once and shared by every GEMV that
/// reads the same rows); it is computed here when absent.
///
/// The weight is read in its stored format (`f32`, compact `bf16`/`f16` bits, or E4M3
/// bytes) by [`rowdot`], which decodes in registers and sums in the order of [`dot`],
/// so every storage gives the results of the `f32` reference.
pub fn gemv(
    xs: &[f32],
    rows: usize,
    w: GemvWeight<'_>,
    act: Option<&QuantRows>,
) -> Result<Vec<f32>, KernelError> {
    let mut out = None;
    gemv_many(xs, rows, &[w], act, Epilogue::None, |_, y| {
        out = Some(y);
        Ok(())
    })?;
    out.ok_or_else(|| KernelError::Invalid("gemv: no result".into()))
}

/// A weight's rows as stored: float values or integer codes.
#[derive(Copy, Clone, Debug)]
enum Stored<'a> {
    Float(Rows<'a>),
    Int(IntRows<'a>),
    K(KRows<'a>),
}

impl<'a> Stored<'a> {
    fn len(&self) -> usize {
        match self {
            Stored::Float(r) => r.len(),
            Stored::Int(r) => r.len(),
            Stored::K(r) => r.len(),
        }
    }

    fn range(&self, start: usize, end: usize) -> Stored<'a> {
        match self {
            Stored::Float(r) => Stored::Float(r.range(start, end)),
            Stored::Int(r) => Stored::Int(r.range(start, end)),
            Stored::K(r) => Stored::K(r.range(start, end)),
        }
    }

    fn row_bytes(&self, ins: usize) -> usize {
        match self {
            Stored::Float(r) => ins * r.value_bytes(),
            Stored::Int(r) => r.row_bytes(ins),
            Stored::K(r) => r.row_bytes(),
        }
    }
}

/// A weight's activations, prepared for its storage.
enum Prepared<'a> {
    Float(rowdot::Activations<'a>),
    Int(&'a Q8Acts),
    K(&'a Q8KActs),
}

impl Prepared<'_> {
    /// `out[k]` = row `r` of the activations (rows of `ins`) times row `k` of `w`.
    fn dots(&self, r: usize, ins: usize, w: Stored<'_>, out: &mut [f32]) {
        match (self, w) {
            (Prepared::Float(a), Stored::Float(rows)) => a.row(r, ins).dots(rows, out),
            (Prepared::Int(q), Stored::Int(rows)) => intdot::dots(q.row(r, ins), rows, out),
            (Prepared::K(q), Stored::K(rows)) => kdot::dots(q.row(r, ins), rows, out),
            // Each part is prepared for its own storage just below where it is made.
            _ => out.fill(f32::NAN),
        }
    }

    /// `out[r * k + o]` = row `r` of the `rows` activation rows (of `ins`) times row
    /// `o` of the `k` rows of `w`: each weight row read from memory once for all of
    /// them, each result as [`Prepared::dots`] gives it.
    fn dots_rows(&self, rows: usize, ins: usize, w: Stored<'_>, out: &mut [f32]) {
        match (self, w) {
            (Prepared::Float(a), Stored::Float(ws)) => a.dots_rows(rows, ins, ws, out),
            // Each activation row over the chunk's weight rows, several weight rows at
            // a time (one load of each activation block feeding them all): the chunk
            // (at most `CHUNK_BYTES`) is read from memory for the first activation
            // row and found in L2 by the others.
            (Prepared::Int(q), Stored::Int(ws)) => {
                let k = ws.len().checked_div(ins).unwrap_or(0);
                for (r, dst) in out.chunks_exact_mut(k.max(1)).take(rows).enumerate() {
                    intdot::dots(q.row(r, ins), ws, dst);
                }
            }
            (Prepared::K(q), Stored::K(ws)) => {
                let k = ws.len().checked_div(ins).unwrap_or(0);
                for (r, dst) in out.chunks_exact_mut(k.max(1)).take(rows).enumerate() {
                    kdot::dots(q.row(r, ins), ws, dst);
                }
            }
            _ => out.fill(f32::NAN),
        }
    }
}

/// One weight of a batch of GEMVs over the same rows, resolved: its stored rows, which
/// activations it multiplies, and its epilogue scales.
struct Part<'a> {
    rows: Stored<'a>,
    outs: usize,
    /// Whether it multiplies the FP8-quantized activations (else the rows as given).
    quantized: bool,
    /// The weight scales of a quantized weight, per output channel or one.
    scales: Option<Cow<'a, [f32]>>,
}

impl Part<'_> {
    /// The finished output `o` of row `r` from its row-dot `acc` (see the module
    /// documentation): scaled for a quantized weight, as it is for a plain one.
    #[inline]
    fn scale(&self, acc: f32, o: usize) -> f32 {
        match &self.scales {
            Some(s) => acc * QuantWeight::scale_of(s, o),
            None => acc,
        }
    }
}

/// Weight bytes one chunk of a decode GEMV streams, at most and at least. A chunk is a
/// sequential stream that the hardware prefetchers must pick up again, so chunks are
/// long: with 16 KiB chunks the 125M model's decode ran 30% slower than with 64 KiB,
/// and 256 KiB ran faster again. But a kernel is also cut into at least four chunks
/// per thread when it can be, so that threads running at different speeds even out.
const CHUNK_BYTES: (usize, usize) = (32 << 10, 256 << 10);

/// Rows per chunk of a decode GEMV over `total` rows of `row_bytes` (see
/// [`CHUNK_BYTES`]): whole multiples of the 4 rows the vector kernels' blocks hold.
fn chunk_rows(total: usize, row_bytes: usize) -> usize {
    let (least, most) = CHUNK_BYTES;
    let bytes = (total * row_bytes / (4 * team::threads())).clamp(least, most);
    (bytes / row_bytes.max(1)).max(4).next_multiple_of(4)
}

/// What a batch of GEMVs does with its results before it hands them out. At decode it
/// runs inside the parallel loop, on each chunk of results while they are in cache,
/// instead of on the calling thread after the loop, where the other threads would
/// wait for it.
#[derive(Copy, Clone)]
pub enum Epilogue<'a> {
    /// The results as they are.
    None,
    /// Every result rounded to this dtype.
    Round(DType),
    /// `f(first, values)` on the results of a single GEMV: `values` are results
    /// `first..first + values.len()` of the row-major `[rows, out]` result.
    Each(&'a (dyn Fn(usize, &mut [f32]) + Sync)),
    /// `f(a, b)` on the results of two GEMVs of one shape, element by element, writing
    /// into `a`; the batch hands out `a` alone (SwiGLU's gate and up).
    Pair(&'a (dyn Fn(&mut [f32], &[f32]) + Sync)),
}

impl std::fmt::Debug for Epilogue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Epilogue::None => "Epilogue::None",
            Epilogue::Round(_) => "Epilogue::Round",
            Epilogue::Each(_) => "Epilogue::Each",
            Epilogue::Pair(_) => "Epilogue::Pair",
        })
    }
}

/// Every GEMV of `ws` over the same rows `xs` (`rows` rows of `ins` values), as
/// [`gemv`] computes each, handing result `i` to `emit(i, values)`.
///
/// At decode (one row) the weights run as **one** parallel loop: their outputs are
/// laid end to end and cut into chunks of [`CHUNK_BYTES`] of weights, so a fused
/// kernel with three weights (the Q, K and V projections) hands the threads one job
/// instead of three, and no thread waits at a join between them.
pub fn gemv_many(
    xs: &[f32],
    rows: usize,
    ws: &[GemvWeight<'_>],
    act: Option<&QuantRows>,
    epilogue: Epilogue<'_>,
    mut emit: impl FnMut(usize, Vec<f32>) -> Result<(), KernelError>,
) -> Result<(), KernelError> {
    let Some(first) = ws.first() else {
        return Ok(());
    };
    let ins = match first.shape() {
        [_, i] => *i,
        other => {
            return Err(KernelError::Invalid(format!(
                "gemv: weight must be [out, in], got {other:?}"
            )))
        }
    };
    if xs.len() != rows * ins {
        return Err(KernelError::Invalid(format!(
            "gemv: {} values are not {rows} rows of {ins}",
            xs.len()
        )));
    }
    // Weights stored in a form other than the executor binds them in are decoded once
    // into this buffer (never the case for a bound weight).
    let mut decoded: [Vec<f32>; 4] = Default::default();
    if ws.len() > decoded.len() {
        return Err(KernelError::Invalid(format!(
            "gemv: {} weights in one kernel, at most {} supported",
            ws.len(),
            decoded.len()
        )));
    }
    // The activation format of the quantized weights with FP8 activations.
    let fp8_act = ws.iter().find_map(|w| match w {
        GemvWeight::Quant(q) if q.act.is_fp8() && q.act != q.to => Some(q.act),
        _ => None,
    });
    let mut parts: [Option<Part<'_>>; 4] = Default::default();
    for ((w, slot), buf) in ws.iter().zip(parts.iter_mut()).zip(decoded.iter_mut()) {
        match w.shape() {
            [_, i] if *i == ins => {}
            other => {
                return Err(KernelError::Invalid(format!(
                    "gemv: weight {other:?} does not take {ins} input features"
                )))
            }
        }
        let outs = w.shape()[0];
        let part = match w {
            GemvWeight::Dense(t) => Part {
                rows: Stored::Float(stored(t, buf, "gemv")?),
                outs,
                quantized: false,
                scales: None,
            },
            GemvWeight::Quant(q) if q.is_k() => Part {
                rows: Stored::K(q.k_rows()?),
                outs,
                quantized: false,
                scales: None,
            },
            GemvWeight::Quant(q) if q.is_int() => Part {
                rows: Stored::Int(q.int_rows()?),
                outs,
                quantized: false,
                scales: None,
            },
            GemvWeight::Quant(q) => {
                if q.act != q.to && Some(q.act) != fp8_act {
                    return Err(KernelError::Invalid(format!(
                        "gemv: one kernel's weights quantize activations to both {} and {}",
                        fp8_act.unwrap_or(q.act),
                        q.act
                    )));
                }
                Part {
                    rows: Stored::Float(stored(&q.values, buf, "gemv")?),
                    outs,
                    quantized: q.act != q.to,
                    scales: Some(q.scale.contiguous_f32().unwrap_or_default()),
                }
            }
        };
        if part.rows.len() != outs * ins {
            return Err(KernelError::Invalid(format!(
                "gemv: {} stored weight values are not [{outs}, {ins}]",
                part.rows.len()
            )));
        }
        *slot = Some(part);
    }
    let parts: &[Option<Part<'_>>] = &parts[..ws.len()];

    let fits = match epilogue {
        Epilogue::None | Epilogue::Round(_) => true,
        Epilogue::Each(_) => ws.len() == 1,
        Epilogue::Pair(_) => ws.len() == 2 && ws[0].shape() == ws[1].shape(),
    };
    if !fits {
        return Err(KernelError::Invalid(format!(
            "gemv: an epilogue that does not fit {} weights",
            ws.len()
        )));
    }
    // The FP8 activations, quantized once for every weight that reads them.
    let owned = match (fp8_act, act) {
        (Some(_), Some(a)) if a.values.len() == xs.len() => None,
        (Some(fmt), _) => Some(quantize_rows(xs, ins, fmt)),
        (None, _) => None,
    };
    let quant: Option<&QuantRows> = match (fp8_act, &owned) {
        (None, _) => None,
        (Some(_), Some(o)) => Some(o),
        (Some(_), None) => act,
    };
    let plain_x = |p: &Part<'_>| -> &[f32] {
        match (p.quantized, quant) {
            (true, Some(q)) => &q.values,
            _ => xs,
        }
    };
    // The activations quantized to 8-bit blocks, once for every integer weight.
    let int_acts = match parts
        .iter()
        .flatten()
        .any(|p| matches!(p.rows, Stored::Int(_)))
    {
        true => Some(intdot::quantize_q8(xs, ins)?),
        false => None,
    };
    // And to Q8_K super-blocks, once for every Q4_K weight.
    let k_acts = match parts
        .iter()
        .flatten()
        .any(|p| matches!(p.rows, Stored::K(_)))
    {
        true => Some(kdot::quantize_q8k(xs, rows)?),
        false => None,
    };
    // Each weight's activations, prepared once for its storage format.
    let mut prepared: [Option<Prepared<'_>>; 4] = Default::default();
    for (p, slot) in parts.iter().flatten().zip(prepared.iter_mut()) {
        *slot = match (p.rows, p.quantized, fp8_act, &int_acts) {
            (Stored::Int(_), _, _, Some(q)) => Some(Prepared::Int(q)),
            (Stored::Int(_), _, _, None) => None,
            (Stored::K(_), _, _, _) => k_acts.as_ref().map(Prepared::K),
            (Stored::Float(rows), _, _, _) => {
                Some(Prepared::Float(rowdot::Activations::new(plain_x(p), rows)))
            }
        };
    }
    let result = if rows <= MAX_ROW_DOT_ROWS {
        decode_gemvs(ins, rows, parts, &prepared, epilogue, &mut emit)
    } else {
        let mut results: [Option<Vec<f32>>; 4] = Default::default();
        for ((p, a), slot) in parts
            .iter()
            .flatten()
            .zip(prepared.iter().flatten())
            .zip(results.iter_mut())
        {
            *slot = Some(match p.rows {
                // Prefill: the weights reused across rows (see `super::gemm`). Integer
                // codes have no GEMM yet and take the row dots below.
                Stored::Float(w) => gemm::gemm(plain_x(p), rows, ins, w, p.outs, &|o, _, acc| {
                    p.scale(acc, o)
                }),
                _ => by_output_feature(p.outs, rows, ins, |o, r| {
                    let mut y = [0.0f32];
                    a.dots(r, ins, p.rows.range(o * ins, (o + 1) * ins), &mut y);
                    p.scale(y[0], o)
                }),
            });
        }
        // The epilogue in parallel chunks of results (a prefill step's SiLU over
        // `T x intermediate` values costs as much as a GEMM on one thread).
        const EPILOGUE_CHUNK: usize = 1 << 14;
        let parallel = rows * ins >= PARALLEL_MIN_WORK;
        match (epilogue, &mut results) {
            (Epilogue::Round(dtype), _) => results.iter_mut().flatten().for_each(|y| {
                team::for_each_chunk_mut(y, EPILOGUE_CHUNK, parallel, |_, c| {
                    crate::rounding::round_slice(dtype, c)
                })
            }),
            (Epilogue::Each(f), [Some(y), ..]) => {
                team::for_each_chunk_mut(y, EPILOGUE_CHUNK, parallel, |c, part| {
                    f(c * EPILOGUE_CHUNK, part)
                })
            }
            (Epilogue::Pair(f), [Some(a), Some(b), ..]) => {
                let b = &*b;
                team::for_each_chunk_mut(a, EPILOGUE_CHUNK, parallel, |c, part| {
                    let start = c * EPILOGUE_CHUNK;
                    f(part, &b[start..start + part.len()])
                })
            }
            _ => {}
        }
        let paired = matches!(epilogue, Epilogue::Pair(_));
        let mut outcome = Ok(());
        for (i, y) in results.into_iter().flatten().enumerate() {
            if outcome.is_ok() && (i == 0 || !paired) {
                outcome = emit(i, y);
            } else {
                pool::give(y);
            }
        }
        outcome
    };
    // The prepared activations and the owned quantized rows go back to the pool
    // when they are dropped here.
    drop(prepared);
    drop(owned);
    drop(int_acts);
    drop(k_acts);
    result
}

/// The decode case of [`gemv_many`]: a few activation rows (one per sequence of a
/// batch), every weight's outputs laid end to end and computed by one parallel loop,
/// with the epilogue applied to each chunk inside the loop. A chunk covers some output
/// features of every row: each weight row is read from memory once for all the rows
/// ([`Prepared::dots_rows`]), and the chunk holds, for each weight it spans, that
/// weight's features of row 0, then of row 1, and so on. For [`Epilogue::Pair`] the
/// two weights' outputs are interleaved by chunk instead (chunk `c` holds rows
/// `c * k..` of the first weight for every row, then the same of the second), so that
/// each chunk holds matching pairs. The results are then gathered row-major.
fn decode_gemvs(
    ins: usize,
    rows: usize,
    parts: &[Option<Part<'_>>],
    prepared: &[Option<Prepared<'_>>],
    epilogue: Epilogue<'_>,
    emit: &mut impl FnMut(usize, Vec<f32>) -> Result<(), KernelError>,
) -> Result<(), KernelError> {
    let parts = || parts.iter().flatten();
    let total: usize = parts().map(|p| p.outs).sum();
    let row_bytes = parts().map(|p| p.rows.row_bytes(ins)).max().unwrap_or(1);
    // Output features per chunk.
    let chunk_rows = chunk_rows(total, row_bytes);
    let parallel = total * ins >= PARALLEL_MIN_WORK;
    // Features `first..first + k` of part `p` for every row, scaled: `dst` holds
    // `rows` runs of `k` results.
    let dots = |p: &Part<'_>, a: &Prepared<'_>, first: usize, dst: &mut [f32]| {
        let k = dst.len() / rows;
        a.dots_rows(rows, ins, p.rows.range(first * ins, (first + k) * ins), dst);
        if p.scales.is_some() {
            for run in dst.chunks_mut(k.max(1)) {
                for (o, y) in run.iter_mut().enumerate() {
                    *y = p.scale(*y, first + o);
                }
            }
        }
    };
    // A part's row-major result gathered from the chunks, from chunk `c0` on:
    // `piece(c)` says where in `out` chunk `c`'s run of that part's features starts
    // for row 0, which feature it starts at and how many it holds (the runs of the
    // rows follow each other), or `None` past the part's last chunk.
    type Piece<'p> = &'p (dyn Fn(usize) -> Option<(usize, usize, usize)> + Sync);
    let gather = |outs: usize, c0: usize, piece: Piece<'_>, out: &[f32]| {
        let mut y = pool::zeros(rows * outs);
        team::for_each_chunk_mut(&mut y, outs.max(1), parallel, |r, yr| {
            let mut c = c0;
            while let Some((at, first, k)) = piece(c) {
                let from = at + r * k;
                yr[first..first + k].copy_from_slice(&out[from..from + k]);
                c += 1;
            }
        });
        y
    };
    let mut out = pool::zeros(total * rows);
    if let Epilogue::Pair(f) = epilogue {
        let (Some((pa, aa)), Some((pb, ab))) = (
            parts().zip(prepared.iter().flatten()).next(),
            parts().zip(prepared.iter().flatten()).nth(1),
        ) else {
            return Err(KernelError::Invalid(
                "gemv: a pair needs two weights".into(),
            ));
        };
        team::for_each_chunk_mut(&mut out, 2 * chunk_rows * rows, parallel, |c, chunk| {
            let (a, b) = chunk.split_at_mut(chunk.len() / 2);
            dots(pa, aa, c * chunk_rows, a);
            dots(pb, ab, c * chunk_rows, b);
            f(a, b);
        });
        if rows == 1 {
            // The first half of every chunk, in order.
            let mut y = pool::take(pa.outs);
            for chunk in out.chunks(2 * chunk_rows) {
                y.extend_from_slice(&chunk[..chunk.len() / 2]);
            }
            pool::give(out);
            return emit(0, y);
        }
        let outs = pa.outs;
        let piece = |c: usize| {
            let first = c * chunk_rows;
            (first < outs).then(|| (2 * first * rows, first, chunk_rows.min(outs - first)))
        };
        let y = gather(outs, 0, &piece, &out);
        pool::give(out);
        return emit(0, y);
    }
    team::for_each_chunk_mut(&mut out, chunk_rows * rows, parallel, |c, chunk| {
        // The chunk covers features `start..start + width` of the weights laid end to
        // end, for every row; it may span the end of one weight and the start of the
        // next.
        let start = c * chunk_rows;
        let width = chunk.len() / rows;
        let mut base = 0;
        for (p, a) in parts().zip(prepared.iter().flatten()) {
            let (lo, hi) = (start.max(base), (start + width).min(base + p.outs));
            if lo < hi {
                dots(
                    p,
                    a,
                    lo - base,
                    &mut chunk[rows * (lo - start)..rows * (hi - start)],
                );
            }
            base += p.outs;
        }
        match epilogue {
            // A single weight: the chunk is `rows` runs of `width` results.
            Epilogue::Each(f) => {
                for (r, run) in chunk.chunks_mut(width.max(1)).enumerate() {
                    f(r * total + start, run);
                }
            }
            Epilogue::Round(dtype) => crate::rounding::round_slice(dtype, chunk),
            Epilogue::None | Epilogue::Pair(_) => {}
        }
    });
    let count = parts().count();
    if count == 1 && rows == 1 {
        return emit(0, out);
    }
    let mut base = 0;
    for (i, p) in parts().enumerate() {
        let y = if rows == 1 {
            let mut y = pool::take(p.outs);
            y.extend_from_slice(&out[base..base + p.outs]);
            y
        } else {
            // Chunk `c` holds features `c * chunk_rows..` of the weights laid end to
            // end, `rows` runs each; this part's share of it, if any.
            let end = base + p.outs;
            let piece = |c: usize| {
                let start = c * chunk_rows;
                let (lo, hi) = (start.max(base), (start + chunk_rows).min(end));
                (start < end).then(|| (rows * lo, lo - base, hi - lo))
            };
            gather(p.outs, base / chunk_rows, &piece, &out)
        };
        base += p.outs;
        emit(i, y)?;
    }
    pool::give(out);
    Ok(())
}

/// The stored values of a weight tensor as rows for [`rowdot`]: its own buffer
/// when it is contiguous (the case of every bound weight), else its values gathered
/// into `decoded` as `f32`.
fn stored<'a>(t: &'a Tensor, decoded: &'a mut Vec<f32>, op: &str) -> Result<Rows<'a>, KernelError> {
    let (start, end) = (t.offset(), t.offset() + t.numel());
    if t.is_contiguous() && end <= t.storage_len() {
        match t.buffer() {
            Buffer::F32(b) => return Ok(Rows::F32(&b[start..end])),
            Buffer::U16(b) if t.dtype() == DType::F16 => return Ok(Rows::F16(&b[start..end])),
            Buffer::U16(b) => return Ok(Rows::Bf16(&b[start..end])),
            Buffer::U8(b) if t.dtype() == DType::Fp8E4M3 => return Ok(Rows::E4M3(&b[start..end])),
            Buffer::U8(_) | Buffer::I32(_) => {}
        }
    }
    *decoded = match t.buffer() {
        Buffer::I32(_) => {
            return Err(KernelError::Invalid(format!(
                "{op} needs a float weight, got {}",
                t.dtype()
            )))
        }
        _ => t.to_vec_f32(),
    };
    Ok(Rows::F32(decoded))
}

/// The row-major `[rows, outs]` result whose element `(r, o)` is `f(o, r)`, computed
/// feature-major (see [`feature_major`]) and laid out row-major after.
pub(crate) fn by_output_feature(
    outs: usize,
    rows: usize,
    ins: usize,
    f: impl Fn(usize, usize) -> f32 + Sync,
) -> Vec<f32> {
    let mut by_feature = pool::zeros(outs * rows);
    feature_major(&mut by_feature, rows, ins, f);
    if rows == 1 {
        return by_feature;
    }
    let mut out = pool::zeros(outs * rows);
    for (o, col) in by_feature.chunks(rows.max(1)).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            out[r * outs + o] = v;
        }
    }
    pool::give(by_feature);
    out
}

/// Fills `by_feature` (`[out, rows]`) with `f(o, r)`; computing feature-major streams
/// each weight row from memory once, and each value is computed by one thread in a
/// fixed order, so results do not depend on the thread count.
fn feature_major(
    by_feature: &mut [f32],
    rows: usize,
    ins: usize,
    f: impl Fn(usize, usize) -> f32 + Sync,
) {
    if rows == 0 {
        return;
    }
    // Sixteen output features per chunk, as many rows each.
    let parallel = by_feature.len() * ins >= PARALLEL_MIN_WORK;
    team::for_each_chunk_mut(by_feature, 16 * rows, parallel, |c, block| {
        for (k, col) in block.chunks_mut(rows).enumerate() {
            let o = c * 16 + k;
            for (r, v) in col.iter_mut().enumerate() {
                *v = f(o, r);
            }
        }
    });
}

/// The rows of `x [..., in]` as one row-major slice, with the row count.
pub fn rows_of<'a>(x: &'a Tensor, op: &str) -> Result<(Cow<'a, [f32]>, usize, usize), KernelError> {
    float_buffer(x, op)?;
    if x.rank() == 0 {
        return Err(KernelError::Invalid(format!(
            "{op}: needs x [..., features], got a scalar"
        )));
    }
    let ins = x.shape()[x.rank() - 1];
    let rows = x.numel().checked_div(ins).unwrap_or(0);
    Ok((x.contiguous_f32().unwrap_or_default(), rows, ins))
}

/// `linear` with a plain or quantized weight: `x [..., in] @ W^T`, rounded to x's dtype.
pub fn linear(x: &Tensor, w: GemvWeight<'_>) -> Result<Tensor, KernelError> {
    let (xs, rows, ins) = rows_of(x, "linear")?;
    check("linear", x.dtype(), ins, w)?;
    let out = gemv(&xs, rows, w, None)?;
    let mut shape = x.dims();
    if let Some(last) = shape.last_mut() {
        *last = w.shape()[0];
    }
    Ok(Tensor::from_kernel_f32(x.dtype(), shape, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusec_weights::SplitMix64;

    fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// The weights of both kinds: plain `f32`, and E4M3 with per-channel scales and
    /// FP8 activations.
    fn weights(rng: &mut SplitMix64, outs: usize, ins: usize) -> (Tensor, QuantWeight) {
        let w = random(rng, outs * ins);
        let dense = Tensor::from_f32(DType::F32, &[outs, ins], w.clone()).expect("dense");
        let codes: Vec<f32> = w.iter().map(|&v| round_e4m3(v * 50.0)).collect();
        let values = Tensor::from_f32(DType::Fp8E4M3, &[outs, ins], codes)
            .expect("codes")
            .to_compact()
            .expect("compact");
        let scale = Tensor::from_f32(DType::F32, &[outs], random(rng, outs)).expect("scales");
        let quant = QuantWeight::new(values, scale, DType::F32, DType::Fp8E4M3).expect("quant");
        (dense, quant)
    }

    #[test]
    fn branch_free_e4m3_rounding_matches_round_e4m3() {
        let check = |x: f32| {
            let (fast, slow) = (round_e4m3_finite(x), round_e4m3(x));
            assert_eq!(fast.to_bits(), slow.to_bits(), "{x:e} ({:#x})", x.to_bits());
        };
        // Every magnitude up to past saturation in fine steps (subnormal quanta, ties
        // and their neighbours among them), both signs, and the specials but NaN.
        let top = 1000.0f32.to_bits();
        for bits in (0..top).step_by(61) {
            check(f32::from_bits(bits));
            check(-f32::from_bits(bits));
        }
        for k in 0..4096 {
            let tie = (k as f32 + 0.5) / 512.0;
            for x in [
                tie,
                f32::from_bits(tie.to_bits() + 1),
                f32::from_bits(tie.to_bits() - 1),
            ] {
                check(x);
                check(-x);
            }
        }
        for x in [
            0.0,
            -0.0,
            448.0,
            464.0,
            465.0,
            1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            check(x);
        }
    }

    /// Each epilogue at decode, across many chunks and in parallel (inside a team
    /// region and outside one), against the separate GEMVs with the epilogue applied
    /// after, bit for bit; and the batch of rows against single rows.
    #[test]
    fn epilogues_inside_the_parallel_loop_equal_epilogues_after_it() {
        let mut rng = SplitMix64::new(5);
        let (outs, ins) = (1003, 300);
        let (g_dense, g_quant) = weights(&mut rng, outs, ins);
        let (u_dense, u_quant) = weights(&mut rng, outs, ins);
        let residual = random(&mut rng, 2 * outs);
        let combine = |a: &mut [f32], b: &[f32]| {
            for (x, &y) in a.iter_mut().zip(b) {
                *x = x.sin() * y;
            }
        };
        let add = |first: usize, ys: &mut [f32]| {
            for (k, y) in ys.iter_mut().enumerate() {
                *y += residual[first + k];
            }
        };
        for (g, u) in [
            (GemvWeight::Dense(&g_dense), GemvWeight::Dense(&u_dense)),
            (GemvWeight::Quant(&g_quant), GemvWeight::Quant(&u_quant)),
        ] {
            for rows in [1, 2] {
                let xs = random(&mut rng, rows * ins);
                let mut want_pair = gemv(&xs, rows, g, None).expect("gate");
                combine(&mut want_pair, &gemv(&xs, rows, u, None).expect("up"));
                let mut want_each = gemv(&xs, rows, g, None).expect("gate");
                add(0, &mut want_each);
                for in_region in [false, true] {
                    let run = || {
                        let (mut pair, mut each) = (Vec::new(), Vec::new());
                        gemv_many(
                            &xs,
                            rows,
                            &[g, u],
                            None,
                            Epilogue::Pair(&combine),
                            |i, y| {
                                assert_eq!(i, 0, "a pair hands out one result");
                                pair = y;
                                Ok(())
                            },
                        )
                        .expect("pair");
                        gemv_many(&xs, rows, &[g], None, Epilogue::Each(&add), |_, y| {
                            each = y;
                            Ok(())
                        })
                        .expect("each");
                        (pair, each)
                    };
                    let (pair, each) = if in_region { team::region(run) } else { run() };
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&pair), bits(&want_pair), "pair, {rows} rows");
                    assert_eq!(bits(&each), bits(&want_each), "each, {rows} rows");
                }
            }
        }
        // An epilogue that does not fit the weights is an error, not a wrong result.
        let xs = random(&mut rng, ins);
        let one = [GemvWeight::Dense(&g_dense)];
        assert!(gemv_many(&xs, 1, &one, None, Epilogue::Pair(&combine), |_, _| Ok(())).is_err());
    }

    /// A batch of rows (a batched decode step) through every epilogue and a kernel of
    /// three weights whose chunks span two of them, against each row run alone, bit
    /// for bit, with plain, FP8 and integer weights, in a team region and outside one.
    #[test]
    fn a_batch_of_rows_gives_each_row_its_results_alone() {
        let mut rng = SplitMix64::new(23);
        let ins = 320;
        let (a_dense, a_quant) = weights(&mut rng, 1003, ins);
        let (b_dense, b_quant) = weights(&mut rng, 1003, ins);
        let (c_dense, c_quant) = weights(&mut rng, 61, ins);
        // Integer codes: random bytes, with random `f16` block scales.
        let mut int_of = |o: usize, dtype: DType| {
            let bytes = if dtype == DType::I8 {
                o * ins
            } else {
                o * ins / 2
            };
            let codes: Vec<u8> = (0..bytes).map(|_| rng.below(256) as u8).collect();
            let dims = crate::tensor::Dims::from_slice(&[o, ins]).expect("dims");
            let values = Tensor::contiguous(dtype, dims, Buffer::U8(std::sync::Arc::new(codes)));
            // Q4_1's side data is a scale and a minimum per block.
            let per = if dtype == DType::U4 { 2 } else { 1 };
            let scales: Vec<f32> = (0..o * ins / intdot::BLOCK * per)
                .map(|_| half::f16::from_f32(rng.normal() as f32 / 64.0).to_f32())
                .collect();
            let mut shape = vec![o, ins / intdot::BLOCK];
            if per > 1 {
                shape.push(per);
            }
            let scale = Tensor::from_f32(DType::F16, &shape, scales).expect("scales");
            QuantWeight::new(values, scale, DType::F32, DType::I8).expect("int weight")
        };
        let mut ints: Vec<(QuantWeight, QuantWeight, QuantWeight)> =
            [DType::I8, DType::I4, DType::U4]
                .into_iter()
                .map(|t| (int_of(1003, t), int_of(1003, t), int_of(61, t)))
                .collect();
        // Q4_K: random codes and side bytes with small f16 `d` and `dmin`; 320 inputs
        // end in a short super-block.
        let mut k_of = |o: usize| {
            let codes: Vec<u8> = (0..o * ins / 2).map(|_| rng.below(256) as u8).collect();
            let dims = crate::tensor::Dims::from_slice(&[o, ins]).expect("dims");
            let values =
                Tensor::contiguous(DType::U4, dims, Buffer::U8(std::sync::Arc::new(codes)));
            let supers = ins.div_ceil(256);
            let mut side: Vec<u8> = (0..o * supers * 16).map(|_| rng.below(256) as u8).collect();
            for h in side.chunks_mut(16) {
                for k in [0, 2] {
                    let v = half::f16::from_f32(rng.normal() as f32 / 1024.0);
                    h[k..k + 2].copy_from_slice(&v.to_le_bytes());
                }
            }
            let dims = crate::tensor::Dims::from_slice(&[o, supers, 16]).expect("dims");
            let scale = Tensor::contiguous(DType::U8, dims, Buffer::U8(std::sync::Arc::new(side)));
            QuantWeight::new(values, scale, DType::F32, DType::I8).expect("Q4_K weight")
        };
        ints.push((k_of(1003), k_of(1003), k_of(61)));
        let residual = random(&mut rng, 16 * 1003);
        let combine = |a: &mut [f32], b: &[f32]| {
            for (x, &y) in a.iter_mut().zip(b) {
                *x = x.sin() * y;
            }
        };
        let mut sets: Vec<[GemvWeight<'_>; 3]> = vec![
            [
                GemvWeight::Dense(&a_dense),
                GemvWeight::Dense(&b_dense),
                GemvWeight::Dense(&c_dense),
            ],
            [
                GemvWeight::Quant(&a_quant),
                GemvWeight::Quant(&b_quant),
                GemvWeight::Quant(&c_quant),
            ],
        ];
        for (a, b, c) in &ints {
            sets.push([
                GemvWeight::Quant(a),
                GemvWeight::Quant(b),
                GemvWeight::Quant(c),
            ]);
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // Every epilogue over `rows` rows whose first is row `first` of the batch (for
        // the residual): the three weights rounded, the pair, the residual add.
        let run = |ws: &[GemvWeight<'_>; 3], xs: &[f32], rows: usize, first: usize| {
            let add = |at: usize, ys: &mut [f32]| {
                for (k, y) in ys.iter_mut().enumerate() {
                    *y += residual[first * 1003 + at + k];
                }
            };
            let mut got: Vec<Vec<f32>> = Vec::new();
            let mut keep = |_: usize, y: Vec<f32>| {
                got.push(y);
                Ok(())
            };
            gemv_many(xs, rows, ws, None, Epilogue::Round(DType::Bf16), &mut keep).expect("three");
            gemv_many(
                xs,
                rows,
                &ws[..2],
                None,
                Epilogue::Pair(&combine),
                &mut keep,
            )
            .expect("pair");
            gemv_many(xs, rows, &ws[..1], None, Epilogue::Each(&add), &mut keep).expect("each");
            got
        };
        for ws in &sets {
            for rows in [2, 3, 5, 8, 9, 16] {
                let xs = random(&mut rng, rows * ins);
                let mut alone: Vec<Vec<f32>> = Vec::new();
                for r in 0..rows {
                    let row = run(ws, &xs[r * ins..(r + 1) * ins], 1, r);
                    alone.resize(row.len(), Vec::new());
                    for (all, y) in alone.iter_mut().zip(row) {
                        all.extend(y);
                    }
                }
                for in_region in [false, true] {
                    let batch = match in_region {
                        true => team::region(|| run(ws, &xs, rows, 0)),
                        false => run(ws, &xs, rows, 0),
                    };
                    assert_eq!(batch.len(), alone.len());
                    for (i, (got, want)) in batch.iter().zip(&alone).enumerate() {
                        assert_eq!(
                            bits(got),
                            bits(want),
                            "result {i}, {rows} rows, in a region: {in_region}"
                        );
                    }
                }
            }
        }
    }
}

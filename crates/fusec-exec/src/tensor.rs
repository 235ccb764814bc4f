//! CPU tensors: a shared buffer seen through a shape, strides and an offset.
//!
//! As in PyTorch, a view (reshape, transpose, slice, unsqueeze, expand) shares its
//! operand's buffer and costs O(rank): only the shape, strides and offset change. A
//! reshape that cannot be expressed as a view of the existing strides is an error (the
//! IR inserts an explicit `copy` where PyTorch's `reshape` would copy); viewability
//! ignores size-1 dimensions, as PyTorch's does.
//!
//! Float values are stored as `f32` whatever their IR dtype; a tensor whose dtype is
//! `f16`, `bf16` or an FP8 format holds values already rounded to that dtype (see
//! [`crate::rounding`]). Token ids and positions are `i32`. Two kinds of tensors are
//! stored compactly instead, in the bits of their dtype, because the kernels that
//! read them are bound by memory: GEMV weights (`f16`, `bf16` and E4M3,
//! [`Tensor::to_compact`]) and the E4M3 KV caches of a decode session
//! ([`Tensor::to_compact_storage`]), which decode attention reads at one byte per
//! cached value. Generic kernels read `f32` buffers only;
//! [`Tensor::contiguous_f32`] and [`Tensor::to_vec_f32`] decode compact storage.
//!
//! A KV cache lives in a buffer with spare capacity along its sequence axis: the
//! tensor is a prefix view of that buffer ([`Tensor::zeros_with_capacity`],
//! [`Tensor::with_capacity`], [`Tensor::capacity_along`]), so that appending one
//! position writes only the new entries. Buffers are shared and immutable; the only
//! mutation is an append into a buffer that no other tensor shares
//! (`Tensor::unique_f32_mut`, `Tensor::unique_u8_mut` for a compact cache), which
//! therefore cannot change any value another tensor can see.
//!
//! A tensor's shape and strides are [`Dims`]: at most [`MAX_RANK`] sizes held inline,
//! so that making a tensor or a view allocates nothing but its buffer, and kernels
//! take their buffers from the executor's pool: a decode step makes hundreds of small
//! tensors, and a steady-state step allocates nothing on the heap at all. A rank
//! above [`MAX_RANK`] is an error ([`TensorError::Rank`]), never a panic.

use std::borrow::Cow;
use std::sync::Arc;

use fusec_ir::DType;
use fusec_weights::{Storage, WeightTensor};
use ndarray::{ArrayD, ArrayViewD, IxDyn, ShapeBuilder};

use crate::rounding;

pub use crate::dims::{Dims, TensorError, MAX_RANK};

/// The storage a tensor views.
#[derive(Clone, Debug)]
pub enum Buffer {
    F32(Arc<Vec<f32>>),
    I32(Arc<Vec<i32>>),
    /// The raw bits of `f16` or `bf16` values (which one is the tensor's dtype): the
    /// compact storage of a GEMV weight, converted once when the executor binds it.
    U16(Arc<Vec<u16>>),
    /// The raw bits of FP8 E4M3 values: the compact storage of a quantized weight.
    U8(Arc<Vec<u8>>),
}

impl Buffer {
    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        match self {
            Buffer::F32(b) => b.len(),
            Buffer::I32(b) => b.len(),
            Buffer::U16(b) => b.len(),
            Buffer::U8(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A strided view of a [`Buffer`]; cloning shares the buffer.
#[derive(Clone, Debug)]
pub struct Tensor {
    dtype: DType,
    buffer: Buffer,
    shape: Dims,
    strides: Dims,
    offset: usize,
}

/// Row-major strides of a contiguous tensor of `shape`.
pub fn contiguous_strides(shape: &Dims) -> Dims {
    let mut strides = Dims::filled(shape.len(), 0);
    let mut s = 1;
    for (st, &d) in strides.iter_mut().zip(shape.iter()).rev() {
        *st = s;
        s *= d;
    }
    strides
}

fn check_len(shape: &[usize], len: usize) -> Result<(), TensorError> {
    if shape.iter().product::<usize>() == len {
        Ok(())
    } else {
        Err(TensorError::Length {
            shape: shape.to_vec(),
            len,
        })
    }
}

impl Tensor {
    /// A contiguous float tensor; the values are rounded to `dtype`.
    pub fn from_f32(
        dtype: DType,
        shape: &[usize],
        mut data: Vec<f32>,
    ) -> Result<Tensor, TensorError> {
        if !dtype.is_float() || !rounding::is_supported(dtype) {
            return Err(TensorError::DType {
                dtype,
                what: "f32 storage",
            });
        }
        check_len(shape, data.len())?;
        let shape = Dims::from_slice(shape)?;
        rounding::round_slice(dtype, &mut data);
        Ok(Tensor::contiguous(
            dtype,
            shape,
            Buffer::F32(Arc::new(data)),
        ))
    }

    /// A weight as a tensor, sharing its buffer (no copy).
    pub fn from_weight(w: &WeightTensor) -> Result<Tensor, TensorError> {
        let buffer = match w.storage() {
            Storage::F32(b) => Buffer::F32(Arc::clone(b)),
            Storage::U16(b) => Buffer::U16(Arc::clone(b)),
            Storage::U8(b) => Buffer::U8(Arc::clone(b)),
        };
        Ok(Tensor::contiguous(
            w.dtype(),
            Dims::from_slice(w.shape())?,
            buffer,
        ))
    }

    /// This tensor's values as a weight: its buffer shared when the tensor is the
    /// whole of a dense buffer, else a copy of its values; an error for `i32` values.
    pub fn to_weight(&self) -> Result<WeightTensor, TensorError> {
        let whole = self.is_contiguous()
            && self.offset == 0
            && self.storage_len() == fusec_weights::tensor::stored_len(self.dtype, self.numel());
        let storage = match &self.buffer {
            Buffer::F32(b) if whole => Storage::F32(Arc::clone(b)),
            Buffer::U16(b) if whole => Storage::U16(Arc::clone(b)),
            Buffer::U8(b) if whole => Storage::U8(Arc::clone(b)),
            Buffer::F32(_) | Buffer::U16(_) | Buffer::U8(_) => {
                Storage::F32(Arc::new(self.to_vec_f32()))
            }
            Buffer::I32(_) => {
                return Err(TensorError::DType {
                    dtype: self.dtype,
                    what: "weight values",
                })
            }
        };
        WeightTensor::from_storage(self.dtype, &self.shape, storage)
            .map_err(|e| TensorError::Invalid(e.to_string()))
    }

    /// A contiguous float tensor of `array`'s shape and values (read in logical
    /// order), rounded to `dtype`.
    pub fn from_array(dtype: DType, array: ArrayD<f32>) -> Result<Tensor, TensorError> {
        let shape = array.shape().to_vec();
        let values = if array.is_standard_layout() {
            let n = array.len();
            let (mut data, offset) = array.into_raw_vec_and_offset();
            data.drain(..offset.unwrap_or(0));
            data.truncate(n);
            data
        } else {
            array.iter().copied().collect()
        };
        Tensor::from_f32(dtype, &shape, values)
    }

    /// A contiguous `i32` tensor.
    pub fn from_i32(shape: &[usize], data: Vec<i32>) -> Result<Tensor, TensorError> {
        check_len(shape, data.len())?;
        Ok(Tensor::contiguous(
            DType::I32,
            Dims::from_slice(shape)?,
            Buffer::I32(Arc::new(data)),
        ))
    }

    /// A contiguous tensor of zeros.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Tensor, TensorError> {
        let n = shape.iter().product();
        if dtype == DType::I32 {
            Tensor::from_i32(shape, vec![0; n])
        } else {
            Tensor::from_f32(dtype, shape, vec![0.0; n])
        }
    }

    /// A rank-0 `f32` tensor.
    pub fn scalar(value: f32) -> Tensor {
        Tensor::contiguous(DType::F32, Dims::new(), Buffer::F32(Arc::new(vec![value])))
    }

    /// A contiguous tensor over `buffer`, whose length must be the shape's element
    /// count (half of it for packed `i4` codes) and whose kind must match `dtype`
    /// (kernels uphold both).
    pub(crate) fn contiguous(dtype: DType, shape: Dims, buffer: Buffer) -> Tensor {
        debug_assert_eq!(
            fusec_weights::tensor::stored_len(dtype, shape.iter().product::<usize>()),
            buffer.len()
        );
        debug_assert_eq!(dtype == DType::I32, matches!(buffer, Buffer::I32(_)));
        Tensor {
            dtype,
            strides: contiguous_strides(&shape),
            shape,
            buffer,
            offset: 0,
        }
    }

    /// A kernel's float result: rounds to `dtype` and wraps (in a recycled `Arc` when
    /// the pool has one).
    pub(crate) fn from_kernel_f32(dtype: DType, shape: Dims, mut data: Vec<f32>) -> Tensor {
        rounding::round_slice(dtype, &mut data);
        Tensor::contiguous(dtype, shape, Buffer::F32(crate::pool::wrap(data)))
    }

    /// A kernel's `i32` result (argmax, a cast to ids), wrapped as
    /// [`Tensor::from_kernel_f32`] wraps.
    pub(crate) fn from_kernel_i32(shape: Dims, data: Vec<i32>) -> Tensor {
        Tensor::contiguous(DType::I32, shape, Buffer::I32(crate::pool::wrap(data)))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// The shape as a [`Dims`] of its own (a copy, which allocates nothing), for a
    /// kernel to edit into its result's shape.
    pub fn dims(&self) -> Dims {
        self.shape
    }

    /// The strides as a [`Dims`] of their own.
    pub fn stride_dims(&self) -> Dims {
        self.strides
    }

    /// The offset of element `[0, 0, ...]` in the buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn buffer(&self) -> &Buffer {
        &self.buffer
    }

    pub(crate) fn into_buffer(self) -> Buffer {
        self.buffer
    }

    /// Elements in the underlying buffer (more than `numel` for a slice, fewer for an
    /// expanded view).
    pub fn storage_len(&self) -> usize {
        self.buffer.len()
    }

    /// The whole `f32` buffer, or `None` for an `i32` tensor or compact storage.
    pub fn f32_buffer(&self) -> Option<&[f32]> {
        match &self.buffer {
            Buffer::F32(b) => Some(b),
            _ => None,
        }
    }

    /// This view of an `f32` buffer as an `ndarray` view (same shape, strides and
    /// offset, no copy); `None` for `i32` values and compact storage.
    pub fn view_f32(&self) -> Option<ArrayViewD<'_, f32>> {
        strided_view(self.f32_buffer()?, &self.shape, &self.strides, self.offset)
    }

    /// This view of an `i32` buffer as an `ndarray` view; `None` for a float tensor.
    pub fn view_i32(&self) -> Option<ArrayViewD<'_, i32>> {
        strided_view(self.i32_buffer()?, &self.shape, &self.strides, self.offset)
    }

    /// The values as a new `f32` array of this shape (compact storage decoded, ids
    /// converted).
    pub fn to_array(&self) -> ArrayD<f32> {
        // `to_vec_f32` gives exactly `numel` values in row-major order.
        ArrayD::from_shape_vec(IxDyn(&self.shape), self.to_vec_f32())
            .unwrap_or_else(|_| ArrayD::zeros(IxDyn(&[0])))
    }

    /// The whole `i32` buffer, or `None` for a float tensor.
    pub fn i32_buffer(&self) -> Option<&[i32]> {
        match &self.buffer {
            Buffer::I32(b) => Some(b),
            _ => None,
        }
    }

    /// This contiguous `f16`, `bf16` or FP8 E4M3 tensor in compact storage (2 or 1
    /// bytes per value), or `None` when its dtype has no compact form here, it is a view
    /// of part of a buffer, or a value is not exact in its dtype (conversion must not
    /// change a value). The executor stores GEMV weights this way so that a GEMV
    /// streams 2 or 1 bytes per weight instead of 4.
    pub fn to_compact(&self) -> Option<Tensor> {
        let values = self.f32_buffer()?;
        if !self.is_contiguous() || self.offset != 0 || values.len() != self.numel() {
            return None;
        }
        let buffer = match self.dtype {
            DType::Bf16 => Buffer::U16(Arc::new(
                values
                    .iter()
                    .map(|&v| rounding::bf16_bits(v))
                    .collect::<Option<Vec<u16>>>()?,
            )),
            DType::F16 => Buffer::U16(Arc::new(
                values
                    .iter()
                    .map(|&v| rounding::f16_bits(v))
                    .collect::<Option<Vec<u16>>>()?,
            )),
            DType::Fp8E4M3 => Buffer::U8(Arc::new(
                values
                    .iter()
                    .map(|&v| rounding::e4m3_bits(v))
                    .collect::<Option<Vec<u8>>>()?,
            )),
            _ => return None,
        };
        Some(Tensor {
            dtype: self.dtype,
            buffer,
            shape: self.shape,
            strides: self.strides,
            offset: 0,
        })
    }

    /// The row-major values of a compact tensor decoded to `f32`.
    fn decode_compact(&self) -> Option<Vec<f32>> {
        let dt = self.dtype;
        match &self.buffer {
            Buffer::U16(b) => Some(
                gather(b, &self.shape, &self.strides, self.offset)
                    .into_iter()
                    .map(|v| rounding::from_u16_bits(dt, v))
                    .collect(),
            ),
            // Integer codes, bound whole and contiguous (as the loaders bind them).
            Buffer::U8(b) if dt == DType::I8 => Some(
                gather(b, &self.shape, &self.strides, self.offset)
                    .into_iter()
                    .map(|c| f32::from(c as i8))
                    .collect(),
            ),
            Buffer::U8(b) if dt == DType::U8 => Some(
                gather(b, &self.shape, &self.strides, self.offset)
                    .into_iter()
                    .map(f32::from)
                    .collect(),
            ),
            Buffer::U8(b) if dt.is_nibbles() => Some(
                (0..self.numel())
                    .map(|i| f32::from(fusec_weights::tensor::nibble_code(dt, b, self.offset + i)))
                    .collect(),
            ),
            Buffer::U8(b) => Some(
                gather(b, &self.shape, &self.strides, self.offset)
                    .into_iter()
                    .map(rounding::e4m3_value)
                    .collect(),
            ),
            Buffer::F32(_) | Buffer::I32(_) => None,
        }
    }

    /// Bytes of the logical value at its IR dtype.
    pub fn bytes(&self) -> u64 {
        self.dtype.bytes_for(self.numel() as u64)
    }

    /// Bytes a kernel reads when it reads this tensor once: the smaller of the view's
    /// and the buffer's size (an expanded view reads its source once), and no more than
    /// the elements the view addresses (an expanded view of a cache with spare
    /// capacity reads the cached entries, not the room after them).
    pub fn read_bytes(&self) -> u64 {
        let addressed: usize = self
            .shape
            .iter()
            .zip(self.strides.iter())
            .filter(|(_, &stride)| stride != 0)
            .map(|(&d, _)| d)
            .product();
        let stored = match self.dtype {
            DType::I4 | DType::U4 => self.storage_len().saturating_mul(2),
            _ => self.storage_len(),
        };
        let elements = self.numel().min(stored).min(addressed);
        self.dtype.bytes_for(elements as u64)
    }

    /// Whether the elements lie row-major and dense from the offset on; size-1
    /// dimensions may have any stride.
    pub fn is_contiguous(&self) -> bool {
        dense(&self.shape, &self.strides)
    }

    /// The values in row-major order, borrowed when the tensor is contiguous.
    pub fn contiguous_f32(&self) -> Option<Cow<'_, [f32]>> {
        if let Some(values) = self.decode_compact() {
            return Some(Cow::Owned(values));
        }
        let buf = self.f32_buffer()?;
        if self.is_contiguous() {
            Some(Cow::Borrowed(&buf[self.offset..self.offset + self.numel()]))
        } else {
            Some(Cow::Owned(gather(
                buf,
                &self.shape,
                &self.strides,
                self.offset,
            )))
        }
    }

    /// The values in row-major order as `f32` (ids converted).
    pub fn to_vec_f32(&self) -> Vec<f32> {
        match &self.buffer {
            Buffer::F32(b) => gather(b, &self.shape, &self.strides, self.offset),
            Buffer::I32(b) => gather(b, &self.shape, &self.strides, self.offset)
                .into_iter()
                .map(|v| v as f32)
                .collect(),
            Buffer::U16(_) | Buffer::U8(_) => self.decode_compact().unwrap_or_default(),
        }
    }

    /// The values in row-major order, or `None` for a float tensor.
    pub fn to_vec_i32(&self) -> Option<Vec<i32>> {
        let b = self.i32_buffer()?;
        Some(gather(b, &self.shape, &self.strides, self.offset))
    }

    /// A contiguous copy (a new buffer, from the pool for `f32` and `i32` values) of
    /// the tensor's values.
    pub fn clone_contiguous(&self) -> Tensor {
        let shape = self.shape;
        let buffer = match &self.buffer {
            Buffer::F32(b) => {
                let mut out = crate::pool::take(self.numel());
                gather_into(b, &self.shape, &self.strides, self.offset, &mut out);
                Buffer::F32(crate::pool::wrap(out))
            }
            Buffer::I32(b) => {
                let mut out = crate::pool::take(self.numel());
                gather_into(b, &self.shape, &self.strides, self.offset, &mut out);
                Buffer::I32(crate::pool::wrap(out))
            }
            Buffer::U16(b) => {
                Buffer::U16(Arc::new(gather(b, &self.shape, &self.strides, self.offset)))
            }
            Buffer::U8(b) => {
                Buffer::U8(Arc::new(gather(b, &self.shape, &self.strides, self.offset)))
            }
        };
        Tensor::contiguous(self.dtype, shape, buffer)
    }

    /// The element at a logical index, as `f64`; `None` if the index is out of range.
    pub fn get(&self, index: &[usize]) -> Option<f64> {
        if index.len() != self.rank() || index.iter().zip(&self.shape).any(|(i, d)| i >= d) {
            return None;
        }
        let off = self.offset
            + index
                .iter()
                .zip(&self.strides)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        match &self.buffer {
            Buffer::F32(b) => b.get(off).map(|&v| f64::from(v)),
            Buffer::I32(b) => b.get(off).map(|&v| f64::from(v)),
            Buffer::U16(b) => b
                .get(off)
                .map(|&v| f64::from(rounding::from_u16_bits(self.dtype, v))),
            Buffer::U8(b) => b.get(off).map(|&v| f64::from(rounding::e4m3_value(v))),
        }
    }

    /// A zeroed tensor of `shape` whose buffer has room for `capacity` entries along
    /// `axis` (at least `shape[axis]`): a prefix view of a dense buffer.
    pub fn zeros_with_capacity(
        dtype: DType,
        shape: &[usize],
        axis: usize,
        capacity: usize,
    ) -> Result<Tensor, TensorError> {
        if axis >= shape.len() {
            return Err(TensorError::Invalid(format!(
                "axis {axis} out of range for shape {shape:?}"
            )));
        }
        let mut full = Dims::from_slice(shape)?;
        full[axis] = capacity.max(shape[axis]);
        Tensor::zeros(dtype, &full)?.slice(axis, 0, shape[axis])
    }

    /// This tensor's values in a new buffer with room for `capacity` entries along
    /// `axis` (at least the current length). The new buffer has the storage of this
    /// one: an E4M3 cache in compact storage stays compact as it grows.
    pub fn with_capacity(&self, axis: usize, capacity: usize) -> Result<Tensor, TensorError> {
        self.check_axis(axis, self.rank())?;
        let len = self.shape[axis];
        let capacity = capacity.max(len);
        let outer: usize = self.shape[..axis].iter().product();
        let block: usize = self.shape[axis + 1..].iter().product();
        let buffer = match &self.buffer {
            Buffer::F32(b) => {
                let mut data = crate::pool::zeros(outer * capacity * block);
                self.copy_with_capacity(b, &mut data, len * block, capacity * block);
                Buffer::F32(Arc::new(data))
            }
            Buffer::U8(b) => {
                let mut data = vec![0u8; outer * capacity * block];
                self.copy_with_capacity(b, &mut data, len * block, capacity * block);
                Buffer::U8(Arc::new(data))
            }
            Buffer::I32(_) | Buffer::U16(_) => {
                return Err(TensorError::DType {
                    dtype: self.dtype,
                    what: "spare capacity",
                })
            }
        };
        let mut full = self.shape;
        full[axis] = capacity;
        Tensor::contiguous(self.dtype, full, buffer).slice(axis, 0, len)
    }

    /// Copies this view of `buf`, row-major, into `data` in spans of `span` values
    /// placed `pitch` values apart (the layout of [`Tensor::with_capacity`]).
    fn copy_with_capacity<T: Copy>(&self, buf: &[T], data: &mut [T], span: usize, pitch: usize) {
        if span == 0 {
            return;
        }
        let values = gather(buf, &self.shape, &self.strides, self.offset);
        for (o, src) in values.chunks(span).enumerate() {
            let dst = o * pitch;
            data[dst..dst + src.len()].copy_from_slice(src);
        }
    }

    /// This view over its whole buffer converted to compact E4M3 storage (one byte per
    /// value, as [`Tensor::to_compact`] stores an FP8 weight), with the same shape,
    /// strides and offset; `None` unless the dtype is E4M3 and the buffer holds `f32`
    /// values that are all exact E4M3 values or NaN (which stays NaN, without its
    /// payload). Spare capacity is kept, so a KV cache
    /// made by [`Tensor::zeros_with_capacity`] converts into a compact cache that
    /// appends in place.
    pub fn to_compact_storage(&self) -> Option<Tensor> {
        if self.dtype != DType::Fp8E4M3 {
            return None;
        }
        let codes = self
            .f32_buffer()?
            .iter()
            .map(|&v| rounding::e4m3_bits_nan(v))
            .collect::<Option<Vec<u8>>>()?;
        Some(Tensor {
            buffer: Buffer::U8(Arc::new(codes)),
            ..self.clone()
        })
    }

    /// The number of entries along `axis` that the buffer has room for, when the tensor
    /// is a prefix view along `axis` of a dense buffer (as [`Tensor::with_capacity`]
    /// makes); `None` for any other layout.
    pub fn capacity_along(&self, axis: usize) -> Option<usize> {
        if axis >= self.rank() || self.offset != 0 {
            return None;
        }
        let others: usize = self
            .shape
            .iter()
            .enumerate()
            .filter(|(d, _)| *d != axis)
            .map(|(_, &n)| n)
            .product();
        if others == 0 || !self.storage_len().is_multiple_of(others) {
            return None;
        }
        let capacity = self.storage_len() / others;
        let mut full = self.shape;
        full[axis] = capacity;
        let strides = contiguous_strides(&full);
        // Size-1 axes before `axis` may have any stride (their index is always 0); the
        // appended axis and every axis after it must be laid out densely.
        let dense = (0..self.rank())
            .all(|d| (d < axis && self.shape[d] == 1) || self.strides[d] == strides[d]);
        (dense && capacity >= self.shape[axis]).then_some(capacity)
    }

    /// The `f32` buffer for writing, if no other tensor shares it.
    pub(crate) fn unique_f32_mut(&mut self) -> Option<&mut Vec<f32>> {
        match &mut self.buffer {
            Buffer::F32(b) => Arc::get_mut(b),
            _ => None,
        }
    }

    /// The compact E4M3 buffer for writing, if no other tensor shares it.
    pub(crate) fn unique_u8_mut(&mut self) -> Option<&mut Vec<u8>> {
        match &mut self.buffer {
            Buffer::U8(b) => Arc::get_mut(b),
            _ => None,
        }
    }

    /// Whether no other tensor shares this tensor's buffer, so that an append may
    /// write into it.
    pub(crate) fn is_unique(&mut self) -> bool {
        match &mut self.buffer {
            Buffer::F32(b) => Arc::get_mut(b).is_some(),
            Buffer::I32(b) => Arc::get_mut(b).is_some(),
            Buffer::U16(b) => Arc::get_mut(b).is_some(),
            Buffer::U8(b) => Arc::get_mut(b).is_some(),
        }
    }

    /// A view of this tensor's buffer with another layout.
    pub(crate) fn with_layout(&self, shape: Dims, strides: Dims, offset: usize) -> Tensor {
        Tensor {
            dtype: self.dtype,
            buffer: self.buffer.clone(),
            shape,
            strides,
            offset,
        }
    }

    fn check_axis(&self, axis: usize, rank: usize) -> Result<(), TensorError> {
        if axis < rank {
            Ok(())
        } else {
            Err(TensorError::Invalid(format!(
                "axis {axis} out of range for shape {:?}",
                self.shape
            )))
        }
    }

    /// A view with another shape of the same element count, without copying.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor, TensorError> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(TensorError::Invalid(format!(
                "cannot reshape {:?} to {shape:?}: element counts differ",
                self.shape
            )));
        }
        let target = Dims::from_slice(shape)?;
        let strides = view_strides(&self.shape, &self.strides, &target).ok_or_else(|| {
            TensorError::NotViewable {
                shape: self.shape.to_vec(),
                strides: self.strides.to_vec(),
                target: shape.to_vec(),
            }
        })?;
        Ok(self.with_layout(target, strides, self.offset))
    }

    /// Swaps two axes.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor, TensorError> {
        self.check_axis(a, self.rank())?;
        self.check_axis(b, self.rank())?;
        let (mut shape, mut strides) = (self.shape, self.strides);
        shape.swap(a, b);
        strides.swap(a, b);
        Ok(self.with_layout(shape, strides, self.offset))
    }

    /// Elements `start..end` along `axis`.
    pub fn slice(&self, axis: usize, start: usize, end: usize) -> Result<Tensor, TensorError> {
        self.check_axis(axis, self.rank())?;
        if start > end || end > self.shape[axis] {
            return Err(TensorError::Invalid(format!(
                "slice {start}..{end} out of 0..{} on axis {axis}",
                self.shape[axis]
            )));
        }
        let mut shape = self.shape;
        shape[axis] = end - start;
        let offset = self.offset + start * self.strides[axis];
        Ok(self.with_layout(shape, self.strides, offset))
    }

    /// Inserts a size-1 axis at `axis`.
    pub fn unsqueeze(&self, axis: usize) -> Result<Tensor, TensorError> {
        self.check_axis(axis, self.rank() + 1)?;
        // PyTorch's choice of stride for the new axis; any stride works for size 1.
        let stride = if axis < self.rank() {
            self.shape[axis] * self.strides[axis]
        } else {
            1
        };
        let (mut shape, mut strides) = (self.shape, self.strides);
        shape.insert(axis, 1)?;
        strides.insert(axis, stride)?;
        Ok(self.with_layout(shape, strides, self.offset))
    }

    /// Broadcasts size-1 axes to `shape` (stride 0); the rank is unchanged.
    pub fn expand(&self, shape: &[usize]) -> Result<Tensor, TensorError> {
        if shape.len() != self.rank() {
            return Err(TensorError::Invalid(format!(
                "cannot expand {:?} to {shape:?}: ranks differ",
                self.shape
            )));
        }
        let target = Dims::from_slice(shape)?;
        let mut strides = self.strides;
        for (i, (&from, &to)) in self.shape.iter().zip(shape).enumerate() {
            if from != to {
                if from != 1 {
                    return Err(TensorError::Invalid(format!(
                        "cannot expand {:?} to {shape:?}: only size-1 axes expand",
                        self.shape
                    )));
                }
                strides[i] = 0;
            }
        }
        Ok(self.with_layout(target, strides, self.offset))
    }
}

/// `buf` seen through `shape`, `strides` and `offset` as an `ndarray` view; `None`
/// when the view does not fit in the buffer (which no tensor's layout allows).
fn strided_view<'a, T>(
    buf: &'a [T],
    shape: &[usize],
    strides: &[usize],
    offset: usize,
) -> Option<ArrayViewD<'a, T>> {
    if shape.contains(&0) {
        // An empty view reads nothing; ndarray checks the strides of an empty shape
        // against the data anyway, so it gets the row-major ones.
        return ArrayViewD::from_shape(IxDyn(shape), &buf[..0]).ok();
    }
    let data = buf.get(offset..)?;
    ArrayViewD::from_shape(IxDyn(shape).strides(IxDyn(strides)), data).ok()
}

/// Strides that view a tensor of `old` shape and `old_strides` as `new` (same element
/// count), or `None` when no strides do. This is PyTorch's `computeStride`: the old
/// dimensions are grouped into chunks that are contiguous among themselves, and each
/// chunk must be covered exactly by consecutive new dimensions. Size-1 dimensions never
/// break a chunk.
fn view_strides(old: &[usize], old_strides: &[usize], new: &Dims) -> Option<Dims> {
    if old.is_empty() {
        // A scalar views as any all-ones shape.
        return Some(Dims::filled(new.len(), 1));
    }
    let numel: usize = old.iter().product();
    if numel == 0 {
        return Some(contiguous_strides(new));
    }
    let mut new_strides = Dims::filled(new.len(), 0);
    let mut view_d = new.len();
    let mut chunk_base_stride = old_strides[old.len() - 1];
    let (mut tensor_numel, mut view_numel) = (1usize, 1usize);
    for tensor_d in (0..old.len()).rev() {
        tensor_numel *= old[tensor_d];
        let chunk_ends = tensor_d == 0
            || (old[tensor_d - 1] != 1
                && old_strides[tensor_d - 1] != tensor_numel * chunk_base_stride);
        if chunk_ends {
            while view_d > 0 && (view_numel < tensor_numel || new[view_d - 1] == 1) {
                new_strides[view_d - 1] = view_numel * chunk_base_stride;
                view_numel *= new[view_d - 1];
                view_d -= 1;
            }
            if view_numel != tensor_numel {
                return None;
            }
            if tensor_d > 0 {
                chunk_base_stride = old_strides[tensor_d - 1];
                tensor_numel = 1;
                view_numel = 1;
            }
        }
    }
    (view_d == 0).then_some(new_strides)
}

/// Whether a view of `shape` and `strides` lies row-major and dense; size-1 axes may
/// have any stride, and an empty view is dense.
pub fn dense(shape: &[usize], strides: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in shape.iter().zip(strides).rev() {
        if d == 0 {
            return true;
        }
        if d != 1 {
            if s != expected {
                return false;
            }
            expected *= d;
        }
    }
    true
}

/// The elements of a strided view, row-major, into a new vector.
pub(crate) fn gather<T: Copy>(
    buf: &[T],
    shape: &[usize],
    strides: &[usize],
    offset: usize,
) -> Vec<T> {
    let mut out = Vec::with_capacity(shape.iter().product());
    gather_into(buf, shape, strides, offset, &mut out);
    out
}

/// Appends the elements of a strided view, row-major, to `out`.
pub(crate) fn gather_into<T: Copy>(
    buf: &[T],
    shape: &[usize],
    strides: &[usize],
    offset: usize,
    out: &mut Vec<T>,
) {
    let n: usize = shape.iter().product();
    if dense(shape, strides) {
        out.extend_from_slice(&buf[offset..offset + n]);
        return;
    }
    match (shape.split_last(), strides.split_last()) {
        // Rows that are contiguous in memory are copied whole.
        (Some((&inner, outer)), Some((&1, outer_strides))) => {
            crate::kernels::strided::walk(outer, [outer_strides], [offset], |[o]| {
                out.extend_from_slice(&buf[o..o + inner])
            });
        }
        _ => crate::kernels::strided::walk(shape, [strides], [offset], |[o]| out.push(buf[o])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iota(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::from_f32(DType::F32, shape, (0..n).map(|v| v as f32).collect())
            .expect("sizes match")
    }

    #[test]
    fn ndarray_views_see_the_same_layout() {
        let t = iota(&[2, 3, 4]).transpose(0, 2).expect("axes in range");
        let s = t.slice(1, 1, 3).expect("in range");
        let v = s.view_f32().expect("f32 values");
        assert_eq!(v.shape(), s.shape());
        assert_eq!(v.iter().copied().collect::<Vec<_>>(), s.to_vec_f32());
        assert_eq!(v[[3, 0, 1]] as f64, s.get(&[3, 0, 1]).expect("in range"));
        assert_eq!(s.to_array(), v.to_owned());
        let back = Tensor::from_array(DType::F32, v.to_owned()).expect("f32 values");
        assert_eq!(back.to_vec_f32(), s.to_vec_f32());
        let e = iota(&[1, 3]).expand(&[4, 3]).expect("size-1 axis");
        assert_eq!(e.view_f32().expect("f32 values").sum(), 4.0 * 3.0);
        let empty = Tensor::zeros_with_capacity(DType::F32, &[2, 0, 3], 1, 4).expect("valid");
        assert_eq!(empty.view_f32().expect("f32 values").shape(), &[2, 0, 3]);
        let ids = Tensor::from_i32(&[2], vec![7, 9]).expect("sizes match");
        assert!(ids.view_f32().is_none());
        assert_eq!(ids.view_i32().expect("ids").as_slice(), Some(&[7, 9][..]));
    }

    #[test]
    fn views_share_storage() {
        let t = iota(&[2, 3, 4]);
        let tt = t.transpose(0, 2).expect("axes in range");
        assert_eq!(tt.shape(), &[4, 3, 2]);
        assert_eq!(tt.get(&[3, 1, 1]), Some(12.0 + 4.0 + 3.0));
        let s = t.slice(2, 1, 3).expect("in range");
        assert_eq!(s.to_vec_f32()[..4], [1.0, 2.0, 5.0, 6.0]);
        assert_eq!(s.read_bytes(), 12 * 4);
        let e = iota(&[1, 3]).expand(&[4, 3]).expect("size-1 axis");
        assert_eq!(e.numel(), 12);
        assert_eq!(e.read_bytes(), 3 * 4);
    }

    #[test]
    fn reshape_follows_pytorch_viewability() {
        let t = iota(&[2, 3, 4]);
        assert!(t.reshape(&[6, 4]).is_ok());
        // A transposed tensor cannot be flattened without a copy...
        let tt = t.transpose(1, 2).expect("axes in range");
        assert!(matches!(
            tt.reshape(&[24]),
            Err(TensorError::NotViewable { .. })
        ));
        // ...but the untouched leading axis can still be split.
        assert!(tt.reshape(&[2, 1, 4, 3]).is_ok());
        // Size-1 axes never block a view: [B,H,1,hd] -> [B,1,H,hd] -> [B,1,H*hd].
        let o = iota(&[2, 4, 1, 8]).transpose(1, 2).expect("axes in range");
        let r = o.reshape(&[2, 1, 32]).expect("viewable");
        assert_eq!(r.to_vec_f32(), iota(&[2, 1, 32]).to_vec_f32());
        // An expanded tensor cannot merge its broadcast axis.
        let e = iota(&[2, 1, 3]).expand(&[2, 4, 3]).expect("size-1 axis");
        assert!(e.reshape(&[8, 3]).is_err());
        assert!(iota(&[]).reshape(&[1, 1]).is_ok());
    }

    #[test]
    fn capacity_views_are_prefixes_of_a_dense_buffer() {
        let t = iota(&[2, 3, 4]);
        let c = t.with_capacity(1, 5).expect("axis in range");
        assert_eq!(c.shape(), &[2, 3, 4]);
        assert_eq!(c.to_vec_f32(), t.to_vec_f32());
        assert_eq!(c.storage_len(), 2 * 5 * 4);
        assert_eq!(c.capacity_along(1), Some(5));
        assert_eq!(c.read_bytes(), t.read_bytes());
        // A plain contiguous tensor is its own buffer: no room to spare.
        assert_eq!(t.capacity_along(1), Some(3));
        assert_eq!(t.transpose(0, 2).expect("in range").capacity_along(1), None);
        let z = Tensor::zeros_with_capacity(DType::F32, &[1, 2, 0, 4], 2, 8).expect("valid");
        assert_eq!(z.numel(), 0);
        assert_eq!(z.capacity_along(2), Some(8));
        assert_eq!(z.read_bytes(), 0);
    }

    #[test]
    fn compact_caches_keep_their_layout_and_grow_compact() {
        let values = vec![0.5, -0.0, 448.0, f32::NAN, 0.001953125, -3.0];
        let t = Tensor::from_f32(DType::Fp8E4M3, &[1, 3, 2], values).expect("valid");
        let c = t.with_capacity(1, 5).expect("axis in range");
        let compact = c.to_compact_storage().expect("exact values");
        assert!(matches!(compact.buffer(), Buffer::U8(_)));
        assert_eq!(compact.storage_len(), 10);
        assert_eq!(compact.capacity_along(1), Some(5));
        assert_eq!(compact.read_bytes(), 6);
        let bits = |t: &Tensor| {
            t.to_vec_f32()
                .iter()
                .map(|v| if v.is_nan() { f32::NAN } else { *v }.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&compact), bits(&t));
        let grown = compact.with_capacity(1, 8).expect("axis in range");
        assert!(matches!(grown.buffer(), Buffer::U8(_)));
        assert_eq!(grown.capacity_along(1), Some(8));
        assert_eq!(bits(&grown), bits(&t));
        // Only exact E4M3 values in f32 storage convert.
        assert!(iota(&[2]).to_compact_storage().is_none());
        assert!(compact.to_compact_storage().is_none());
    }

    #[test]
    fn contiguity_ignores_size_one_axes() {
        let t = iota(&[3, 1, 4]).unsqueeze(0).expect("axis in range");
        assert!(t.is_contiguous());
        assert!(!iota(&[3, 4])
            .transpose(0, 1)
            .expect("in range")
            .is_contiguous());
    }

    #[test]
    fn ranks_above_the_maximum_are_errors() {
        let ones = [1; MAX_RANK + 1];
        assert_eq!(
            Tensor::from_f32(DType::F32, &ones, vec![0.0]).map(|_| ()),
            Err(TensorError::Rank { rank: MAX_RANK + 1 })
        );
        let t = iota(&[1; MAX_RANK]);
        assert!(matches!(t.unsqueeze(0), Err(TensorError::Rank { .. })));
        assert!(matches!(t.reshape(&ones), Err(TensorError::Rank { .. })));
        assert!(t.reshape(&[1]).is_ok());
    }

    #[test]
    fn rejects_bad_construction() {
        assert!(Tensor::from_f32(DType::F32, &[2, 2], vec![0.0; 3]).is_err());
        assert!(Tensor::from_f32(DType::I32, &[1], vec![0.0]).is_err());
        let q = Tensor::from_f32(DType::Fp8E4M3, &[2], vec![0.3, 1e4]).expect("valid");
        assert_eq!(q.to_vec_f32(), [0.3125, 448.0]);
        assert_eq!(q.bytes(), 2);
        let h = Tensor::from_f32(DType::F16, &[1], vec![0.1]).expect("valid");
        assert_eq!(h.to_vec_f32(), [half::f16::from_f32(0.1).to_f32()]);
    }
}

// fusec CUDA prelude: element conversions, reductions and vector loads shared by every
// kernel. Values are computed in f32 and rounded to the stored type on store, which is
// what PyTorch's kernels for half types do.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

// Generated kernels name every index and constant of their family; those a shape does
// not need (the batch index at batch 1) are expected, not worth a warning.
#pragma nv_diag_suppress 177
#pragma nv_diag_suppress 550

#define FU_FULL_MASK 0xffffffffu
#define FU_INF __int_as_float(0x7f800000)
#define FU_NO_INDEX 0x7fffffff

__device__ __forceinline__ float fu_f32(float x) { return x; }
__device__ __forceinline__ float fu_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float fu_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float fu_f32(__nv_fp8_e4m3 x) { return static_cast<float>(x); }
__device__ __forceinline__ float fu_f32(__nv_fp8_e5m2 x) { return static_cast<float>(x); }
__device__ __forceinline__ float fu_f32(int x) { return static_cast<float>(x); }

// Round to nearest even; FP8 saturates to the largest finite value (E4M3: 448);
// float to int truncates toward zero, saturating, NaN to 0 (as Rust's `as`).
template <typename T> __device__ __forceinline__ T fu_from(float x);
template <> __device__ __forceinline__ float fu_from<float>(float x) { return x; }
template <> __device__ __forceinline__ __half fu_from<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 fu_from<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __nv_fp8_e4m3 fu_from<__nv_fp8_e4m3>(float x) { return __nv_fp8_e4m3(x); }
template <> __device__ __forceinline__ __nv_fp8_e5m2 fu_from<__nv_fp8_e5m2>(float x) { return __nv_fp8_e5m2(x); }
template <> __device__ __forceinline__ int fu_from<int>(float x) { return __float2int_rz(x); }

// `x` rounded to the precision of `T` (the identity for float).
template <typename T> __device__ __forceinline__ float fu_round(float x) { return fu_f32(fu_from<T>(x)); }

__device__ __forceinline__ float fu_silu(float x) { return x / (1.0f + expf(-x)); }
// PyTorch's gelu(x, approximate="tanh") in its CPU kernel's order
// (aten/src/ATen/native/cpu/Activation.cpp): 0.5 x (1 + tanh(kBeta (x + kKappa x^3))).
__device__ __forceinline__ float fu_gelu_tanh(float x) {
  const float kBeta = 0.7978845608028654f, kKappa = 0.044715f;
  return 0.5f * x * (1.0f + tanhf(kBeta * (x + kKappa * (x * x * x))));
}
__device__ __forceinline__ float fu_rsqrt(float x) { return 1.0f / sqrtf(x); }

// Asks L2 for the 128-byte line holding `p` (PTX ISA, `prefetch`) and goes on: a GEMV
// issues its first row's lines before its prologue so that weight bytes stream while
// the prologue stages the activations. The CPU emulation has its own (a no-op).
#ifndef FUSEC_EMULATED
__device__ __forceinline__ void fu_prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
#endif

// One warp-wide tensor-core product D = A B + D: A a 16x16 bf16 tile (row-major), B a
// 16x8 bf16 tile (column-major), D 16x8 f32 accumulators; PTX ISA
// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` (sm_80 and later). Each lane
// holds fragments as the PTX ISA's "Matrix Fragments for mma.m16n8k16 with floating
// point type" lays them out: with g = lane / 4 and t = lane % 4, a[0] = A[g][2t..2t+1],
// a[1] = A[g+8][2t..2t+1], a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9];
// b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]; c[0], c[1] = D[g][2t], D[g][2t+1] and
// c[2], c[3] = D[g+8][2t], D[g+8][2t+1]. The lower 16 bits of a register hold the lower
// index. Every lane of the warp must call it (`.sync.aligned`). The CPU emulation
// (fusec-cuda's tests/emulate/emu.h) has its own, per the same table.
#ifndef FUSEC_EMULATED
__device__ __forceinline__ void fu_mma_bf16_16x8x16(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// The larger of two values, NaN winning, as torch.amax.
__device__ __forceinline__ float fu_max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float fu_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FU_FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ float fu_warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fu_max_nan(v, __shfl_xor_sync(FU_FULL_MASK, v, o));
  return v;
}

// The scale of one block of 32 FP8 activations (`dequant{act=fp8}`; the executor's
// `gemv::quantize_rows`), one value per lane, 0 past the row's end: the block's
// largest magnitude over `max` (NaN ignored, as the executor's fold of `f32::max`
// ignores it), or 1 for a block with no finite nonzero magnitude, rounded up to 16
// significant bits so that code times scale is exact, as
// `numerics::act_block_scale` says. Every lane of the warp must call it.
__device__ __forceinline__ float fu_act_block_scale(float v, float max) {
  float am = fabsf(v);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) am = fmaxf(am, __shfl_xor_sync(FU_FULL_MASK, am, o));
  unsigned u = __float_as_uint((am > 0.0f && am < FU_INF) ? am / max : 1.0f);
  if (u & 0xFFu) u = (u | 0xFFu) + 1u;
  return __uint_as_float(u);
}

// Sum over the `W` lanes of an aligned group of lanes (W a power of two, at most 32).
// Every lane of the warp must call it.
template <int W> __device__ __forceinline__ float fu_group_sum(float v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FU_FULL_MASK, v, o);
  return v;
}

// Block-quantized integer GEMVs (`gemv_int.rs`). A warp holds a block of 32 values,
// one a lane: returns the lane's 8-bit code and the block's scale, rounded to f16, in
// `*d`, as `quantize_row_q8_0_ref` (ggml-quants.c) and the CPU executor quantize:
// `d = amax / 127`, code `round(y * (1 / d))`, half away from zero; and in `*sum` the
// block's `f16(d * Σ codes)` with the unrounded `d` (Q8_1's `s`, for Q4_1's minimums).
__device__ __forceinline__ signed char fu_q8_block(float y, float* d, float* sum) {
  const float am = fu_warp_max(fabsf(y));
  const float s = am / 127.0f;
  const float inv = s != 0.0f ? 1.0f / s : 0.0f;
  *d = __half2float(__float2half_rn(s));
  const signed char q = (signed char)(int)roundf(y * inv);
  // At most 32 * 127 in magnitude: exact in f32.
  *sum = __half2float(__float2half_rn(s * fu_warp_sum((float)q)));
  return q;
}

// The exact integer dot product of 16 Q8_0 weight codes with 16 activation codes.
__device__ __forceinline__ int fu_dot_q8(uint4 w, uint4 x) {
  int s = __dp4a((int)w.x, (int)x.x, 0);
  s = __dp4a((int)w.y, (int)x.y, s);
  s = __dp4a((int)w.z, (int)x.z, s);
  return __dp4a((int)w.w, (int)x.w, s);
}

// The exact integer dot product of one Q4_0 block (16 bytes: value j in the low nibble
// of byte j, value j + 16 in its high nibble, each stored as code + 8) with its 32
// activation codes (`lo` values 0..15, `hi` 16..31): the nibbles as they are, less
// 8 times the activations' sum (llama.cpp's `vec_dot_q4_0_q8_1_impl` likewise).
__device__ __forceinline__ int fu_dot_q4(uint4 w, uint4 lo, uint4 hi) {
  const unsigned wr[4] = {w.x, w.y, w.z, w.w};
  const unsigned l[4] = {lo.x, lo.y, lo.z, lo.w};
  const unsigned h[4] = {hi.x, hi.y, hi.z, hi.w};
  int s = 0, sx = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    s = __dp4a((int)(wr[i] & 0x0F0F0F0Fu), (int)l[i], s);
    s = __dp4a((int)((wr[i] >> 4) & 0x0F0F0F0Fu), (int)h[i], s);
    sx = __dp4a(0x01010101, (int)l[i], sx);
    sx = __dp4a(0x01010101, (int)h[i], sx);
  }
  return s - 8 * sx;
}

// The exact integer dot product of one Q4_1 block (the nibble order of Q4_0, each
// nibble its code) with its 32 activation codes.
__device__ __forceinline__ int fu_dot_u4(uint4 w, uint4 lo, uint4 hi) {
  const unsigned wr[4] = {w.x, w.y, w.z, w.w};
  const unsigned l[4] = {lo.x, lo.y, lo.z, lo.w};
  const unsigned h[4] = {hi.x, hi.y, hi.z, hi.w};
  int s = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    s = __dp4a((int)(wr[i] & 0x0F0F0F0Fu), (int)l[i], s);
    s = __dp4a((int)((wr[i] >> 4) & 0x0F0F0F0Fu), (int)h[i], s);
  }
  return s;
}

// Block-wide reductions: every thread of the block calls them and gets the result.
__device__ __forceinline__ float fu_block_sum(float v) {
  __shared__ float red[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = fu_warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  return fu_warp_sum(lane < warps ? red[lane] : 0.0f);
}

__device__ __forceinline__ float fu_block_max(float v) {
  __shared__ float red[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = fu_warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  return fu_warp_max(lane < warps ? red[lane] : -FU_INF);
}

// Argmax as torch.argmax: the largest value, NaN counting as the largest, ties to the
// lowest index. (v, i) absorbs (v2, i2); FU_NO_INDEX marks an empty candidate.
__device__ __forceinline__ void fu_argmax_merge(float& v, int& i, float v2, int i2) {
  bool take;
  if (i2 == FU_NO_INDEX) take = false;
  else if (i == FU_NO_INDEX) take = true;
  else if (v != v || v2 != v2) take = (v2 != v2) && (v == v || i2 < i);
  else take = v2 > v || (v2 == v && i2 < i);
  if (take) { v = v2; i = i2; }
}

__device__ __forceinline__ int fu_block_argmax(float v, int i) {
  __shared__ float rv[32];
  __shared__ int ri[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float v2 = __shfl_xor_sync(FU_FULL_MASK, v, o);
    int i2 = __shfl_xor_sync(FU_FULL_MASK, i, o);
    fu_argmax_merge(v, i, v2, i2);
  }
  __syncthreads();
  if (lane == 0) { rv[warp] = v; ri[warp] = i; }
  __syncthreads();
  v = lane < warps ? rv[lane] : -FU_INF;
  i = lane < warps ? ri[lane] : FU_NO_INDEX;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float v2 = __shfl_xor_sync(FU_FULL_MASK, v, o);
    int i2 = __shfl_xor_sync(FU_FULL_MASK, i, o);
    fu_argmax_merge(v, i, v2, i2);
  }
  return i;
}

// FP8 element types, and the hardware conversion of a pair of them: on sm_89 and later
// one `cvt.rn.f16x2.e4m3x2` (or `.e5m2x2`) turns two codes into two halves (PTX ISA,
// "cvt"), where converting one value at a time spends that instruction on each element
// (CUDA Math API, `__nv_cvt_fp8x2_to_halfraw2`). Every FP8 code is exact in f16.
template <typename T> struct fu_fp8 { static constexpr bool is = false; };
template <> struct fu_fp8<__nv_fp8_e4m3> {
  static constexpr bool is = true;
  static constexpr __nv_fp8_interpretation_t kind = __NV_E4M3;
};
template <> struct fu_fp8<__nv_fp8_e5m2> {
  static constexpr bool is = true;
  static constexpr __nv_fp8_interpretation_t kind = __NV_E5M2;
};

// Elements 2i and 2i + 1 of the FP8 codes in `raw` (little-endian: the lower byte is the
// first element), as f32.
template <typename T, int N>
__device__ __forceinline__ void fu_fp8_pairs(const unsigned short* raw, float* out) {
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(raw[i], fu_fp8<T>::kind)));
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// N consecutive elements from global memory, converted to f32, in 16-, 8- or 4-byte
// loads through the read-only cache. `p` must be aligned to the load size.
template <typename T, int N>
__device__ __forceinline__ void fu_load(const T* __restrict__ p, float (&out)[N]) {
  constexpr int BYTES = N * (int)sizeof(T);
  if constexpr (BYTES % 16 == 0) {
    constexpr int PER = 16 / (int)sizeof(T);
#pragma unroll
    for (int c = 0; c < BYTES / 16; ++c) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + c);
      if constexpr (fu_fp8<T>::is) {
        fu_fp8_pairs<T, PER>(reinterpret_cast<const unsigned short*>(&raw), out + c * PER);
      } else {
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < PER; ++k) out[c * PER + k] = fu_f32(e[k]);
      }
    }
  } else if constexpr (BYTES == 8) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    if constexpr (fu_fp8<T>::is) {
      fu_fp8_pairs<T, N>(reinterpret_cast<const unsigned short*>(&raw), out);
    } else {
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < N; ++k) out[k] = fu_f32(e[k]);
    }
  } else if constexpr (BYTES == 4) {
    const unsigned int raw = __ldg(reinterpret_cast<const unsigned int*>(p));
    if constexpr (fu_fp8<T>::is) {
      fu_fp8_pairs<T, N>(reinterpret_cast<const unsigned short*>(&raw), out);
    } else {
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < N; ++k) out[k] = fu_f32(e[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = fu_f32(p[k]);
  }
}

// N values rounded to T and stored at `p` in shared memory, 16 bytes at a time where
// the size allows (`p` then 16-byte aligned).
template <typename T, int N>
__device__ __forceinline__ void fu_store_shared(T* p, const float (&v)[N]) {
  constexpr int BYTES = N * (int)sizeof(T);
  if constexpr (BYTES % 16 == 0) {
    constexpr int PER = 16 / (int)sizeof(T);
#pragma unroll
    for (int c = 0; c < BYTES / 16; ++c) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < PER; ++k) e[k] = fu_from<T>(v[c * PER + k]);
      reinterpret_cast<uint4*>(p)[c] = raw;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) p[k] = fu_from<T>(v[k]);
  }
}

// The same from shared memory.
template <typename T, int N>
__device__ __forceinline__ void fu_load_shared(const T* p, float (&out)[N]) {
  constexpr int BYTES = N * (int)sizeof(T);
  if constexpr (BYTES % 16 == 0) {
    constexpr int PER = 16 / (int)sizeof(T);
#pragma unroll
    for (int c = 0; c < BYTES / 16; ++c) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[c];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < PER; ++k) out[c * PER + k] = fu_f32(e[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = fu_f32(p[k]);
  }
}

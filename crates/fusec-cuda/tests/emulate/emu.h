// A CPU emulation of the CUDA features fusec's kernels use, so that the tests can run
// the generated kernels without a GPU. The blocks of a launch run in a shuffled order
// (a fresh permutation per launch, from a seeded generator) on several OS threads, so
// that kernels whose blocks communicate through global memory (the split-KV combine,
// the last-block tickets) meet the orders a GPU may run them in; the threads of one
// block are fibers on one OS thread, switched at every barrier (__syncthreads, and the
// two halves of a warp shuffle), so barriers and shuffles have their CUDA meaning at
// the cost of a cheap user-space switch. Shared memory is thread-local static storage,
// which is right because an OS thread runs one block at a time. atomicAdd and
// __threadfence are real atomics and fences. A barrier that can never complete (a
// divergent __syncthreads or shuffle) aborts with a message instead of hanging.
//
// FUSEC_EMU_THREADS (default 3) sets the OS threads per launch, FUSEC_EMU_SEED the
// seed of the block orders.
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local
#define __launch_bounds__(n)
#define __align__(n) alignas(n)

namespace emu {
struct Thread {
  dim3 tid, bid, bdim, gdim;
  unsigned lane = 0, warp = 0;
};

struct Fiber {
  jmp_buf env;
  ucontext_t uc;
  std::vector<char> stack;
  Thread t;
  bool started = false, done = false;
};

// A barrier among `alive` fibers: the last to arrive releases the others.
struct Barrier {
  unsigned alive = 0, arrived = 0;
  unsigned long long generation = 0;
  void release_if_complete() {
    if (arrived > 0 && arrived == alive) { arrived = 0; ++generation; }
  }
};

inline thread_local jmp_buf scheduler;
inline thread_local Fiber* current = nullptr;
inline thread_local void (*entry_body)(void*) = nullptr;
inline thread_local void* entry_arg = nullptr;
inline thread_local Barrier block_bar;
inline thread_local std::vector<Barrier> warp_bars;
inline thread_local std::vector<uint64_t> slots;
inline thread_local unsigned char* dyn_smem = nullptr;
inline thread_local unsigned long long idle_yields = 0;

struct Block { unsigned char* dyn; };
inline thread_local Block block_view;
inline thread_local Block* block = &block_view;

inline void yield() {
  if (_setjmp(current->env) == 0) _longjmp(scheduler, 1);
}

inline void wait(Barrier& b) {
  const unsigned long long g = b.generation;
  ++b.arrived;
  b.release_if_complete();
  while (b.generation == g) {
    if (++idle_yields > 100000000ULL) {
      std::fprintf(stderr, "emu: deadlock: a barrier can never complete (divergent __syncthreads or shuffle)\n");
      std::abort();
    }
    yield();
  }
  idle_yields = 0;
}

inline void fiber_main() {
  entry_body(entry_arg);
  current->done = true;
  --block_bar.alive;
  block_bar.release_if_complete();
  Barrier& w = warp_bars[current->t.warp];
  --w.alive;
  w.release_if_complete();
  _longjmp(scheduler, 1);
}

// The fibers (and their stacks) of the calling OS thread, freed when it ends: a launch
// starts its worker threads afresh.
inline std::vector<Fiber>& fibers() {
  static thread_local std::vector<Fiber> f;
  return f;
}

template <class F> void run_body(void* f) { (*static_cast<F*>(f))(); }

// One block of a launch, on the calling OS thread's fibers.
template <class F>
void run_block(dim3 grid, dim3 b, unsigned bdim, unsigned shared, F& body) {
  std::vector<uint4> dyn(shared / 16 + 1);
  std::vector<Fiber>& fs = fibers();
  if (fs.size() < bdim) fs.resize(bdim);
  slots.assign(bdim, 0);
  entry_body = &run_body<F>;
  entry_arg = &body;
  block_view.dyn = reinterpret_cast<unsigned char*>(dyn.data());
  block_bar = Barrier{bdim, 0, 0};
  warp_bars.assign((bdim + 31) / 32, Barrier{});
  for (unsigned t = 0; t < bdim; ++t) {
    Fiber& f = fs[t];
    f.t.tid = dim3{t, 0, 0};
    f.t.bid = b;
    f.t.bdim = dim3{bdim, 1, 1};
    f.t.gdim = grid;
    f.t.lane = t % 32;
    f.t.warp = t / 32;
    f.started = f.done = false;
    ++warp_bars[t / 32].alive;
    if (f.stack.empty()) f.stack.resize(256 * 1024);
  }
  unsigned remaining = bdim;
  while (remaining > 0) {
    for (unsigned t = 0; t < bdim; ++t) {
      Fiber& f = fs[t];
      if (f.done) continue;
      current = &f;
      if (_setjmp(scheduler) == 0) {
        if (!f.started) {
          f.started = true;
          getcontext(&f.uc);
          f.uc.uc_stack.ss_sp = f.stack.data();
          f.uc.uc_stack.ss_size = f.stack.size();
          f.uc.uc_link = nullptr;
          makecontext(&f.uc, fiber_main, 0);
          setcontext(&f.uc);
        } else {
          _longjmp(f.env, 1);
        }
      }
      if (f.done) --remaining;
    }
  }
}

inline unsigned long long env_or(const char* name, unsigned long long fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : fallback;
}

// SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
// OOPSLA 2014): the block orders.
inline unsigned long long splitmix(unsigned long long& s) {
  unsigned long long z = (s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

inline std::atomic<unsigned long long> launches{0};

template <class F>
void launch(dim3 grid, unsigned bdim, unsigned shared, F body) {
  const unsigned long long n = (unsigned long long)grid.x * grid.y * grid.z;
  std::vector<dim3> order;
  order.reserve(n);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(dim3{x, y, z});
  unsigned long long seed = env_or("FUSEC_EMU_SEED", 1) * 0x100000001b3ULL + launches.fetch_add(1);
  for (unsigned long long i = n; i > 1; --i) std::swap(order[i - 1], order[splitmix(seed) % i]);
  std::atomic<unsigned long long> next{0};
  auto worker = [&] {
    for (unsigned long long i; (i = next.fetch_add(1)) < n;) run_block(grid, order[i], bdim, shared, body);
  };
  const unsigned long long threads = std::min<unsigned long long>(n, std::max<unsigned long long>(1, env_or("FUSEC_EMU_THREADS", 3)));
  std::vector<std::thread> pool;
  for (unsigned long long t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
}
}  // namespace emu

#define threadIdx (emu::current->t.tid)
#define blockIdx (emu::current->t.bid)
#define blockDim (emu::current->t.bdim)
#define gridDim (emu::current->t.gdim)

inline void __syncthreads() { emu::wait(emu::block_bar); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
// The prelude's L2 prefetch is PTX; here there is no cache to warm.
#define FUSEC_EMULATED 1
inline void fu_prefetch_l2(const void*) {}
template <class T> inline T __ldg(const T* p) { return *p; }
// A load that bypasses L1, used for what other blocks wrote: an acquire load here.
template <class T> inline T __ldcg(const T* p) {
  std::atomic_thread_fence(std::memory_order_acquire);
  T v; std::memcpy(&v, (const void*)p, sizeof(T)); return v;
}

namespace emu {
// The value lane `src` of the calling lane's warp holds: every lane posts its own and
// waits for the warp, then reads, then waits again so that no lane posts its next
// value before all have read.
template <class T> inline T shuffle_from(T v, unsigned src) {
  const unsigned lane = current->t.lane, base = current->t.warp * 32;
  Barrier& w = warp_bars[current->t.warp];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[base + lane] = bits;
  wait(w);
  const uint64_t r = slots[base + src];
  wait(w);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}
}  // namespace emu

template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) {
  return emu::shuffle_from(v, emu::current->t.lane ^ (unsigned)o);
}

// Lane `src`'s value, to every lane of the warp.
template <class T> inline T __shfl_sync(unsigned, T v, int src) {
  return emu::shuffle_from(v, (unsigned)src & 31u);
}

// A product rounded once, never contracted into an FMA (CUDA's `__fmul_rn`).
inline float __fmul_rn(float a, float b) { volatile float p = a * b; return p; }
// A sum rounded once, never contracted into an FMA (CUDA's `__fadd_rn`).
inline float __fadd_rn(float a, float b) { volatile float s = a + b; return s; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float2int_rz(float x) {
  if (x != x) return 0;
  if (x >= 2147483648.0f) return 2147483647;
  if (x <= -2147483648.0f) return (-2147483647 - 1);
  return (int)x;
}

// Four signed-byte products added to `c` (sm_61's `dp4a.s32.s32`), exactly.
inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
  return c;
}

struct __half { _Float16 v; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }

struct __nv_bfloat16 { uint16_t x; };
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t b = (uint32_t)h.x << 16; float f; std::memcpy(&f, &b, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t b; std::memcpy(&b, &f, 4);
  if (f != f) return __nv_bfloat16{0x7fc0};
  b += 0x7fffu + ((b >> 16) & 1u);
  return __nv_bfloat16{(uint16_t)(b >> 16)};
}

namespace emu {
// Per lane of the block: the six 32-bit fragment registers of a warp's mma (four of A,
// two of B), exchanged through this storage as the shuffles exchange theirs.
inline thread_local std::vector<uint32_t> mma_regs;
inline float bf16_lo(uint32_t r) { return __bfloat162float(__nv_bfloat16{(uint16_t)(r & 0xffffu)}); }
inline float bf16_hi(uint32_t r) { return __bfloat162float(__nv_bfloat16{(uint16_t)(r >> 16)}); }
inline float bf16_half(uint32_t r, int k) { return (k & 1) ? bf16_hi(r) : bf16_lo(r); }
}  // namespace emu

// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`, emulated per the PTX ISA's
// fragment table for m16n8k16 (the layout the prelude's comment restates): every lane
// deposits its A and B registers, the warp meets at a barrier, and each lane gathers
// the A row and B column its four accumulators need from the lanes that hold them.
// A(r, k) sits in lane (r % 8) * 4 + (k % 8) / 2, register (r >= 8) + 2 (k >= 8), half
// k % 2; B(k, n) in lane n * 4 + (k % 8) / 2, register (k >= 8), half k % 2. The PTX ISA
// does not fix the order or the internal precision of the tensor cores' sums; here the
// 16 products (each exact) and the accumulator are summed in double and rounded to f32
// once, which is within the reordering any hardware does, and the tests' tolerances
// hold either way.
inline void fu_mma_bf16_16x8x16(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  const unsigned lane = emu::current->t.lane, base = emu::current->t.warp * 32;
  emu::Barrier& w = emu::warp_bars[emu::current->t.warp];
  const size_t need = (size_t)(base + 32) * 6;
  if (emu::mma_regs.size() < need) emu::mma_regs.resize(need);
  uint32_t* mine = &emu::mma_regs[(size_t)(base + lane) * 6];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  for (int i = 0; i < 2; ++i) mine[4 + i] = b[i];
  emu::wait(w);
  const unsigned g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const unsigned row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    double s = c[i];
    for (int k = 0; k < 16; ++k) {
      const uint32_t* al = &emu::mma_regs[(size_t)(base + (row % 8) * 4 + (k % 8) / 2) * 6];
      const uint32_t* bl = &emu::mma_regs[(size_t)(base + col * 4 + (k % 8) / 2) * 6];
      const float av = emu::bf16_half(al[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k);
      const float bv = emu::bf16_half(bl[4 + (k >= 8 ? 1 : 0)], k);
      s += (double)av * (double)bv;
    }
    out[i] = (float)s;
  }
  emu::wait(w);
  for (int i = 0; i < 4; ++i) c[i] = out[i];
}

namespace emu {
// An OCP FP8 format with E exponent bits and M mantissa bits; E4M3 has no infinity
// and one NaN per sign, E5M2 is IEEE-like. Conversion rounds to nearest even and
// saturates to the largest finite value, as __NV_SATFINITE.
template <int E, int M> struct Fp8 {
  static constexpr int BIAS = (1 << (E - 1)) - 1;
  static float decode(uint8_t c) {
    const int s = c >> 7, e = (c >> M) & ((1 << E) - 1), m = c & ((1 << M) - 1);
    float v;
    if (E == 4 && e == 15 && m == 7) return NAN;
    if (E == 5 && e == 31) return m ? NAN : (s ? -INFINITY : INFINITY);
    if (e == 0) v = std::ldexp((float)m / (1 << M), 1 - BIAS);
    else v = std::ldexp(1.0f + (float)m / (1 << M), e - BIAS);
    return s ? -v : v;
  }
  static uint8_t max_code() { return E == 4 ? 0x7e : 0x7b; }
  static uint8_t encode(float f) {
    if (f != f) return 0x7f;
    const uint8_t sign = std::signbit(f) ? 0x80 : 0;
    const float a = std::fabs(f);
    if (a >= decode(max_code())) return sign | max_code();
    uint8_t best = 0;
    float best_err = INFINITY;
    for (int c = 0; c <= max_code(); ++c) {
      const float err = std::fabs(decode((uint8_t)c) - a);
      if (err < best_err || (err == best_err && (c & 1) == 0)) { best = (uint8_t)c; best_err = err; }
    }
    return sign | best;
  }
};
}  // namespace emu

struct __nv_fp8_e4m3 {
  uint8_t __x;
  __nv_fp8_e4m3() = default;
  explicit __nv_fp8_e4m3(float f) : __x(emu::Fp8<4, 3>::encode(f)) {}
  explicit operator float() const { return emu::Fp8<4, 3>::decode(__x); }
};
struct __nv_fp8_e5m2 {
  uint8_t __x;
  __nv_fp8_e5m2() = default;
  explicit __nv_fp8_e5m2(float f) : __x(emu::Fp8<5, 2>::encode(f)) {}
  explicit operator float() const { return emu::Fp8<5, 2>::decode(__x); }
};

// The pair conversion of cuda_fp8.h: two FP8 codes (the lower byte first) to two
// halves, every code exact in f16; then the halves to f32.
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
typedef unsigned short __nv_fp8x2_storage_t;
struct float2 { float x, y; };
struct __half2_raw { unsigned short x, y; };
struct __half2 {
  __half x, y;
  explicit __half2(__half2_raw r) { std::memcpy(&x, &r.x, 2); std::memcpy(&y, &r.y, 2); }
};
inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t v, __nv_fp8_interpretation_t k) {
  auto one = [k](uint8_t c) {
    const float f = k == __NV_E4M3 ? emu::Fp8<4, 3>::decode(c) : emu::Fp8<5, 2>::decode(c);
    const _Float16 h = (_Float16)f;
    unsigned short bits;
    std::memcpy(&bits, &h, 2);
    return bits;
  };
  return __half2_raw{one((uint8_t)(v & 0xff)), one((uint8_t)(v >> 8))};
}
inline float2 __half22float2(__half2 h) { return float2{(float)h.x.v, (float)h.y.v}; }

extern "C" unsigned long long emu_alloc(unsigned long long bytes) {
  const unsigned long long n = (bytes + 255) / 256 * 256;
  void* p = std::aligned_alloc(256, n ? n : 256);
  if (p) std::memset(p, 0, n ? n : 256);
  return (unsigned long long)p;
}
extern "C" void emu_write(unsigned long long dst, const void* src, unsigned long long n) { std::memcpy((void*)dst, src, n); }
extern "C" void emu_read(void* dst, unsigned long long src, unsigned long long n) { std::memcpy(dst, (const void*)src, n); }

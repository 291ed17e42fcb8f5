// Shared by the native CPU kernels (cpu_kernels.cc: panel matmuls; amx_panels.cc:
// their AMX-BF16 path; cache_attention.cc): vector types, bf16 rounding, and
// the work sharing over XLA's intra-op thread pool. recursive_lm/kernels/native.py
// compiles the three files into one library (its cache key hashes all of them).
#ifndef RECURSIVE_LM_KERNELS_COMMON_H_
#define RECURSIVE_LM_KERNELS_COMMON_H_

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__linux__)
#define RLM_HAVE_AMX 1
#else
#define RLM_HAVE_AMX 0
#endif

#include "xla/ffi/api/ffi.h"

namespace rlm {

namespace ffi = xla::ffi;

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned access

constexpr int64_t kPanel = 32;

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

inline uint32_t FloatBits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
}

// f32 -> nearest bf16 (ties to even), as the high 16 bits of a u32; NaN stays NaN.
inline uint32_t RoundToBf16Bits(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u | 0x00400000u) & 0xffff0000u;
  u += 0x7fffu + ((u >> 16) & 1u);
  return u & 0xffff0000u;
}

// The chunked work sharing behind ParallelFor and ParallelForAhead: [0, n) in
// chunks, on the calling thread and XLA's intra-op pool. Chunks go to whoever
// is free (an atomic counter), so a pool thread that is slow to wake costs
// nothing. The state is held by shared_ptr: a pool task that starts after the
// call returned finds no chunk left and touches nothing else. kAhead: each
// thread claims its next chunk before it runs the current one, and fn gets
// (i0, i1, next, first) (ParallelForAhead); else fn(i0, i1).
template <bool kAhead, typename Fn>
void ParallelChunks(ffi::ThreadPool& pool, int64_t n, int64_t chunks_per_thread, Fn fn) {
  if (n <= 0) return;
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n, chunk;
    Fn fn;
    State(int64_t n, int64_t chunk, Fn fn) : n(n), chunk(chunk), fn(fn) {}
    int64_t Claim() { return next.fetch_add(1, std::memory_order_relaxed) * chunk; }
    void Run() {
      int64_t i0 = Claim();
      for (bool first = true; i0 < n; first = false) {
        const int64_t i1 = i0 + chunk < n ? i0 + chunk : n;
        if constexpr (kAhead) {
          const int64_t following = Claim();
          fn(i0, i1, following < n ? following : -1, first);
          done.fetch_add(i1 - i0, std::memory_order_release);
          i0 = following;
        } else {
          fn(i0, i1);
          done.fetch_add(i1 - i0, std::memory_order_release);
          i0 = Claim();
        }
      }
    }
  };
  const int64_t threads = pool.num_threads() > 0 ? pool.num_threads() : 1;
  const int64_t chunk = n / (threads * chunks_per_thread) > 0
                            ? n / (threads * chunks_per_thread) : 1;
  auto state = std::make_shared<State>(n, chunk, fn);
  const int64_t helpers = threads - 1 < n - 1 ? threads - 1 : n - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state]() { state->Run(); });
  state->Run();
  while (state->done.load(std::memory_order_acquire) < n) CpuRelax();
}

// Runs fn(i0, i1) over [0, n) in chunks (ParallelChunks).
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t chunks_per_thread, Fn fn) {
  ParallelChunks<false>(pool, n, chunks_per_thread, fn);
}

// As ParallelFor, but each thread claims its next chunk before it runs the
// current one: fn(i0, i1, next, first) gets the start of the chunk this thread
// runs next (-1: none) and whether [i0, i1) is its first chunk of the call, so
// a streaming kernel can prefetch across its chunk boundary into the bytes it
// will read next (not into a chunk another thread may take).
template <typename Fn>
void ParallelForAhead(ffi::ThreadPool& pool, int64_t n, int64_t chunks_per_thread, Fn fn) {
  ParallelChunks<true>(pool, n, chunks_per_thread, fn);
}

// f32 activations [M, K] -> bf16 (nearest even) [M, Kp], zero padded to Kp.
void PaddedBf16(const float* x, int64_t M, int64_t K, int64_t Kp, std::vector<uint16_t>& out);

// The AMX path of bf16 / int8 panels (amx_panels.cc): used for calls of at
// least this many rows (INT64_MAX: never; set by RecursiveLmAmxInit).
extern std::atomic<int64_t> g_amx_min_rows_bf16;
extern std::atomic<int64_t> g_amx_min_rows_int8;

#if RLM_HAVE_AMX
// Paired bf16 panels [P, K, 32], panels [p0, p1): y[M, N] (columns of those
// panels) = xa (bf16 activations [M, Kp], PaddedBf16) @ W.
// next: the panel this thread runs after p1 - 1 (-1: none), first: whether p0
// is its first panel of the call (ParallelForAhead): the weight prefetch runs
// on from the range's end into panel next, and a first range's opening bytes
// are prefetched at its start (g_amx_chunk_prefetch; off: the prefetch runs
// on into panel p1 whoever reads it, and nothing is prefetched at the start).
void AmxBf16Panels(const uint16_t* xa, int64_t M, int64_t K, const uint16_t* w,
                   float* y, int64_t N, int64_t p0, int64_t p1, int64_t next, bool first);
// int8 panels [P, K, 32] with per-column scales, widened to bf16 on the fly.
void AmxInt8Panels(const uint16_t* xa, int64_t M, int64_t K, const int8_t* w,
                   const float* scale, float* y, int64_t N, int64_t p0, int64_t p1);
#endif

}  // namespace rlm

#endif  // RECURSIVE_LM_KERNELS_COMMON_H_

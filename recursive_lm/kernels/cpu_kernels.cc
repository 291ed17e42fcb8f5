// Native CPU kernels for decoding, registered as XLA FFI targets:
//
// * recursive_lm_panel_matmul: y[M, P*32] = x[M, K] @ W for a few rows M.
// * recursive_lm_cache_attention: attention of a few queries over a KV cache,
//   reading only the slots up to the last one each query may see.
//
// Panel matmul.
// W is stored as panels [P, K, 32]: panel p holds output columns [32p, 32p+32)
// for every k, contiguously. Each panel is read once, front to back, while up to
// 8 rows of x accumulate into 16 vector registers, so the weights stream at
// memory bandwidth (XLA's GEMMs reach about half of it at 2-8 rows on this CPU;
// see results/bench_decode.md). Panels are split across the calling thread and
// XLA's intra-op thread pool by an atomic counter: whoever is free takes the
// next chunk, so a pool thread that is slow to wake costs nothing.
//
// Built at first use by recursive_lm/kernels/native.py with -march=native (the
// GCC vector extension below becomes AVX-512, AVX2 or SSE code).
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
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#else
#define RLM_HAVE_AMX 0
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned access

constexpr int64_t kPanel = 32;

// Independent accumulator sets per row for a register block of R rows: at 1-2
// rows the two sums of a row would otherwise be one chain of dependent FMAs
// (4+ cycles each), which caps a core below its share of the memory bandwidth;
// with Chains<R>() sets, about 16 sums are in flight at every R.
template <int R>
constexpr int Chains() {
  return R >= 8 ? 1 : (R >= 4 ? 2 : (R >= 2 ? 4 : 8));
}

// Software prefetch this many bytes ahead of the weight stream (0: none); the
// hardware streamer stops at 4 KiB page boundaries, the prefetch does not.
#ifndef RLM_PREFETCH_BYTES
#define RLM_PREFETCH_BYTES 0
#endif
inline void PrefetchAhead(const void* p) {
#if RLM_PREFETCH_BYTES > 0
  __builtin_prefetch((const char*)p + RLM_PREFETCH_BYTES, 0, 0);
#else
  (void)p;
#endif
}

// Sums the A accumulator sets into set 0.
template <int A, int R>
inline void Reduce(v16 (&lo)[A][R], v16 (&hi)[A][R]) {
  for (int a = 1; a < A; ++a)
    for (int r = 0; r < R; ++r) {
      lo[0][r] += lo[a][r];
      hi[0][r] += hi[a][r];
    }
}

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// One panel p for rows [0, R) of each weight format. Each kernel is a small
// struct holding its operands; Run<R>(r0, p) computes rows [r0, r0 + R) of
// panel p, and Panels() below walks the row groups.

// float32 panels [P, K, 32].
struct F32Panels {
  const float* x;  // [M, K]
  const float* w;  // [P, K, 32]
  float* y;        // [M, N]
  int64_t K, N;
  template <int R>
  void Run(int64_t r0, int64_t p) const {
    const float* xr = x + r0 * K;
    const float* wp = w + p * K * kPanel;
    constexpr int A = Chains<R>();
    v16 lo[A][R], hi[A][R];
    for (int a = 0; a < A; ++a)
      for (int r = 0; r < R; ++r) lo[a][r] = hi[a][r] = (v16){};
    auto step = [&](int a, int64_t k) {
      PrefetchAhead(wp + k * kPanel);
      PrefetchAhead(wp + k * kPanel + 16);
      const v16 w0 = *(const v16u*)(wp + k * kPanel);
      const v16 w1 = *(const v16u*)(wp + k * kPanel + 16);
      for (int r = 0; r < R; ++r) {
        const float s = xr[r * K + k];
        lo[a][r] += s * w0;
        hi[a][r] += s * w1;
      }
    };
    int64_t k = 0;
    for (; k + A <= K; k += A)
      for (int a = 0; a < A; ++a) step(a, k + a);
    for (; k < K; ++k) step(0, k);
    Reduce<A, R>(lo, hi);
    Store<R>(lo[0], hi[0], r0, p, nullptr);
  }
  template <int R>
  void Store(const v16* lo, const v16* hi, int64_t r0, int64_t p, const float* scale) const {
    v16 s0 = (v16){} + 1.f, s1 = s0;
    if (scale) {
      s0 = *(const v16u*)(scale + p * kPanel);
      s1 = *(const v16u*)(scale + p * kPanel + 16);
    }
    for (int r = 0; r < R; ++r) {
      *(v16u*)(y + (r0 + r) * N + p * kPanel) = lo[r] * s0;
      *(v16u*)(y + (r0 + r) * N + p * kPanel + 16) = hi[r] * s1;
    }
  }
};

// int8 weight-only panels [P, K, 32] with one f32 scale per output column:
// y[r, n] = scale[n] * sum_k x[r, k] q[k, n]. Each weight row is widened to
// f32 in registers (exact) and the scale is applied once, at the end.
typedef int8_t v16c __attribute__((vector_size(16), aligned(1)));

// 16 int8 -> 16 f32 (exact). GCC scalarizes __builtin_convertvector from int8,
// so AVX-512 uses the sign-extending load (vpmovsxbd) and vcvtdq2ps directly.
inline v16 WidenInt8(const int8_t* p) {
#if defined(__AVX512F__)
  return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#else
  return __builtin_convertvector(*(const v16c*)p, v16);
#endif
}

struct Int8Panels {
  F32Panels out;   // x, y, K, N (w unused)
  const int8_t* w;  // [P, K, 32]
  const float* scale;  // [P * 32]
  template <int R>
  void Run(int64_t r0, int64_t p) const {
    const int64_t K = out.K;
    const float* xr = out.x + r0 * K;
    const int8_t* wp = w + p * K * kPanel;
    constexpr int A = Chains<R>();
    v16 lo[A][R], hi[A][R];
    for (int a = 0; a < A; ++a)
      for (int r = 0; r < R; ++r) lo[a][r] = hi[a][r] = (v16){};
    auto step = [&](int a, int64_t k) {
      if (k % 2 == 0) PrefetchAhead(wp + k * kPanel);  // one 64-byte line per 2 rows
      const v16 w0 = WidenInt8(wp + k * kPanel);
      const v16 w1 = WidenInt8(wp + k * kPanel + 16);
      for (int r = 0; r < R; ++r) {
        const float s = xr[r * K + k];
        lo[a][r] += s * w0;
        hi[a][r] += s * w1;
      }
    };
    int64_t k = 0;
    for (; k + A <= K; k += A)
      for (int a = 0; a < A; ++a) step(a, k + a);
    for (; k < K; ++k) step(0, k);
    Reduce<A, R>(lo, hi);
    out.Store<R>(lo[0], hi[0], r0, p, scale);
  }
};

// bfloat16 panels [P, K, 32] with input rows paired: for j < K/2 the 64 values
// at [2j, 2j+2) hold (w[2j, n], w[2j+1, n]) for n = 0..31, adjacent (the order
// AVX-512 BF16 dot products read); an odd last row is stored plainly. The
// activations are rounded to bf16 once per call (as in a bf16 XLA dot), products
// are exact in f32 and sums are f32. With AVX-512 BF16 (vdpbf16ps, chosen at
// build time from the CPU flags) one instruction does 32 multiply-adds; else
// each pair is widened to f32 in registers (a shift and a mask).
typedef uint32_t v16w __attribute__((vector_size(64)));
typedef uint32_t v16wu __attribute__((vector_size(64), aligned(4)));
typedef uint16_t v16h __attribute__((vector_size(32), aligned(2)));

inline v16 AsFloat(v16w b) {
  v16 f;
  __builtin_memcpy(&f, &b, sizeof(f));
  return f;
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

struct Bf16Panels {
  F32Panels out;          // x (bf16-rounded, as f32), y, K, N
  const uint32_t* pairs;  // [M, K/2]: (x[2j] | x[2j+1] << 16) in bf16
  const uint16_t* w;      // [P, K, 32], paired as above
  template <int R>
  void Run(int64_t r0, int64_t p) const {
    const int64_t K = out.K, H = K / 2;
    const uint16_t* wp = w + p * K * kPanel;
    constexpr int A = Chains<R>();
    v16 acc_lo[A][R], acc_hi[A][R];
    for (int a = 0; a < A; ++a)
      for (int r = 0; r < R; ++r) acc_lo[a][r] = acc_hi[a][r] = (v16){};
#if defined(__AVX512BF16__)
    const uint32_t* xp = pairs + r0 * H;
    auto step = [&](int a, int64_t j) {
      PrefetchAhead(wp + j * 2 * kPanel);
      PrefetchAhead(wp + j * 2 * kPanel + kPanel);
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + j * 2 * kPanel);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + j * 2 * kPanel + kPanel);
      for (int r = 0; r < R; ++r) {
        const __m512bh s = (__m512bh)_mm512_set1_epi32((int)xp[r * H + j]);
        acc_lo[a][r] = (v16)_mm512_dpbf16_ps((__m512)acc_lo[a][r], w0, s);
        acc_hi[a][r] = (v16)_mm512_dpbf16_ps((__m512)acc_hi[a][r], w1, s);
      }
    };
#else
    const float* xr = out.x + r0 * K;
    const v16w high = (v16w){} + 0xffff0000u;
    auto step = [&](int a, int64_t j) {
      PrefetchAhead(wp + j * 2 * kPanel);
      PrefetchAhead(wp + j * 2 * kPanel + kPanel);
      const v16w wa = *(const v16wu*)(wp + j * 2 * kPanel);
      const v16w wb = *(const v16wu*)(wp + j * 2 * kPanel + kPanel);
      const v16 a0 = AsFloat(wa << 16), a1 = AsFloat(wa & high);
      const v16 b0 = AsFloat(wb << 16), b1 = AsFloat(wb & high);
      for (int r = 0; r < R; ++r) {
        const float s0 = xr[r * K + 2 * j], s1 = xr[r * K + 2 * j + 1];
        acc_lo[a][r] += s0 * a0 + s1 * a1;
        acc_hi[a][r] += s0 * b0 + s1 * b1;
      }
    };
#endif
    int64_t j = 0;
    for (; j + A <= H; j += A)
      for (int a = 0; a < A; ++a) step(a, j + a);
    for (; j < H; ++j) step(0, j);
    Reduce<A, R>(acc_lo, acc_hi);
    v16* lo = acc_lo[0];
    v16* hi = acc_hi[0];
    if (K % 2) {  // the plain last row
      const uint16_t* t = wp + (K - 1) * kPanel;
      const v16 t0 = AsFloat(__builtin_convertvector(*(const v16h*)t, v16w) << 16);
      const v16 t1 = AsFloat(__builtin_convertvector(*(const v16h*)(t + 16), v16w) << 16);
      for (int r = 0; r < R; ++r) {
        const float s = out.x[(r0 + r) * K + K - 1];
        lo[r] += s * t0;
        hi[r] += s * t1;
      }
    }
    out.Store<R>(lo, hi, r0, p, nullptr);
  }
};


// ---------------------------------------------------------------- AMX-BF16
// With AMX (Sapphire Rapids and later; compiled in when -march=native has
// AMX-TILE and AMX-BF16, used only after RecursiveLmAmxInit() got the kernel's
// permission and a test instruction ran), bf16 panels of M >= g_amx_min_rows
// rows run on the tile unit. The paired panel layout is AMX's "VNNI" B-tile
// format: the 64 values of input-row pair j are (w[2j, n], w[2j+1, n]) for
// n = 0..31, so a B tile (16 pair rows x 64 bytes = 32 inputs x 16 columns)
// is 16 rows of 64 bytes at a stride of 128 bytes: one tile for columns
// 0-15, one for 16-31. A tile = 16 rows of bf16 activations x 32 inputs; C
// tiles = f32 sums [rows, 16], accumulated over K in steps of 32 (bf16
// products are exact in f32, sums f32: the same math as vdpbf16ps, in another
// summation order). Tiles: C 0-3 (two row blocks x two column halves), A 4-5,
// B 6-7. The tile configuration is per thread: every work chunk loads it and
// releases the tiles at its end (XLA's pool threads run other work between).
// int8 panels take the same path after each panel is widened to a paired
// bf16 copy in a per-thread buffer (int8 values are exact in bf16).
static std::atomic<int64_t> g_amx_min_rows_bf16{INT64_MAX};
static std::atomic<int64_t> g_amx_min_rows_int8{INT64_MAX};

#if RLM_HAVE_AMX
struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Row blocks of a and b rows (b = 0: one block), tiles as above.
inline void ConfigureTiles(int a, int b) {
  TileConfig c;
  const int r[8] = {a, a, b, b, a, b, 16, 16};
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = (uint8_t)r[t];
    c.colsb[t] = r[t] ? 64 : 0;
  }
  _tile_loadconfig(&c);
}

// Rows [r0, r0 + a + b) of one panel: xa bf16 activations [M, Kp] (Kp =
// ceil(K / 32) * 32, zero padded); step(s) gives the B-tile data (16 pair
// rows x 64 values, row stride 128 bytes) of the panel's 32-input step s, for
// s = 0, 1, ..., steps - 1 in order. y gets the f32 sums.
template <bool Two, typename Step>
inline void AmxRowBlocks(const uint16_t* xa, int64_t Kp, int64_t steps, Step& step,
                         float* y, int64_t N, int64_t a) {
  _tile_zero(0);
  _tile_zero(1);
  if (Two) { _tile_zero(2); _tile_zero(3); }
  const int64_t xs = Kp * 2;  // activation row stride in bytes
  const uint16_t* xb = xa + a * Kp;
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* ws = step(s);
    _tile_loadd(4, xa + s * 32, xs);
    _tile_loadd(6, ws, 128);
    _tile_loadd(7, ws + 16 * 2, 128);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (Two) {
      _tile_loadd(5, xb + s * 32, xs);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, y, N * 4);
  _tile_stored(1, y + 16, N * 4);
  if (Two) {
    _tile_stored(2, y + a * N, N * 4);
    _tile_stored(3, y + a * N + 16, N * 4);
  }
}

// Walks the row blocks of one panel: pairs of 16-row blocks, then the rest;
// the configuration is reloaded only when the block shape changes (*shape).
// Each row block reads the steps in order (see AmxRowBlocks).
template <typename Step>
inline void AmxPanel(const uint16_t* xa, int64_t M, int64_t Kp, int64_t steps, Step& step,
                     float* yp, int64_t N, int* shape) {
  for (int64_t r0 = 0; r0 < M;) {
    const int64_t rest = M - r0;
    const int a = rest >= 16 ? 16 : (int)rest;
    const int b = rest >= 32 ? 16 : (rest > 16 ? (int)rest - 16 : 0);
    if (*shape != a * 32 + b) {
      ConfigureTiles(a, b);
      *shape = a * 32 + b;
    }
    if (b) AmxRowBlocks<true>(xa + r0 * Kp, Kp, steps, step, yp + r0 * N, N, a);
    else AmxRowBlocks<false>(xa + r0 * Kp, Kp, steps, step, yp + r0 * N, N, a);
    r0 += a + b;
  }
}

// The steps of a panel held in place (paired bf16): full steps from the
// panel, then, when tail != nullptr, one more step from tail.
struct InPlaceSteps {
  const uint16_t* wp;
  int64_t full;
  const uint16_t* tail;
  const uint16_t* operator()(int64_t s) const { return s < full ? wp + s * 32 * kPanel : tail; }
};

// Paired bf16 panels [P, K, 32] for panels [p0, p1).
void AmxBf16Panels(const uint16_t* xa, int64_t M, int64_t K, const uint16_t* w,
                   float* y, int64_t N, int64_t p0, int64_t p1) {
  const int64_t Kp = (K + 31) / 32 * 32, steps = K / 32;
  alignas(64) uint16_t tail[16 * 64];
  int shape = -1;
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* wp = w + p * K * kPanel;
    const bool has_tail = K % 32 != 0;
    if (has_tail) {  // the last K % 32 inputs, as 16 zero-padded pair rows
      __builtin_memset(tail, 0, sizeof(tail));
      const int64_t j0 = steps * 16, pairs = K / 2 - j0;
      __builtin_memcpy(tail, wp + j0 * 2 * kPanel, pairs * 2 * kPanel * 2);
      if (K % 2) {
        const uint16_t* last = wp + (K - 1) * kPanel;
        for (int n = 0; n < kPanel; ++n) tail[pairs * 64 + 2 * n] = last[n];
      }
    }
    InPlaceSteps in_place{wp, steps, has_tail ? tail : nullptr};
    AmxPanel(xa, M, Kp, steps + has_tail, in_place, y + p * kPanel, N, &shape);
  }
  _tile_release();
}

// 16 pair rows (32 inputs) of an int8 panel from input row k0 on, widened to
// paired bf16 (the B-tile layout, 16 x 64 values); rows at or past K are 0.
inline void WidenInt8Step(const int8_t* wp, int64_t K, int64_t k0, uint16_t* out) {
  const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
  for (int j = 0; j < 16; ++j) {
    const int64_t k = k0 + 2 * j;
    for (int h = 0; h < 2; ++h) {
      __m512i pair = _mm512_setzero_si512();
      if (k < K) {
        const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128((const __m128i*)(wp + k * kPanel + 16 * h))));
        pair = _mm512_srli_epi32(_mm512_castps_si512(a), 16);
        if (k + 1 < K) {
          const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
              _mm_loadu_si128((const __m128i*)(wp + (k + 1) * kPanel + 16 * h))));
          pair = _mm512_or_si512(pair, _mm512_and_si512(_mm512_castps_si512(b), high));
        }
      }
      _mm512_store_si512(out + j * 2 * kPanel + 32 * h, pair);
    }
  }
}

// The steps of an int8 panel, widened to bf16 into a small ring of L1
// buffers two steps ahead of the tile loads (so the stores have retired);
// read in order once (one row block).
struct WidenedSteps {
  const int8_t* wp;
  int64_t K, steps;
  uint16_t (*ring)[16 * 64];
  const uint16_t* operator()(int64_t s) {
    if (s == 0)
      for (int64_t t = 0; t < 2 && t < steps; ++t) WidenInt8Step(wp, K, 32 * t, ring[t]);
    if (s + 2 < steps) WidenInt8Step(wp, K, 32 * (s + 2), ring[(s + 2) & 3]);
    return ring[s & 3];
  }
};

// int8 panels [P, K, 32] for panels [p0, p1), rows in one or two 16-row
// blocks (M <= 32): each 32-input step of the panel is widened to bf16 right
// before its tile multiply (WidenedSteps); the column scales are applied to
// the sums. M > 32 (prefill): the whole panel is widened once into a
// per-thread buffer and walked like a bf16 panel.
void AmxInt8Panels(const uint16_t* xa, int64_t M, int64_t K, const int8_t* w,
                   const float* scale, float* y, int64_t N, int64_t p0, int64_t p1) {
  const int64_t Kp = (K + 31) / 32 * 32, steps = Kp / 32;
  alignas(64) uint16_t ring[4][16 * 64];
  thread_local std::vector<uint16_t> whole;
  int shape = -1;
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* wp = w + p * K * kPanel;
    float* yp = y + p * kPanel;
    if (M > 32) {
      if ((int64_t)whole.size() < Kp * kPanel + 32) whole.resize(Kp * kPanel + 32);
      uint16_t* wb = (uint16_t*)(((uintptr_t)whole.data() + 63) & ~(uintptr_t)63);
      for (int64_t s = 0; s < steps; ++s) WidenInt8Step(wp, K, 32 * s, wb + s * 32 * kPanel);
      InPlaceSteps widened{wb, steps, nullptr};
      AmxPanel(xa, M, Kp, steps, widened, yp, N, &shape);
    } else {
      WidenedSteps widen{wp, K, steps, ring};
      AmxPanel(xa, M, Kp, steps, widen, yp, N, &shape);
    }
    const __m512 s0 = _mm512_loadu_ps(scale + p * kPanel);
    const __m512 s1 = _mm512_loadu_ps(scale + p * kPanel + 16);
    for (int64_t r = 0; r < M; ++r) {
      _mm512_storeu_ps(yp + r * N, _mm512_mul_ps(_mm512_loadu_ps(yp + r * N), s0));
      _mm512_storeu_ps(yp + r * N + 16, _mm512_mul_ps(_mm512_loadu_ps(yp + r * N + 16), s1));
    }
  }
  _tile_release();
}

// Asks Linux for the AMX tile state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA),
// then runs one tile multiply in a forked child, so a hypervisor that traps
// the instructions kills the child, not this process. True when AMX works.
bool AmxUsable() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  const pid_t pid = fork();
  if (pid < 0) return false;
  if (pid == 0) {
    alignas(64) uint16_t a[16 * 32], b[16 * 32];
    alignas(64) float c[16 * 16];
    for (int i = 0; i < 16 * 32; ++i) a[i] = b[i] = 0x3f80;  // 1.0
    ConfigureTiles(16, 0);
    _tile_zero(0);
    _tile_loadd(4, a, 64);
    _tile_loadd(6, b, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_stored(0, c, 64);
    _tile_release();
    _exit(c[0] == 32.f && c[255] == 32.f ? 0 : 1);
  }
  int st = 0;
  if (waitpid(pid, &st, 0) != pid) return false;
  return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}
#endif  // RLM_HAVE_AMX

// f32 activations [M, K] -> bf16 (nearest even) [M, Kp], zero padded to Kp.
void PaddedBf16(const float* x, int64_t M, int64_t K, int64_t Kp, std::vector<uint16_t>& out) {
  out.assign(M * Kp, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) out[m * Kp + k] = (uint16_t)(RoundToBf16Bits(x[m * K + k]) >> 16);
}

// All M rows for panels [p0, p1), in groups of 8 rows. The row groups are the
// inner loop: a panel (K x 32 weights, 72 KiB in f32 at K = 576) comes from
// memory once and stays in L2 for the next group.
template <typename Kernel>
void Panels(const Kernel& kern, int64_t M, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t r0 = 0; r0 < M; r0 += 8) {
      switch (M - r0 < 8 ? M - r0 : 8) {
        case 1: kern.template Run<1>(r0, p); break;
        case 2: kern.template Run<2>(r0, p); break;
        case 3: kern.template Run<3>(r0, p); break;
        case 4: kern.template Run<4>(r0, p); break;
        case 5: kern.template Run<5>(r0, p); break;
        case 6: kern.template Run<6>(r0, p); break;
        case 7: kern.template Run<7>(r0, p); break;
        default: kern.template Run<8>(r0, p); break;
      }
    }
  }
}

// Runs fn(i0, i1) over [0, n) in chunks, on the calling thread and XLA's
// intra-op pool. Chunks go to whoever is free (an atomic counter), so a pool
// thread that is slow to wake costs nothing. The state is held by shared_ptr:
// a pool task that starts after the call returned finds no chunk left and
// touches nothing else.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t chunks_per_thread, Fn fn) {
  if (n <= 0) return;
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n, chunk;
    Fn fn;
    State(int64_t n, int64_t chunk, Fn fn) : n(n), chunk(chunk), fn(fn) {}
    void Run() {
      for (;;) {
        const int64_t i0 = next.fetch_add(1, std::memory_order_relaxed) * chunk;
        if (i0 >= n) return;
        const int64_t i1 = i0 + chunk < n ? i0 + chunk : n;
        fn(i0, i1);
        done.fetch_add(i1 - i0, std::memory_order_release);
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

ffi::Error PanelMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[1] != xd[1]) {
    return ffi::Error::InvalidArgument(
        "recursive_lm_panel_matmul: expected x [M, K] and w [P, K, 32]");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t M = xd[0], K = xd[1], P = wd[0];
  if (M == 0) return ffi::Error::Success();
  // About 8 chunks per thread: fine enough to balance, coarse enough that the
  // counter is not contended.
  const F32Panels kern{xp, wp, yp, K, P * kPanel};
  ParallelFor(pool, P, 8, [=](int64_t p0, int64_t p1) { Panels(kern, M, p0, p1); });
  return ffi::Error::Success();
}

ffi::Error PanelMatmulInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[1] != xd[1] ||
      scale.element_count() != wd[0] * kPanel) {
    return ffi::Error::InvalidArgument(
        "recursive_lm_panel_matmul_int8: expected x [M, K], w [P, K, 32], scale [P*32]");
  }
  const int64_t M = xd[0], K = xd[1], P = wd[0];
  if (M == 0) return ffi::Error::Success();
  // The AMX path (off by default: measured no faster than the FMAs, the
  // widening to bf16 costs more than the tiles save) rounds the activations
  // to bf16; the FMA path keeps them f32.
  const float* xs = x.typed_data();
  float* yp = y->typed_data();
  const int8_t* wq = w.typed_data();
  const float* sc = scale.typed_data();
  const int64_t N = P * kPanel;
#if RLM_HAVE_AMX
  if (M >= g_amx_min_rows_int8.load(std::memory_order_relaxed)) {
    std::vector<uint16_t> xa;
    const int64_t Kp = (K + 31) / 32 * 32;
    PaddedBf16(xs, M, K, Kp, xa);
    const uint16_t* xap = xa.data();
    ParallelFor(pool, P, 8, [=](int64_t p0, int64_t p1) {
      AmxInt8Panels(xap, M, K, wq, sc, yp, N, p0, p1);
    });
    return ffi::Error::Success();
  }
#endif
  const Int8Panels kern{{xs, nullptr, yp, K, N}, wq, sc};
  ParallelFor(pool, P, 8, [=](int64_t p0, int64_t p1) { Panels(kern, M, p0, p1); });
  return ffi::Error::Success();
}

ffi::Error PanelMatmulBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[1] != xd[1]) {
    return ffi::Error::InvalidArgument(
        "recursive_lm_panel_matmul_bf16: expected x [M, K] and w [P, K, 32]");
  }
  const int64_t M = xd[0], K = xd[1], P = wd[0], H = K / 2;
  if (M == 0) return ffi::Error::Success();
  const float* xs = x.typed_data();
#if RLM_HAVE_AMX
  if (M >= g_amx_min_rows_bf16.load(std::memory_order_relaxed)) {
    std::vector<uint16_t> xa;
    const int64_t Kp = (K + 31) / 32 * 32;
    PaddedBf16(xs, M, K, Kp, xa);
    const uint16_t* xap = xa.data();
    const uint16_t* wb = reinterpret_cast<const uint16_t*>(w.typed_data());
    float* yp = y->typed_data();
    ParallelFor(pool, P, 8, [=](int64_t p0, int64_t p1) {
      AmxBf16Panels(xap, M, K, wb, yp, P * kPanel, p0, p1);
    });
    return ffi::Error::Success();
  }
#endif
  // The activations rounded to bf16, once: as f32 values and as packed pairs.
  std::vector<float> rounded(M * K);
  std::vector<uint32_t> pairs(M * H);
  for (int64_t i = 0; i < M * K; ++i) {
    const uint32_t b = RoundToBf16Bits(xs[i]);
    __builtin_memcpy(&rounded[i], &b, sizeof(b));
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < H; ++j)
      pairs[m * H + j] = (FloatBits(rounded[m * K + 2 * j]) >> 16) |
                         (FloatBits(rounded[m * K + 2 * j + 1]) & 0xffff0000u);
  const Bf16Panels kern{{rounded.data(), nullptr, y->typed_data(), K, P * kPanel},
                        pairs.data(), w.typed_data()};
  ParallelFor(pool, P, 8, [=](int64_t p0, int64_t p1) { Panels(kern, M, p0, p1); });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- attention
typedef int32_t v16i __attribute__((vector_size(64)));

inline float Dot(const float* a, const float* b, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
  if (D >= 16) {
    v16 acc = {};
    for (; d + 16 <= D; d += 16) acc += *(const v16u*)(a + d) * *(const v16u*)(b + d);
    for (int l = 0; l < 16; ++l) s += acc[l];
  }
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

// exp(x) for x <= 0, 16 lanes: 2^n * p(r), r = x - n ln2, |r| <= ln2/2, a degree-6
// polynomial (relative error ~2e-7); x < -87 gives 0.
inline v16 ExpNonPositive(v16 x) {
  const v16 lo = x < -87.f ? (v16){} - 87.f : x;  // clamp; those lanes are zeroed below
  const v16 n = __builtin_convertvector(
      __builtin_convertvector(lo * 1.44269504f + (lo < 0.f ? -0.5f : 0.5f), v16i), v16);
  const v16 r = lo - n * 0.693145752f - n * 1.42860677e-6f;
  v16 p = (v16){} + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16 two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.f ? (v16){} : p * two_n;
}

// Sum over j of p[j] * v[j, :] into out[:D]. C > 0: D == 16 * C, the sums
// stay in registers; C == 0: any D.
template <int C>
void WeightedRows(const float* p, const float* v, int64_t last, int64_t D, float* out) {
  if constexpr (C > 0) {
    v16 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = (v16){};
    for (int64_t j = 0; j < last; ++j) {
      if (p[j] == 0.f) continue;
      const float* vj = v + j * D;
      for (int c = 0; c < C; ++c) acc[c] += p[j] * *(const v16u*)(vj + 16 * c);
    }
    for (int c = 0; c < C; ++c) *(v16u*)(out + 16 * c) = acc[c];
  } else {
    for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
    for (int64_t j = 0; j < last; ++j) {
      if (p[j] == 0.f) continue;
      const float* vj = v + j * D;
      for (int64_t d = 0; d < D; ++d) out[d] += p[j] * vj[d];
    }
  }
}

// One (kv head row n, query position t): the G query heads of the group, over
// the slots up to the last visible one (later slots are not read); masked
// slots inside get probability 0.
template <int C>
void AttendOne(const float* q, const float* k, const float* v, const bool* mask,
               float* out, int64_t S, int64_t D, int64_t G, float scale,
               std::vector<float>& probs) {
  int64_t last = S;
  while (last > 0 && !mask[last - 1]) --last;
  // No visible slot: uniform over all S slots, which is what a softmax over
  // equal masked scores gives (the XLA path).
  const bool none = last == 0;
  if (none) last = S;
  const int64_t L = (last + 15) / 16 * 16;
  probs.assign(L, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float mx = -INFINITY;
    for (int64_t j = 0; j < last; ++j) {
      const bool vis = none || mask[j];
      const float s = none ? 0.f : (vis ? Dot(qg, k + j * D, D) * scale : -INFINITY);
      probs[j] = s;
      if (s > mx) mx = s;
    }
    for (int64_t j = last; j < L; ++j) probs[j] = -INFINITY;
    v16 tot = {};
    for (int64_t j = 0; j < L; j += 16) {
      const v16 e = ExpNonPositive(*(v16u*)(probs.data() + j) - mx);
      *(v16u*)(probs.data() + j) = e;
      tot += e;
    }
    float total = 0.f;
    for (int l = 0; l < 16; ++l) total += tot[l];
    float* og = out + g * D;
    WeightedRows<C>(probs.data(), v, last, D, og);
    const float inv = 1.f / total;
    for (int64_t d = 0; d < D; ++d) og[d] *= inv;
  }
}

using AttendFn = void (*)(const float*, const float*, const float*, const bool*, float*,
                          int64_t, int64_t, int64_t, float, std::vector<float>&);

AttendFn AttendFor(int64_t D) {
  switch (D) {
    case 16: return AttendOne<1>;
    case 32: return AttendOne<2>;
    case 64: return AttendOne<4>;
    case 128: return AttendOne<8>;
    default: return AttendOne<0>;
  }
}

// q [N, T*G, D] (N = B * Hkv rows, query heads of a group adjacent), k/v cache
// [N, S, D], mask [B, T, S] -> out [N, T*G, D].
ffi::Error CacheAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                          ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                          ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                          float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || md.size() != 3 || kd[0] != qd[0] ||
      kd[2] != qd[2] || v.dimensions().size() != 3 || v.dimensions()[0] != kd[0] ||
      v.dimensions()[1] != kd[1] || v.dimensions()[2] != kd[2] || md[2] != kd[1] || md[0] == 0 ||
      qd[0] % md[0] != 0 || qd[1] % md[1] != 0) {
    return ffi::Error::InvalidArgument(
        "recursive_lm_cache_attention: expected q [B*Hkv, T*G, D], k/v [B*Hkv, S, D], "
        "mask [B, T, S]");
  }
  const int64_t N = qd[0], TG = qd[1], D = qd[2], S = kd[1];
  const int64_t B = md[0], T = md[1], G = TG / T, H = N / B;
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  const AttendFn attend = AttendFor(D);
  ParallelFor(pool, N * T, 2, [=](int64_t i0, int64_t i1) {
    std::vector<float> probs;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / T, t = i % T, b = n / H;
      attend(qp + (n * TG + t * G) * D, kp + n * S * D, vp + n * S * D,
                mp + (b * T + t) * S, op + (n * TG + t * G) * D, S, D, G, scale, probs);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecursiveLmPanelMatmul, PanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecursiveLmPanelMatmulBf16, PanelMatmulBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecursiveLmPanelMatmulInt8, PanelMatmulInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// 1 when the bf16 panel kernel uses AVX-512 BF16 dot products, 0 when it
// widens to f32 (read by native.py for its status line).
extern "C" int RecursiveLmBf16DotProducts() {
#if defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

// 1 when the library was built with AMX-TILE/AMX-BF16 code.
extern "C" int RecursiveLmAmxCompiled() { return RLM_HAVE_AMX; }

// Turns the AMX path on for bf16 panels of at least bf16_min_rows rows and
// int8 panels of at least int8_min_rows rows (<= 0: never), when the library
// has AMX code and the CPU and kernel allow it (AmxUsable, checked once).
// Returns 1 when AMX is on for either format.
extern "C" int RecursiveLmAmxInit(int64_t bf16_min_rows, int64_t int8_min_rows) {
#if RLM_HAVE_AMX
  static const bool usable = AmxUsable();
  const bool any = usable && (bf16_min_rows > 0 || int8_min_rows > 0);
  g_amx_min_rows_bf16 = usable && bf16_min_rows > 0 ? bf16_min_rows : INT64_MAX;
  g_amx_min_rows_int8 = usable && int8_min_rows > 0 ? int8_min_rows : INT64_MAX;
  return any ? 1 : 0;
#else
  (void)bf16_min_rows;
  (void)int8_min_rows;
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecursiveLmCacheAttention, CacheAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

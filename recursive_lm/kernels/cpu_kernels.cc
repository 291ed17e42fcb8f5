// Native panel matmuls for decoding, registered as XLA FFI targets
// (recursive_lm_panel_matmul{,_bf16,_int8}): y[M, P*32] = x[M, K] @ W for a
// few rows M, W in f32, paired bf16 or int8 panels.
//
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
//
// The AMX-BF16 path of bf16/int8 panels is in amx_panels.cc, the cache
// attention in cache_attention.cc; shared helpers in kernels_common.h.
#include "kernels_common.h"

namespace rlm {
namespace {

// Independent accumulator sets per row for a register block of R rows: at 1-2
// rows the two sums of a row would otherwise be one chain of dependent FMAs
// (4+ cycles each), which caps a core below its share of the memory bandwidth;
// with Chains<R>() sets, about 16 sums are in flight at every R (except in the
// partial last group of a call of more than 8 rows: Panels() below).
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


// One panel p for rows [0, R) of each weight format. Each kernel is a small
// struct holding its operands; Run<R>(r0, p) computes rows [r0, r0 + R) of
// panel p, and Panels() below walks the row groups.

// Calls of at least this many rows (0: none) of the f32 path prefetch the next
// panel into L2 while they compute this one; read once per call
// (RecursiveLmF32Prefetch). Panels are contiguous, so "next" is panel p + 1 in
// memory (past the weights' end on the last one: a prefetch never faults). Its
// rows are spread over the call's row groups (group g of G prefetches rows
// k = g mod G), so from 9 rows on the groups that compute from L2 keep the
// memory busy too. Measured on an Intel Xeon (a decode step's 61 f32 matmuls
// chained, 326 MB): 1.19-1.27x at 4-32 rows, 0.86x at 1 row and 0.95x at 2,
// where the hardware prefetcher alone keeps up (docs/weight_formats.md).
std::atomic<int64_t> g_f32_prefetch_rows{4};

// float32 panels [P, K, 32].
struct F32Panels {
  const float* x;  // [M, K]
  const float* w;  // [P, K, 32]
  float* y;        // [M, N]
  int64_t K, N;
  int64_t groups = 0;  // row groups of the call (ceil(M / 8)); 0: no L2 prefetch
  template <int R, int A = Chains<R>()>
  void Run(int64_t r0, int64_t p) const {
    const float* xr = x + r0 * K;
    const float* wp = w + p * K * kPanel;
    const float* next = wp + K * kPanel;
    int64_t pf = groups ? r0 / 8 : K;  // next row of the next panel to prefetch
    v16 lo[A][R], hi[A][R];
    for (int a = 0; a < A; ++a)
      for (int r = 0; r < R; ++r) lo[a][r] = hi[a][r] = (v16){};
    auto step = [&](int a, int64_t k) {
      PrefetchAhead(wp + k * kPanel);
      PrefetchAhead(wp + k * kPanel + 16);
      if (k == pf) {  // both 64-byte lines of row pf of the next panel
        __builtin_prefetch(next + pf * kPanel, 0, 2);
        __builtin_prefetch(next + pf * kPanel + 16, 0, 2);
        pf += groups;
      }
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

// The int8 path prefetches the weight stream this many bytes ahead into L2
// (prefetcht1, one 64-byte line per 2 input rows; 0: none); read once per
// call (RecursiveLmInt8Prefetch). Measured with a standalone probe (269 MB, 2
// threads, loaded machine): 6.5 vs 4.2 GB/s without (docs/weight_formats.md).
std::atomic<int64_t> g_int8_prefetch_bytes{8192};

// The low-bit paths' software prefetch into L2: ``ahead`` bytes past p
// (prefetcht1; 0: none).
inline void PrefetchL2(const void* p, int64_t ahead) {
  if (ahead > 0) __builtin_prefetch((const char*)p + ahead, 0, 2);  // t1
}

struct Int8Panels {
  F32Panels out;   // x, y, K, N (w unused)
  const int8_t* w;  // [P, K, 32]
  const float* scale;  // [P * 32]
  int64_t ahead;   // prefetch distance in bytes (0: none)
  template <int R, int A = Chains<R>()>
  void Run(int64_t r0, int64_t p) const {
    const int64_t K = out.K;
    const float* xr = out.x + r0 * K;
    const int8_t* wp = w + p * K * kPanel;
    v16 lo[A][R], hi[A][R];
    for (int a = 0; a < A; ++a)
      for (int r = 0; r < R; ++r) lo[a][r] = hi[a][r] = (v16){};
    auto step = [&](int a, int64_t k) {
      if (k % 2 == 0) {  // one 64-byte line per 2 rows
        PrefetchAhead(wp + k * kPanel);
        PrefetchL2(wp + k * kPanel, ahead);
      }
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



// The non-AMX bf16 path prefetches the weight stream this many bytes ahead
// into L2 (prefetcht1, both 64-byte lines of each input-row pair; 0: none), as
// the int8 and AMX paths do; read once per call (RecursiveLmBf16Prefetch).
std::atomic<int64_t> g_bf16_prefetch_bytes{8192};

struct Bf16Panels {
  F32Panels out;          // x (bf16-rounded, as f32), y, K, N
  const uint32_t* pairs;  // [M, K/2]: (x[2j] | x[2j+1] << 16) in bf16
  const uint16_t* w;      // [P, K, 32], paired as above
  int64_t ahead;          // L2 prefetch distance in bytes (0: none)
  template <int R, int A = Chains<R>()>
  void Run(int64_t r0, int64_t p) const {
    const int64_t K = out.K, H = K / 2;
    const uint16_t* wp = w + p * K * kPanel;
    v16 acc_lo[A][R], acc_hi[A][R];
    for (int a = 0; a < A; ++a)
      for (int r = 0; r < R; ++r) acc_lo[a][r] = acc_hi[a][r] = (v16){};
#if defined(__AVX512BF16__)
    const uint32_t* xp = pairs + r0 * H;
    auto step = [&](int a, int64_t j) {
      PrefetchAhead(wp + j * 2 * kPanel);
      PrefetchAhead(wp + j * 2 * kPanel + kPanel);
      PrefetchL2(wp + j * 2 * kPanel, ahead);
      PrefetchL2(wp + j * 2 * kPanel + kPanel, ahead);
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
      PrefetchL2(wp + j * 2 * kPanel, ahead);
      PrefetchL2(wp + j * 2 * kPanel + kPanel, ahead);
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

// Rows [r0, r0 + n) of panel p, 1 <= n <= 8. kWhole: every row sums with one
// chain (Chains<8>, a full group's order), whatever n.
template <bool kWhole, typename Kernel>
inline void RunGroup(const Kernel& kern, int64_t n, int64_t r0, int64_t p) {
  constexpr int A8 = Chains<8>();
  switch (n) {
    case 1: kern.template Run<1, kWhole ? A8 : Chains<1>()>(r0, p); break;
    case 2: kern.template Run<2, kWhole ? A8 : Chains<2>()>(r0, p); break;
    case 3: kern.template Run<3, kWhole ? A8 : Chains<3>()>(r0, p); break;
    case 4: kern.template Run<4, kWhole ? A8 : Chains<4>()>(r0, p); break;
    case 5: kern.template Run<5, kWhole ? A8 : Chains<5>()>(r0, p); break;
    case 6: kern.template Run<6, kWhole ? A8 : Chains<6>()>(r0, p); break;
    case 7: kern.template Run<7, kWhole ? A8 : Chains<7>()>(r0, p); break;
    default: kern.template Run<8>(r0, p); break;
  }
}

// All M rows for panels [p0, p1), in groups of 8 rows. The row groups are the
// inner loop: a panel (K x 32 weights, 72 KiB in f32 at K = 576) comes from
// memory once and stays in L2 for the next group. In a call of more than 8
// rows the last, partial group sums with one chain per row, as the full
// groups do (Chains<8>), so every row of a call of at least 8 rows is
// bitwise the same row of any other such call: a server may run the head or
// a K/V fill on 12 or 20 of its slots and get the values of a full-pool call.
// (A call of fewer than 8 rows splits its sums over more chains for speed.)
template <typename Kernel>
void Panels(const Kernel& kern, int64_t M, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t r0 = 0; r0 < M; r0 += 8) {
      const int64_t n = M - r0 < 8 ? M - r0 : 8;
      if (M > 8) {
        RunGroup<true>(kern, n, r0, p);
      } else {
        RunGroup<false>(kern, n, r0, p);
      }
    }
  }
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
  const int64_t pf_rows = g_f32_prefetch_rows.load(std::memory_order_relaxed);
  const int64_t groups = pf_rows > 0 && M >= pf_rows ? (M + 7) / 8 : 0;
  const F32Panels kern{xp, wp, yp, K, P * kPanel, groups};
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
  const Int8Panels kern{{xs, nullptr, yp, K, N}, wq, sc,
                        g_int8_prefetch_bytes.load(std::memory_order_relaxed)};
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
    ParallelForAhead(pool, P, 8, [=](int64_t p0, int64_t p1, int64_t next, bool first) {
      AmxBf16Panels(xap, M, K, wb, yp, P * kPanel, p0, p1, next, first);
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
                        pairs.data(), w.typed_data(),
                        g_bf16_prefetch_bytes.load(std::memory_order_relaxed)};
  ParallelFor(pool, P, 8, [=](int64_t p0, int64_t p1) { Panels(kern, M, p0, p1); });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace rlm

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecursiveLmPanelMatmul, rlm::PanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecursiveLmPanelMatmulBf16, rlm::PanelMatmulBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecursiveLmPanelMatmulInt8, rlm::PanelMatmulInt8,
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

// Sets the int8 FMA path's L2 prefetch distance in bytes (0: none) for later
// calls; returns the previous one.
extern "C" int64_t RecursiveLmInt8Prefetch(int64_t bytes) {
  return rlm::g_int8_prefetch_bytes.exchange(bytes < 0 ? 0 : bytes);
}

// Sets the row count from which f32 calls prefetch the next panel into L2
// (0: never) for later calls; returns the previous one.
extern "C" int64_t RecursiveLmF32Prefetch(int64_t rows) {
  return rlm::g_f32_prefetch_rows.exchange(rows < 0 ? 0 : rows);
}

// Sets the non-AMX bf16 path's L2 prefetch distance in bytes (0: none) for
// later calls; returns the previous one.
extern "C" int64_t RecursiveLmBf16Prefetch(int64_t bytes) {
  return rlm::g_bf16_prefetch_bytes.exchange(bytes < 0 ? 0 : bytes);
}

// Skinny matmul for decoding on CPU: y[M, P*32] = x[M, K] @ W, for M of 1-16 rows.
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
// GCC vector extension below becomes AVX-512, AVX2 or SSE code) and registered
// as the XLA FFI target "recursive_lm_panel_matmul" for the CPU platform.
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

// Rows [0, R) of y, panels [p0, p1).
template <int R>
void PanelRows(const float* x, int64_t K, const float* w, float* y, int64_t N,
               int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* wp = w + p * K * kPanel;
    v16 lo[R], hi[R];
    for (int r = 0; r < R; ++r) lo[r] = hi[r] = (v16){};
    for (int64_t k = 0; k < K; ++k) {
      const v16 w0 = *(const v16u*)(wp + k * kPanel);
      const v16 w1 = *(const v16u*)(wp + k * kPanel + 16);
      for (int r = 0; r < R; ++r) {
        const float s = x[r * K + k];
        lo[r] += s * w0;
        hi[r] += s * w1;
      }
    }
    for (int r = 0; r < R; ++r) {
      *(v16u*)(y + r * N + p * kPanel) = lo[r];
      *(v16u*)(y + r * N + p * kPanel + 16) = hi[r];
    }
  }
}

// All M rows (groups of 8) for panels [p0, p1).
void Panels(const float* x, int64_t M, int64_t K, const float* w, float* y,
            int64_t N, int64_t p0, int64_t p1) {
  for (int64_t r0 = 0; r0 < M; r0 += 8) {
    const float* xr = x + r0 * K;
    float* yr = y + r0 * N;
    switch (M - r0 < 8 ? M - r0 : 8) {
      case 1: PanelRows<1>(xr, K, w, yr, N, p0, p1); break;
      case 2: PanelRows<2>(xr, K, w, yr, N, p0, p1); break;
      case 3: PanelRows<3>(xr, K, w, yr, N, p0, p1); break;
      case 4: PanelRows<4>(xr, K, w, yr, N, p0, p1); break;
      case 5: PanelRows<5>(xr, K, w, yr, N, p0, p1); break;
      case 6: PanelRows<6>(xr, K, w, yr, N, p0, p1); break;
      case 7: PanelRows<7>(xr, K, w, yr, N, p0, p1); break;
      default: PanelRows<8>(xr, K, w, yr, N, p0, p1); break;
    }
  }
}

// Work shared by the caller and pool tasks. Held by shared_ptr: a pool task
// that starts after the call returned finds no chunk left and touches nothing.
struct Work {
  const float* x;
  const float* w;
  float* y;
  int64_t M, K, N, P, chunk;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (;;) {
      const int64_t p0 = next.fetch_add(1, std::memory_order_relaxed) * chunk;
      if (p0 >= P) return;
      const int64_t p1 = p0 + chunk < P ? p0 + chunk : P;
      Panels(x, M, K, w, y, N, p0, p1);
      done.fetch_add(p1 - p0, std::memory_order_release);
    }
  }
};

ffi::Error PanelMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[1] != xd[1]) {
    return ffi::Error::InvalidArgument(
        "recursive_lm_panel_matmul: expected x [M, K] and w [P, K, 32]");
  }
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->y = y->typed_data();
  work->M = xd[0];
  work->K = xd[1];
  work->P = wd[0];
  work->N = wd[0] * kPanel;
  if (work->M == 0 || work->P == 0) return ffi::Error::Success();
  const int64_t threads = pool.num_threads() > 0 ? pool.num_threads() : 1;
  // About 8 chunks per thread: fine enough to balance, coarse enough that the
  // counter is not contended.
  work->chunk = work->P / (threads * 8) > 0 ? work->P / (threads * 8) : 1;
  const int64_t helpers = threads - 1 < work->P - 1 ? threads - 1 : work->P - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->P) CpuRelax();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecursiveLmPanelMatmul, PanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

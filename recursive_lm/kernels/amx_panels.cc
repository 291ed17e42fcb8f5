// The AMX-BF16 path of the bf16 and int8 panel matmuls (cpu_kernels.cc calls
// it for calls of enough rows), the run-time check that the tile unit works,
// and the activation rounding both bf16 paths share.
#include "kernels_common.h"

#if RLM_HAVE_AMX
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

namespace rlm {

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
std::atomic<int64_t> g_amx_min_rows_bf16{INT64_MAX};
std::atomic<int64_t> g_amx_min_rows_int8{INT64_MAX};

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

// Software prefetch into L2 (prefetcht1) of the weight bytes [p + ahead,
// p + ahead + n), issued a 32-input step before the tile loads of p. The tile
// loads alone leave the stream at ~70% of a plain read's rate; 8 KiB ahead
// into L2 brings 1- and 8-row AMX calls to about the plain read's rate, where
// prefetchnta (the hint of the FMA paths' RLM_PREFETCH_BYTES) made them slower
// (docs/weight_formats.md, "per-step costs"). The distance is read once per
// call (RecursiveLmAmxPrefetch sets it; 0: none), so a benchmark can A/B it in
// one process.
std::atomic<int64_t> g_amx_prefetch_bytes{8192};

inline void PrefetchL2(const void* p, int64_t ahead, int64_t n) {
  if (ahead <= 0) return;
  const char* c = (const char*)p + ahead;
  for (int64_t i = 0; i < n; i += 64) _mm_prefetch(c + i, _MM_HINT_T1);
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
    step.Prefetch(s);
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

// 1: a bf16 call's threads prefetch across their chunk boundaries into the
// panel each runs next, and prefetch the opening bytes of their first chunk;
// 0 (the default): the prefetch runs on past a chunk's end into the panel
// that follows it in memory (often another thread's), as before. Off by
// default: on the chained matmuls of one step it measured 1-2% faster in two
// holds of the exclusive lock and 4-9% slower in a third
// (docs/weight_formats.md, perf15d). RecursiveLmAmxChunkPrefetch.
std::atomic<int> g_amx_chunk_prefetch{0};

// The steps of a panel held in place (paired bf16): full steps from the
// panel, then, when tail != nullptr, one more step from tail.
struct InPlaceSteps {
  const uint16_t* wp;
  int64_t full;
  const uint16_t* tail;
  int64_t ahead;  // prefetch distance in bytes
  // Where the stream goes on past this panel's end (its first bytes): the
  // next panel in memory (next == nullptr, redirect false), another panel
  // (redirect, next != nullptr), or nowhere (redirect, next == nullptr).
  bool redirect = false;
  const uint16_t* next = nullptr;
  int64_t panel_bytes = 0;
  const uint16_t* operator()(int64_t s) const { return s < full ? wp + s * 32 * kPanel : tail; }
  // The bytes one step (2 KiB) further on in the weight stream.
  void Prefetch(int64_t s) const {
    if (ahead <= 0) return;
    const int64_t off = s * 32 * kPanel * 2 + ahead;
    if (!redirect || off + 32 * kPanel * 2 <= panel_bytes) {
      PrefetchL2(wp + s * 32 * kPanel, ahead, 32 * kPanel * 2);
      return;
    }
    for (int64_t o = off; o < off + 32 * kPanel * 2; o += 64) {
      if (o < panel_bytes) _mm_prefetch((const char*)wp + o, _MM_HINT_T1);
      else if (next) _mm_prefetch((const char*)next + (o - panel_bytes), _MM_HINT_T1);
    }
  }
};

// Paired bf16 panels [P, K, 32] for panels [p0, p1).
void AmxBf16Panels(const uint16_t* xa, int64_t M, int64_t K, const uint16_t* w,
                   float* y, int64_t N, int64_t p0, int64_t p1, int64_t next, bool first) {
  const int64_t Kp = (K + 31) / 32 * 32, steps = K / 32;
  const int64_t ahead = g_amx_prefetch_bytes.load(std::memory_order_relaxed);
  const bool chunked = g_amx_chunk_prefetch.load(std::memory_order_relaxed) != 0;
  const int64_t panel_bytes = K * kPanel * 2;
  if (chunked && first && ahead > 0) {  // the bytes the first steps' prefetch skips
    const char* c = (const char*)(w + p0 * K * kPanel);
    const int64_t n = ahead < (p1 - p0) * panel_bytes ? ahead : (p1 - p0) * panel_bytes;
    for (int64_t i = 0; i < n; i += 64) _mm_prefetch(c + i, _MM_HINT_T1);
  }
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
    InPlaceSteps in_place{wp, steps, has_tail ? tail : nullptr, ahead};
    if (chunked && p == p1 - 1) {
      in_place.redirect = true;
      in_place.next = next >= 0 ? w + next * K * kPanel : nullptr;
      in_place.panel_bytes = panel_bytes;
    }
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
  int64_t ahead;  // prefetch distance in bytes
  const uint16_t* operator()(int64_t s) {
    if (s == 0)
      for (int64_t t = 0; t < 2 && t < steps; ++t) WidenInt8Step(wp, K, 32 * t, ring[t]);
    if (s + 2 < steps) WidenInt8Step(wp, K, 32 * (s + 2), ring[(s + 2) & 3]);
    return ring[s & 3];
  }
  void Prefetch(int64_t s) const { PrefetchL2(wp + 32 * s * kPanel, ahead, 32 * kPanel); }
};

// int8 panels [P, K, 32] for panels [p0, p1), rows in one or two 16-row
// blocks (M <= 32): each 32-input step of the panel is widened to bf16 right
// before its tile multiply (WidenedSteps); the column scales are applied to
// the sums. M > 32 (prefill): the whole panel is widened once into a
// per-thread buffer and walked like a bf16 panel.
void AmxInt8Panels(const uint16_t* xa, int64_t M, int64_t K, const int8_t* w,
                   const float* scale, float* y, int64_t N, int64_t p0, int64_t p1) {
  const int64_t Kp = (K + 31) / 32 * 32, steps = Kp / 32;
  const int64_t ahead = g_amx_prefetch_bytes.load(std::memory_order_relaxed);
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
      InPlaceSteps widened{wb, steps, nullptr, 0};  // L1/L2-resident copy
      AmxPanel(xa, M, Kp, steps, widened, yp, N, &shape);
    } else {
      WidenedSteps widen{wp, K, steps, ring, ahead};
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

}  // namespace rlm

// 1 when the library was built with AMX-TILE/AMX-BF16 code.
extern "C" int RecursiveLmAmxCompiled() { return RLM_HAVE_AMX; }

// Turns the AMX path on for bf16 panels of at least bf16_min_rows rows and
// int8 panels of at least int8_min_rows rows (<= 0: never), when the library
// has AMX code and the CPU and kernel allow it (AmxUsable, checked once).
// Returns 1 when AMX is on for either format.
extern "C" int RecursiveLmAmxInit(int64_t bf16_min_rows, int64_t int8_min_rows) {
#if RLM_HAVE_AMX
  static const bool usable = rlm::AmxUsable();
  const bool any = usable && (bf16_min_rows > 0 || int8_min_rows > 0);
  rlm::g_amx_min_rows_bf16 = usable && bf16_min_rows > 0 ? bf16_min_rows : INT64_MAX;
  rlm::g_amx_min_rows_int8 = usable && int8_min_rows > 0 ? int8_min_rows : INT64_MAX;
  return any ? 1 : 0;
#else
  (void)bf16_min_rows;
  (void)int8_min_rows;
  return 0;
#endif
}

// Turns the bf16 AMX path's prefetch across chunk boundaries on (1) or off (0)
// for later calls (g_amx_chunk_prefetch); returns the previous setting (-1
// without AMX code).
extern "C" int64_t RecursiveLmAmxChunkPrefetch(int64_t on) {
#if RLM_HAVE_AMX
  return rlm::g_amx_chunk_prefetch.exchange(on ? 1 : 0);
#else
  (void)on;
  return -1;
#endif
}

// Sets the AMX paths' software prefetch distance in bytes (0: none) for later
// calls; returns the previous one (-1 without AMX code).
extern "C" int64_t RecursiveLmAmxPrefetch(int64_t bytes) {
#if RLM_HAVE_AMX
  return rlm::g_amx_prefetch_bytes.exchange(bytes < 0 ? 0 : bytes);
#else
  (void)bytes;
  return -1;
#endif
}

// Native cache attention for decoding, registered as an XLA FFI target:
// recursive_lm_cache_attention: attention of a few queries over a KV cache,
// reading only the slots up to the last one each query may see.
#include "kernels_common.h"

namespace rlm {
namespace {
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
               std::vector<float>& probs, const float*) {
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

// Sum of the 16 lanes (a shuffle tree with AVX-512).
inline float HSum(v16 a) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)a);
#else
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += a[l];
  return s;
#endif
}

// AttendOne for all G query heads of a group at once (D == 16 * C, G <= 4):
// each visible key and value row is loaded once for the G heads (AttendOne
// reads them G times, from L2 once the rows outgrow L1) and a score's 16 lane
// sums reduce by a shuffle tree instead of 16 dependent scalar adds. The same
// math in another summation order. At batch 8 the per-head version took
// ~20% of a bf16 decode step (experiments/profile_decode.py, ffi_call
// f32[24,3,64]; docs/weight_formats.md).
//
// next_k (not null: g_attention_prefetch is on): the keys of the row this
// thread attends next. While the keys are scored, each visible slot's value
// row is prefetched into L2, and while the values are summed, the next row's
// keys are: one thread's K and V reads become one continuous stream instead
// of a cold start per row and per K/V array.
template <int C, int G>
void AttendGroup(const float* q, const float* k, const float* v, const bool* mask,
                 float* out, int64_t S, int64_t D, int64_t, float scale,
                 std::vector<float>& probs, const float* next_k) {
  int64_t last = S;
  while (last > 0 && !mask[last - 1]) --last;
  const bool none = last == 0;  // uniform over all S slots, as in AttendOne
  if (none) last = S;
  const int64_t L = (last + 15) / 16 * 16;
  probs.assign(G * L, 0.f);
  float* pr = probs.data();
  v16 qv[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) qv[g][c] = *(const v16u*)(q + g * D + 16 * c);
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = none ? 0.f : -INFINITY;
  if (!none) {
    for (int64_t j = 0; j < last; ++j) {
      if (!mask[j]) {
        for (int g = 0; g < G; ++g) pr[g * L + j] = -INFINITY;
        continue;
      }
      if (next_k)
        for (int c = 0; c < C; ++c) __builtin_prefetch(v + j * D + 16 * c, 0, 2);
      v16 kj[C];
      for (int c = 0; c < C; ++c) kj[c] = *(const v16u*)(k + j * D + 16 * c);
      for (int g = 0; g < G; ++g) {
        v16 acc = qv[g][0] * kj[0];
        for (int c = 1; c < C; ++c) acc += qv[g][c] * kj[c];
        const float s = HSum(acc) * scale;
        pr[g * L + j] = s;
        mx[g] = s > mx[g] ? s : mx[g];
      }
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* pg = pr + g * L;
    for (int64_t j = last; j < L; ++j) pg[j] = -INFINITY;
    v16 tot = {};
    for (int64_t j = 0; j < L; j += 16) {
      const v16 e = ExpNonPositive(*(v16u*)(pg + j) - mx[g]);
      *(v16u*)(pg + j) = e;
      tot += e;
    }
    float total = 0.f;
    for (int l = 0; l < 16; ++l) total += tot[l];
    inv[g] = 1.f / total;
  }
  v16 acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = (v16){};
  for (int64_t j = 0; j < last; ++j) {
    if (next_k)
      for (int c = 0; c < C; ++c) __builtin_prefetch(next_k + j * D + 16 * c, 0, 2);
    bool any = false;
    for (int g = 0; g < G; ++g) any |= pr[g * L + j] != 0.f;
    if (!any) continue;  // masked (or underflowed) for every head: not read
    v16 vj[C];
    for (int c = 0; c < C; ++c) vj[c] = *(const v16u*)(v + j * D + 16 * c);
    for (int g = 0; g < G; ++g) {
      const float p = pr[g * L + j];
      if (p == 0.f) continue;
      for (int c = 0; c < C; ++c) acc[g][c] += p * vj[c];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) *(v16u*)(out + g * D + 16 * c) = acc[g][c] * inv[g];
}

// 1: groups of up to 4 query heads with D in {16, 32, 64, 128} take
// AttendGroup; 0: AttendOne always (RecursiveLmAttentionGrouped; for A/B
// timings and tests).
std::atomic<int> g_attention_grouped{1};

// 1: AttendGroup prefetches a thread's next K/V rows (see there; the
// default); 0: no software prefetch (RecursiveLmAttentionPrefetch, A/B).
std::atomic<int> g_attention_prefetch{1};

using AttendFn = void (*)(const float*, const float*, const float*, const bool*, float*,
                          int64_t, int64_t, int64_t, float, std::vector<float>&,
                          const float*);

template <int C>
AttendFn GroupFor(int64_t G) {
  switch (G) {
    case 1: return AttendGroup<C, 1>;
    case 2: return AttendGroup<C, 2>;
    case 3: return AttendGroup<C, 3>;
    case 4: return AttendGroup<C, 4>;
    default: return nullptr;
  }
}

AttendFn AttendFor(int64_t D, int64_t G) {
  if (g_attention_grouped.load(std::memory_order_relaxed)) {
    AttendFn f = nullptr;
    switch (D) {
      case 16: f = GroupFor<1>(G); break;
      case 32: f = GroupFor<2>(G); break;
      case 64: f = GroupFor<4>(G); break;
      case 128: f = GroupFor<8>(G); break;
      default: break;
    }
    if (f) return f;
  }
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
  const AttendFn attend = AttendFor(D, G);
  const bool prefetch = g_attention_prefetch.load(std::memory_order_relaxed) != 0;
  ParallelForAhead(pool, N * T, 2, [=](int64_t i0, int64_t i1, int64_t following, bool) {
    std::vector<float> probs;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / T, t = i % T, b = n / H;
      const int64_t after = i + 1 < i1 ? i + 1 : following;  // this thread's next item
      const float* next_k = prefetch && after >= 0 ? kp + (after / T) * S * D : nullptr;
      attend(qp + (n * TG + t * G) * D, kp + n * S * D, vp + n * S * D,
             mp + (b * T + t) * S, op + (n * TG + t * G) * D, S, D, G, scale, probs, next_k);
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace rlm

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecursiveLmCacheAttention, rlm::CacheAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

// Turns the grouped attention kernel on (1) or off (0) for later calls;
// returns the previous setting.
extern "C" int RecursiveLmAttentionGrouped(int on) {
  return rlm::g_attention_grouped.exchange(on ? 1 : 0);
}

// Turns AttendGroup's K/V prefetch on (1) or off (0) for later calls; returns
// the previous setting.
extern "C" int RecursiveLmAttentionPrefetch(int on) {
  return rlm::g_attention_prefetch.exchange(on ? 1 : 0);
}

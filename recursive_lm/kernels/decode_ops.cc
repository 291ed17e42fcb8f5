// Small native ops of a decode step, registered as XLA FFI targets:
// * recursive_lm_argmax: x [..., V] f32 -> int32 [...], the first index of each
//   row's maximum, or of its first NaN when it has one (jnp.argmax's answer);
// * recursive_lm_materialize: a copy of an f32 array. XLA cannot fuse through
//   a custom call, so a value that goes through it is computed once: the RoPE
//   tables (nn/layers.py rope_cos_sin), which XLA otherwise recomputes (cos and
//   sin per element) inside every head's and layer's RoPE fusion;
// * recursive_lm_embed_rows_bf16: rows of a bf16 table [V, D] for int32 ids
//   [...], widened to f32 [..., D] (exact). XLA:CPU gathers a bf16 table in
//   f32 (a whole-table conversion), and a gather of its uint16 bits still
//   copies the whole table (56 MB for SmolLM2's embedding) once per call of
//   a jitted decode loop; this reads only the B rows a step embeds. Ids are
//   taken as jnp.take takes them: negative ids count from the end, ids still
//   outside [0, V) give a row of NaN (take's fill for bf16).
//
// XLA:CPU runs the same reduction (decode/sampling.py: a max, then the least
// index that equals it) as two fusions over the logits, ~0.85 ms per step at
// batch 8 over SmolLM2's 49152 logits (experiments/profile_decode.py,
// docs/weight_formats.md); this reads each row once into L1/L2 for the max
// and again (cached) for the first index, on all threads.
#include "kernels_common.h"

namespace rlm {
namespace {

int32_t ArgmaxRow(const float* x, int64_t V) {
  int64_t i = 0;
  float mx = -INFINITY;
  bool nan = false;
  if (V >= 16) {
    v16 m = (v16){} - INFINITY;
    v16 bad = {};
    for (; i + 16 <= V; i += 16) {
      const v16 a = *(const v16u*)(x + i);
      m = a > m ? a : m;
      bad = a != a ? (v16){} + 1.f : bad;  // NaN lanes
    }
    for (int l = 0; l < 16; ++l) {
      mx = m[l] > mx ? m[l] : mx;
      nan |= bad[l] != 0.f;
    }
  }
  for (; i < V; ++i) {
    mx = x[i] > mx ? x[i] : mx;
    nan |= x[i] != x[i];
  }
  int64_t j = 0;
  if (nan) {
    while (j < V && x[j] == x[j]) ++j;
    return (int32_t)j;
  }
  // The first index equal to the maximum (all -inf: 0, as jnp.argmax).
  for (; j + 16 <= V; j += 16) {
    const v16 a = *(const v16u*)(x + j);
    bool hit = false;
    for (int l = 0; l < 16; ++l) hit |= a[l] == mx;
    if (hit) break;
  }
  while (j < V && x[j] != mx) ++j;
  return (int32_t)(j < V ? j : V - 1);
}

ffi::Error Argmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions();
  if (xd.size() < 1 || xd[xd.size() - 1] < 1) {
    return ffi::Error::InvalidArgument("recursive_lm_argmax: expected x [..., V] with V >= 1");
  }
  const int64_t V = xd[xd.size() - 1];
  const int64_t rows = (int64_t)out->element_count();
  const float* xp = x.typed_data();
  int32_t* op = out->typed_data();
  ParallelFor(pool, rows, 1, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = ArgmaxRow(xp + r * V, V);
  });
  return ffi::Error::Success();
}

ffi::Error Materialize(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  if (x.element_count() != out->element_count()) {
    return ffi::Error::InvalidArgument("recursive_lm_materialize: output size != input size");
  }
  __builtin_memcpy(out->typed_data(), x.typed_data(), x.element_count() * sizeof(float));
  return ffi::Error::Success();
}

ffi::Error EmbedRowsBf16(ffi::Buffer<ffi::BF16> table, ffi::Buffer<ffi::S32> ids,
                         ffi::ResultBuffer<ffi::F32> out) {
  const auto td = table.dimensions();
  if (td.size() != 2 || out->element_count() != ids.element_count() * td[1]) {
    return ffi::Error::InvalidArgument(
        "recursive_lm_embed_rows_bf16: expected table [V, D], ids [...], out [..., D]");
  }
  const int64_t V = td[0], D = td[1], n = (int64_t)ids.element_count();
  const uint16_t* t = reinterpret_cast<const uint16_t*>(table.typed_data());
  const int32_t* ip = ids.typed_data();
  float* op = out->typed_data();
  const uint32_t nan_bits = 0x7fc00000u;
  for (int64_t r = 0; r < n; ++r) {
    int64_t id = ip[r];
    if (id < 0) id += V;
    float* o = op + r * D;
    if (id < 0 || id >= V) {
      for (int64_t d = 0; d < D; ++d) __builtin_memcpy(o + d, &nan_bits, sizeof(float));
      continue;
    }
    const uint16_t* row = t + id * D;
    for (int64_t d = 0; d < D; ++d) {
      const uint32_t b = (uint32_t)row[d] << 16;
      __builtin_memcpy(o + d, &b, sizeof(float));
    }
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace rlm

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecursiveLmArgmax, rlm::Argmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecursiveLmMaterialize, rlm::Materialize,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecursiveLmEmbedRowsBf16, rlm::EmbedRowsBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

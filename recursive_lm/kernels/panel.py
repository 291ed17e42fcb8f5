"""The "panel" kernel layout: dense weights for streaming skinny matmuls.

A kernel ``[in, out]`` is stored as ``[ceil(out / 32), in, 32]``: panel ``p``
holds output columns ``[32p, 32p + 32)`` for every input, contiguously (the
last panel zero-padded). With 1-16 rows of activations, as in decoding, the
native kernel (``cpu_kernels.cc``) reads each panel once, front to back,
which streams the weights at memory bandwidth; other row counts, other
platforms and a machine without the native library use an XLA dot on the
same array (identical results up to float rounding).

Three weight formats share the layout (``WEIGHT_FORMATS``), told apart by the
array's dtype:

* ``f32``: float32 panels.
* ``bf16``: bfloat16 panels whose input rows are *paired*: rows ``2j, 2j+1``
  are interleaved column by column (the order of AVX-512 BF16 dot products),
  an odd last row is stored plainly. The activations are rounded to bf16 and
  the sums are float32, as in a bf16 XLA dot with f32 accumulation.
* ``int8``: int8 panels plus one float32 scale per output column
  (``[ceil(out / 32) * 32]``), symmetric: ``w[k, n] ~= scale[n] * q[k, n]``
  with ``scale[n] = max_k |w[k, n]| / 127``. The kernel widens q to f32 in
  registers and applies the scale to the sums; activations stay float32. (An
  AMX path that widens q to bf16 and rounds the activations to bf16 exists
  but is off by default: measured no faster, see ``native.AMX_MIN_ROWS``.)

On a CPU with AMX (``native.amx()``), bf16 panels of at least
``native.AMX_MIN_ROWS["bf16"]`` rows run on the tile unit: the paired bf16 layout is
AMX's B-tile format as it is. ``native.panel_path(weights, rows)`` names the
path a call takes.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from recursive_lm.kernels import native

PANEL = 32
WEIGHT_FORMATS = ("f32", "bf16", "int8")
# Up to this many rows the native f32 kernel is used by default: it beats XLA's
# GEMM on CPU at every measured row count from 1 to 64 (memory-bound up to 8
# rows, near the FMA peak from 16; results/skinny_matmul.md). Longer inputs
# (prefill) use XLA's blocked GEMM. bf16 and int8 panels use the native kernel
# at every row count (XLA would re-lay or widen the whole weight on each call).
MAX_NATIVE_ROWS = 64


def panels_for(features: int) -> int:
  return -(-features // PANEL)


def to_panels(w: jax.Array) -> jax.Array:
  """[..., in, out] -> [..., ceil(out/32), in, 32] (zero-padded)."""
  *lead, k, n = w.shape
  pad = panels_for(n) * PANEL - n
  if pad:
    w = jnp.pad(w, [(0, 0)] * len(lead) + [(0, 0), (0, pad)])
  w = w.reshape(*lead, k, panels_for(n), PANEL)
  return jnp.swapaxes(w, -3, -2)


def from_panels(w: jax.Array, features: int) -> jax.Array:
  """Inverse of ``to_panels``: [..., P, in, 32] -> [..., in, features]."""
  *lead, p, k, _ = w.shape
  return jnp.swapaxes(w, -3, -2).reshape(*lead, k, p * PANEL)[..., :features]


def _pair_rows(w: jax.Array) -> jax.Array:
  """[..., P, K, 32] plain -> rows 2j, 2j+1 interleaved column by column."""
  *lead, p, k, _ = w.shape
  h = k // 2
  paired = jnp.swapaxes(w[..., :2 * h, :].reshape(*lead, p, h, 2, PANEL), -1, -2)
  return jnp.concatenate([paired.reshape(*lead, p, 2 * h, PANEL), w[..., 2 * h:, :]], -2)


def _unpair_rows(w: jax.Array) -> jax.Array:
  """Inverse of ``_pair_rows``."""
  *lead, p, k, _ = w.shape
  h = k // 2
  plain = jnp.swapaxes(w[..., :2 * h, :].reshape(*lead, p, h, PANEL, 2), -1, -2)
  return jnp.concatenate([plain.reshape(*lead, p, 2 * h, PANEL), w[..., 2 * h:, :]], -2)


def to_bf16_panels(w: jax.Array) -> jax.Array:
  """[..., in, out] (any float dtype) -> bf16 panels with paired rows."""
  return _pair_rows(to_panels(jnp.asarray(w).astype(jnp.bfloat16)))


def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[..., in, out] -> (q int8 [..., in, out], scale f32 [..., out]), symmetric
  per output column (a zero column gets scale 0)."""
  w = jnp.asarray(w).astype(jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=-2) / 127.0
  safe = jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.round(w / safe[..., None, :]), -127, 127).astype(jnp.int8)
  return q, scale


def to_int8_panels(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[..., in, out] -> (int8 panels [..., P, in, 32], scale f32 [..., P * 32])."""
  q, scale = quantize_int8(w)
  pad = panels_for(w.shape[-1]) * PANEL - w.shape[-1]
  return to_panels(q), jnp.pad(scale, [(0, 0)] * (scale.ndim - 1) + [(0, pad)])


def weight_format(w: jax.Array) -> str:
  """The format of a panel kernel, from its dtype."""
  fmt = {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.bfloat16): "bf16",
         jnp.dtype(jnp.int8): "int8"}.get(jnp.dtype(w.dtype))
  if fmt is None:
    raise ValueError(f"panel kernels are float32, bfloat16 or int8, got {w.dtype}; "
                     "convert with nn.model.decode_layout(..., weights=...)")
  return fmt


def dequantized_panels(w: jax.Array, scale: jax.Array | None = None) -> jax.Array:
  """Any-format panels -> plain float32 panels [..., P, in, 32] of the same values."""
  fmt = weight_format(w)
  if fmt == "bf16":
    return _unpair_rows(w).astype(jnp.float32)
  if fmt == "int8":
    return w.astype(jnp.float32) * scale.reshape(*scale.shape[:-1], -1, 1, PANEL)
  return w


def _xla(x2, w, scale):
  fmt = weight_format(w)
  if fmt == "bf16":  # the kernel's math: bf16 inputs, exact products, f32 sums
    return jnp.einsum("mk,pkj->mpj", x2.astype(jnp.bfloat16), _unpair_rows(w),
                      preferred_element_type=jnp.float32).reshape(x2.shape[0], -1)
  if fmt == "int8":
    y = jnp.einsum("mk,pkj->mpj", x2, w.astype(jnp.float32)).reshape(x2.shape[0], -1)
    return y * scale
  return jnp.einsum("mk,pkj->mpj", x2, w).reshape(x2.shape[0], -1)


def _native(x2, w, scale):
  out = jax.ShapeDtypeStruct((x2.shape[0], w.shape[0] * PANEL), jnp.float32)
  fmt = weight_format(w)
  target = {"f32": native.PANEL_MATMUL, "bf16": native.PANEL_MATMUL_BF16,
            "int8": native.PANEL_MATMUL_INT8}[fmt]
  call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
  return call(x2, w, scale) if fmt == "int8" else call(x2, w)


def panel_matmul(x: jax.Array, w: jax.Array, features: int,
                 use_native: bool | None = None, scale: jax.Array | None = None
                 ) -> jax.Array:
  """``x [..., in] @ W`` for W in panel layout ``[P, in, 32]``; returns [..., features].

  ``w`` is float32, bfloat16 (paired rows) or int8 (then ``scale`` [P * 32] is
  required); see the module docstring. The result is float32 for bf16/int8
  weights and x's dtype for f32 weights. ``use_native``: None picks the native
  kernel when it is built (f32: for f32 inputs of at most ``MAX_NATIVE_ROWS``
  rows); True requires it (any row count, for benchmarks); False always uses
  XLA's dot.
  """
  *lead, k = x.shape
  if w.ndim != 3 or w.shape[1] != k or w.shape[2] != PANEL:
    raise ValueError(f"panel kernel must be [P, {k}, {PANEL}], got {w.shape}")
  fmt = weight_format(w)
  if (fmt == "int8") != (scale is not None):
    raise ValueError("int8 panels need their per-column scale (and only they take one)")
  if scale is not None and scale.shape != (w.shape[0] * PANEL,):
    raise ValueError(f"int8 panel scale must be [{w.shape[0] * PANEL}], got {scale.shape}")
  m = math.prod(lead)
  x2 = x.reshape(m, k)
  if fmt != "f32":
    x2 = x2.astype(jnp.float32)
    scale = None if scale is None else scale.astype(jnp.float32)
  f32 = x2.dtype == jnp.float32
  if use_native is None:
    use_native = f32 and (fmt != "f32" or m <= MAX_NATIVE_ROWS) and native.load()
  elif use_native and not (f32 and native.load()):
    raise RuntimeError("the native panel matmul needs float32 inputs and a built "
                       f"library: {native.status()}")
  if use_native:
    y = jax.lax.platform_dependent(x2, w, scale, cpu=_native, default=_xla)
  else:
    y = _xla(x2, w, scale)
  return y[:, :features].reshape(*lead, features)


def int8_panels_from_panels(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Float panels [..., P, in, 32] -> (int8 panels, scale f32 [..., P * 32])."""
  *lead, p, k, _ = w.shape
  plain = jnp.swapaxes(w.astype(jnp.float32), -3, -2).reshape(*lead, k, p * PANEL)
  q, scale = quantize_int8(plain)
  return to_panels(q), scale

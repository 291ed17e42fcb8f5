"""The "panel" kernel layout: dense weights for streaming skinny matmuls.

A kernel ``[in, out]`` is stored as ``[ceil(out / 32), in, 32]``: panel ``p``
holds output columns ``[32p, 32p + 32)`` for every input, contiguously (the
last panel zero-padded). With 1-16 rows of activations, as in decoding, the
native kernel (``cpu_kernels.cc``) reads each panel once, front to back,
which streams the weights at memory bandwidth; other row counts, other
platforms and a machine without the native library use an XLA dot on the
same array (identical results up to float rounding).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from recursive_lm.kernels import native

PANEL = 32
# Up to this many rows the native kernel is used by default: it beats XLA's
# GEMM on CPU at every measured row count from 1 to 64 (memory-bound up to 8
# rows, near the FMA peak from 16; results/skinny_matmul.md). Longer inputs
# (prefill) use XLA's blocked GEMM.
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


def _xla(x2, w):
  return jnp.einsum("mk,pkj->mpj", x2, w).reshape(x2.shape[0], -1)


def _native(x2, w):
  out = jax.ShapeDtypeStruct((x2.shape[0], w.shape[0] * PANEL), jnp.float32)
  return jax.ffi.ffi_call(native.PANEL_MATMUL, out, vmap_method="sequential")(x2, w)


def panel_matmul(x: jax.Array, w: jax.Array, features: int,
                 use_native: bool | None = None) -> jax.Array:
  """``x [..., in] @ W`` for W in panel layout ``[P, in, 32]``; returns [..., features].

  ``use_native``: None picks the native kernel for f32 inputs of at most
  ``MAX_NATIVE_ROWS`` rows when it is built; True requires it (any row count,
  for benchmarks); False always uses XLA's dot.
  """
  *lead, k = x.shape
  if w.ndim != 3 or w.shape[1] != k or w.shape[2] != PANEL:
    raise ValueError(f"panel kernel must be [P, {k}, {PANEL}], got {w.shape}")
  m = math.prod(lead)
  x2 = x.reshape(m, k)
  f32 = x2.dtype == jnp.float32 and w.dtype == jnp.float32
  if use_native is None:
    use_native = m <= MAX_NATIVE_ROWS and f32 and native.load()
  elif use_native and not (f32 and native.load()):
    raise RuntimeError("the native panel matmul needs float32 inputs and a built "
                       f"library: {native.status()}")
  if use_native:
    y = jax.lax.platform_dependent(x2, w, cpu=_native, default=_xla)
  else:
    y = _xla(x2, w)
  return y[:, :features].reshape(*lead, features)

"""Attention of a few queries over a KV cache, with a native CPU kernel.

``cache_attention`` computes what ``nn.layers.attend_cache`` computes with XLA
(softmax over the visible slots of each query, uniform when none is visible)
but reads only the slots up to the last visible one, and keeps the scores of
a query group in registers: at batch 8, XLA's batched matmuls over the static
cache took ~200 us per layer for ~1 MB of keys (results/bench_decode.md).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.kernels import native

# Query rows (batch x query tokens) up to which the native kernel is used.
MAX_NATIVE_QUERIES = 64


def usable(q_rows: int, dtype) -> bool:
  return q_rows <= MAX_NATIVE_QUERIES and jnp.dtype(dtype) == jnp.float32 and native.load()


def cache_attention(q, k, v, mask, fallback):
  """q [N, T*G, D], k/v [N, S, D] (N = B*Hkv), mask [B, T, S] bool -> [N, T*G, D].

  ``fallback(q, k, v, mask)`` is the XLA computation used off CPU and when the
  native library is unavailable.
  """
  if not native.load():
    return fallback(q, k, v, mask)
  scale = 1.0 / math.sqrt(q.shape[-1])

  def native_call(q, k, v, mask):
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    # vmap (MoR depth-wise batching vmaps the model) loops over the calls.
    call = jax.ffi.ffi_call(native.CACHE_ATTENTION, out, vmap_method="sequential")
    return call(q, k, v, mask, scale=np.float32(scale))

  return jax.lax.platform_dependent(q, k, v, mask, cpu=native_call, default=fallback)

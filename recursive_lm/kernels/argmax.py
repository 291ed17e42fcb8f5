"""Greedy token choice with a native CPU kernel (``argmax.cc``).

``argmax(logits, fallback)`` gives what ``decode.sampling.argmax`` gives (the
first index of each row's maximum, the first NaN where a row has one, as
int32) in one FFI call on CPU; ``fallback`` is the XLA computation used off
CPU, for other dtypes, without the native library, or with ``ENABLED`` False.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from recursive_lm.kernels import native

# Read at trace time (a function traced with it off keeps XLA's reduction):
# for A/B timings.
ENABLED = True


def argmax(logits: jax.Array, fallback) -> jax.Array:
  if (not ENABLED or logits.dtype != jnp.float32 or logits.ndim < 1 or logits.shape[-1] < 1
      or not native.load()):
    return fallback(logits)

  def native_call(x):
    out = jax.ShapeDtypeStruct(x.shape[:-1], jnp.int32)
    return jax.ffi.ffi_call(native.ARGMAX, out, vmap_method="sequential")(x)

  return jax.lax.platform_dependent(logits, cpu=native_call, default=fallback)

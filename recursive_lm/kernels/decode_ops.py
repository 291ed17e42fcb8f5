"""Small native CPU ops of a decode step (``decode_ops.cc``).

``argmax(logits, fallback)`` gives what ``decode.sampling.argmax`` gives (the
first index of each row's maximum, the first NaN where a row has one, as
int32) in one FFI call on CPU; ``fallback`` is the XLA computation used off
CPU, for other dtypes, without the native library, or with ``NATIVE_ARGMAX``
False.

``materialize(x)``: ``x`` unchanged, computed once: on CPU an f32 array goes
through a native copy, which XLA cannot fuse into its consumers (used for the
RoPE tables: ``nn.layers.rope_cos_sin``); elsewhere, or with ``MATERIALIZE``
False, ``x`` itself.

``embed_rows(table, ids, fallback)``: ``table[ids]`` widened to f32 for a
bf16 table, on CPU one native call that reads only those rows (XLA copies
the whole table per call of the jitted loop, ~43 ms for SmolLM2's 56 MB
table); ``fallback(table, ids)`` elsewhere, for other dtypes, without the
native library, or with ``NATIVE_EMBED`` False.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from recursive_lm.kernels import native

# Read at trace time (a function traced with one off keeps XLA's own ops): for
# A/B timings.
NATIVE_ARGMAX = True
MATERIALIZE = True
NATIVE_EMBED = True


def argmax(logits: jax.Array, fallback) -> jax.Array:
  if (not NATIVE_ARGMAX or logits.dtype != jnp.float32 or logits.ndim < 1 or logits.shape[-1] < 1
      or not native.load()):
    return fallback(logits)

  def native_call(x):
    out = jax.ShapeDtypeStruct(x.shape[:-1], jnp.int32)
    return jax.ffi.ffi_call(native.ARGMAX, out, vmap_method="sequential")(x)

  return jax.lax.platform_dependent(logits, cpu=native_call, default=fallback)


def materialize(x: jax.Array) -> jax.Array:
  if not MATERIALIZE or x.dtype != jnp.float32 or x.size == 0 or not native.load():
    return x

  def native_call(x):
    call = jax.ffi.ffi_call(native.MATERIALIZE, jax.ShapeDtypeStruct(x.shape, x.dtype),
                            vmap_method="broadcast_all")
    return call(x)

  return jax.lax.platform_dependent(x, cpu=native_call, default=lambda x: x)


def embed_rows(table: jax.Array, ids: jax.Array, fallback) -> jax.Array:
  if (not NATIVE_EMBED or table.dtype != jnp.bfloat16 or table.ndim != 2
      or not jnp.issubdtype(ids.dtype, jnp.integer) or ids.size == 0 or not native.load()):
    return fallback(table, ids)

  def native_call(table, ids):
    out = jax.ShapeDtypeStruct(ids.shape + table.shape[1:], jnp.float32)
    return jax.ffi.ffi_call(native.EMBED_ROWS_BF16, out, vmap_method="sequential")(
        table, ids.astype(jnp.int32))

  return jax.lax.platform_dependent(table, ids, cpu=native_call, default=fallback)

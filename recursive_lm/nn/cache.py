"""The KV cache of every decode path: one pytree layout, one "no write" slot.

Layout (a dict pytree, what ``Transformer`` reads and writes in cache mode):

* ``"prelude"`` / ``"coda"``: one (keys, values) pair per layer, each
  [B, Hkv, S, Dh];
* ``"block"``: one pair per shared-block layer, [N, B, Hkv, S, Dh] (one slice
  per loop);
* ``"block_valid"`` (MoR only): [N, B, S] bool, which slots hold a key at
  each recursion.

Slot == position. A write to a slot outside [0, S) is dropped: ``no_write(cache)``
(= S) is the one sentinel for "this row / token writes nothing".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def init_cache(cfg, batch: int, length: int, dtype=None) -> dict:
  """Zero KV cache for ``batch`` rows of ``length`` slots (slot == position)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
  z = lambda *lead: jnp.zeros(lead + shape, dtype)
  cache = {
      "prelude": [(z(), z()) for _ in range(cfg.plan.prelude)],
      "block": [(z(cfg.plan.loops), z(cfg.plan.loops)) for _ in range(cfg.plan.block)],
      "coda": [(z(), z()) for _ in range(cfg.plan.coda)],
  }
  if cfg.router is not None:  # MoR: which slots hold a key at each recursion
    cache["block_valid"] = jnp.zeros((cfg.plan.loops, batch, length), bool)
  return cache


def cache_length(cache: dict) -> int:
  """Slots S of a cache (block keys are [N, B, Hkv, S, Dh])."""
  return cache["block"][0][0].shape[3]


def no_write(cache: dict) -> int:
  """The write slot that writes nothing (out of range: dropped)."""
  return cache_length(cache)


def write_slots(cache: dict, pos: Array, writes: Array) -> Array:
  """``pos`` where ``writes`` else the no-write slot (same shape)."""
  return jnp.where(writes, pos, no_write(cache))


def normalize_cache(cache: dict) -> dict:
  """One pytree structure (lists of (k, v) tuples) for every producer of a
  cache (``Transformer``, ``nn.unrolled``), so they can share a loop carry."""
  return {g: (v if g == "block_valid" else [tuple(c) for c in v])
          for g, v in cache.items()}

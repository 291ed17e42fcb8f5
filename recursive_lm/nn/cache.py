"""The KV cache of every decode path: one pytree type, one "no write" slot.

:class:`KVCache` (a ``flax.struct`` dataclass, so a pytree that ``jit``,
``lax.while_loop`` and ``lax.cond`` carry) holds

* ``prelude`` / ``coda``: one (keys, values) pair per layer, each [B, Hkv, S, Dh];
* ``block``: one pair per shared-block layer, [N, B, Hkv, S, Dh] (one slice per
  loop);
* ``valid`` (Mixture-of-Recursions only, else None): [N, B, S] bool, which
  slots hold a key at each recursion (attention at recursion n sees only
  those; a token that skipped recursion n wrote nothing there).

Slot == position. A write to a slot outside [0, S) is dropped: ``no_write``
(= S) is the one sentinel for "this row / token writes nothing", for the
layers' K/V scatter and the MoR validity alike.

Producers (``init_cache``, ``Transformer`` in cache mode, ``nn.unrolled``)
return a ``KVCache`` whose groups are tuples of (k, v) tuples, so every
producer yields the same pytree structure (a loop carry can mix them).
Consumers also take the former dict layout (``{"prelude", "block", "coda"}``
plus ``"block_valid"`` for MoR): ``KVCache`` reads as a read-only mapping with
those keys (``cache["block"]``, ``cache.items()``, ``dict(cache, block=...)``)
and ``as_kv_cache`` / ``normalize_cache`` turn such a dict back into the type.
The fields are declared in the dict's sorted key order (block, block_valid,
coda, prelude), so ``jax.tree_util.tree_leaves`` lists the buffers in the same
order for both.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
_GROUPS = ("prelude", "block", "coda")
VALID_KEY = "block_valid"  # the validity's name in the mapping view / dict layout


def _pairs(layers) -> tuple:
  return tuple(tuple(kv) for kv in layers)


@flax.struct.dataclass
class KVCache(Mapping):
  """Prelude / block / coda K/V and MoR's per-recursion validity (module docstring)."""
  block: tuple = ()                # ((k, v), ...) per block layer, [N, B, Hkv, S, Dh]
  valid: Array | None = None       # MoR: [N, B, S] bool, else None
  coda: tuple = ()                 # ((k, v), ...) per coda layer, [B, Hkv, S, Dh]
  prelude: tuple = ()              # ((k, v), ...) per prelude layer, [B, Hkv, S, Dh]

  def __post_init__(self):
    for g in _GROUPS:  # lists from older producers -> one canonical structure
      object.__setattr__(self, g, _pairs(getattr(self, g)))

  # -- sizes and the no-write slot --------------------------------------------
  @property
  def length(self) -> int:
    """Slots S."""
    return self._any_keys().shape[-2]

  @property
  def batch(self) -> int:
    """Rows B."""
    return self.block[0][0].shape[1] if self.block else self._any_keys().shape[0]

  @property
  def no_write(self) -> int:
    """The write slot that writes nothing (out of range: dropped)."""
    return self.length

  def write_slots(self, pos: Array, writes: Array) -> Array:
    """``pos`` where ``writes`` else the no-write slot (same shape)."""
    return jnp.where(writes, pos, self.no_write)

  def _any_keys(self) -> Array:
    for g in ("block", "prelude", "coda"):
      if getattr(self, g):
        return getattr(self, g)[0][0]
    raise ValueError("empty KVCache: build it with init_cache(cfg, batch, length)")

  # -- one layer ----------------------------------------------------------------
  def with_layer(self, group: str, idx: int, kv) -> "KVCache":
    """The cache with layer ``idx`` of ``group`` ("prelude" | "block" |
    "coda") replaced by the (keys, values) pair ``kv``."""
    layers = list(getattr(self, group))
    layers[idx] = tuple(kv)
    return self.replace(**{group: tuple(layers)})

  # -- rows ----------------------------------------------------------------------
  def rows(self, idx: Array) -> "KVCache":
    """The cache of rows ``idx`` [R] (a gather: [R, ...] everywhere)."""
    take = lambda x, ax: jnp.take(x, idx, axis=ax)
    return KVCache(
        prelude=[(take(k, 0), take(v, 0)) for k, v in self.prelude],
        block=[(take(k, 1), take(v, 1)) for k, v in self.block],
        coda=[(take(k, 0), take(v, 0)) for k, v in self.coda],
        valid=None if self.valid is None else take(self.valid, 1))

  def set_rows(self, idx: Array, rows: "KVCache | Mapping") -> "KVCache":
    """Writes ``rows`` (a cache of R rows) back at rows ``idx`` [R]; an index
    outside [0, B) writes nothing (the rows' no-write sentinel is B)."""
    rows = as_kv_cache(rows)

    def put(dst, src, lead):
      at = (slice(None),) * lead + (idx,)
      return dst.at[at].set(src.astype(dst.dtype), mode="drop")

    pairs = lambda g, lead: [(put(k, rk, lead), put(v, rv, lead)) for (k, v), (rk, rv)
                             in zip(getattr(self, g), getattr(rows, g))]
    return KVCache(prelude=pairs("prelude", 0), block=pairs("block", 1),
                   coda=pairs("coda", 0),
                   valid=None if self.valid is None else put(self.valid, rows.valid, 1))

  def clear_valid(self, rows: Array) -> "KVCache":
    """MoR: every slot of the rows where ``rows`` [B] is True marked empty at
    every recursion (a new sequence starts there)."""
    if self.valid is None:
      return self
    return self.replace(valid=jnp.where(rows[None, :, None], False, self.valid))

  # -- the read-only mapping view of the former dict layout -----------------------
  def __getitem__(self, key: str):
    if key in _GROUPS:
      return getattr(self, key)
    if key == VALID_KEY and self.valid is not None:
      return self.valid
    raise KeyError(key)

  def __iter__(self):
    yield from _GROUPS
    if self.valid is not None:
      yield VALID_KEY

  def __len__(self) -> int:
    return len(_GROUPS) + (self.valid is not None)


def as_kv_cache(cache: KVCache | Mapping[str, Any]) -> KVCache:
  """``cache`` as a ``KVCache`` (a dict in the former layout is converted)."""
  if isinstance(cache, KVCache):
    return cache
  missing = [g for g in _GROUPS if g not in cache]
  if missing:
    raise ValueError(f"a KV cache needs the groups {list(_GROUPS)} (missing {missing}); "
                     "build it with nn.cache.init_cache(cfg, batch, length)")
  return KVCache(prelude=cache["prelude"], block=cache["block"], coda=cache["coda"],
                 valid=cache.get(VALID_KEY))


def init_cache(cfg, batch: int, length: int, dtype=None) -> KVCache:
  """Zero KV cache for ``batch`` rows of ``length`` slots (slot == position);
  MoR configs (``cfg.router`` set) also get an all-False validity."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
  z = lambda *lead: jnp.zeros(lead + shape, dtype)
  return KVCache(
      prelude=[(z(), z()) for _ in range(cfg.plan.prelude)],
      block=[(z(cfg.plan.loops), z(cfg.plan.loops)) for _ in range(cfg.plan.block)],
      coda=[(z(), z()) for _ in range(cfg.plan.coda)],
      valid=(jnp.zeros((cfg.plan.loops, batch, length), bool)
             if cfg.router is not None else None))


def cache_length(cache) -> int:
  """Slots S of a cache (block keys are [N, B, Hkv, S, Dh])."""
  return cache["block"][0][0].shape[3]


def no_write(cache) -> int:
  """The write slot that writes nothing (out of range: dropped)."""
  return cache_length(cache)


def write_slots(cache, pos: Array, writes: Array) -> Array:
  """``pos`` where ``writes`` else the no-write slot (same shape)."""
  return jnp.where(writes, pos, no_write(cache))


def normalize_cache(cache) -> KVCache:
  """One pytree structure for every producer of a cache (``Transformer``,
  ``nn.unrolled``, dicts built by older helpers), so they can share a loop
  carry: the ``KVCache`` with tuple groups."""
  return as_kv_cache(cache)

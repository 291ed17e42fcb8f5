"""The model's depth, one layer at a time: pure functions over ``Transformer`` params.

Early exiting, self-speculation and depth-wise batching need to stop and
restart the forward pass between layers. These functions apply the pieces of
the one model (embedding, any layer of the unrolled depth plan, the shared
final norm + LM head) to the same parameter tree and KV cache that
``Transformer`` uses, so a model trained or converted anywhere in the library
runs here unchanged:

* ``embed(cfg, params, tokens)``
* ``run_layers(cfg, params, start, end, h, positions, cache, write_slots)``:
  unrolled layers ``[start, end)`` (static ints) in cache mode, writing KV at
  per-row ``write_slots`` (slot == position; out-of-range slots write nothing);
  the cache functions return a ``nn.cache.KVCache``;
* ``apply_loop(cfg, params, loop, h, ...)``: the K shared-block layers at a
  loop index that may differ per row (``loop`` int or int array [B]): per-row
  LoRA and per-row cache depth are gathered; this is depth-wise batching's step;
* ``propagate_kv(...)``: CALM state copying: K/V of layers ``[start, end)``
  projected from one (exit) state, no attention or MLP;
* ``head(cfg, params, h)``: final norm + LM head (every exit shares it);
* ``hidden_states(cfg, params, tokens, exit_layers)``: sequence-mode forward
  returning the residual state after each listed layer (exit training).

Unrolled index ``i`` follows ``cfg.plan.unrolled()``: prelude layers, then
loop 0 of the block's K layers, loop 1, ..., then coda layers. Exits after
each loop sit at ``loop_exits(cfg)``.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from recursive_lm.config import ModelConfig
from recursive_lm.nn import layers as L
from recursive_lm.nn.cache import as_kv_cache
from recursive_lm.nn.model import Transformer

Array = jax.Array


def loop_exits(cfg: ModelConfig) -> list[int]:
  """Unrolled layer counts after each loop of the shared block (the last one
  includes the coda, i.e. it is the full depth)."""
  p, k, n = cfg.plan.prelude, cfg.plan.block, cfg.plan.loops
  out = [p + k * (i + 1) for i in range(n)]
  out[-1] = cfg.plan.effective_depth
  return out


def embed(cfg: ModelConfig, params, tokens: Array) -> Array:
  return Transformer(cfg).apply({"params": params}, tokens, method="embed_tokens")


def head(cfg: ModelConfig, params, h: Array) -> Array:
  """Final norm + LM head on raw residual states h [..., D] -> logits."""
  lead = h.shape[:-1]
  h2 = h.reshape((-1, 1, h.shape[-1]))
  out = Transformer(cfg).apply({"params": params}, h2, method="head")
  return out.reshape(lead + out.shape[-1:])


def rope_and_mask(cfg: ModelConfig, positions: Array, kv_len: int):
  cos, sin = L.rope_cos_sin(cfg.rope, cfg.head_dim, positions)
  return cos, sin, L.attention_mask(positions, None, kv_len, True)


def _loop_lora(cfg: ModelConfig, params, k: int, loop):
  """LoRA factors of block layer k at ``loop`` (int, or [B] array: per row)."""
  if not cfg.lora:
    return None
  bank = params["lora"]
  out = {}
  for t in cfg.lora:
    a, b = bank[f"layer_{k}_{t}_a"], bank[f"layer_{k}_{t}_b"]
    out[t] = (a[loop], b[loop])  # [in, r] or [B, in, r] (batched matmul)
  return out


def _layer_params(cfg: ModelConfig, params, unit):
  group, idx, _ = unit
  if group == "block":
    return params["block"][f"layer_{idx}"]
  return params[f"{group}_{idx}"]


def _read_cache(cache, unit, loop):
  group, idx, _ = unit
  if cache is None:
    return None
  if group != "block":
    return cache[group][idx]
  ck, cv = cache["block"][idx]
  if isinstance(loop, int):
    return ck[loop], cv[loop]
  rows = jnp.arange(ck.shape[1])
  return ck[loop, rows], cv[loop, rows]


def _write_cache(cache, unit, loop, new):
  """The cache (a ``KVCache``; a dict in the former layout is converted) with
  the layer's new (keys, values) written at ``loop``."""
  group, idx, _ = unit
  if cache is None:
    return None
  cache = as_kv_cache(cache)
  if group != "block":
    return cache.with_layer(group, idx, new)
  ck, cv = cache.block[idx]
  if isinstance(loop, int):
    return cache.with_layer("block", idx, (ck.at[loop].set(new[0]), cv.at[loop].set(new[1])))
  rows = jnp.arange(ck.shape[1])
  return cache.with_layer("block", idx, (ck.at[loop, rows].set(new[0]),
                                         cv.at[loop, rows].set(new[1])))


def _apply_unit(cfg, params, unit, loop, h, cos, sin, mask, cache, write_slots):
  lora = _loop_lora(cfg, params, unit[1], loop) if unit[0] == "block" else None
  c = _read_cache(cache, unit, loop)
  h, c2 = L.DecoderLayer(cfg).apply({"params": _layer_params(cfg, params, unit)},
                                    h, cos, sin, mask, c, write_slots, lora)
  return h, _write_cache(cache, unit, loop, c2) if cache is not None else None


def run_layers(cfg: ModelConfig, params, start: int, end: int, h: Array,
               positions: Array, cache, write_slots: Array | None = None):
  """Unrolled layers [start, end) on h [B, T, D] at positions [B, T] (cache mode).

  Returns (h, cache). ``write_slots`` defaults to ``positions``.
  """
  units = cfg.plan.unrolled()
  if not 0 <= start <= end <= len(units):
    raise ValueError(f"layer range [{start}, {end}) outside the model's "
                     f"{len(units)} unrolled layers")
  if write_slots is None:
    write_slots = positions
  cache = as_kv_cache(cache)
  cos, sin, mask = rope_and_mask(cfg, positions, cache.length)
  for i in range(start, end):
    h, cache = _apply_unit(cfg, params, units[i], units[i][2], h, cos, sin, mask,
                           cache, write_slots)
  return h, cache


def apply_loop(cfg: ModelConfig, params, loop, h: Array, positions: Array, cache,
               write_slots: Array | None = None):
  """The shared block's K layers at loop index ``loop`` (int or [B] per row)."""
  if write_slots is None:
    write_slots = positions
  cache = as_kv_cache(cache)
  cos, sin, mask = rope_and_mask(cfg, positions, cache.length)
  if not isinstance(loop, int):
    loop = jnp.asarray(loop, jnp.int32)
  for k in range(cfg.plan.block):
    h, cache = _apply_unit(cfg, params, ("block", k, None), loop, h, cos, sin, mask,
                           cache, write_slots)
  return h, cache


class _KVProjection(nn.Module):
  """The K/V half of a DecoderLayer's attention (same param names)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h, cos, sin, lora):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    x = L.RMSNorm(cfg.norm_eps, dt, pdt, name="attn_norm")(h)
    return _KVAttn(cfg, name="attn")(x, cos, sin, lora or {})


class _KVAttn(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, lora):
    cfg = self.cfg
    hq, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q_k_v = (("q", hq * dh, (L.EMBED, L.HEADS)), ("k", hkv * dh, (L.EMBED, L.KV_HEADS)),
             ("v", hkv * dh, (L.EMBED, L.KV_HEADS)))
    parts = q_k_v if cfg.fused_projections else q_k_v[1:]
    outs = L.projections(self, cfg, x, parts, "qkv", lora)
    k, v = outs[-2], outs[-1]
    b, t, _ = x.shape
    k = L.apply_rope(k.reshape(b, t, hkv, dh), cos, sin)
    return k, v.reshape(b, t, hkv, dh)


def propagate_kv(cfg: ModelConfig, params, start: int, end: int, h: Array,
                 positions: Array, cache, write_slots: Array | None = None):
  """CALM state copying: write K/V of layers [start, end) computed from the
  single state ``h`` (the exit layer's state), skipping attention and MLP."""
  units = cfg.plan.unrolled()
  if write_slots is None:
    write_slots = positions
  cache = as_kv_cache(cache)
  cos, sin = L.rope_cos_sin(cfg.rope, cfg.head_dim, positions)
  for i in range(start, end):
    unit = units[i]
    lora = _loop_lora(cfg, params, unit[1], unit[2]) if unit[0] == "block" else None
    k, v = _KVProjection(cfg).apply({"params": _layer_params(cfg, params, unit)},
                                    h, cos, sin, lora)
    ck, cv = _read_cache(cache, unit, unit[2])
    cache = _write_cache(cache, unit, unit[2], (L.scatter_kv(ck, k, write_slots),
                                                L.scatter_kv(cv, v, write_slots)))
  return cache


def hidden_states(cfg: ModelConfig, params, tokens: Array,
                  exit_layers: Sequence[int], segment_ids: Array | None = None,
                  positions: Array | None = None):
  """Sequence-mode forward; returns (states [E, B, T, D] after each layer count
  in ``exit_layers`` (1-based unrolled counts, e.g. ``loop_exits(cfg)``), final
  h [B, T, D]). Differentiable; used by the exit losses."""
  units = cfg.plan.unrolled()
  exit_layers = sorted(set(int(e) for e in exit_layers))
  if not exit_layers or exit_layers[0] < 1 or exit_layers[-1] > len(units):
    raise ValueError(f"exit_layers must lie in [1, {len(units)}], got {exit_layers}")
  b, t = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cos, sin = L.rope_cos_sin(cfg.rope, cfg.head_dim, positions)
  mask = L.attention_mask(positions, segment_ids)
  h = embed(cfg, params, tokens)
  states = []
  for i in range(exit_layers[-1]):
    h, _ = _apply_unit(cfg, params, units[i], units[i][2], h, cos, sin, mask, None, None)
    if i + 1 in exit_layers:
      states.append(h)
  return jnp.stack(states), h

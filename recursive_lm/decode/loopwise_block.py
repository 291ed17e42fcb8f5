"""The shared block at a per-row loop, without per-row cache copies.

Loop-wise serving applies one loop of the shared block to every slot, each at
its own loop index. ``decode.depth.apply_loop`` does this by gathering each
row's cache slice ``ck[loop[b], b]`` (a copy of every row's keys and values
per layer and step) and scattering the whole updated slice back. Here the
block cache keeps its static layout ``[N, P, Hkv, S, Dh]`` and

* the new key/value of each row is written into its one slot
  ``(loop[b], b, :, pos[b])`` of the flat ``[N*P*Hkv, S, Dh]`` view (in place);
* attention reads that view directly: the query of row b is offered to all N
  depth slices, the mask of every slice but ``loop[b]`` shows only slot 0, and
  the native CPU kernel (``kernels.attention``) reads slots only up to the last
  visible one, so each row reads its own keys plus one slot per other depth.
  Without the native kernel (other backends, non-f32) rows are gathered as in
  ``decode.depth``.

``fill_kv`` is CALM state copying for a few rows (the tokens that exited this
step): K/V of the deeper loops' layers and of the coda projected from the exit
state, written into each row's slot; with fused projections it reads only the
k/v part of the fused kernel.

Params and layer names are those of ``nn.layers.DecoderLayer``, so any model of
the library runs here unchanged.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recursive_lm.config import ModelConfig
from recursive_lm.decode import depth as D
from recursive_lm.kernels import attention as native_attention
from recursive_lm.kernels import native
from recursive_lm.kernels.panel import PANEL
from recursive_lm.nn import layers as L
from recursive_lm.nn.cache import as_kv_cache

Array = jax.Array


class _QKV(nn.Module):
  """q, k, v projections (+RoPE) with the param names of ``layers.Attention``."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, lora):
    cfg = self.cfg
    hq, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = L.projections(self, cfg, x, (("q", hq * dh, (L.EMBED, L.HEADS)),
                                           ("k", hkv * dh, (L.EMBED, L.KV_HEADS)),
                                           ("v", hkv * dh, (L.EMBED, L.KV_HEADS))),
                            "qkv", lora)
    b, t, _ = x.shape
    q = L.apply_rope(q.reshape(b, t, hq, dh), cos, sin)
    k = L.apply_rope(k.reshape(b, t, hkv, dh), cos, sin)
    return q, k, v.reshape(b, t, hkv, dh)


def _linear(cfg: ModelConfig, features: int, axes, p, x, lora=None):
  dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  return L.Linear(features, axes, cfg.lora_scale, dt, pdt, cfg.kernel_layout).apply(
      {"params": p}, x, lora)


def _norm(cfg: ModelConfig, p, x):
  dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  return L.RMSNorm(cfg.norm_eps, dt, pdt).apply({"params": p}, x)


def native_depth_attention(cfg: ModelConfig) -> bool:
  """Whether the masked all-depth read of the native kernel is used."""
  return jnp.dtype(cfg.dtype) == jnp.float32 and native.load()


def _flat_rows(loop: Array, p: int, hkv: int, slots: Array | None = None) -> Array:
  """Rows of the flat [N*P*Hkv, S, Dh] view holding (loop[r], slots[r], h):
  [R, Hkv] (``slots`` default: every slot, R = P; slot P: clipped to P - 1)."""
  b = jnp.arange(p, dtype=jnp.int32) if slots is None else jnp.minimum(slots, p - 1)
  return (loop[:, None] * p + b[:, None]) * hkv + jnp.arange(hkv, dtype=jnp.int32)[None]


def _attend(cfg: ModelConfig, q: Array, ck: Array, cv: Array, loop: Array, pos: Array,
            rows: Array | None = None):
  """q [R, 1, H, Dh] of slots ``rows`` [R] (default: every slot, R = P; slot P:
  padding) over block cache [N, P, Hkv, S, Dh] at depth loop[r], slots <= pos[r].
  Returns [R, H*Dh]."""
  n, p, hkv, s, dh = ck.shape
  r, _, h, _ = q.shape
  dt = jnp.dtype(cfg.dtype)
  slots = jnp.arange(s, dtype=jnp.int32)
  visible = slots[None, :] <= pos[:, None]                                  # [R, S]
  if not native_depth_attention(cfg):
    at = jnp.arange(p) if rows is None else jnp.minimum(rows, p - 1)
    mask = visible[:, None, None, None, :]
    out = L.attend_cache(q, ck[loop, at], cv[loop, at], mask, dt)       # [R, 1, H*Dh]
    return out.reshape(r, h * dh)                                         # as the native path
  if rows is not None:
    # The R rows' queries at their slots of a P-row query; every other slot
    # sees only slot 0 of each depth (the native kernel reads a row's slots
    # only up to its last visible one), so the cache is read in place.
    q = jnp.zeros((p,) + q.shape[1:], q.dtype).at[rows].set(q, mode="drop")
    loop_p = jnp.zeros((p,), loop.dtype).at[rows].set(loop, mode="drop")
    visible = jnp.broadcast_to(slots == 0, (p, s)).at[rows].set(visible, mode="drop")
    out = _attend_all(cfg, q, ck, cv, loop_p, visible)
    return out[jnp.minimum(rows, p - 1)]
  return _attend_all(cfg, q, ck, cv, loop, visible)


def _attend_all(cfg: ModelConfig, q: Array, ck: Array, cv: Array, loop: Array,
                visible: Array):
  """The native all-depth read for every slot: q [P, 1, H, Dh], visible [P, S]."""
  n, p, hkv, s, dh = ck.shape
  h = q.shape[2]
  g = h // hkv
  dt = jnp.dtype(cfg.dtype)
  slots = jnp.arange(s, dtype=jnp.int32)
  own = jnp.arange(n, dtype=jnp.int32)[:, None] == loop[None, :]            # [N, P]
  mask = jnp.where(own[:, :, None], visible[None], (slots == 0)[None, None])  # [N, P, S]
  qf = q.reshape(p, hkv, g, dh).reshape(1, p * hkv, g, dh)
  qf = jnp.broadcast_to(qf, (n, p * hkv, g, dh)).reshape(n * p * hkv, g, dh)
  kf, vf = ck.reshape(n * p * hkv, s, dh), cv.reshape(n * p * hkv, s, dh)
  fallback = lambda q, k, v, m: L._attend_flat(q, k, v, m, hkv, dt)  # pylint: disable=protected-access
  out = native_attention.cache_attention(qf, kf, vf, mask.reshape(n * p, 1, s), fallback)
  out = out.reshape(n, p, h * dh)
  return jnp.take_along_axis(out, loop[None, :, None], axis=0)[0]          # [P, H*Dh]


def _write_slot(c: Array, new: Array, loop: Array, slot: Array,
                rows: Array | None = None) -> Array:
  """c [N, P, Hkv, S, Dh] <- new [R, Hkv, Dh] at (loop[r], rows[r], :, slot[r])
  (``rows`` default: every slot, R = P); slot S: none."""
  n, p, hkv, s, dh = c.shape
  flat_rows = _flat_rows(loop, p, hkv, rows)
  flat = c.reshape(n * p * hkv, s, dh)
  flat = flat.at[flat_rows, slot[:, None]].set(new.astype(c.dtype), mode="drop")
  return flat.reshape(c.shape)


def block_loop(cfg: ModelConfig, params, loop: Array, h: Array, pos: Array,
               block_cache, write: Array, rows: Array | None = None):
  """One loop of the shared block for every row at its own ``loop`` [R].

  h [R, D] at positions pos [R]; rows with ``write`` False write no KV (their
  output is to be discarded). ``rows`` [R]: the cache slots of the R rows (a
  subset of the P slots, e.g. the busy ones; slot P: padding, write False);
  default every slot, R = P. Returns (h [R, D], block cache)."""
  hq, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  s = block_cache[0][0].shape[3]
  cos, sin = L.rope_cos_sin(cfg.rope, cfg.head_dim, pos[:, None])
  slot = jnp.where(write, pos, s)
  x = h[:, None]
  new_cache = []
  for k in range(cfg.plan.block):
    lp = params["block"][f"layer_{k}"]
    lora = D._loop_lora(cfg, params, k, loop) or {}  # pylint: disable=protected-access
    q, kk, vv = _QKV(cfg).apply({"params": lp["attn"]}, _norm(cfg, lp["attn_norm"], x),
                                cos, sin, lora)
    ck = _write_slot(block_cache[k][0], kk[:, 0], loop, slot, rows)
    cv = _write_slot(block_cache[k][1], vv[:, 0], loop, slot, rows)
    new_cache.append((ck, cv))
    a = _attend(cfg, q, ck, cv, loop, pos, rows)[:, None]
    x = x + _linear(cfg, cfg.d_model, (L.HEADS, L.EMBED), lp["attn"]["o"], a,
                    lora.get("o")).astype(x.dtype)
    m = L.SwiGLU(cfg).apply({"params": lp["mlp"]}, _norm(cfg, lp["mlp_norm"], x), lora)
    x = x + m.astype(x.dtype)
  return x[:, 0], new_cache


def _kv_projection(cfg: ModelConfig, lp, x: Array, lora) -> tuple[Array, Array]:
  """k, v (pre-RoPE) of layer params ``lp`` on normed x [R, 1, D]."""
  hq, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  attn, lora = lp["attn"], lora or {}
  nq, nkv = hq * dh, hkv * dh
  if not cfg.fused_projections:
    k = _linear(cfg, nkv, (L.EMBED, L.KV_HEADS), attn["k"], x, lora.get("k"))
    v = _linear(cfg, nkv, (L.EMBED, L.KV_HEADS), attn["v"], x, lora.get("v"))
    return k, v
  w = attn["qkv"]["kernel"]
  layout = cfg.kernel_layout
  if layout == "panel" and nq % PANEL:
    kv = _linear(cfg, nq + 2 * nkv, (L.EMBED, L.KV_HEADS), attn["qkv"], x)[..., nq:]
  else:
    w = {"in_out": lambda: w[:, nq:], "out_in": lambda: w[nq:],
         "panel": lambda: w[nq // PANEL:]}[layout]()
    kv = _linear(cfg, 2 * nkv, (L.EMBED, L.KV_HEADS), {"kernel": w}, x)
  k, v = kv[..., :nkv], kv[..., nkv:]
  dt = jnp.dtype(cfg.dtype)
  xd = x.astype(dt)
  for name in ("k", "v"):
    if lora.get(name) is not None:
      a, b = lora[name]
      delta = ((xd @ a.astype(dt)) @ b.astype(dt)) * cfg.lora_scale
      k, v = (k + delta, v) if name == "k" else (k, v + delta)
  return k, v


def _kv_loop_free(cfg: ModelConfig) -> bool:
  """Whether a block layer's K/V projection is the same at every loop (no
  per-loop LoRA on k or v): the K/V of a token's skipped loops of one shared
  layer are then one projection of its exit state, written once per loop."""
  return not ({"k", "v"} & cfg.lora.keys())


def fill_kv(cfg: ModelConfig, params, cache, rows: Array, h: Array, pos: Array,
            depth: Array, valid: Array):
  """State copying for ``rows`` [R] (slot indices) whose token stopped after
  ``depth`` [R] loops with exit state h [R, D] at pos [R]: K/V of every skipped
  block layer (loops >= depth) and of the coda, from h. Rows with ``valid``
  False or depth == N write nothing. Returns the cache (a ``nn.cache.KVCache``).

  Every skipped layer reads the same exit state, so without per-loop LoRA on
  k/v (``_kv_loop_free``) the skipped loops of one shared layer have the same
  K/V: it is projected once and written into each skipped loop's slot (with
  3 loops, half the projections of one per loop; the values are the same)."""
  plan = cfg.plan
  n_loops = plan.loops
  hkv, dh = cfg.n_kv_heads, cfg.head_dim
  cache = as_kv_cache(cache)
  s, p = cache.length, cache.batch
  cos, sin = L.rope_cos_sin(cfg.rope, dh, pos[:, None])
  x = h[:, None]
  r = rows.shape[0]
  live = valid & (depth < n_loops)

  def project(lp, lora):
    k, v = _kv_projection(cfg, lp, _norm(cfg, lp["attn_norm"], x), lora)
    k = L.apply_rope(k.reshape(r, 1, hkv, dh), cos, sin)[:, 0]
    return k, v.reshape(r, hkv, dh)

  def write(c, flat_rows, shape, slot, new):
    return c.reshape(shape).at[flat_rows, slot].set(new.astype(c.dtype), mode="drop"
                                                    ).reshape(c.shape)

  # (group, idx, [loops]) per projection: one per shared layer when its K/V
  # does not depend on the loop, else one per (layer, loop); then the coda.
  later = range(1, n_loops)
  if _kv_loop_free(cfg):
    jobs = [("block", k, list(later)) for k in range(plan.block)] if later else []
  else:
    jobs = [("block", k, [l]) for l in later for k in range(plan.block)]
  jobs += [("coda", i, [0]) for i in range(plan.coda)]
  for group, idx, loops in jobs:
    if group == "block":
      lp = params["block"][f"layer_{idx}"]
      lora = D._loop_lora(cfg, params, idx, loops[0]) if len(loops) == 1 else None  # pylint: disable=protected-access
    else:
      lp, lora = params[f"{group}_{idx}"], None
    k, v = project(lp, lora)
    ck, cv = cache[group][idx]
    for loop in loops:
      skip = live & (depth <= loop) if group == "block" else live
      slot = jnp.where(skip, pos, s)[:, None]
      if group == "block":
        flat_rows = (loop * p + rows[:, None]) * hkv + jnp.arange(hkv)[None]
        shape = (ck.shape[0] * p * hkv, s, dh)
      else:
        flat_rows = rows[:, None] * hkv + jnp.arange(hkv)[None]
        shape = (p * hkv, s, dh)
      ck, cv = write(ck, flat_rows, shape, slot, k), write(cv, flat_rows, shape, slot, v)
    cache = cache.with_layer(group, idx, (ck, cv))
  return cache

"""The routed shared block of a Mixture-of-Recursions model (``Transformer``'s
block when ``cfg.router`` is set; ``recursive_lm.mor.block`` re-exports it).

Two implementations of the same function (tests check they agree):

* **dense** (``MoRBlock.__call__``, one recursion per call; under ``nn.scan``
  when ``router.impl == "dense"``, else a Python loop): every token runs
  every recursion; a token not routed to recursion r keeps its state, and
  attention at r is restricted by masks to the keys the KV strategy allows.
  This path also serves causal threshold routing, forced decisions
  (``loop_mask``), token-choice and cache (decode) mode.
* **gathered** (``gathered_block``, expert-choice top-k in sequence mode):
  recursion r gathers its k_r = max(1, floor(cap_r * T)) tokens (indices
  sorted ascending, so a plain causal mask on the compacted sequence is the
  causal mask restricted to them), with their original RoPE positions and
  segment ids, runs the shared layers on [B, k_r] only, and scatters the
  residual-inclusive update back.

Either way the params are ``block/layer_k/...``, the tree of the
broadcast-scanned recursive block, so checkpoints and conversion carry over.

KV strategies (``router.kv``), sequence mode:
* recursion: keys at r are the tokens routed to r;
* share_first: keys at r > 0 are every first-recursion key (queries shrink);
* hybrid: first-recursion keys with the tokens routed to r overwritten by
  their fresh keys.
Cache mode keeps the cache's per-recursion validity ``KVCache.valid [N, B,
S]`` (slot s holds a key written at recursion n); attention masks with it, so
skipped tokens are invisible. A token not routed to a recursion writes to the
cache's no-write slot S there (dropped), like every other skipped write.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from recursive_lm.config import ModelConfig
from recursive_lm.nn import mor_routers as R
from recursive_lm.nn import layers as L

Array = jax.Array


def capacities_k(cfg: ModelConfig, t: int) -> list[int]:
  """Static top-k sizes k_r = max(1, floor(cap_r * T))."""
  caps = cfg.router.capacity_schedule(cfg.plan.loops)
  return [max(1, int(math.floor(c * t + 1e-9))) for c in caps]


def dense_topk(z: Array, cand: Array, k) -> Array:
  """Top-k of z among ``cand`` per row as a bool mask (ties: lower index wins,
  as ``lax.top_k``). ``k`` may be traced."""
  b, t = z.shape
  zm = jnp.where(cand, z, -jnp.inf)
  order = jnp.argsort(-zm, axis=-1, stable=True)
  rank = jnp.zeros((b, t), jnp.int32).at[jnp.arange(b)[:, None], order].set(
      jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
  return cand & (rank < k)


class MoRBlock(nn.Module):
  """Shared layers ``layer_0..layer_{K-1}`` plus one routed recursion."""
  cfg: ModelConfig

  def setup(self):
    self.layer_list = [L.DecoderLayer(self.cfg, name=f"layer_{k}")
                       for k in range(self.cfg.plan.block)]

  def apply_layers(self, h, cos, sin, mask, cache_n=None, slots=None, lora_n=None,
                   hooks=None, return_kv=False):
    """F(h): the K shared layers once. Returns (y, new caches, attended kv)."""
    caches, kvs = [], []
    for k, layer in enumerate(self.layer_list):
      c = None if cache_n is None else cache_n[k]
      lk = None if lora_n is None else lora_n.get(f"layer_{k}")
      hook = None if hooks is None else hooks[k]
      h, c2 = layer(h, cos, sin, mask, c, slots, lk, hook, return_kv)
      (caches if cache_n is not None else kvs).append(c2)
    return h, caches, kvs

  def __call__(self, carry, xs, cos, sin, mask, write_slots, tc, routing):
    """One recursion, dense-masked. ``carry``: dict(h, h1, cand, kv, kv_ok,
    cache, valid, n); ``xs``: dict(lora, router, k, thr, full, forced)."""
    cfg, rc = self.cfg, self.cfg.router
    h, n, cand = carry["h"], carry["n"], carry["cand"]
    b = h.shape[0]
    first = n == 0
    forced = xs.get("forced")
    ys = {}
    if rc.kind == "expert":
      rn = xs["router"]
      z = R.expert_logits(rn, h, rc)
      g = R.expert_gate(z, rc)
      if forced is not None:
        sel = forced & cand
      elif routing == "topk":
        sel = dense_topk(z, cand, xs["k"])
      else:
        zd = R.expert_logits(rn, h, rc, aux=True) if rc.decode_with_aux_router else z
        sel = cand & (xs["full"] | (zd > xs["thr"]))
      ys["z"] = jnp.where(cand, z, 0.0)
      ys["cand"] = cand
      if rc.aux_router:
        ys["z_aux"] = jnp.where(cand, R.expert_logits(rn, h, rc, aux=True), 0.0)
    else:
      depth, _ = tc
      sel = forced if forced is not None else depth >= n
    ys["sel"] = sel

    new = dict(carry)
    cache = carry["cache"]
    hooks, ret_kv, slots, cache_n = None, False, None, None
    if cache is None:
      if rc.kv == "recursion":
        m = mask & sel[:, None, None, None, :]
      else:
        kv_ok = jnp.where(first, sel, carry["kv_ok"])
        m = mask & kv_ok[:, None, None, None, :]
        shared = carry["kv"]
        use = (jnp.broadcast_to(first, sel.shape) if rc.kv == "share_first"
               else first | sel)[:, :, None, None]

        def make_hook(k):
          return lambda ko, vo: (jnp.where(use, ko, shared[k][0].astype(ko.dtype)),
                                 jnp.where(use, vo, shared[k][1].astype(vo.dtype)))
        hooks, ret_kv = [make_hook(k) for k in range(cfg.plan.block)], True
        new["kv_ok"] = kv_ok
    else:
      valid = carry["valid"]
      no_write = valid.shape[-1]  # the cache's no-write slot S
      slots = jnp.where(sel, write_slots, no_write)
      vn = valid[n].at[jnp.arange(b)[:, None], slots].set(True, mode="drop")
      if rc.kv == "recursion":
        key_ok = vn
        cache_n = [(ck[n], cv[n]) for ck, cv in cache]
      elif rc.kv == "share_first":
        slots = jnp.where(first, slots, no_write)
        key_ok = jnp.where(first, vn, valid[0])
        cache_n = [(ck[0], cv[0]) for ck, cv in cache]
      else:  # hybrid: own fresh keys where written at n, else recursion 1's
        key_ok = jnp.where(first, vn, valid[0])
        vm = valid[n][:, None, :, None]  # caches are [B, Hkv, S, Dh]
        cache_n = [(jnp.where(vm, ck[n], ck[0]), jnp.where(vm, cv[n], cv[0]))
                   for ck, cv in cache]
      new["valid"] = valid.at[n].set(vn)
      m = mask & key_ok[:, None, None, None, :]

    y, caches, kvs = self.apply_layers(h, cos, sin, m, cache_n, slots, xs["lora"],
                                       hooks, ret_kv)
    if cache is not None:
      at = 0 if rc.kv == "share_first" else n
      new["cache"] = [(ck.at[at].set(c[0]), cv.at[at].set(c[1]))
                      for (ck, cv), c in zip(cache, caches)]
    if ret_kv:
      new["kv"] = [(jnp.where(first, ku, sk), jnp.where(first, vu, sv))
                   for (ku, vu), (sk, sv) in zip(kvs, carry["kv"])]
    if rc.kind == "expert":
      upd = R.combine(h, y, g, rc.gating)
      new["h"] = jnp.where(sel[..., None], upd, h)
      new["cand"] = sel
    else:
      depth, w = tc
      fin = R.combine(carry["h1"], y, w, rc.gating)
      new["h"] = jnp.where((depth == n)[..., None], fin, jnp.where(sel[..., None], y, h))
    new["n"] = n + 1
    return new, ys


def make_block(cfg: ModelConfig, name: str) -> nn.Module:
  if cfg.router.impl == "gather":
    return MoRBlock(cfg, name=name)
  body = MoRBlock
  if cfg.remat != "none":
    policy = None if cfg.remat == "full" else getattr(jax.checkpoint_policies, cfg.remat)
    body = nn.remat(MoRBlock, prevent_cse=False, policy=policy)
  return nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                 in_axes=(0,) + (nn.broadcast,) * 6, length=cfg.plan.loops
                 )(cfg, name=name)


def token_depths(router_out: dict) -> Array:
  """Recursions each token passed, [B, T] int32 (from ``sel`` [N, B, T])."""
  return jnp.sum(router_out["sel"].astype(jnp.int32), axis=0)


def _rows(x: Array, idx: Array) -> Array:
  """x[b, idx[b]] for x [B, T, ...], idx [B, k]."""
  return x[jnp.arange(x.shape[0])[:, None], idx]


def gathered_block(block: MoRBlock, cfg: ModelConfig, h, positions, segment_ids,
                   cos, sin, router, lora, ks):
  """Expert-choice top-k recursions on gathered tokens. Returns (h, ys)."""
  rc = cfg.router
  b, t = h.shape[:2]
  bi = jnp.arange(b)[:, None]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  out = {"z": [], "cand": [], "sel": []}
  if rc.aux_router:
    out["z_aux"] = []
  shared, kv_ok = None, None
  zeros_f, zeros_b = jnp.zeros((b, t), jnp.float32), jnp.zeros((b, t), bool)
  for r in range(cfg.plan.loops):
    rn = R.loop_slice(router, r)
    h_c = _rows(h, idx)
    z_c = R.expert_logits(rn, h_c, rc)
    _, top = jax.lax.top_k(z_c, ks[r])
    top = jnp.sort(top, axis=-1)
    full = jnp.take_along_axis(idx, top, axis=1)
    g_s = jnp.take_along_axis(R.expert_gate(z_c, rc), top, axis=1)
    h_s = _rows(h, full)
    seg_s = None if segment_ids is None else jnp.take_along_axis(segment_ids, full, 1)
    cos_s, sin_s = _rows(cos, full), _rows(sin, full)
    lora_r = None if lora is None else jax.tree_util.tree_map(lambda x: x[r], lora)
    hooks, ret_kv = None, False
    if rc.kv == "recursion" or r == 0:
      m = L.attention_mask(jnp.take_along_axis(positions, full, 1), seg_s)
      ret_kv = rc.kv != "recursion"
    else:
      m = jnp.arange(t)[None, None, :] <= full[:, :, None]  # [B, k, T]
      if segment_ids is not None:
        m = m & (seg_s[:, :, None] == segment_ids[:, None, :]) & (
            segment_ids[:, None, :] != 0)
      m = (m & kv_ok[:, None, :])[:, None, None]
      if rc.kv == "share_first":
        hooks = [lambda ko, vo, s=s: (s[0].astype(ko.dtype), s[1].astype(vo.dtype))
                 for s in shared]
      else:
        hooks = [lambda ko, vo, s=s: (s[0].astype(ko.dtype).at[bi, full].set(ko),
                                      s[1].astype(vo.dtype).at[bi, full].set(vo))
                 for s in shared]
    y, _, kvs = block.apply_layers(h_s, cos_s, sin_s, m, None, None, lora_r, hooks,
                                   ret_kv)
    if r == 0 and rc.kv != "recursion":
      shared = [(jnp.zeros((b, t) + k.shape[2:], k.dtype).at[bi, full].set(k),
                 jnp.zeros((b, t) + v.shape[2:], v.dtype).at[bi, full].set(v))
                for k, v in kvs]
      kv_ok = zeros_b.at[bi, full].set(True)
    h = h.at[bi, full].set(R.combine(h_s, y, g_s, rc.gating))
    out["z"].append(zeros_f.at[bi, idx].set(z_c))
    out["cand"].append(zeros_b.at[bi, idx].set(True))
    out["sel"].append(zeros_b.at[bi, full].set(True))
    if rc.aux_router:
      out["z_aux"].append(zeros_f.at[bi, idx].set(R.expert_logits(rn, h_c, rc, aux=True)))
    idx = full
  return h, {k: jnp.stack(v) for k, v in out.items()}


def run(model, h, positions, segment_ids, cos, sin, mask, cache, write_slots,
        loop_mask, routing):
  """The routed block inside ``Transformer`` (``cache``: a ``KVCache`` or None).
  Returns (h, block cache, block validity, router outputs dict)."""
  cfg = model.cfg
  rc, n_loops = cfg.router, cfg.plan.loops
  b, t = h.shape[:2]
  cache_mode = cache is not None
  routing = routing or ("threshold" if cache_mode else "topk")
  if routing not in ("topk", "threshold"):
    raise ValueError(f"routing must be 'topk' or 'threshold', got {routing!r}")
  if cache_mode and rc.kind == "expert" and routing == "topk" and loop_mask is None:
    raise ValueError("top-k expert routing looks at future tokens; cache (decode) "
                     "mode needs routing='threshold' or explicit loop_mask decisions")
  router = model.router()
  lora = model.lora() if cfg.lora else None
  ks = capacities_k(cfg, t)
  aux = {}
  tc = None
  expert_router = None
  if rc.kind == "token":
    z, g, depth, w = R.token_route(router, h, rc)
    tc = (depth, w)
    aux.update(token_logits=z, token_probs=g, depth=depth)
  else:
    expert_router = router
    if (rc.impl == "gather" and routing == "topk" and not cache_mode
        and loop_mask is None):
      h, ys = gathered_block(model.block, cfg, h, positions, segment_ids, cos, sin,
                             router, lora, ks)
      aux.update(ys)
      return h, None, None, aux
  caps = rc.capacity_schedule(n_loops)
  thr = rc.decode_thresholds or (0.0,) * n_loops
  kv_shape = (b, t, cfg.n_kv_heads, cfg.head_dim)
  need_kv = not cache_mode and rc.kv != "recursion"
  carry = dict(
      h=h, h1=h, cand=jnp.ones((b, t), bool), n=jnp.zeros((), jnp.int32),
      kv=([(jnp.zeros(kv_shape, h.dtype), jnp.zeros(kv_shape, h.dtype))
           for _ in range(cfg.plan.block)] if need_kv else None),
      kv_ok=jnp.zeros((b, t), bool) if need_kv else None,
      cache=list(cache.block) if cache_mode else None,
      valid=cache.valid if cache_mode else None)
  xs = dict(lora=lora, router=expert_router, k=jnp.asarray(ks, jnp.int32),
            thr=jnp.asarray(thr, jnp.float32),
            full=jnp.asarray([c >= 1.0 for c in caps]), forced=loop_mask)
  if rc.impl == "dense":
    carry, ys = model.block(carry, xs, cos, sin, mask, write_slots, tc, routing)
  else:
    outs = []
    for n in range(n_loops):
      xs_n = jax.tree_util.tree_map(lambda x: x[n], xs)
      carry, y = model.block(carry, xs_n, cos, sin, mask, write_slots, tc, routing)
      outs.append(y)
    ys = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
  aux.update(ys)
  return carry["h"], carry["cache"], carry["valid"], aux

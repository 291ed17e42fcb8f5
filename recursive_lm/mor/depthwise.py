"""Continuous depth-wise batching for Mixture-of-Recursions models.

:class:`MoRDepthwiseBatcher` is ``decode.depthwise.DepthwiseBatcher``'s slot
pool (P slots, each holding one request's current token at its *own*
recursion; one jitted step applies one recursion to every slot; a FIFO queue
refills freed slots) with each slot following the causal MoR semantics of
``mor.decode.MoREngine`` for one token:

1. a slot starting a token embeds it and runs the prelude (masked writes);
   token-choice routers decide the token's depth here, once, from the block
   input (``routers.token_route``);
2. the routed recursion itself is the model's own ``MoRBlock.__call__`` (cache
   mode, ``routing="threshold"``), ``jax.vmap``-ed over the slots with a
   per-slot recursion index ``n``: the same router decision, gate/combine
   (residual / additive / delta), KV strategy (recursion / share_first /
   hybrid) and ``block_valid`` bookkeeping as the sequence-batched engine;
3. whether the token continues is decided right after recursion n (so no step
   is spent on a recursion the token will skip): expert-choice evaluates
   recursion n+1's causal threshold rule (``z > thr`` or capacity 1) on the new
   state, exactly the decision ``MoRBlock`` would take there; token-choice
   stops at its decided depth;
4. a stopping slot runs the coda + head, samples its next token and restarts
   at recursion 0 of the next position. Depths the token skipped get no KV
   and stay invalid in ``block_valid`` (as in ``MoREngine``); each slot's
   validity row is cleared when a new request is prefilled into it.

Like ``MoREngine``, every emitted token is fed back once (the last one too),
so ``BatchOutput.loops[i][j]`` is the number of recursions generated token j
of request i went through when fed back, i.e. ``MoREngine.generate(...).depths``.
Tokens and depths equal ``MoREngine``'s for each request served alone
(tests/test_mor_depthwise.py).
"""
from __future__ import annotations

import collections
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.decode import depth as D
from recursive_lm.decode.depthwise import BatchOutput, DepthwiseBatcher, _check_requests
from recursive_lm.decode.engine import _round_up, bucket_length
from recursive_lm.decode.sampling import SamplingConfig, sample
from recursive_lm.mor import routers as R
from recursive_lm.mor.block import MoRBlock
from recursive_lm.nn import layers as L
from recursive_lm.nn.model import cache_length, init_cache

VALID = "block_valid"


def _normalize(cache):
  return {g: (v if g == VALID else [tuple(c) for c in v]) for g, v in cache.items()}


def _split(cache):
  """(cache without validity, validity [N, P, S])."""
  return {g: v for g, v in cache.items() if g != VALID}, cache[VALID]


def _row_axis(group: str) -> int:
  return 1 if group in ("block", VALID) else 0


def _cache_row(cache, slot):
  out = {}
  for g, v in cache.items():
    if g == VALID:
      out[g] = jax.lax.dynamic_slice_in_dim(v, slot, 1, 1)
    else:
      out[g] = [tuple(jax.lax.dynamic_slice_in_dim(c, slot, 1, _row_axis(g)) for c in kv)
                for kv in v]
  return out


def _set_cache_row(cache, row, slot):
  out = {}
  for g, v in cache.items():
    if g == VALID:
      out[g] = jax.lax.dynamic_update_slice_in_dim(v, row[g].astype(v.dtype), slot, 1)
    else:
      out[g] = [tuple(jax.lax.dynamic_update_slice_in_dim(c, r.astype(c.dtype), slot,
                                                          _row_axis(g))
                      for c, r in zip(kv, rkv)) for kv, rkv in zip(v, row[g])]
  return out


class MoRDepthwiseBatcher(DepthwiseBatcher):
  """Depth-wise batching server for MoR models (see module docstring).

  Args:
    cfg, params: a MoR model (``cfg.router`` set).
    slots: pool size P.
    eos_id, pad_id: as for ``decode.engine.Engine``.

  ``generate(prompts, max_new_tokens, sampling, seed, stop_at_eos)`` returns a
  ``decode.depthwise.BatchOutput`` whose ``loops`` are the per-token MoR depths.
  """

  def __init__(self, cfg: ModelConfig, params, slots: int = 8,
               eos_id: int | None = None, pad_id: int | None = None):
    if cfg.router is None:
      raise ValueError("MoRDepthwiseBatcher needs a Mixture-of-Recursions config "
                       "(cfg.router set); serve other recursive models with "
                       "decode.depthwise.DepthwiseBatcher")
    super().__init__(cfg, params, slots=slots, exit=None, eos_id=eos_id, pad_id=pad_id)

  # -- state -------------------------------------------------------------------
  def _init_state(self, max_new: int, seed: int):
    st = super()._init_state(max_new, seed)
    p = self.slots
    st.update(h1=jnp.zeros_like(st["h"]), tdepth=jnp.zeros((p,), jnp.int32),
              tw=jnp.zeros((p,), jnp.float32), cnt=jnp.zeros((p,), jnp.int32),
              final=jnp.zeros((p,), bool))
    return st

  # -- jitted pieces -----------------------------------------------------------
  @functools.partial(jax.jit, static_argnums=0,
                     static_argnames=("max_new", "sampling", "stop_at_eos"))
  def _prefill(self, params, cache, st, tokens, length, slot, key, max_new,
               sampling, stop_at_eos):
    """Causal MoR prefill of one prompt into ``slot``'s cache row (validity row
    cleared first); samples the first token and starts the slot at recursion 0."""
    s = cache_length(cache)
    t = tokens.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    slots = jnp.where(pos < length, pos, s)
    row = _cache_row(cache, slot)
    row[VALID] = jnp.zeros_like(row[VALID])
    out = self.model.apply({"params": params}, tokens, positions=pos, cache=row,
                           write_slots=slots, routing="threshold")
    cache = _set_cache_row(cache, _normalize(out["cache"]), slot)
    first = sample(out["logits"][:, length - 1], key, sampling)[0]
    eos = self.eos_id if (stop_at_eos and self.eos_id is not None) else -1
    ends = (first == eos) | (max_new <= 1)
    st = dict(st)
    st["out"] = st["out"].at[slot].set(self.pad_id).at[slot, 0].set(first)
    st["loops"] = st["loops"].at[slot].set(0)
    for k, v in (("loop", 0), ("pos", length), ("tok", first), ("active", True),
                 ("final", ends), ("finished", False), ("n_out", 1), ("cnt", 0)):
      st[k] = st[k].at[slot].set(v)
    return cache, st

  def _recursion(self, params, h, h1, n, pos, ws, td, tw, blk, valid):
    """``MoRBlock`` at per-slot recursion ``n`` [P] for one token per slot.
    Returns (h [P, D], block cache, validity, sel [P])."""
    cfg, rc = self.cfg, self.cfg.router
    s = valid.shape[-1]
    caps = rc.capacity_schedule(cfg.plan.loops)
    thr_all = jnp.asarray(rc.decode_thresholds or (0.0,) * cfg.plan.loops, jnp.float32)
    full_all = jnp.asarray([c >= 1.0 for c in caps])
    router = params["router"]
    block = MoRBlock(cfg)

    def one(h, h1, n, p, w, d, g, blk, valid):
      positions = p[None, None]
      cos, sin = L.rope_cos_sin(cfg.rope, cfg.head_dim, positions)
      mask = L.attention_mask(positions, None, s, True)
      lora = None
      if cfg.lora:
        lora = {f"layer_{k}": {t: (params["lora"][f"layer_{k}_{t}_a"][n],
                                   params["lora"][f"layer_{k}_{t}_b"][n])
                               for t in cfg.lora} for k in range(cfg.plan.block)}
      carry = dict(h=h[None, None], h1=h1[None, None], cand=jnp.ones((1, 1), bool),
                   n=n, kv=None, kv_ok=None,
                   cache=[(ck[:, None], cv[:, None]) for ck, cv in blk],
                   valid=valid[:, None])
      xs = dict(lora=lora, router=R.loop_slice(router, n) if rc.kind == "expert" else None,
                k=jnp.int32(0), thr=thr_all[n], full=full_all[n], forced=None)
      tc = (d[None, None], g[None, None]) if rc.kind == "token" else None
      new, ys = block.apply({"params": params["block"]}, carry, xs, cos, sin, mask,
                            w[None, None], tc, "threshold")
      return (new["h"][0, 0], [(ck[:, 0], cv[:, 0]) for ck, cv in new["cache"]],
              new["valid"][:, 0], ys["sel"][0, 0])

    return jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0, 0, 1, 1), out_axes=(0, 1, 1, 0))(
        h, h1, n, pos, ws, td, tw, blk, valid)

  def _step(self, params, cache, st, threshold, max_new, sampling, stop_at_eos):
    del threshold
    cfg, plan, rc = self.cfg, self.cfg.plan, self.cfg.router
    n_loops, total = plan.loops, plan.effective_depth
    core, valid = _split(cache)
    s = valid.shape[-1]
    active, n, pos = st["active"], st["loop"], st["pos"]
    p1 = pos[:, None]
    # 1. embedding + prelude (and token-choice depth) for slots starting a token.
    fresh = active & (n == 0)
    h0 = D.embed(cfg, params, st["tok"][:, None])
    if plan.prelude:
      h0, core = D.run_layers(cfg, params, 0, plan.prelude, h0, p1, core,
                              jnp.where(fresh, pos, s)[:, None])
    h0 = h0[:, 0]
    h_in = jnp.where(fresh[:, None], h0, st["h"])
    h1 = jnp.where(fresh[:, None], h0, st["h1"])
    tdepth, tw = st["tdepth"], st["tw"]
    if rc.kind == "token":
      _, _, d, w = R.token_route(params["router"], h0[:, None], rc)
      tdepth = jnp.where(fresh, d[:, 0], tdepth)
      tw = jnp.where(fresh, w[:, 0], tw)
    cnt = jnp.where(fresh, 0, st["cnt"])
    # 2. the routed recursion at each slot's own n.
    h, blk, valid, sel = self._recursion(params, h_in, h1, n, pos,
                                         jnp.where(active, pos, s), tdepth, tw,
                                         core["block"], valid)
    core = dict(core, block=[tuple(c) for c in blk])
    sel = sel & active
    cnt = cnt + sel.astype(jnp.int32)
    # 3. does the token take recursion n + 1?
    if rc.kind == "expert":
      nxt_n = jnp.minimum(n + 1, n_loops - 1)
      caps = rc.capacity_schedule(n_loops)
      thr = jnp.asarray(rc.decode_thresholds or (0.0,) * n_loops, jnp.float32)
      full = jnp.asarray([c >= 1.0 for c in caps])
      rn = R.loop_slice(params["router"], nxt_n)  # per-slot leaves [P, ...]
      aux = rc.decode_with_aux_router
      zd = jax.vmap(lambda r, x: R.expert_logits(r, x[None], rc, aux=aux)[0])(rn, h)
      cont = sel & (n + 1 < n_loops) & (full[nxt_n] | (zd > thr[nxt_n]))
    else:
      cont = sel & (n < tdepth) & (n + 1 < n_loops)
    done = active & ~cont
    # 4. coda + head for finishing slots; emit, feed back, free.
    h_out = h
    if plan.coda:
      hc, core = D.run_layers(cfg, params, total - plan.coda, total, h[:, None], p1,
                              core, jnp.where(done, pos, s)[:, None])
      h_out = jnp.where(done[:, None], hc[:, 0], h)
    logits = D.head(cfg, params, h_out)
    rng, key = jax.random.split(st["rng"])
    tok = sample(logits, key, sampling)
    rows = jnp.arange(self.slots)
    final = st["final"]
    # the depth of the token just fed back (out[n_out - 1])
    loops = st["loops"].at[rows, jnp.where(done, st["n_out"] - 1, max_new)].set(
        cnt, mode="drop")
    emit = done & ~final
    col = jnp.where(emit, st["n_out"], max_new)
    out = st["out"].at[rows, col].set(tok, mode="drop")
    n_out = st["n_out"] + emit.astype(jnp.int32)
    eos = self.eos_id if (stop_at_eos and self.eos_id is not None) else -1
    ends = emit & ((tok == eos) | (n_out >= max_new))
    stop = done & final
    st = dict(st, h=h.astype(st["h"].dtype), h1=h1.astype(st["h1"].dtype),
              tdepth=tdepth, tw=tw, cnt=cnt, loop=jnp.where(done, 0, n + 1),
              pos=jnp.where(done, pos + 1, pos), tok=jnp.where(emit, tok, st["tok"]),
              final=jnp.where(emit, ends, final), active=active & ~stop,
              finished=st["finished"] | stop, n_out=n_out, out=out, loops=loops,
              rng=rng, steps=st["steps"] + 1,
              busy=st["busy"] + jnp.sum(active, dtype=jnp.int32))
    return _normalize(dict(core, block_valid=valid)), st

  @functools.partial(jax.jit, static_argnums=0,
                     static_argnames=("max_new", "sampling", "stop_at_eos"))
  def _run(self, params, cache, st, threshold, stop_on_finish, max_steps, max_new,
           sampling, stop_at_eos):
    def cond(c):
      _, st = c
      return (jnp.any(st["active"]) & ~(stop_on_finish & jnp.any(st["finished"]))
              & (st["steps"] < max_steps))

    def body(c):
      return self._step(params, *c, threshold, max_new=max_new, sampling=sampling,
                        stop_at_eos=stop_at_eos)

    return jax.lax.while_loop(cond, body, (_normalize(cache), st))

  # -- public API --------------------------------------------------------------
  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               stop_at_eos: bool = True) -> BatchOutput:
    """Serves ``prompts`` (any number; FIFO queue) through the slot pool.
    ``loops[i][j]``: recursions token j of request i took when fed back."""
    lengths = _check_requests(self.cfg, prompts, max_new_tokens)
    s = _round_up(max(lengths) + max_new_tokens, 64)
    static = dict(max_new=max_new_tokens, sampling=sampling, stop_at_eos=stop_at_eos)
    t_start = time.perf_counter()
    cache = _normalize(init_cache(self.cfg, self.slots, s))
    st = self._init_state(max_new_tokens, seed)
    queue = collections.deque(range(len(prompts)))
    owner = [-1] * self.slots
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    base = jax.random.key(seed + 1)
    max_steps = jnp.asarray(np.iinfo(np.int32).max, jnp.int32)
    threshold = jnp.float32(np.inf)
    prefill_s = 0.0
    free = list(range(self.slots))
    while True:
      t0 = time.perf_counter()
      for slot in free:
        if not queue:
          break
        rid = queue.popleft()
        owner[slot] = rid
        t = bucket_length(lengths[rid])
        tokens = np.full((1, t), self.pad_id, np.int32)
        tokens[0, :lengths[rid]] = prompts[rid]
        cache, st = self._prefill(self.params, cache, st, jnp.asarray(tokens),
                                  jnp.int32(lengths[rid]), jnp.int32(slot),
                                  jax.random.fold_in(base, rid), **static)
      jax.block_until_ready(st["active"])
      prefill_s += time.perf_counter() - t0
      cache, st = self._run(self.params, cache, st, threshold, jnp.asarray(bool(queue)),
                            max_steps, **static)
      active, finished = jax.device_get((st["active"], st["finished"]))
      done_slots = [i for i in range(self.slots) if finished[i] and owner[i] >= 0]
      if done_slots:
        out, loops, n_out = jax.device_get((st["out"], st["loops"], st["n_out"]))
        for i in done_slots:
          results[owner[i]] = (out[i, :n_out[i]], loops[i, :n_out[i]])
          owner[i] = -1
        st = dict(st, finished=jnp.zeros_like(st["finished"]))
      free = [i for i in range(self.slots) if owner[i] < 0]
      if not queue and not active.any():
        break
    seconds = time.perf_counter() - t_start
    steps, busy = int(st["steps"]), int(st["busy"])
    return BatchOutput([results[i][0].tolist() for i in range(len(prompts))],
                       [results[i][1].tolist() for i in range(len(prompts))],
                       lengths, seconds, prefill_s, steps, steps * self.slots, busy)

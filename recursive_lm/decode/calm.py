"""CALM decoding step with per-row exits, batched, static shapes (spec §2.2.3, §5.3).

Exits ``e_0 < e_1 < ... < e_{n-1} = L`` split the depth into segments
``[e_{i-1}, e_i)``. One decode step:

* the segments in order, each run only while some active row is undecided
  (``inplace.when``: a 0/1-trip loop that updates the KV cache in place; a
  ``lax.cond``/``switch`` would copy the cache through the conditional every
  step). A segment runs its layers on every row (masked compute: rows that
  already exited keep their state and write no KV there), evaluates the exit
  head and confidence, and decides per row (``rule="per_row"``) or for the
  whole batch once its least confident undecided member is confident
  (``rule="batch_min"``, CALM's original rule);
* rows that exited earlier get the segment's missing KV filled from their
  *exit-layer* state in the same segment, before its layers run (fixes CALM's
  defect §4.2-iii, which propagated the first segment's state), and after the
  segments one in-place branch (``inplace.select_branch``) fills the segments
  no row reached.

How skipped layers get their KV (``kv``):

* ``"propagate"``: CALM state copying: K/V of each skipped layer projected
  from the exit-layer state (``depth.propagate_kv``; no attention, no MLP).
* ``"first_loop"``: recursive KV sharing, for models trained to read the first
  loop's KV in deeper loops: a skipped block layer ``k`` of loop ``n >= 1``
  gets a copy of the same token's loop-0 KV of layer ``k`` (already computed,
  since every exit lies after loop 0). Skipped layers with no loop-0
  counterpart (coda; block layers of loop 0 itself when an exit lies inside
  loop 0) fall back to ``"propagate"``.

Oracle modes for analysis (they run the full depth for every row):

* ``oracle="cache"``: exit decisions by confidence as usual, but the KV of
  every layer is the real one (CALM ``oracle_cache``);
* ``oracle="tokens"``: exit at the first exit whose argmax equals the full
  model's (CALM ``oracle_tok_consistency``), real KV;
* ``oracle="noisy_cache"``: exit decisions by confidence and skipped layers'
  KV filled as ``kv`` says (overwriting the real KV after the step), but the
  token comes from the final layer (CALM ``oracle_tok_noisy_cache``): isolates
  the effect of the approximate cache. The recorded exit index is the
  confidence-chosen exit.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from recursive_lm.config import ModelConfig
from recursive_lm.nn import unrolled as D
from recursive_lm.decode.exit_rule import ExitRule
from recursive_lm.decode.inplace import select_branch, when
from recursive_lm.nn import layers as L
from recursive_lm.nn.cache import KVCache, as_kv_cache
from recursive_lm.nn.model import cache_length

Array = jax.Array
RULES = ("per_row", "batch_min")
KV_POLICIES = ("propagate", "first_loop")
ORACLES = (None, "cache", "tokens", "noisy_cache")



@dataclasses.dataclass(frozen=True)
class CalmSpec:
  exits: tuple[int, ...]          # increasing unrolled layer counts, last == L
  rule: str = "per_row"
  kv: str = "propagate"
  oracle: str | None = None


def _copy_first_loop(cache, k: int, n: int, pos: Array, slots: Array) -> KVCache:
  """Block layer k, loop n <- loop 0's K/V of the same token (per-row slots)."""
  cache = as_kv_cache(cache)
  ck, cv = cache.block[k]  # [N, B, Hkv, S, Dh]
  s = ck.shape[3]
  rows = jnp.arange(ck.shape[1])
  src = jnp.clip(pos, 0, s - 1)
  return cache.with_layer("block", k, (
      ck.at[n].set(L.scatter_kv(ck[n], ck[0, rows, :, src][:, None], slots)),
      cv.at[n].set(L.scatter_kv(cv[n], cv[0, rows, :, src][:, None], slots))))


def fill_skipped(cfg: ModelConfig, params, kv: str, start: int, end: int, h: Array,
                 pos: Array, cache, slots: Array, exit_layer: Array):
  """KV of layers [start, end) for tokens that exited at ``exit_layer`` [B] with
  state h [B, 1, D]; rows with out-of-range ``slots`` [B, 1] write nothing."""
  s = cache_length(cache)
  if kv == "propagate":
    return D.propagate_kv(cfg, params, start, end, h, pos[:, None], cache, slots)
  units = cfg.plan.unrolled()
  for i in range(start, end):
    group, k, n = units[i]
    if group == "block" and n > 0:
      copy_ok = (exit_layer > cfg.plan.prelude + k)[:, None]  # loop-0 layer k was run
      cache = _copy_first_loop(cache, k, n, pos, jnp.where(copy_ok, slots, s))
      cache = D.propagate_kv(cfg, params, i, i + 1, h, pos[:, None], cache,
                             jnp.where(copy_ok, s, slots))
    else:
      cache = D.propagate_kv(cfg, params, i, i + 1, h, pos[:, None], cache, slots)
  return cache


def _record(confs: Array, i, c: Array, mask: Array) -> Array:
  hit = (jnp.arange(confs.shape[1]) == i)[None] & mask[:, None]
  return jnp.where(hit, c[:, None], confs)


def calm_step(cfg: ModelConfig, params, spec: CalmSpec, rule: ExitRule, cache,
              tok: Array, pos: Array, active: Array, thr: Array, state=None,
              forced: Array | None = None):
  """One CALM decode step. tok, pos, active, thr: [B]; forced: [B] or None
  (``ExitRule.decide``).

  Returns (logits [B, V], exit index [B], exit confidences [B, n] (NaN where
  not checked; the last exit is never checked), cache, state (unused, None),
  stats dict of int32 scalars).

  With a head-free measure the LM head runs once, after the segment loop, on
  each row's exit state; a softmax measure reads it at every checked exit.
  Skipped-layer KV is filled only when some row has exited (``inplace.when``,
  with the exit state as an operand so that nothing of the fill runs otherwise).
  """
  if spec.oracle is not None:
    return _oracle_step(cfg, params, spec, rule, cache, tok, pos, active, thr, forced)
  exits = spec.exits
  n = len(exits)
  starts = (0,) + exits[:-1]
  s = cache_length(cache)
  h0 = D.embed(cfg, params, tok[:, None])
  b = tok.shape[0]
  use_logits = rule.needs_logits
  logits0 = (jnp.zeros((b, cfg.vocab_size), jnp.dtype(cfg.dtype)) if use_logits
             else jnp.zeros((b, 0), jnp.float32))
  exit_layer0 = jnp.full((b,), cfg.plan.effective_depth, jnp.int32)
  exit_tab = jnp.asarray(exits, jnp.int32)

  def conf_at(i, h, logits, prev_h, prev_logits):
    lg = logits if use_logits else None
    if i == 0:
      return rule.confidence(h, lg, None, None, i=i)
    return rule.confidence(h, lg, prev_h, prev_logits if use_logits else None, i=i)

  def segment(i):
    """Segment i's layers on the undecided rows, its exit check and decision.
    Runs only while some active row is undecided (``inplace.when``: the
    cache is updated in place, never copied through a conditional)."""
    def run(c):
      seg, h, cache, und, sel, sel_h, idx, confs, prev_h, prev_logits = c
      dec = active & ~und
      exit_layer = jnp.where(dec, exit_tab[jnp.clip(idx, 0, n - 1)], exit_layer0)
      if i > 0:  # rows decided at an earlier exit: this segment's KV from their state
        # (before the segment runs: the rows are disjoint, and a write after the
        # segment's attention read the same buffer would make XLA copy it)
        # (h by operand: a closed-over h lets XLA hoist the K/V projections out of
        # the 0/1-trip loop, so they would run every step, taken or not)
        fill = lambda c, h_: fill_skipped(cfg, params, spec.kv, starts[i], exits[i], h_, pos,
                                          c, jnp.where(dec, pos, s)[:, None], exit_layer)
        cache = when(jnp.any(dec), fill, cache, (h,))
      h_new, cache = D.run_layers(cfg, params, starts[i], exits[i], h, pos[:, None], cache,
                                  jnp.where(und, pos, s)[:, None])
      h = jnp.where(und[:, None, None], h_new, h)
      h_x = h[:, 0]
      if rule.exit_maps is not None:  # exit modules: the state the head reads at this exit
        h_x = rule.exit_state(i, h_x)
      logits = D.head(cfg, params, h_x) if use_logits else logits0
      cf = conf_at(i, h[:, 0], logits, prev_h, prev_logits)
      last = i == n - 1
      ok = rule.decide(i, cf, thr, forced)
      if spec.rule == "per_row":
        go = und & (ok | last)
      else:
        go = und & (jnp.all(ok | ~und) | last)
      if use_logits:
        sel = jnp.where(go[:, None], logits, sel)
      sel_h = jnp.where(go[:, None], h_x, sel_h)
      idx = jnp.where(go, i, idx)
      if not last:
        confs = _record(confs, i, cf, und)
      prev_h = jnp.where(und[:, None], h[:, 0], prev_h)
      if use_logits:
        prev_logits = jnp.where(und[:, None], logits, prev_logits)
      return seg + 1, h, cache, und & ~go, sel, sel_h, idx, confs, prev_h, prev_logits
    return run

  c = (jnp.int32(0), h0, cache, active, logits0, h0[:, 0],
       jnp.full((b,), n - 1, jnp.int32), jnp.full((b, n), jnp.nan, jnp.float32), h0[:, 0],
       logits0)
  for i in range(n):
    c = when(jnp.any(c[3]), segment(i), c)
  seg, h, cache, _, sel, sel_h, idx, confs, _, _ = c
  if not use_logits:  # the one head per emitted token
    sel = D.head(cfg, params, sel_h)

  # Segments no row reached: fill them for every active row from its exit state.
  exit_layer = exit_tab[idx]
  slots = jnp.where(active, pos, s)[:, None]

  def tail(j):  # segments [j, n) were not run
    return lambda cache, h_: fill_skipped(cfg, params, spec.kv, exits[j - 1], exits[-1], h_,
                                          pos, cache, slots, exit_layer)

  cache = select_branch(seg - 1, [tail(j) for j in range(1, n)], cache, (h,))
  filled = jnp.sum(jnp.where(active, cfg.plan.effective_depth - exit_layer, 0))
  stats = {"kv_filled_layers": filled.astype(jnp.int32)}
  return sel, idx, confs, cache, state, stats


def _oracle_step(cfg, params, spec: CalmSpec, rule: ExitRule, cache, tok, pos, active, thr,
                 forced=None):
  exits = spec.exits
  n = len(exits)
  starts = (0,) + exits[:-1]
  s = cache_length(cache)
  slots = jnp.where(active, pos, s)[:, None]
  h = D.embed(cfg, params, tok[:, None])
  logits_all, ok_all, confs, states = [], [], [], []
  prev_h, prev_logits = None, None
  for i in range(n):
    h, cache = D.run_layers(cfg, params, starts[i], exits[i], h, pos[:, None], cache, slots)
    states.append(h)
    logits = D.head(cfg, params, h[:, 0])
    cf = rule.confidence(h[:, 0], logits, prev_h, prev_logits)
    logits_all.append(logits)
    confs.append(cf if i < n - 1 else jnp.full_like(cf, jnp.nan))
    ok_all.append(rule.decide(i, cf, thr, forced))
    prev_h, prev_logits = h[:, 0], logits
  stacked = jnp.stack(logits_all)                                   # [n, B, V]
  if spec.oracle == "tokens":
    final = jnp.argmax(stacked[-1], axis=-1)
    ok = jnp.argmax(stacked, axis=-1) == final[None]
  else:
    ok = jnp.stack(ok_all)
    if spec.rule == "batch_min":
      ok = jnp.broadcast_to(jnp.all(ok | ~active[None], axis=1, keepdims=True), ok.shape)
  ok = ok.at[-1].set(True)
  idx = jnp.argmax(ok, axis=0).astype(jnp.int32)
  sel = jnp.take_along_axis(stacked, idx[None, :, None], axis=0)[0]
  confs = jnp.stack(confs, axis=-1).astype(jnp.float32)
  filled = jnp.int32(0)
  if spec.oracle == "noisy_cache":
    sel = stacked[-1]
    exit_layer = jnp.asarray(exits, jnp.int32)[idx]
    h_exit = jnp.take_along_axis(jnp.stack(states), idx[None, :, None, None], axis=0)[0]
    for j in range(1, n):  # segment j is skipped by rows that exited before it
      skip = active & (idx < j)
      cache = fill_skipped(cfg, params, spec.kv, starts[j], exits[j], h_exit, pos, cache,
                           jnp.where(skip, pos, s)[:, None], exit_layer)
    filled = jnp.sum(jnp.where(active, exits[-1] - exit_layer, 0)).astype(jnp.int32)
  return sel, idx, confs, cache, None, {"kv_filled_layers": filled}

"""Admission and prefill of ``decode.loopwise.LoopwiseServer``: steps 1-2 of
its serving loop (see that module's docstring).

``RefillMixin`` holds the part of an iteration that brings requests into the
slot pool: admission from the device-side queue, chunked prefill in place in
the slots (passes of static row counts, ``prefill_rows``), and staged refills
(the next ``stage_rows`` requests prefilled together into a staging cache, a
freed slot taking one by a cache-row copy). It relies on the server's
configuration and its ``_target``, ``_sample``, ``_eos`` and
``_feedback_depths``; ``mor.depthwise`` overrides ``_prefill_layers``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from recursive_lm.decode import depth as D
from recursive_lm.decode.inplace import when
from recursive_lm.nn.cache import KVCache, as_kv_cache

Array = jax.Array
FREE, PREFILL, DECODE = 0, 1, 2


def _lists(cache) -> KVCache:
  """The cache as a ``KVCache`` (tuple groups: one loop-carry structure)."""
  return as_kv_cache(cache)


def _put(x: Array, idx: Array, val) -> Array:
  return x.at[idx].set(jnp.asarray(val).astype(x.dtype), mode="drop")


class RefillMixin:
  """Steps 1-2 of a ``LoopwiseServer`` iteration: admission and prefill."""

  # -- 1. admission ------------------------------------------------------------
  def _admit(self, st):
    free = st["phase"] == FREE
    rank = jnp.cumsum(free.astype(jnp.int32)) - 1
    take = free & (st["head"] + rank < st["n_req"])
    if self.lockstep:
      take = take & jnp.all(free)
    return dict(st, rid=jnp.where(take, st["head"] + rank, st["rid"]),
                phase=jnp.where(take, PREFILL, st["phase"]),
                pf=jnp.where(take, 0, st["pf"]),
                head=st["head"] + jnp.sum(take, dtype=jnp.int32))

  # -- 2. chunked prefill ------------------------------------------------------
  def _prefill_layers(self, params, h, pos, sub, ws, first_chunk):
    del first_chunk
    return self.model.apply({"params": params}, h, pos, None, sub, ws,
                            method=lambda m, *a: m.layers(*a)[:2])

  def _prefill_pass(self, r: int, params, carry, max_new, sampling, stop_at_eos):
    """One chunk for up to ``r`` waiting slots not yet served this iteration."""
    st, cache, served = carry
    cfg, p, c = self.cfg, self.slots, self.chunk
    s = cache["block"][0][0].shape[3]
    todo = (st["phase"] == PREFILL) & ~served
    slot = jnp.arange(p, dtype=jnp.int32)
    # a pass over the whole pool reads and writes the cache in place (no row copies)
    rows = (jnp.where(todo, slot, p) if r == p else
            jnp.nonzero(todo, size=r, fill_value=p)[0].astype(jnp.int32))
    ok = rows < p
    ri = slot if r == p else jnp.minimum(rows, p - 1)
    rid = jnp.maximum(st["rid"][ri], 0)
    pf, ln = st["pf"][ri], st["q_len"][rid]
    cols = pf[:, None] + jnp.arange(c, dtype=jnp.int32)[None]
    tq = st["q_tok"].shape[1]
    toks = jnp.take_along_axis(st["q_tok"][rid], jnp.minimum(cols, tq - 1), axis=1)
    valid = ok[:, None] & (cols < ln[:, None])
    ws = jnp.where(valid, cols, s)
    h = D.embed(cfg, params, toks)
    first = ok & (pf == 0)
    if r == p:
      h, cache = self._prefill_layers(params, h, cols, cache, ws, first)
      cache = _lists(cache)
    else:
      h, sub = self._prefill_layers(params, h, cols, _lists(cache).rows(ri), ws, first)
      cache = _lists(cache).set_rows(rows, sub)
    done = ok & (pf + c >= ln)
    last = jnp.clip(ln - 1 - pf, 0, c - 1)
    hl = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    first = self._sample(D.head(cfg, params, hl), rid, jnp.zeros_like(rid), st["seed"],
                         sampling)
    ends = done & ((first == self._eos(stop_at_eos)) | (max_new <= 1))
    at = jnp.where(ok, rows, p)
    dn = jnp.where(done, rows, p)
    st = dict(st)
    st["pf"] = _put(st["pf"], at, pf + c)
    qi = jnp.where(done, rid, st["out_tok"].shape[0])
    st["out_tok"] = st["out_tok"].at[qi, 0].set(first, mode="drop")
    if not self._feedback_depths:
      st["out_dep"] = st["out_dep"].at[qi, 0].set(cfg.plan.loops, mode="drop")
    st["out_n"] = _put(st["out_n"], qi, 1)
    gone = ends if not self._feedback_depths else jnp.zeros_like(ends)
    for k, v in (("phase", jnp.where(gone, FREE, DECODE)), ("rid", jnp.where(gone, -1, rid)),
                 ("pos", ln), ("tok", first), ("loop", 0), ("n_out", 1),
                 ("target", self._target(rid, jnp.ones_like(rid))), ("ready", False),
                 ("parked", False), ("final", ends)):
      st[k] = _put(st[k], dn, v)
    st["prefill_passes"] = st["prefill_passes"] + 1
    return st, cache, _put(served, at, True)

  def _prefill(self, params, st, cache, **static):
    """Every waiting slot gets its next chunk: passes of the largest static row
    count the unserved waiting slots fill, largest first. Each size is a
    ``while_loop`` (zero or more passes) rather than a ``cond``/``switch``:
    a loop carry is updated in place, where XLA copies the whole KV cache into
    and out of a conditional's branches."""
    served = jnp.zeros((self.slots,), bool)
    sizes = sorted(self.prefill_rows, reverse=True)
    carry = (st, _lists(cache), served)
    for i, r in enumerate(sizes):
      least = 1 if i == len(sizes) - 1 else r
      todo = lambda c, least=least: jnp.sum((c[0]["phase"] == PREFILL) & ~c[2]) >= least
      step = functools.partial(self._prefill_pass, r, params, **static)
      carry = jax.lax.while_loop(todo, step, carry)
    return carry[0], carry[1]

  # -- 2b. staged refills -------------------------------------------------------
  def _stage_fill(self, params, st, max_new, sampling, stop_at_eos):
    """The next ``stage_rows`` queued requests, prefilled together (all their
    chunks, one pass of ``stage_rows`` rows each) into the staging cache; their
    first tokens sampled by one head call."""
    cfg, g, c = self.cfg, self.stage_rows, self.chunk
    sc = _lists(st["stage"])
    s, tq = sc.length, st["q_tok"].shape[1]
    idx = st["head"] + jnp.arange(g, dtype=jnp.int32)
    ok = idx < st["n_req"]
    rid = jnp.where(ok, idx, 0)
    ln = jnp.where(ok, st["q_len"][rid], 0)
    first_chunk = ok

    def chunk(carry):
      pf, sc, hl, n = carry
      cols = pf + jnp.arange(c, dtype=jnp.int32)[None]
      cols = jnp.broadcast_to(cols, (g, c))
      toks = jnp.take_along_axis(st["q_tok"][rid], jnp.minimum(cols, tq - 1), axis=1)
      ws = jnp.where(cols < ln[:, None], cols, s)
      h, sc = self._prefill_layers(params, D.embed(cfg, params, toks), cols, sc, ws,
                                   first_chunk & (pf == 0))
      done = (pf < ln) & (pf + c >= ln)
      last = jnp.clip(ln - 1 - pf, 0, c - 1)
      h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
      return pf + c, _lists(sc), jnp.where(done[:, None], h_last, hl).astype(hl.dtype), n + 1

    hl = jnp.zeros((g, cfg.d_model), st["h"].dtype)
    _, sc, hl, n = jax.lax.while_loop(lambda a: a[0] < jnp.max(ln), chunk,
                                      (jnp.int32(0), sc, hl, jnp.int32(0)))
    first = self._sample(D.head(cfg, params, hl), rid, jnp.zeros_like(rid), st["seed"],
                         sampling)
    ends = ok & ((first == self._eos(stop_at_eos)) | (max_new <= 1))
    st = dict(st)
    qi = jnp.where(ok, rid, st["out_tok"].shape[0])
    st["out_tok"] = st["out_tok"].at[qi, 0].set(first, mode="drop")
    if not self._feedback_depths:
      st["out_dep"] = st["out_dep"].at[qi, 0].set(cfg.plan.loops, mode="drop")
    st["out_n"] = _put(st["out_n"], qi, 1)
    # a request done at its first token needs no slot (MoR still feeds it back once)
    live = ok & ~ends if not self._feedback_depths else ok
    return dict(st, stage=sc, s_rid=jnp.where(ok, idx, -1), s_tok=first.astype(jnp.int32),
                s_live=live,
                s_end=ends, head=st["head"] + jnp.sum(ok, dtype=jnp.int32),
                prefill_passes=st["prefill_passes"] + n)

  def _admit_staged(self, st, cache):
    """Free slots take staged requests in order, one cache-row copy each."""
    p = self.slots
    free, avail = st["phase"] == FREE, st["s_live"]
    free_rank = jnp.where(free, jnp.cumsum(free) - 1, -1)
    avail_rank = jnp.where(avail, jnp.cumsum(avail) - 1, -1)
    n = jnp.minimum(jnp.sum(free), jnp.sum(avail)).astype(jnp.int32)

    def move(carry):
      i, st, cache = carry
      slot = jnp.argmax(free_rank == i).astype(jnp.int32)
      row = jnp.argmax(avail_rank == i).astype(jnp.int32)
      cache = cache.set_rows(slot[None], _lists(st["stage"]).rows(row[None]))
      rid = st["s_rid"][row]
      st = dict(st)
      for k, v in (("phase", DECODE), ("rid", rid), ("pos", st["q_len"][rid]),
                   ("tok", st["s_tok"][row]), ("loop", 0), ("n_out", 1),
                   ("target", self._target(rid[None], jnp.ones((1,), jnp.int32))[0]),
                   ("ready", False), ("parked", False), ("final", st["s_end"][row])):
        st[k] = st[k].at[slot].set(jnp.asarray(v).astype(st[k].dtype))
      st["s_live"] = st["s_live"].at[row].set(False)
      return i + 1, st, _lists(cache)

    _, st, cache = jax.lax.while_loop(lambda a: a[0] < n, move,
                                      (jnp.int32(0), st, _lists(cache)))
    return st, cache

  def _refill_staged(self, params, st, cache, **static):
    """Free slots take staged requests; an empty stage takes the next ones.

    When the stage is empty and every slot is free (the start of a stream, and
    every refill when all requests finish together, e.g. one depth for every
    token), the next P requests are prefilled in place in the pool, one pass
    of P rows per chunk, as in lockstep: staging them would copy every cache
    row from the stage into the pool (only with ``stage_rows == P``)."""
    # Most iterations have nothing to refill (no free slot, the stage full or
    # the queue served): one predicate skips all of it (a 0/1-trip loop).
    stage_empty = ~jnp.any(st["s_live"]) & (st["head"] < st["n_req"])
    work = jnp.any(st["phase"] == FREE) | stage_empty
    if self.stage_rows == self.slots:
      work = work | jnp.any(st["phase"] == PREFILL)
    return when(work, lambda c: self._refill_staged_now(params, *c, **static),
                (st, _lists(cache)))

  def _refill_staged_now(self, params, st, cache, **static):
    if self.stage_rows == self.slots:
      direct = (~jnp.any(st["s_live"]) & jnp.all(st["phase"] == FREE)
                & (st["head"] < st["n_req"]))
      st = when(direct, self._admit, st)
      st, cache = self._prefill(params, st, cache, **static)
    st, cache = self._admit_staged(st, cache)
    empty = ~jnp.any(st["s_live"]) & (st["head"] < st["n_req"])
    st = when(empty, lambda st: self._stage_fill(params, st, **static), st)
    st, cache = self._admit_staged(st, cache)
    return st, _lists(cache)

"""Loop-wise (continuous depth-wise) serving: one jitted loop over a fixed slot pool.

A pool of ``P`` slots; each slot holds one request's current token at its
*own* loop of the shared block and owns one row of a static KV cache. The
whole serving run is one ``lax.while_loop`` on the device; each iteration:

1. **admits** (steps 1-2 live in ``decode.loopwise_refill``; staged refills,
   the loop-wise default): free slots take the next *staged* requests, one
   cache-row copy each. The stage (``stage_rows`` rows, default P, with its
   own KV cache) is filled when it is empty: the next ``stage_rows``
   requests of the device-side queue (prompt buffer ``[Q, T]``, lengths, a
   head pointer) are prefilled together at full depth, one pass of
   ``stage_rows`` rows per ``prefill_chunk`` tokens, and their first tokens
   sampled by one head call. Refills thus cost what lockstep's batched
   prefill costs (on this CPU a 1-4 row pass costs 1.6-2.5x per row);
2. with ``stage_rows=0`` (and in lockstep) free slots instead take requests
   directly and **prefill in place** in chunks of ``prefill_chunk`` tokens
   (up to ``prefill_rows`` slots per pass, the static number of rows chosen
   by how many wait); a slot whose prompt is complete samples its first token;
3. **applies one loop** of the shared block to every decoding slot at its own
   loop index (``decode.loopwise_block.block_loop``: one static cache layout,
   single-slot KV writes, no per-row cache copies); slots starting a token run
   embedding + prelude, slots at their last loop the coda;
4. **emits**: slots whose token is complete are gathered into the smallest
   static *head bucket* that holds them (``head_buckets``, default multiples
   of P/8, none below one 8-row group of the native matmul, ``ROW_GROUP``; chosen
   by 0/1-trip ``while_loop``s: ``decode.inplace``, no
   conditional that copies the cache) and the LM head runs on that bucket,
   so the 49k-vocabulary head costs per emitted token, not per slot and step
   (``head_rows`` caps the bucket; slots beyond it wait a step, rotating). Tokens that stopped before the last loop get the K/V of the
   loops they skipped by state copying (CALM) for those rows only. Emitted
   tokens go straight into the per-request output buffer ``[Q, max_new]``;
   a finished request frees its slot for step 1 of the next iteration.

The loop returns to the host once, when the queue is empty and every slot is
free (the output buffer then holds every request). There is no per-step host
work.

How deep a token goes: ``exit=None`` (all loops), ``ForcedDepth`` (seeded
per-token depths, ``decode.forced_depth``; for speed measurements), or an
``ExitPolicy`` (a confidence >= threshold at a loop boundary). A confidence
needs the head at every loop, so with an ``ExitPolicy`` the head runs on every
slot every step and tokens are emitted right away.

``lockstep=True`` is the sequence-wise baseline on the same code path: the
pool is admitted only when every slot is free, decoding starts when the whole
batch is prefilled (one pass of ``P`` rows per chunk), all rows advance one
loop per step together until the deepest row of the token is done (the others
wait), the head runs once per token for the whole batch, and the batch refills
only when all its requests are finished.

Example::

    srv = LoopwiseServer(cfg, params, slots=32, exit=ForcedDepth((0.5, 0.5)))
    out = srv.generate(prompts, max_new_tokens=64)   # a decode.serving.BatchOutput
"""
from __future__ import annotations

import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.decode import depth as D
from recursive_lm.decode import loopwise_block as B
from recursive_lm.decode.engine import _round_up, check_prompts, token_ids
from recursive_lm.decode.forced_depth import ForcedDepth
from recursive_lm.decode.sampling import SamplingConfig, argmax, sample
from recursive_lm.decode.serving import (BatchOutput, ExitPolicy, check_recursive,
                                         exit_confidence)
from recursive_lm.early_exit.thresholds import should_exit
from recursive_lm.decode.inplace import select_branch, when
from recursive_lm.decode.loopwise_refill import (DECODE, FREE, PREFILL, RefillMixin,
                                                 _lists, _put)
from recursive_lm.nn.model import Transformer, decode_layout, init_cache

Array = jax.Array


def _distinct_buffers(tree):
  """``tree`` with every array leaf its own buffer (a donated argument may not
  hold one buffer twice; the initial state shares its zero vectors)."""
  seen = set()

  def own(x):
    if id(x) in seen:
      return jnp.array(x, copy=True)
    seen.add(id(x))
    return x
  return jax.tree_util.tree_map(own, tree)


# The native panel matmul computes rows in groups of 8. A call of fewer than 8
# rows splits each sum over more accumulator chains (kernels/cpu_kernels.cc,
# Chains<R>), so its rows differ from the same rows in a bigger call by float
# rounding; in a call of at least 8 rows every row, a partial last group's
# too, sums as in a full group. Buckets of at least 8 rows therefore give the
# head and the fill lockstep's full-pool values bitwise (bf16 panels round
# activations, so a rounding difference upstream can change a token; measured
# on an AVX-512 CPU without AMX, where 4-row buckets gave other bf16 tokens
# than lockstep before the kernel summed partial groups that way).
ROW_GROUP = 8


def _eighths(slots: int, top: int) -> tuple[int, ...]:
  """Static bucket sizes: the multiples of slots/8 (at least 1) capped at top,
  none below one row group of the native kernel (``ROW_GROUP``) when the pool
  holds at least two."""
  step = max(slots // 8, 1)
  sizes = {min(b, top) for b in range(step, top + step, step)}
  if slots >= 2 * ROW_GROUP:
    sizes = {max(b, min(ROW_GROUP, top)) for b in sizes}
  return tuple(sorted(sizes))


class LoopwiseServer(RefillMixin):
  """Loop-wise (or, ``lockstep=True``, sequence-wise) serving; see module docstring.

  Args:
    cfg, params: a recursive model (``cfg.plan.loops >= 2``).
    slots: pool size P.
    exit: None, ``ForcedDepth`` or ``ExitPolicy``.
    lockstep: the sequence-wise baseline on the same code path.
    eos_id, pad_id: as for ``decode.engine.Engine``.
    prefill_chunk: prompt tokens per slot and prefill pass.
    prefill_rows: static row counts of a prefill pass (the largest that the
      unserved waiting slots fill is used, repeatedly, until every waiting
      slot has its next chunk); default: the powers of two with at most 64
      token rows per pass, and P; (P,) in lockstep.
    head_rows: most slots the head serves per step (default P: none waits).
    head_buckets: static row counts of the head (the smallest that holds the
      waiting slots runs); default multiples of P/8 (from P = 16 on none
      below 8 rows: ``ROW_GROUP``) up to head_rows, or just
      head_rows in lockstep or when every token has the same depth.
    stage_rows: rows of the refill stage (loop-wise; default P); 0 prefills
      refills in place in the slots (passes of ``prefill_rows``).
    kernel_layout, fuse: decode weight layout, as for ``Engine``.
    compact_fill: the skipped-loop K/V fill projects only the rows that
      skipped (static buckets as the head's); False: every head-bucket row, masked.
    block_buckets: static row counts of one block loop (the smallest that
      holds the busy slots runs; loop-wise default multiples of P/4 with f32
      weights, else, and in lockstep, just P); (P,): every slot every step.
    defer_fill: (loop-wise, ``compact_fill``) the skipped-loop K/V of the
      tokens emitted in one iteration may wait one iteration and be filled
      together with the next iteration's (one fill call per two iterations,
      twice the rows): the next token of a slot reads a skipped loop's K/V
      two iterations after its token was emitted at the earliest. Default on
      in loop-wise; lockstep fills once per token (nothing to pair).
  """

  def __init__(self, cfg: ModelConfig, params, slots: int = 8, exit=None,
               lockstep: bool = False, eos_id: int | None = None,
               pad_id: int | None = None, prefill_chunk: int = 32,
               prefill_rows: Sequence[int] | None = None, head_rows: int | None = None,
               kernel_layout: str | None = None, fuse: bool = False, weights: str = "f32",
               stage_rows: int | None = None, head_buckets: Sequence[int] | None = None,
               compact_fill: bool = True, block_buckets: Sequence[int] | None = None,
               defer_fill: bool | None = None):
    check_recursive(cfg, "depth-wise batching" if not lockstep else
                    "the sequence-wise early-exit baseline")
    if slots < 1:
      raise ValueError(f"slots must be >= 1, got {slots}")
    if exit is not None and not isinstance(exit, (ExitPolicy, ForcedDepth)):
      raise ValueError(f"exit must be None, an ExitPolicy or a ForcedDepth, got {exit!r}")
    if isinstance(exit, ForcedDepth) and exit.max_depth != cfg.plan.loops:
      raise ValueError(f"ForcedDepth has {exit.max_depth} depths but the model loops "
                       f"its block {cfg.plan.loops} times; give one probability per loop")
    if prefill_chunk < 1:
      raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    cfg, params = decode_layout(cfg, params, kernel_layout, fuse, weights=weights)
    self.cfg, self.params, self.slots, self.exit = cfg, params, int(slots), exit
    self.lockstep = bool(lockstep)
    self.model = Transformer(cfg)
    self.eos_id, self.pad_id = token_ids(cfg, eos_id, pad_id)
    self.chunk = int(prefill_chunk)
    p = self.slots
    # native skinny matmuls up to 64 token rows (kernels.panel.MAX_NATIVE_ROWS)
    small = [1 << i for i in range(7) if (1 << i) * self.chunk <= 64]
    rows = prefill_rows or ((p,) if lockstep else (*small, p))
    self.prefill_rows = tuple(sorted({min(max(int(r), 1), p) for r in rows}))
    if head_rows is None:
      # At most every slot: the head bucket (below) fits the slots that wait,
      # so no finished token waits a step for the head.
      head_rows = p
    self.head_rows = min(max(int(head_rows), 1), p)
    # Staged refills (loop-wise): the next requests are prefilled together, in
    # one pass of ``stage_rows`` rows per chunk, into a staging cache, and a
    # slot that frees takes a staged request by copying its cache row. Refills
    # then cost what lockstep's batched prefill costs instead of small passes
    # of 1-4 rows (1.6-2.5x the cost per row on this CPU's skinny matmuls).
    if stage_rows is None:
      stage_rows = 0 if lockstep else p
    if stage_rows < 0:
      raise ValueError(f"stage_rows must be >= 0 (0: refill slots in place), got {stage_rows}")
    self.stage_rows = 0 if lockstep else int(stage_rows)
    # Head buckets: the head runs on the smallest bucket that holds every slot
    # waiting for it (at most head_rows), picked by 0/1-trip while_loops, so it
    # costs per emitted token, not per slot. One depth for every token (or
    # lockstep): the one bucket of all head_rows, so slots that start together
    # stay together and the head runs once per token for the pool.
    if head_buckets is None:
      head_buckets = ((self.head_rows,) if lockstep or self._fixed_depth() else
                      _eighths(p, self.head_rows))
    self.head_buckets = tuple(sorted({min(max(int(b), 1), self.head_rows)
                                      for b in head_buckets} | {self.head_rows}))
    # The skipped-loop fill runs on the rows that skipped only, in the smallest
    # of these static buckets that holds them (compact_fill=False: the whole
    # head bucket, masked).
    self.compact_fill = bool(compact_fill)
    self.fill_buckets = _eighths(p, self.head_rows)
    # Deferred fills: a pending iteration's rows (at most head_rows) and the
    # current one's, in static buckets of multiples of P/4 (whole row groups)
    # up to twice that.
    if defer_fill is None:
      defer_fill = not lockstep
    self.defer_fill = bool(defer_fill) and self.compact_fill and not lockstep
    self.defer_buckets = _eighths(2 * p, 2 * self.head_rows)
    # Block row buckets (loop-wise): the block's matmuls run on the smallest of
    # these that holds the busy slots (the drain tail of a stream). Lockstep
    # runs every slot (the sequence-wise baseline: every row of the batch
    # steps until its deepest row is done).
    # With bf16/int8 weights the block runs on every slot too: its row buckets
    # gave one request of 64 another token from its 112th on (2 loops, 16 +
    # 128, bf16 panels, this AVX-512 CPU without AMX; the matmuls of whole
    # 8-row groups are bitwise those of the full pool, so the difference is in
    # the XLA ops at 8-24 rows), where the block on every slot gave lockstep's
    # tokens; activations rounded to bf16 turn a last-bit difference into a
    # token. f32 keeps the buckets (the drain tail's saving).
    if block_buckets is None:
      block_buckets = ((p,) if lockstep or weights != "f32" else
                       tuple(sorted({max(p * i // 4, 1) for i in range(1, 5)})))
    self.block_buckets = tuple(sorted({min(max(int(b), 1), p) for b in block_buckets}
                                      | {p}))

  def _fixed_depth(self) -> bool:
    if isinstance(self.exit, ForcedDepth):
      return sum(q > 0 for q in self.exit.probs) == 1
    return self.exit is None

  def _all_loops(self) -> bool:
    """Every token runs every loop (no exits): no token has skipped loops to fill."""
    if isinstance(self.exit, ForcedDepth):
      return all(q == 0 for q in self.exit.probs[:-1])
    return self.exit is None

  def _expected_depth(self) -> float:
    if isinstance(self.exit, ForcedDepth):
      return self.exit.mean_depth
    return float(self.cfg.plan.loops)

  @property
  def _emit_now(self) -> bool:
    """Confidence exits need the head at every loop: emit in the decode step."""
    return isinstance(self.exit, ExitPolicy)

  # Instances with the same static settings share compiled code.
  def _static_key(self):
    return (type(self), self.cfg, self.slots, self.exit if not self._emit_now else
            self.exit.measure, self.lockstep, self.eos_id, self.pad_id, self.chunk,
            self.prefill_rows, self.head_rows, self.stage_rows, self.head_buckets,
            self.compact_fill, self.block_buckets, self.defer_fill)

  def __hash__(self):
    return hash(self._static_key())

  def __eq__(self, other):
    return type(self) is type(other) and self._static_key() == other._static_key()

  # -- state -------------------------------------------------------------------
  def _init_state(self, q_tok, q_len, n_req, max_new: int, seed: int):
    p, q = self.slots, q_tok.shape[0]
    zi = jnp.zeros((p,), jnp.int32)
    zb = jnp.zeros((p,), bool)
    zero = jnp.zeros((), jnp.int32)
    return dict(
        q_tok=q_tok, q_len=q_len, n_req=n_req, head=zero,
        out_tok=jnp.full((q, max_new), self.pad_id, jnp.int32),
        out_dep=jnp.zeros((q, max_new), jnp.int32), out_n=jnp.zeros((q,), jnp.int32),
        rid=zi - 1, phase=zi, pf=zi, pos=zi, tok=zi, loop=zi, target=zi, n_out=zi,
        h=jnp.zeros((p, self.cfg.d_model), jnp.dtype(self.cfg.dtype)),
        ready=zb, parked=zb, final=zb, seed=jnp.asarray(seed, jnp.int32),
        steps=zero, busy=zero, head_calls=zero, prefill_passes=zero, iters=zero,
        fill_calls=zero, **self._init_stage(), **self._init_pending())

  def _init_pending(self):
    """Skipped-loop fills waiting one iteration (``defer_fill``): per slot the
    exit state, position, depth and request of its last emitted token."""
    if not self.defer_fill:
      return {}
    p = self.slots
    zi = jnp.zeros((p,), jnp.int32)
    return dict(f_h=jnp.zeros((p, self.cfg.d_model), jnp.dtype(self.cfg.dtype)),
                f_pos=zi, f_depth=zi, f_rid=zi - 1, f_pend=jnp.zeros((p,), bool))

  def _init_stage(self):
    """The staging area of staged refills (no entries when not staged); its
    cache (``stage``) is added by ``generate``."""
    g = self.stage_rows
    if not g:
      return {}
    zi = jnp.zeros((g,), jnp.int32)
    return dict(s_rid=zi - 1, s_tok=zi, s_live=jnp.zeros((g,), bool),
                s_end=jnp.zeros((g,), bool))

  def _target(self, rid: Array, j: Array) -> Array:
    """Loops token j of request rid runs."""
    n = self.cfg.plan.loops
    if isinstance(self.exit, ForcedDepth):
      return self.exit.depth(rid, j)
    return jnp.full(rid.shape, n, jnp.int32)

  def _sample(self, logits: Array, rid: Array, j: Array, seed: Array, sampling):
    """Token per row; non-greedy keys depend only on (seed, request, token index)."""
    if sampling.greedy:
      return argmax(logits.astype(jnp.float32))
    key = jax.random.fold_in(jax.random.key(0), seed)
    keys = jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(key, r), t))(rid, j)
    return jax.vmap(lambda l, k: sample(l[None], k, sampling)[0])(logits, keys)

  def _eos(self, stop_at_eos: bool) -> int:
    return self.eos_id if (stop_at_eos and self.eos_id is not None) else -1

  # -- 3. one loop for every decoding slot -------------------------------------
  _feedback_depths = False  # MoR records the depth of the fed-back token

  def _decode_block(self, params, st, cache, go, threshold, max_new, sampling,
                    stop_at_eos):
    cfg, plan = self.cfg, self.cfg.plan
    s = cache["block"][0][0].shape[3]
    n_loops, total = plan.loops, plan.effective_depth
    loop, pos = st["loop"], st["pos"]
    p1 = pos[:, None]
    fresh = go & (loop == 0)
    h0 = D.embed(cfg, params, st["tok"][:, None])
    h0, cache = D.run_layers(cfg, params, 0, plan.prelude, h0, p1, cache,
                             jnp.where(fresh, pos, s)[:, None])
    h_in = jnp.where(fresh[:, None], h0[:, 0], st["h"])
    h, blk = self._block_loop(params, loop, h_in, pos, cache["block"], go)
    cache = _lists(cache).replace(block=blk)
    last = loop == n_loops - 1
    h_out = h
    if plan.coda:
      hc, cache = D.run_layers(cfg, params, total - plan.coda, total, h[:, None], p1,
                               cache, jnp.where(go & last, pos, s)[:, None])
      h_out = jnp.where(last[:, None], hc[:, 0], h)
    st = dict(st, h=jnp.where(go[:, None], h_out, st["h"]).astype(st["h"].dtype))
    if not self._emit_now:
      fin = go & (loop + 1 >= st["target"])
      return dict(st, ready=st["ready"] | fin,
                  loop=jnp.where(go & ~fin, loop + 1, loop)), _lists(cache)
    # Confidence exits: the head on every slot, emit now.
    logits = D.head(cfg, params, h_out)
    early = go & ~last & should_exit(exit_confidence(self.exit, logits, h_in, h),
                                     threshold)
    rows = jnp.arange(self.slots)
    cache = when(jnp.any(early),
                 lambda c, h, pos, depth, early: B.fill_kv(cfg, params, c, rows, h, pos,
                                                           depth, early),
                 _lists(cache), (h, pos, loop + 1, early))
    emit = go & (last | early)
    st = dict(st, loop=jnp.where(go & ~emit, loop + 1, loop),
              head_calls=st["head_calls"] + 1)
    return self._emit(st, emit, rows, logits, loop + 1, max_new, sampling,
                      stop_at_eos), cache

  def _block_loop(self, params, loop, h, pos, block_cache, go):
    """One loop of the shared block per row (a method: profiles replace it).

    The block runs on the smallest static row bucket (``block_buckets``) that
    holds the slots in ``go``, gathered (their states; the cache is read and
    written in place): when few slots are busy (the drain at the end of a
    stream) the block's matmuls run on those rows only. 0/1-trip loops pick
    the bucket (``decode.inplace``); the full bucket runs every slot."""
    cfg, p = self.cfg, self.slots
    if self.block_buckets == (p,):
      return B.block_loop(cfg, params, loop, h, pos, block_cache, go)
    buckets = self.block_buckets
    n = jnp.sum(go, dtype=jnp.int32)
    pick = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), n).astype(jnp.int32)

    def run(b):
      def fn(carry, loop, h, pos, go):
        out, blk = carry
        if b == p:
          hb, blk = B.block_loop(cfg, params, loop, h, pos, blk, go)
          return hb.astype(out.dtype), tuple(blk)
        rows = jnp.nonzero(go, size=b, fill_value=p)[0].astype(jnp.int32)
        at = jnp.minimum(rows, p - 1)
        hb, blk = B.block_loop(cfg, params, loop[at], h[at], pos[at], blk,
                               go[at] & (rows < p), rows)
        return out.at[rows].set(hb.astype(out.dtype), mode="drop"), tuple(blk)
      return fn

    return select_branch(pick, [run(b) for b in buckets],
                         (h, tuple(tuple(kv) for kv in block_cache)), (loop, h, pos, go))

  # -- 4. emission -------------------------------------------------------------
  def _emit(self, st, sel_ok, sel, logits, depth, max_new, sampling, stop_at_eos):
    """Rows ``sel`` [R] (slot ids; ``sel_ok`` [R]) emit a token from ``logits``."""
    p, q = self.slots, st["out_tok"].shape[0]
    rid, n_out = st["rid"][sel], st["n_out"][sel]
    tok = self._sample(logits, jnp.maximum(rid, 0), n_out, st["seed"], sampling)
    qi = jnp.where(sel_ok, rid, q)
    at = jnp.where(sel_ok, sel, p)
    st = dict(st)
    if self._feedback_depths:
      # depth of the token fed back (out[n_out - 1]); a final row stops here
      st["out_dep"] = st["out_dep"].at[qi, n_out - 1].set(depth, mode="drop")
      stop = sel_ok & st["final"][sel]
      emit = sel_ok & ~stop
    else:
      st["out_dep"] = st["out_dep"].at[qi, n_out].set(depth, mode="drop")
      stop = jnp.zeros_like(sel_ok)
      emit = sel_ok
    qe = jnp.where(emit, rid, q)
    st["out_tok"] = st["out_tok"].at[qe, n_out].set(tok, mode="drop")
    n_new = n_out + emit.astype(jnp.int32)
    st["out_n"] = _put(st["out_n"], qe, n_new)
    ends = emit & ((tok == self._eos(stop_at_eos)) | (n_new >= max_new))
    free = stop if self._feedback_depths else ends
    cont = sel_ok & ~free
    st["final"] = _put(st["final"], jnp.where(emit, sel, p), ends)
    st["phase"] = _put(st["phase"], jnp.where(free, sel, p), FREE)
    st["rid"] = _put(st["rid"], jnp.where(free, sel, p), -1)
    ac = jnp.where(cont, sel, p)
    st["n_out"] = _put(st["n_out"], at, n_new)
    st["pos"] = _put(st["pos"], ac, st["pos"][sel] + 1)
    st["tok"] = _put(st["tok"], jnp.where(emit, sel, p), tok)
    st["loop"] = _put(st["loop"], ac, 0)
    st["target"] = _put(st["target"], ac, self._target(jnp.maximum(rid, 0), n_new))
    st["ready"] = _put(st["ready"], at, False)
    if self.lockstep:
      st["parked"] = _put(st["parked"], ac, True)
    return st

  def _head_order(self, st):
    """Slots in head priority: ready ones first, rotating with the iteration."""
    p = self.slots
    slots = jnp.arange(p, dtype=jnp.int32)
    key = jnp.where(st["ready"], (slots - st["iters"]) % p, p + slots)
    return jnp.argsort(key).astype(jnp.int32)

  def _fill_served(self, params, st, cache, need, order):
    """K/V of the skipped loops (state copying) for the tokens the head serves
    this iteration (``need``) that stopped before the last loop: only those
    rows are projected, gathered into the smallest static fill bucket that
    holds them (multiples of P/8 in whole row groups; 0/1-trip loops). The inputs reach the fill
    as operands (``decode.inplace``), so no projection is hoisted out of it to
    run when no row skipped. With ``defer_fill`` (``_fill_deferred``) this
    iteration's rows may wait one iteration. Returns (state, cache)."""
    cfg, p = self.cfg, self.slots
    rank = jnp.zeros((p,), jnp.int32).at[order].set(jnp.arange(p, dtype=jnp.int32))
    depth = st["loop"] + 1
    skipped = need & st["ready"] & (rank < self.head_rows) & (depth < cfg.plan.loops)
    if self.defer_fill:
      return self._fill_deferred(params, st, cache, skipped, depth)
    cache, called = self._fill_rows(params, cache, self.fill_buckets,
                                    jnp.arange(p, dtype=jnp.int32), st["h"], st["pos"],
                                    depth, skipped)
    return dict(st, fill_calls=st["fill_calls"] + called), cache

  def _fill_rows(self, params, cache, buckets, slot, h, pos, depth, ok):
    """The skipped-loop K/V of the rows where ``ok`` (row i: slot ``slot[i]``,
    exit state ``h[i]``, position, depth), gathered into the smallest static
    bucket of ``buckets`` that holds them (0/1-trip loops; nothing runs when
    no row is ``ok``). Returns (cache, 1 if a fill ran else 0)."""
    cfg, rows = self.cfg, ok.shape[0]
    n = jnp.sum(ok, dtype=jnp.int32)
    pick = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), n).astype(jnp.int32)
    pick = jnp.where(n > 0, pick, len(buckets))

    def fill(b):
      def fn(c, h, pos, depth, ok):
        i = jnp.nonzero(ok, size=b, fill_value=rows)[0].astype(jnp.int32)
        valid = i < rows
        i = jnp.minimum(i, rows - 1)
        return B.fill_kv(cfg, params, c, slot[i], h[i], pos[i], depth[i], valid & ok[i])
      return fn

    cache = select_branch(pick, [fill(b) for b in buckets], _lists(cache), (h, pos, depth, ok))
    return cache, (n > 0).astype(jnp.int32)

  def _fill_deferred(self, params, st, cache, skipped, depth):
    """The skipped-loop fill one iteration late, two iterations per call.

    A token emitted in iteration t starts its successor at loop 0 in t + 1;
    the successor reads loop >= 1 (and the coda) in t + 2 at the earliest, so
    the K/V its predecessor skipped may be written after t + 1's block. Rows
    pending from the previous iteration (whose slot still serves the same
    request: a finished request's last K/V is never read, and a slot that
    took a new request must not be written) are filled now together with this
    iteration's rows; when none is pending, this iteration's rows wait
    instead. One call then serves two iterations' rows, which halves the
    fill's per-call cost (its K/V weights read once per call, its 2 x layers
    small ops); the rows written are those of the immediate fill, their
    values too (each row in a whole 8-row group of the native matmul in both,
    ``ROW_GROUP``)."""
    p = self.slots
    pend = st["f_pend"] & (st["rid"] == st["f_rid"]) & (st["phase"] == DECODE)
    now = jnp.any(pend)
    cur = skipped & now
    h2 = jnp.concatenate([st["f_h"], st["h"].astype(st["f_h"].dtype)])
    pos2 = jnp.concatenate([st["f_pos"], st["pos"]])
    dep2 = jnp.concatenate([st["f_depth"], depth])
    ok2 = jnp.concatenate([pend, cur])
    slot2 = jnp.concatenate([jnp.arange(p, dtype=jnp.int32)] * 2)
    cache, called = self._fill_rows(params, cache, self.defer_buckets, slot2, h2, pos2,
                                    dep2, ok2)
    wait = skipped & ~now
    st = dict(st, f_pend=wait, f_h=jnp.where(wait[:, None], st["h"], st["f_h"]).astype(
                  st["f_h"].dtype),
              f_pos=jnp.where(wait, st["pos"], st["f_pos"]),
              f_depth=jnp.where(wait, depth, st["f_depth"]),
              f_rid=jnp.where(wait, st["rid"], -1),
              fill_calls=st["fill_calls"] + called)
    return st, cache

  def _head_step(self, hr: int, params, st, cache, order, max_new, sampling,
                 stop_at_eos):
    """The head for up to ``hr`` waiting slots (``order``: ``_head_order``,
    computed once per iteration; rotating priority); with
    ``compact_fill=False`` also the K/V fill of the loops their tokens skipped
    (masked over the bucket; else ``_fill_served`` ran before)."""
    cfg, p = self.cfg, self.slots
    sel = order[:hr]
    ok = st["ready"][sel]
    h = st["h"][sel]
    depth = st["loop"][sel] + 1
    if not self._feedback_depths:
      if not self.compact_fill:  # (else filled by _fill_served before the head)
        skipped = ok & (depth < cfg.plan.loops)
        cache = when(jnp.any(skipped),
                     lambda c, sel, h, pos, depth, skipped: B.fill_kv(
                         cfg, params, c, sel, h, pos, depth, skipped),
                     _lists(cache), (sel, h, st["pos"][sel], depth, skipped))
    else:
      depth = st["cnt"][sel]
    logits = self._head_logits(params, h)
    st = dict(st, head_calls=st["head_calls"] + 1)
    return self._emit(st, ok, sel, logits, depth, max_new, sampling, stop_at_eos), cache

  def _head_logits(self, params, h):
    """The LM head on the bucket's states (a method: profiles replace it)."""
    return D.head(self.cfg, params, h)

  # -- the loop ------------------------------------------------------------------
  def _step(self, params, carry, threshold, max_new, sampling, stop_at_eos):
    st, cache = carry
    static = dict(max_new=max_new, sampling=sampling, stop_at_eos=stop_at_eos)
    if self.stage_rows:
      st, cache = self._refill_staged(params, st, cache, **static)
    else:
      st = self._admit(st)
      st, cache = self._prefill(params, st, cache, **static)
    decoding = st["phase"] == DECODE
    go = decoding & ~st["ready"] & ~st["parked"]
    if self.lockstep:
      go = go & ~jnp.any(st["phase"] == PREFILL)
    st, cache = jax.lax.cond(
        jnp.any(go),
        lambda a: self._decode_block(params, *a, go, threshold, **static),
        lambda a: a, (st, cache))
    st = dict(st, steps=st["steps"] + jnp.any(go).astype(jnp.int32),
              busy=st["busy"] + jnp.sum(go, dtype=jnp.int32))
    if not self._emit_now:
      need = jnp.any(st["ready"])
      if self.lockstep:  # once per token, when the deepest row is done
        need = need & ~jnp.any((st["phase"] == DECODE) & ~st["ready"] & ~st["parked"])
      # the smallest head bucket that holds every waiting slot (at most head_rows)
      buckets = self.head_buckets
      n_ready = jnp.minimum(jnp.sum(st["ready"], dtype=jnp.int32), self.head_rows)
      pick = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), n_ready).astype(jnp.int32)
      pick = jnp.where(need, pick, len(buckets))
      order = self._head_order(st)  # once per iteration: the fill and the head share it
      # (statically absent when every token runs every loop: nothing to fill)
      if self.compact_fill and not self._feedback_depths and not self._all_loops():
        st, cache = self._fill_served(params, st, cache, need, order)
      st, cache = select_branch(
          pick, [lambda a, order, b=b: self._head_step(b, params, *a, order, **static)
                 for b in buckets],
          (st, _lists(cache)), (order,))
    if self.lockstep:  # the batch moves on when no row is still computing
      moving = (st["phase"] == DECODE) & ~st["parked"]
      st = dict(st, parked=st["parked"] & jnp.any(moving))
    return dict(st, iters=st["iters"] + 1), _lists(cache)

  # The state and the caches are donated: the loop then updates the caller's
  # buffers in place instead of first copying every cache tensor (one copy of
  # the pool, and of the stage, per run).
  @functools.partial(jax.jit, static_argnums=0, donate_argnums=(2, 3),
                     static_argnames=("max_new", "sampling", "stop_at_eos"))
  def _serve(self, params, st, cache, threshold, max_iters, max_new, sampling,
             stop_at_eos):
    def cond(c):
      st = c[0]
      staged = jnp.any(st["s_live"]) if self.stage_rows else False
      return ((jnp.any(st["phase"] != FREE) | (st["head"] < st["n_req"]) | staged)
              & (st["iters"] < max_iters))

    def body(c):
      return self._step(params, c, threshold, max_new, sampling, stop_at_eos)

    return jax.lax.while_loop(cond, body, (st, _lists(cache)))

  # -- public API --------------------------------------------------------------
  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               stop_at_eos: bool = True) -> BatchOutput:
    """Serves ``prompts`` (any number; FIFO queue) through the slot pool."""
    lengths = check_prompts(self.cfg, prompts, max_new_tokens)
    c = self.chunk
    s = _round_up(max(lengths) + max_new_tokens, 64)
    tq = _round_up(max(lengths), c)
    q = 1 << max(len(prompts) - 1, 0).bit_length()   # bucketed queue size
    toks = np.full((q, tq), self.pad_id, np.int32)
    lens = np.ones((q,), np.int32)
    for i, pr in enumerate(prompts):
      toks[i, :len(pr)] = pr
      lens[i] = len(pr)
    t0 = time.perf_counter()
    st = self._init_state(jnp.asarray(toks), jnp.asarray(lens),
                          jnp.asarray(len(prompts), jnp.int32), max_new_tokens, seed)
    cache = init_cache(self.cfg, self.slots, s)
    if self.stage_rows:
      st["stage"] = init_cache(self.cfg, self.stage_rows, s)
    threshold = jnp.float32(self.exit.threshold if self._emit_now else math.inf)
    st, cache = _distinct_buffers((st, cache))  # both are donated
    st, _ = self._serve(self.params, st, cache, threshold,
                        jnp.asarray(np.iinfo(np.int32).max, jnp.int32),
                        max_new=max_new_tokens, sampling=sampling, stop_at_eos=stop_at_eos)
    keys = ("out_tok", "out_dep", "out_n", "steps", "busy", "head_calls", "prefill_passes",
            "fill_calls")
    out_tok, out_dep, out_n, steps, busy, heads, passes, fills = jax.device_get(
        tuple(st[k] for k in keys))
    self.last_fill_calls = int(fills)  # skipped-loop fill calls of this run
    seconds = time.perf_counter() - t0
    n = len(prompts)
    return BatchOutput([out_tok[i, :out_n[i]].tolist() for i in range(n)],
                       [out_dep[i, :out_n[i]].tolist() for i in range(n)],
                       lengths, seconds, 0.0, int(steps), int(steps) * self.slots,
                       int(busy), int(heads), int(passes))

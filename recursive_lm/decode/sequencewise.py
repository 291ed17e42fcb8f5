"""Sequence-wise (static) batching with per-token early exit: the baseline for
``decode.depthwise.DepthwiseBatcher``.

Requests are served in static batches of ``slots``. Each token of the batch
runs the loops of the shared block in lockstep; a row that exits early (same
``ExitPolicy`` and the same state-copying KV fill as depth-wise batching) is
masked out of the remaining loops, but the batch only moves to the next token
when its deepest row is done (loops are skipped only when *every* row has
exited), and the next batch starts only when every request of this one has
finished. That is the "bubble" depth-wise batching removes; tokens are the
same per request as depth-wise batching's, so the two can be timed against
each other.

Example::

    base = SequenceBatcher(cfg, params, slots=32, exit=ExitPolicy("softmax_max", 0.9))
    out = base.generate(prompts, max_new_tokens=128)   # a depthwise.BatchOutput
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
from recursive_lm.decode.depthwise import (BatchOutput, DepthwiseBatcher, ExitPolicy, _check_requests,
                                           check_recursive, exit_confidence,
                                           fill_skipped_kv)
from recursive_lm.decode.engine import _round_up, bucket_length, chunk_step, token_ids
from recursive_lm.decode.sampling import SamplingConfig, sample
from recursive_lm.decode.speculative import normalize_cache
from recursive_lm.early_exit.thresholds import should_exit
from recursive_lm.nn.model import Transformer, cache_length, init_cache


class SequenceBatcher:
  """Static batches of ``slots`` requests; per-row exits wait for the batch.

  Same constructor and ``generate`` as ``DepthwiseBatcher`` (cfg, params from
  ``recursive_lm.api.load(...)`` or ``recursive_lm.export.load_model(...)``).
  """

  def __init__(self, cfg: ModelConfig, params, slots: int = 8,
               exit: ExitPolicy | None = None, eos_id: int | None = None,
               pad_id: int | None = None):
    check_recursive(cfg, "the sequence-wise early-exit baseline")
    if slots < 1:
      raise ValueError(f"slots must be >= 1, got {slots}")
    self.cfg, self.params, self.slots, self.exit = cfg, params, int(slots), exit
    self.model = Transformer(cfg)
    self.eos_id, self.pad_id = token_ids(cfg, eos_id, pad_id)

  # Instances with the same static settings share compiled code.
  _static_key = DepthwiseBatcher._static_key

  def __hash__(self):
    return hash(self._static_key())

  def __eq__(self, other):
    return (isinstance(other, SequenceBatcher)
            and self._static_key() == other._static_key())

  @functools.partial(jax.jit, static_argnums=0)
  def _prefill(self, params, cache, tokens, lengths):
    b, t = tokens.shape
    s = cache_length(cache)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = chunk_step(self.model, params, cache, tokens, pos,
                               jnp.where(pos < lengths[:, None], pos, s))
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return last, normalize_cache(cache)

  def _token(self, params, cache, tok, pos, done, threshold):
    """One token for the batch, loop by loop. Returns (cache, logits, loops
    run per row, block applications, busy row-loops)."""
    cfg, plan = self.cfg, self.cfg.plan
    s = cache_length(cache)
    total, n_loops = plan.effective_depth, plan.loops
    p1 = pos[:, None]
    h = D.embed(cfg, params, tok[:, None])
    h, cache = D.run_layers(cfg, params, 0, plan.prelude, h, p1, cache,
                            jnp.where(done, s, pos)[:, None])
    b = tok.shape[0]
    zero = jnp.zeros((), jnp.int32)
    carry = (h[:, 0], normalize_cache(cache), done,
             jnp.zeros((b, cfg.vocab_size), jnp.float32), jnp.zeros((b,), jnp.int32),
             zero, zero)
    for m in range(n_loops):
      def run_loop(c, m=m):
        h, cache, exited, sel, loops, steps, busy = c
        go = ~exited
        h_new, cache = D.apply_loop(cfg, params, m, h[:, None], p1, cache,
                                    jnp.where(go, pos, s)[:, None])
        h_new = jnp.where(go[:, None], h_new[:, 0], h)
        busy = busy + jnp.sum(go, dtype=jnp.int32)
        if m == n_loops - 1:
          h_out = h_new
          if plan.coda:
            hc, cache = D.run_layers(cfg, params, total - plan.coda, total, h_new[:, None],
                                     p1, cache, jnp.where(go, pos, s)[:, None])
            h_out = hc[:, 0]
          stop = go
          logits = D.head(cfg, params, h_out)
        elif self.exit is not None:
          logits = D.head(cfg, params, h_new)
          stop = go & should_exit(exit_confidence(self.exit, logits, h, h_new),
                                  threshold)
          cache = jax.lax.cond(
              jnp.any(stop), lambda c: fill_skipped_kv(
                  cfg, params, c, h_new, pos, jnp.full_like(pos, m), stop),
              lambda c: c, normalize_cache(cache))
        else:
          return (h_new, normalize_cache(cache), exited, sel, loops, steps + 1, busy)
        sel = jnp.where(stop[:, None], logits.astype(jnp.float32), sel)
        loops = jnp.where(stop, m + 1, loops)
        return (h_new, normalize_cache(cache), exited | stop, sel, loops, steps + 1,
                busy)
      carry = jax.lax.cond(jnp.all(carry[2]), lambda c: c, run_loop, carry)
    _, cache, _, sel, loops, steps, busy = carry
    return cache, sel, loops, steps, busy

  @functools.partial(jax.jit, static_argnums=0,
                     static_argnames=("max_new", "sampling", "stop_at_eos"))
  def _decode(self, params, cache, last, lengths, rng, threshold, max_new, sampling,
              stop_at_eos):
    b = lengths.shape[0]
    eos = self.eos_id if (stop_at_eos and self.eos_id is not None) else -1
    rng, k0 = jax.random.split(rng)
    first = sample(last, k0, sampling)
    out = jnp.full((b, max_new), self.pad_id, jnp.int32).at[:, 0].set(first)
    loops = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(self.cfg.plan.loops)
    done = (first == eos) | (max_new <= 1) | (lengths == 0)
    zero = jnp.zeros((), jnp.int32)

    def cond(st):
      return (st[0] < max_new) & ~jnp.all(st[4])

    def body(st):
      step, cache, tok, pos, done, out, loops, rng, steps, busy = st
      cache, logits, lp, n, bz = self._token(params, cache, tok, pos, done, threshold)
      rng, key = jax.random.split(rng)
      new = sample(logits, key, sampling)
      col = jnp.where(done, max_new, step)
      rows = jnp.arange(b)
      out = out.at[rows, col].set(new, mode="drop")
      loops = loops.at[rows, col].set(lp, mode="drop")
      live = ~done
      done = done | (new == eos) | (step + 1 >= max_new)
      return (step + 1, cache, jnp.where(live, new, tok), jnp.where(live, pos + 1, pos),
              done, out, loops, rng, steps + n, busy + bz)

    st = (jnp.ones((), jnp.int32), cache, first, lengths, done, out, loops, rng, zero,
          zero)
    st = jax.lax.while_loop(cond, body, st)
    return st[5], st[6], st[8], st[9]

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               stop_at_eos: bool = True) -> BatchOutput:
    lengths = _check_requests(self.cfg, prompts, max_new_tokens)
    s = _round_up(max(lengths) + max_new_tokens, 64)
    eos = self.eos_id if (stop_at_eos and self.eos_id is not None) else None
    t_start = time.perf_counter()
    prefill_s, steps, busy = 0.0, 0, 0
    tokens_out, loops_out = [], []
    for start in range(0, len(prompts), self.slots):
      group = list(range(start, min(start + self.slots, len(prompts))))
      lens = np.zeros((self.slots,), np.int32)   # padding rows: length 0, done
      lens[:len(group)] = [lengths[i] for i in group]
      t = bucket_length(int(lens.max()))
      tokens = np.full((self.slots, t), self.pad_id, np.int32)
      for r, i in enumerate(group):
        tokens[r, :lengths[i]] = prompts[i]
      t0 = time.perf_counter()
      cache = init_cache(self.cfg, self.slots, s)
      last, cache = self._prefill(self.params, cache, jnp.asarray(tokens),
                                  jnp.asarray(np.maximum(lens, 1)))
      jax.block_until_ready(last)
      prefill_s += time.perf_counter() - t0
      out, loops, n, bz = self._decode(
          self.params, cache, last, jnp.asarray(lens), jax.random.key(seed + start),
          jnp.float32(math.inf if self.exit is None else self.exit.threshold),
          max_new=max_new_tokens, sampling=sampling, stop_at_eos=stop_at_eos)
      out, loops, n, bz = jax.device_get((out, loops, n, bz))
      steps, busy = steps + int(n), busy + int(bz)
      for r in range(len(group)):
        row = out[r].tolist()
        k = row.index(eos) + 1 if eos is not None and eos in row else len(row)
        tokens_out.append(row[:k])
        loops_out.append(loops[r, :k].tolist())
    seconds = time.perf_counter() - t_start
    return BatchOutput(tokens_out, loops_out, lengths, seconds, prefill_s, steps,
                       steps * self.slots, busy)

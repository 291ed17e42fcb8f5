"""Continuous depth-wise batching for recursive models (RRT §3.8 / spec B8).

``DepthwiseBatcher`` is ``decode.loopwise.LoopwiseServer`` with today's
arguments: a fixed pool of ``slots``, each slot holding one request's current
token at its *own* loop of the shared block; one jitted loop on the device
admits queued requests into free slots, prefills them in chunks, applies one
loop to every slot, emits finished tokens and refills, returning to the host
once the queue is served (see ``decode.loopwise`` for the step). With an
``ExitPolicy`` a token exits after the first loop whose confidence clears the
threshold (the library-wide rule of ``early_exit.thresholds``); the loops it
skipped get their K/V by **state copying** (CALM): the K/V projections of
those layers applied to the exit state, so every position's KV is complete for
all depths. (The alternative "read the first loop's KV" only applies to models
trained with recursive KV sharing, which this library does not train.)

``decode.sequencewise.SequenceBatcher`` is the static-batching baseline with
the same exit rule on the same code path (``lockstep=True``).

Example::

    cfg, params, tok = recursive_lm.api.load("...")
    batcher = DepthwiseBatcher(cfg, params, slots=32,
                               exit=ExitPolicy("softmax_max", threshold=0.9))
    out = batcher.generate(list_of_prompts, max_new_tokens=128)
    out.tokens, out.tokens_per_second, out.mean_loops_per_token
"""
from __future__ import annotations

import jax.numpy as jnp

from recursive_lm.config import ModelConfig
from recursive_lm.decode import loopwise_block as _block
from recursive_lm.decode.engine import check_prompts
from recursive_lm.decode.loopwise import LoopwiseServer
from recursive_lm.decode.serving import (EXIT_MEASURES, BatchOutput, ExitPolicy,
                                         check_recursive, exit_confidence)

__all__ = ["BatchOutput", "DepthwiseBatcher", "EXIT_MEASURES", "ExitPolicy",
           "check_recursive", "exit_confidence", "fill_skipped_kv"]


def fill_skipped_kv(cfg: ModelConfig, params, cache, h, pos, exit_loop, exited):
  """State copying for rows that exited after loop ``exit_loop`` [B]: write the
  K/V of every deeper loop's layers and of the coda, projected from the exit
  state h [B, D], at position pos [B]. Rows with ``exited`` False write nothing."""
  rows = jnp.arange(h.shape[0], dtype=jnp.int32)
  return _block.fill_kv(cfg, params, cache, rows, h, pos, exit_loop + 1, exited)


class DepthwiseBatcher(LoopwiseServer):
  """Continuous depth-wise batching server over a fixed pool of slots.

  Args:
    cfg, params: a recursive model (``cfg.plan.loops >= 2``), e.g. from
      ``recursive_lm.api.load(...)`` or ``recursive_lm.export.load_model(...)``.
    slots: pool size P (rows of the one jitted step).
    exit: ``ExitPolicy`` for per-token early exit, a ``ForcedDepth``, or None
      (every token runs all loops).
    eos_id, pad_id: as for ``decode.engine.Engine``.
    **serving: further ``LoopwiseServer`` options (prefill_chunk, head_rows, ...).

  ``generate(prompts, max_new_tokens, sampling, seed)`` serves any number of
  requests (more than ``slots`` are queued) and returns a ``BatchOutput``.
  The first call per (queue bucket, prompt length, cache length) compiles;
  time a second call for throughput.
  """

  def __init__(self, cfg: ModelConfig, params, slots: int = 8, exit=None,
               eos_id: int | None = None, pad_id: int | None = None, **serving):
    super().__init__(cfg, params, slots=slots, exit=exit, lockstep=False, eos_id=eos_id,
                     pad_id=pad_id, **serving)


_check_requests = check_prompts  # the shared validation of decode/engine.py

"""Continuous depth-wise batching for recursive models (RRT §3.8 / spec B8).

A fixed pool of ``P`` slots; each slot holds one request's current token at
its *own* loop depth of the shared block, and owns one row of the KV cache.
One jitted step applies the shared block once to every slot:

1. slots at loop 0 embed their token and run the prelude (masked);
2. ``decode.depth.apply_loop`` with the per-slot loop index (per-slot LoRA and
   per-slot cache depth are gathered);
3. slots at the last loop run the coda; the shared final norm + LM head gives
   logits; with an ``ExitPolicy``, a slot whose confidence ``>= threshold``
   exits early (the library-wide rule of ``early_exit.thresholds``);
4. slots that exit or finish their last loop sample their token, append it to
   the request's output and restart at loop 0 of the next position; slots
   whose request ends (EOS or ``max_new_tokens``) are freed;
5. the KV of the loops an exited token skipped is filled by **state copying**
   (CALM): the K/V projections of those layers are applied to the exit state
   (``decode.depth.propagate_kv`` with per-slot write masks). This keeps every
   position's KV complete for all depths, which later tokens attend to. (The
   alternative "read the first loop's KV" only applies to models trained with
   recursive KV sharing, which this library does not train, so it is not
   offered.)

Steps run inside one jitted ``lax.while_loop`` that returns to the host only
when a request finishes and the queue still has work; the host then prefills
waiting requests into the freed slots (one jitted prefill per prompt bucket,
full depth, writing the slot's cache row) and continues. Throughput is timed
end to end: prefill, embedding, every loop, coda, head, KV writes and fills,
sampling and host scheduling.

``decode.sequencewise.SequenceBatcher`` is the static-batching baseline with
the same exit rule: the batch advances token by token and waits for its
deepest row (and for its longest request).

Example::

    cfg, params, tok = recursive_lm.api.load("...")
    batcher = DepthwiseBatcher(cfg, params, slots=32,
                               exit=ExitPolicy("softmax_max", threshold=0.9))
    out = batcher.generate(list_of_prompts, max_new_tokens=128)
    out.tokens, out.tokens_per_second, out.mean_loops_per_token
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.decode import depth as D
from recursive_lm.decode.engine import (_round_up, bucket_length, check_prompts,
                                        chunk_step, token_ids)
from recursive_lm.decode.sampling import SamplingConfig, sample
from recursive_lm.decode.speculative import normalize_cache
from recursive_lm.early_exit import confidence as C
from recursive_lm.early_exit.thresholds import should_exit
from recursive_lm.nn.model import Transformer, cache_length, init_cache

Array = jax.Array

EXIT_MEASURES = ("softmax_max", "softmax_diff", "entropy", "state")


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
  """Per-token early exit at loop boundaries.

  ``measure``: a confidence of ``early_exit.confidence`` computable from one
  exit: ``softmax_max``, ``softmax_diff``, ``entropy`` (from the exit logits)
  or ``state`` (cosine of the loop's input and output states). A token exits
  after loop n < N-1 iff ``confidence >= threshold``; ``+inf`` never exits.
  Skipped loops' KV is filled by state copying (see the module docstring).
  """
  measure: str = "softmax_max"
  threshold: float = math.inf

  def __post_init__(self):
    if self.measure not in EXIT_MEASURES:
      raise ValueError(f"exit measure {self.measure!r} is not supported for "
                       f"depth-wise batching; choose one of {EXIT_MEASURES}")


def check_recursive(cfg: ModelConfig, what: str):
  if cfg.plan.loops < 2:
    raise ValueError(
        f"{what} needs a recursive model (a shared block looped >= 2 times); this "
        f"model's depth plan {cfg.plan} has loops={cfg.plan.loops}. Convert it with "
        "recursive_lm.recursive (e.g. Cycle sharing, 2+ loops), or decode it with "
        "decode.engine.Engine")


def exit_confidence(policy: ExitPolicy, logits: Array, h_in: Array, h_out: Array):
  if policy.measure == "state":
    return C.hidden_cosine(h_in, h_out)
  return C.get_confidence_fn(policy.measure)(logits)


def fill_skipped_kv(cfg: ModelConfig, params, cache, h: Array, pos: Array,
                    exit_loop: Array, exited: Array):
  """State copying for rows that exited after loop ``exit_loop`` [B]: write the
  K/V of every deeper loop's layers and of the coda, projected from the exit
  state h [B, D], at position pos [B]. Rows with ``exited`` False write nothing."""
  s = cache_length(cache)
  units = cfg.plan.unrolled()
  first = cfg.plan.prelude + cfg.plan.block  # loop 0 never gets skipped
  for i in range(first, len(units)):
    group, _, loop = units[i]
    skip = exited & (exit_loop < loop) if group == "block" else exited
    cache = D.propagate_kv(cfg, params, i, i + 1, h[:, None], pos[:, None], cache,
                           jnp.where(skip, pos, s)[:, None])
  return normalize_cache(cache)


@dataclasses.dataclass
class BatchOutput:
  """Result of serving a list of requests (in request order)."""
  tokens: list[list[int]]          # new tokens per request (up to and incl. EOS)
  loops: list[list[int]]           # loops of the shared block run for each token
  prompt_lengths: list[int]
  seconds: float                   # end to end (prefill, steps, scheduling)
  prefill_seconds: float
  steps: int                       # jitted block applications (all slots at once)
  slot_steps: int                  # steps x slots
  active_slot_steps: int           # of those, slots holding a live request

  @property
  def new_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def tokens_per_second(self) -> float:
    return self.new_tokens / max(self.seconds, 1e-9)

  @property
  def mean_loops_per_token(self) -> float:
    n = sum(len(x) for x in self.loops)
    return sum(sum(x) for x in self.loops) / max(n, 1)

  @property
  def utilization(self) -> float:
    return self.active_slot_steps / max(self.slot_steps, 1)


def _row_axis(group: str) -> int:
  return 1 if group == "block" else 0


def _cache_row(cache, slot):
  return {g: [tuple(jax.lax.dynamic_slice_in_dim(c, slot, 1, _row_axis(g)) for c in kv)
              for kv in v] for g, v in cache.items()}


def _set_cache_row(cache, row, slot):
  return {g: [tuple(jax.lax.dynamic_update_slice_in_dim(c, r, slot, _row_axis(g))
                    for c, r in zip(kv, rkv)) for kv, rkv in zip(v, row[g])]
          for g, v in cache.items()}


class DepthwiseBatcher:
  """Continuous depth-wise batching server over a fixed pool of slots.

  Args:
    cfg, params: a recursive model (``cfg.plan.loops >= 2``), e.g. from
      ``recursive_lm.api.load(...)`` or ``recursive_lm.export.load_model(...)``.
    slots: pool size P (rows of the one jitted step).
    exit: ``ExitPolicy`` for per-token early exit, or None (every token runs
      all loops).
    eos_id, pad_id: as for ``decode.engine.Engine``.

  ``generate(prompts, max_new_tokens, sampling, seed)`` serves any number of
  requests (more than ``slots`` are queued) and returns a ``BatchOutput``.
  The first call per (prompt bucket, cache length) compiles; time a second
  call for throughput.
  """

  def __init__(self, cfg: ModelConfig, params, slots: int = 8,
               exit: ExitPolicy | None = None, eos_id: int | None = None,
               pad_id: int | None = None):
    check_recursive(cfg, "depth-wise batching")
    if slots < 1:
      raise ValueError(f"slots must be >= 1, got {slots}")
    self.cfg, self.params, self.slots, self.exit = cfg, params, int(slots), exit
    self.model = Transformer(cfg)
    self.eos_id, self.pad_id = token_ids(cfg, eos_id, pad_id)

  # Instances with the same static settings share compiled code (the threshold
  # and params are traced arguments).
  def _static_key(self):
    return (type(self), self.cfg, self.slots,
            None if self.exit is None else self.exit.measure, self.eos_id, self.pad_id)

  def __hash__(self):
    return hash(self._static_key())

  def __eq__(self, other):
    return (isinstance(other, DepthwiseBatcher)
            and self._static_key() == other._static_key())

  # -- state -------------------------------------------------------------------
  def _init_state(self, max_new: int, seed: int):
    p, dt = self.slots, jnp.dtype(self.cfg.dtype)
    zi = jnp.zeros((p,), jnp.int32)
    zb = jnp.zeros((p,), bool)
    return dict(h=jnp.zeros((p, self.cfg.d_model), dt), loop=zi, pos=zi, tok=zi,
                active=zb, finished=zb, n_out=zi,
                out=jnp.full((p, max_new), self.pad_id, jnp.int32),
                loops=jnp.zeros((p, max_new), jnp.int32),
                rng=jax.random.key(seed), steps=jnp.zeros((), jnp.int32),
                busy=jnp.zeros((), jnp.int32))

  # -- jitted pieces -----------------------------------------------------------
  @functools.partial(jax.jit, static_argnums=0,
                     static_argnames=("max_new", "sampling", "stop_at_eos"))
  def _prefill(self, params, cache, st, tokens, length, slot, key, max_new,
                    sampling, stop_at_eos):
    """Full-depth prefill of one prompt into ``slot``'s cache row; samples the
    request's first token and (re)starts the slot at loop 0."""
    s = cache_length(cache)
    t = tokens.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    slots = jnp.where(pos < length, pos, s)
    logits, row = chunk_step(self.model, params, _cache_row(cache, slot), tokens, pos,
                             slots)
    cache = _set_cache_row(cache, normalize_cache(row), slot)
    first = sample(logits[:, length - 1], key, sampling)[0]
    eos = self.eos_id if (stop_at_eos and self.eos_id is not None) else -1
    ends = (first == eos) | (max_new <= 1)
    n = self.cfg.plan.loops
    st = dict(st)
    st["out"] = st["out"].at[slot].set(self.pad_id).at[slot, 0].set(first)
    st["loops"] = st["loops"].at[slot].set(0).at[slot, 0].set(n)
    for k, v in (("loop", 0), ("pos", length), ("tok", first), ("active", ~ends),
                 ("finished", ends), ("n_out", 1)):
      st[k] = st[k].at[slot].set(v)
    return cache, st

  def _step(self, params, cache, st, threshold, max_new, sampling, stop_at_eos):
    cfg, plan = self.cfg, self.cfg.plan
    s = cache_length(cache)
    n_loops, total = plan.loops, plan.effective_depth
    active, loop, pos = st["active"], st["loop"], st["pos"]
    p1 = pos[:, None]
    # 1. embedding + prelude for slots starting a token.
    fresh = active & (loop == 0)
    h0 = D.embed(cfg, params, st["tok"][:, None])
    h0, cache = D.run_layers(cfg, params, 0, plan.prelude, h0, p1, cache,
                             jnp.where(fresh, pos, s)[:, None])
    h_in = jnp.where(fresh[:, None], h0[:, 0], st["h"])
    # 2. the shared block at each slot's own loop.
    h, cache = D.apply_loop(cfg, params, loop, h_in[:, None], p1, cache,
                            jnp.where(active, pos, s)[:, None])
    h = h[:, 0]
    # 3. coda for slots at the last loop, then the shared head.
    last = loop == n_loops - 1
    h_out = h
    if plan.coda:
      hc, cache = D.run_layers(cfg, params, total - plan.coda, total, h[:, None], p1,
                               cache, jnp.where(active & last, pos, s)[:, None])
      h_out = jnp.where(last[:, None], hc[:, 0], h)
    logits = D.head(cfg, params, h_out)
    early = jnp.zeros_like(active)
    if self.exit is not None:
      conf = exit_confidence(self.exit, logits, h_in, h)
      early = active & ~last & should_exit(conf, threshold)
      # 5. state copying for the loops the exited tokens skip.
      cache = jax.lax.cond(jnp.any(early),
                           lambda c: fill_skipped_kv(cfg, params, c, h, pos, loop, early),
                           lambda c: c, normalize_cache(cache))
    # 4. emit, free, advance.
    emit = active & (last | early)
    rng, key = jax.random.split(st["rng"])
    tok = sample(logits, key, sampling)
    rows = jnp.arange(self.slots)
    col = jnp.where(emit, st["n_out"], max_new)
    out = st["out"].at[rows, col].set(tok, mode="drop")
    loops = st["loops"].at[rows, col].set(loop + 1, mode="drop")
    n_out = st["n_out"] + emit.astype(jnp.int32)
    eos = self.eos_id if (stop_at_eos and self.eos_id is not None) else -1
    ends = emit & ((tok == eos) | (n_out >= max_new))
    st = dict(st, h=h.astype(st["h"].dtype), loop=jnp.where(emit, 0, loop + 1),
              pos=jnp.where(emit, pos + 1, pos), tok=jnp.where(emit, tok, st["tok"]),
              active=active & ~ends, finished=st["finished"] | ends, n_out=n_out,
              out=out, loops=loops, rng=rng, steps=st["steps"] + 1,
              busy=st["busy"] + jnp.sum(active, dtype=jnp.int32))
    return normalize_cache(cache), st

  @functools.partial(jax.jit, static_argnums=0,
                     static_argnames=("max_new", "sampling", "stop_at_eos"))
  def _run(self, params, cache, st, threshold, stop_on_finish, max_steps, max_new,
           sampling, stop_at_eos):
    """Steps until no slot is active, or (``stop_on_finish``) a request ends."""
    def cond(c):
      _, st = c
      return (jnp.any(st["active"]) & ~(stop_on_finish & jnp.any(st["finished"]))
              & (st["steps"] < max_steps))

    def body(c):
      return self._step(params, *c, threshold, max_new=max_new, sampling=sampling,
                        stop_at_eos=stop_at_eos)

    return jax.lax.while_loop(cond, body, (normalize_cache(cache), st))

  # -- public API --------------------------------------------------------------
  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               stop_at_eos: bool = True) -> BatchOutput:
    """Serves ``prompts`` (any number; FIFO queue) through the slot pool."""
    lengths = _check_requests(self.cfg, prompts, max_new_tokens)
    s = _round_up(max(lengths) + max_new_tokens, 64)
    static = dict(max_new=max_new_tokens, sampling=sampling, stop_at_eos=stop_at_eos)
    t_start = time.perf_counter()
    cache = normalize_cache(init_cache(self.cfg, self.slots, s))
    st = self._init_state(max_new_tokens, seed)
    queue = collections.deque(range(len(prompts)))
    owner = [-1] * self.slots
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    base = jax.random.key(seed + 1)
    max_steps = jnp.asarray(np.iinfo(np.int32).max, jnp.int32)
    threshold = jnp.float32(math.inf if self.exit is None else self.exit.threshold)
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


_check_requests = check_prompts  # the shared validation of decode/engine.py

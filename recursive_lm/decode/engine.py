"""The decode engine: one jitted ``lax.while_loop`` over a typed state and a policy.

::

    DecodeState ──► policy.step(params, cache, state, ctx) ──► StepOut ──► emit
    (tok, pos,        full depth / MoR routing, FREE, CALM,      (tokens [B, K],   (ragged write
     done, n_out,     self-speculation: how deep each row goes,   n_emit [B],       at each row's
     out, records,    which KV it writes, what it emits           records, cache,   offset, EOS and
     rng, pstate)                                                 pstate, stats)    max_new cut)
        ▲                                                                              │
        └──────────────────────────── next DecodeState ◄──────────────────────────────┘

``decode_loop`` is the only generation loop: each iteration the policy emits
up to K tokens per row (``n_emit`` of them; self-speculation emits 1..d+1, the
others 1), the engine writes them at each row's own offset, cuts at EOS and
``max_new``, feeds the last emitted token back and advances the row's
position by ``n_emit``. Per-token records (exit index, confidences, MoR depth)
are written the same way. ``prefill_step`` / ``chunk_step`` are the prefill
and cache-mode primitives every policy shares; ``prepare`` is the one host
scaffolding (validate, pad, bucket, allocate the cache).

Compiled code is reused across calls: prompt lengths are padded to buckets,
and the cache length is ``bucket + max_new_tokens`` rounded up.

Example::

    eng = Engine(cfg, params)
    out = eng.generate([[1, 2, 3], [4, 5]], max_new_tokens=16)
    out.tokens  # list of lists, per row, stopped at EOS
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.decode.sampling import SamplingConfig, sample
from recursive_lm.nn.cache import cache_length, init_cache, normalize_cache
from recursive_lm.nn.model import Transformer, decode_layout

Array = jax.Array

PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket_length(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
  for b in buckets:
    if n <= b:
      return b
  return int(-(-n // buckets[-1]) * buckets[-1])


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@dataclasses.dataclass
class GenerateOutput:
  tokens: list[list[int]]          # new tokens per row (up to and incl. EOS)
  prompt_lengths: list[int]
  prefill_seconds: float
  decode_seconds: float
  steps: int                        # decode steps run (max over rows)

  @property
  def new_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def tokens_per_second(self) -> float:
    return self.new_tokens / max(self.decode_seconds + self.prefill_seconds, 1e-9)


def check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                  max_new_tokens: int) -> list[int]:
  """Validates a generate() request; returns the prompt lengths."""
  if not prompts:
    raise ValueError("generate() needs at least one prompt")
  lengths = [len(p) for p in prompts]
  if min(lengths) == 0:
    raise ValueError("every prompt needs at least one token (got an empty prompt);"
                     " add a BOS or any start token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if max(lengths) + max_new_tokens > cfg.max_seq_len:
    raise ValueError(
        f"prompt ({max(lengths)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
        f"the model's max_seq_len {cfg.max_seq_len}; shorten the prompt or lower "
        "max_new_tokens (--max_new_tokens)")
  return lengths


def chunk_step(model: Transformer, params, cache, tokens, positions, write_slots):
  """One model call in cache mode. Returns (logits [B, T, V], new cache)."""
  out = model.apply({"params": params}, tokens, positions=positions, cache=cache,
                    write_slots=write_slots)
  return out["logits"], out["cache"]


def prefill_step(model: Transformer, params, cache, tokens, lengths):
  """Full-depth prefill of right-padded prompts [B, T] with per-row ``lengths``.
  Returns (logits at each row's last prompt token [B, V], new cache)."""
  b, t = tokens.shape
  s = cache_length(cache)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  slots = jnp.where(pos < lengths[:, None], pos, s)  # pads write nothing
  logits, cache = chunk_step(model, params, cache, tokens, pos, slots)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return last, cache


def token_ids(cfg: ModelConfig, eos_id: int | None, pad_id: int | None):
  """(eos, pad): the given ids, else the checkpoint's (pad defaults to 0)."""
  eos = cfg.eos_id if eos_id is None else eos_id
  pad = (cfg.pad_id if cfg.pad_id is not None else 0) if pad_id is None else pad_id
  return eos, pad


# ----------------------------------------------------------------------------
# The one loop.
# ----------------------------------------------------------------------------
class StepOut(NamedTuple):
  """What a policy step returns. Row b emits ``tokens[b, :n_emit[b]]``."""
  tokens: Array            # [B, K] int32
  n_emit: Array            # [B] int32, 0..K (0 for finished rows)
  cache: Any
  pstate: Any
  rng: Array
  records: dict = {}       # name -> [B, K, ...], one entry per emitted token
  stats: dict = {}         # name -> int32 scalar, summed over steps


class DecodeState(NamedTuple):
  """The loop carry (besides the cache)."""
  step: Array              # [] policy steps run
  tok: Array               # [B] last emitted token (fed next)
  pos: Array               # [B] its position (= its KV slot)
  done: Array              # [B]
  n_out: Array             # [B] tokens emitted (the prefill token included)
  out: Array               # [B, max_new]
  records: dict            # name -> [B, max_new, ...]
  rng: Array
  pstate: Any
  stats: dict


@dataclasses.dataclass(frozen=True)
class Record:
  """A per-token record buffer: fill value, trailing shape, dtype, the value
  for the prefill token (None = fill) and a column offset (-1: the record
  belongs to the token fed in this step, e.g. the depth it was processed at)."""
  fill: Any
  shape: tuple = ()
  dtype: Any = jnp.int32
  first: Any = None
  offset: int = 0


class StepCtx(NamedTuple):
  """Per-call inputs of a policy step (traced unless noted)."""
  max_new: int             # static
  sampling: SamplingConfig  # static
  threshold: Array         # [] base exit threshold (exit policies)
  forced: Array | None     # forced decision table (benchmark) or None


def _emit(st: DecodeState, so: StepOut, specs: dict, max_new: int, eos: int) -> DecodeState:
  b, k = so.tokens.shape
  rows = jnp.arange(b)[:, None]
  j = jnp.arange(k, dtype=jnp.int32)[None]
  valid = (j < so.n_emit[:, None]) & ~st.done[:, None]
  is_eos = valid & (so.tokens == eos)
  hit = jnp.any(is_eos, axis=1)
  first_eos = jnp.argmax(is_eos, axis=1)
  valid &= ~(hit[:, None] & (j > first_eos[:, None]))
  valid &= (st.n_out[:, None] + j) < max_new
  cols = jnp.where(valid, st.n_out[:, None] + j, max_new)
  out = st.out.at[rows, cols].set(so.tokens, mode="drop")
  records = dict(st.records)
  for name, rec in so.records.items():
    off = specs[name].offset
    c = jnp.where(valid, cols + off, max_new) if off else cols
    records[name] = records[name].at[rows, c].set(rec.astype(records[name].dtype),
                                                  mode="drop")
  live = ~st.done
  n_out = st.n_out + jnp.sum(valid, axis=1, dtype=jnp.int32)
  last = jnp.take_along_axis(so.tokens, jnp.maximum(so.n_emit - 1, 0)[:, None], axis=1)[:, 0]
  fed = live & (so.n_emit > 0)
  stats = {n: v + so.stats.get(n, 0) for n, v in st.stats.items()}
  return DecodeState(st.step + 1, jnp.where(fed, last, st.tok),
                     jnp.where(live, st.pos + so.n_emit, st.pos),
                     st.done | hit | (n_out >= max_new), n_out, out, records, so.rng,
                     so.pstate, stats)


def decode_loop(policy, params, cache, first_logits, lengths, rng, ctx: StepCtx,
                stop_at_eos: bool, eos_id: int | None, pad_id: int, pstate=None):
  """Runs ``policy`` from the prefill logits to ``ctx.max_new`` tokens per row
  (or EOS). Returns (final DecodeState, cache). Call under ``jax.jit``.

  ``policy``: ``init(batch) -> pstate`` (used when ``pstate`` is None),
  ``records() -> {name: Record}``, ``stat_names``, and ``step(params, cache,
  state, ctx) -> StepOut``."""
  b, max_new = lengths.shape[0], ctx.max_new
  eos = -1 if (eos_id is None or not stop_at_eos) else eos_id
  rng, k0 = jax.random.split(rng)
  first = sample(first_logits, k0, ctx.sampling)
  specs = policy.records()
  records = {}
  for name, r in specs.items():
    buf = jnp.full((b, max_new) + tuple(r.shape), r.fill, r.dtype)
    if r.first is not None:
      buf = buf.at[:, 0].set(r.first)
    records[name] = buf
  st = DecodeState(
      step=jnp.zeros((), jnp.int32), tok=first, pos=lengths.astype(jnp.int32),
      done=(first == eos) | (max_new <= 1), n_out=jnp.ones((b,), jnp.int32),
      out=jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first),
      records=records, rng=rng, pstate=policy.init(b) if pstate is None else pstate,
      stats={n: jnp.zeros((), jnp.int32) for n in policy.stat_names})

  def cond(carry):
    st, _ = carry
    return (st.step < max_new) & ~jnp.all(st.done)

  def body(carry):
    st, cache = carry
    so = policy.step(params, cache, st, ctx)
    return _emit(st, so, specs, max_new, eos), normalize_cache(so.cache)

  return jax.lax.while_loop(cond, body, (st, normalize_cache(cache)))


def prepare(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
            pad_id: int, extra_slots: int = 0):
  """Host scaffolding of every engine: validate, right-pad to a bucket,
  allocate the cache. Returns (lengths list, tokens [B, T] jnp, lengths jnp,
  cache)."""
  lengths = check_prompts(cfg, prompts, max_new_tokens)
  t = bucket_length(max(lengths))
  s = _round_up(t + max_new_tokens + extra_slots, 64)
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return (lengths, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32),
          init_cache(cfg, len(prompts), s))


def trim_rows(out: np.ndarray, n_out: np.ndarray, stop_at_eos: bool,
              eos_id: int | None) -> list[list[int]]:
  """Each row's emitted tokens (up to and incl. EOS)."""
  rows = []
  for r, n in zip(out, n_out):
    r = r[:int(n)].tolist()
    if stop_at_eos and eos_id is not None and eos_id in r:
      r = r[:r.index(eos_id) + 1]
    rows.append(r)
  return rows


class Policy:
  """Defaults of the policy protocol ``decode_loop`` drives: no policy state,
  no per-token records, no counters. A policy overrides ``step`` (and any of
  these); ``max_emit`` is the most tokens a row emits per step."""
  max_emit = 1
  stat_names = ()

  def init(self, batch):
    del batch
    return ()

  def records(self):
    return {}

  def step(self, params, cache, st: "DecodeState", ctx: "StepCtx") -> "StepOut":
    raise NotImplementedError


class FullDepth(Policy):
  """Policy: every token through the whole model (``Transformer`` in cache
  mode); with ``mor_depth`` the MoR threshold routing and a per-token record
  of the recursions the fed token went through."""
  def __init__(self, model: Transformer, pad_id: int, mor_depth: bool = False):
    self.model, self.pad_id, self.mor = model, pad_id, mor_depth

  def records(self):
    return {"depth": Record(0, offset=-1)} if self.mor else {}

  def step(self, params, cache, st: DecodeState, ctx: StepCtx) -> StepOut:
    slots = jnp.where(st.done, cache_length(cache), st.pos)[:, None]
    kw = {"routing": "threshold"} if self.mor else {}
    o = self.model.apply({"params": params}, st.tok[:, None], positions=st.pos[:, None],
                         cache=cache, write_slots=slots, **kw)
    rng, sub = jax.random.split(st.rng)
    new = jnp.where(st.done, self.pad_id, sample(o["logits"][:, 0], sub, ctx.sampling))
    recs = {}
    if self.mor:
      from recursive_lm.nn.mor_block import token_depths  # pylint: disable=g-import-not-at-top
      recs["depth"] = token_depths(o["router"])
    return StepOut(new[:, None], (~st.done).astype(jnp.int32), o["cache"], st.pstate, rng,
                   recs)



class Engine:
  """Batched generation for one model and parameter set."""

  def __init__(self, cfg: ModelConfig, params, eos_id: int | None = None,
               pad_id: int | None = None, kernel_layout: str | None = None,
               fuse: bool = False, weights: str = "f32"):
    # weights: "f32" | "bf16" | "int8", see nn.model.decode_layout.
    cfg, params = decode_layout(cfg, params, kernel_layout, fuse, weights=weights)
    self.cfg = cfg
    self.params = params
    self.model = Transformer(cfg)
    self.eos_id, self.pad_id = token_ids(cfg, eos_id, pad_id)
    self.policy = self._make_policy()
    self._prefill = jax.jit(self._prefill_impl)
    self._generate = jax.jit(self._generate_impl,
                             static_argnames=("max_new", "sampling", "stop_at_eos"))

  def _make_policy(self):
    return FullDepth(self.model, self.pad_id)

  # -- jitted pieces -----------------------------------------------------------
  def _prefill_impl(self, params, cache, tokens, lengths):
    last, cache = prefill_step(self.model, params, cache, tokens, lengths)
    return last, normalize_cache(cache)

  def _generate_impl(self, params, cache, last_logits, lengths, rng, max_new,
                     sampling, stop_at_eos):
    ctx = StepCtx(max_new, sampling, jnp.float32(0), None)
    st, _ = decode_loop(self.policy, params, cache, last_logits, lengths, rng, ctx,
                        stop_at_eos, self.eos_id, self.pad_id)
    return st.out, st.n_out, st.step + 1, st.records

  # -- public API --------------------------------------------------------------
  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               stop_at_eos: bool = True) -> GenerateOutput:
    lengths, tokens, lens, cache = prepare(self.cfg, prompts, max_new_tokens, self.pad_id)
    t0 = time.perf_counter()
    last, cache = self._prefill(self.params, cache, tokens, lens)
    last.block_until_ready()
    t1 = time.perf_counter()
    out, n_out, steps, recs = self._generate(self.params, cache, last, lens,
                                             jax.random.key(seed), max_new=max_new_tokens,
                                             sampling=sampling, stop_at_eos=stop_at_eos)
    out, n_out = np.asarray(out), np.asarray(n_out)
    t2 = time.perf_counter()
    rows = trim_rows(out, n_out, stop_at_eos, self.eos_id)
    self._last_records = {k: np.asarray(v) for k, v in recs.items()}
    return GenerateOutput(rows, lengths, t1 - t0, t2 - t1, int(steps))

  # -- scoring -----------------------------------------------------------------
  @functools.partial(jax.jit, static_argnums=0)
  def _nll(self, params, tokens, mask):
    logits = self.model.apply({"params": params}, tokens)["logits"].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return nll * mask[:, 1:]

  def token_nll(self, ids: Sequence[int], window: int | None = None) -> np.ndarray:
    """NLL of ids[1:] given their prefix (non-overlapping windows past ``window``)."""
    window = min(window or self.cfg.max_seq_len, self.cfg.max_seq_len)
    ids = list(ids)
    if len(ids) < 2:
      raise ValueError("scoring needs at least 2 tokens")
    out = []
    for start in range(0, len(ids) - 1, window):
      chunk = ids[start:start + window + 1]
      t = bucket_length(len(chunk))
      tok = np.full((1, t), self.pad_id, np.int32)
      tok[0, :len(chunk)] = chunk
      mask = np.zeros((1, t), np.float32)
      mask[0, :len(chunk)] = 1
      nll = np.asarray(self._nll(self.params, jnp.asarray(tok), jnp.asarray(mask)))
      out.append(nll[0, :len(chunk) - 1])
    return np.concatenate(out)

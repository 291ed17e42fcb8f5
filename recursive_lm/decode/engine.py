"""Decode engine: jitted prefill + ``lax.while_loop`` generation over a static cache.

Primitives (reused by the early-exit engines):
* ``chunk_step``: run the model on a chunk of tokens per row at per-row
  positions, writing KV at per-row slots (slot == position; padding writes
  nothing), returning logits and the new cache.
* a per-row length pointer ``pos`` [B]: the next position to write.

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
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.decode.sampling import SamplingConfig, sample
from recursive_lm.nn.model import Transformer, cache_length, decode_layout, init_cache

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


class Engine:
  """Batched generation for one model and parameter set."""

  def __init__(self, cfg: ModelConfig, params, eos_id: int | None = None,
               pad_id: int | None = None, kernel_layout: str | None = None,
               fuse: bool = False, weights: str = "f32"):
    # weights: "f32" | "bf16" | "int8", see nn.model.decode_layout (lowbits branch).
    cfg, params = decode_layout(cfg, params, kernel_layout, fuse, weights=weights)
    self.cfg = cfg
    self.params = params
    self.model = Transformer(cfg)
    self.eos_id, self.pad_id = token_ids(cfg, eos_id, pad_id)
    self._prefill = jax.jit(self._prefill_impl)
    self._generate = jax.jit(self._generate_impl,
                             static_argnames=("max_new", "sampling", "stop_at_eos"))

  # -- jitted pieces -----------------------------------------------------------
  def _prefill_impl(self, params, cache, tokens, lengths):
    return prefill_step(self.model, params, cache, tokens, lengths)

  def _generate_impl(self, params, cache, last_logits, lengths, rng, max_new,
                     sampling, stop_at_eos):
    b = lengths.shape[0]
    eos = -1 if self.eos_id is None else self.eos_id

    def cond(st):
      step, _, _, _, done, _, _ = st
      return (step < max_new) & ~jnp.all(done)

    def body(st):
      step, cache, logits, pos, done, out, rng = st
      rng, sub = jax.random.split(rng)
      tok = sample(logits, sub, sampling)
      tok = jnp.where(done, self.pad_id, tok)
      out = out.at[:, step].set(tok)
      if stop_at_eos:
        done = done | (tok == eos)
      new_logits, cache = chunk_step(self.model, params, cache, tok[:, None],
                                     pos[:, None], pos[:, None])
      return step + 1, cache, new_logits[:, 0], pos + 1, done, out, rng

    out = jnp.full((b, max_new), self.pad_id, jnp.int32)
    st = (jnp.zeros((), jnp.int32), cache, last_logits, lengths.astype(jnp.int32),
          jnp.zeros((b,), bool), out, rng)
    step, cache, _, _, done, out, _ = jax.lax.while_loop(cond, body, st)
    return out, step

  # -- public API --------------------------------------------------------------
  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               stop_at_eos: bool = True) -> GenerateOutput:
    lengths = check_prompts(self.cfg, prompts, max_new_tokens)
    t = bucket_length(max(lengths))
    s = _round_up(t + max_new_tokens, 64)
    tokens = np.full((len(prompts), t), self.pad_id, np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    cache = init_cache(self.cfg, len(prompts), s)
    t0 = time.perf_counter()
    last, cache = self._prefill(self.params, cache, jnp.asarray(tokens),
                                jnp.asarray(lengths, jnp.int32))
    last.block_until_ready()
    t1 = time.perf_counter()
    out, steps = self._generate(self.params, cache, last, jnp.asarray(lengths, jnp.int32),
                                jax.random.key(seed), max_new=max_new_tokens,
                                sampling=sampling, stop_at_eos=stop_at_eos)
    out = np.asarray(out)
    t2 = time.perf_counter()
    rows = []
    for r in out:
      r = r.tolist()
      if stop_at_eos and self.eos_id is not None and self.eos_id in r:
        r = r[:r.index(self.eos_id) + 1]
      rows.append(r)
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

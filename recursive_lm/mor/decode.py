"""Causal Mixture-of-Recursions decoding.

Expert-choice routers decide per token with ``z > threshold`` (default 0,
i.e. sigmoid(z) > 0.5; the auxiliary BCE trains z towards top-k membership),
or with per-recursion thresholds calibrated to the training capacities
(:func:`calibrate_thresholds`); token-choice routers decide each token's depth
once. Both are causal, so prefill + token-by-token decoding with the
recursion-wise (or shared / hybrid) KV cache reproduces the full forward with
``routing="threshold"`` (tests/test_mor_decode.py).

:class:`MoREngine` is ``decode.engine.Engine`` (jitted prefill +
``lax.while_loop``, per-row positions, static cache) plus a per-token record
of the depth each generated token reached.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.decode.engine import Engine, GenerateOutput, bucket_length
from recursive_lm.decode.sampling import SamplingConfig, sample
from recursive_lm.nn.model import Transformer, init_cache


def token_depths(router_out: dict) -> jax.Array:
  """Recursions each token passed, [B, T] int32 (from ``sel`` [N, B, T])."""
  return jnp.sum(router_out["sel"].astype(jnp.int32), axis=0)


@dataclasses.dataclass
class MoRGenerateOutput(GenerateOutput):
  depths: list[list[int]] = dataclasses.field(default_factory=list)  # per new token


class MoREngine(Engine):
  """Batched causal MoR generation (see module docstring)."""

  def __init__(self, cfg: ModelConfig, params, **kw):
    if cfg.router is None:
      raise ValueError("MoREngine needs a config with a router; use Engine otherwise")
    super().__init__(cfg, params, **kw)

  def _step(self, params, cache, tok, pos):
    out = self.model.apply({"params": params}, tok[:, None], positions=pos[:, None],
                           cache=cache, write_slots=pos[:, None], routing="threshold")
    return out["logits"][:, 0], out["cache"], token_depths(out["router"])[:, 0]

  def _generate_impl(self, params, cache, last_logits, lengths, rng, max_new,
                     sampling, stop_at_eos):
    b = lengths.shape[0]
    eos = -1 if self.eos_id is None else self.eos_id

    def cond(st):
      return (st[0] < max_new) & ~jnp.all(st[4])

    def body(st):
      step, cache, logits, pos, done, out, depth, rng = st
      rng, sub = jax.random.split(rng)
      tok = sample(logits, sub, sampling)
      tok = jnp.where(done, self.pad_id, tok)
      out = out.at[:, step].set(tok)
      if stop_at_eos:
        done = done | (tok == eos)
      logits, cache, d = self._step(params, cache, tok, pos)
      depth = depth.at[:, step].set(d)
      return step + 1, cache, logits, pos + 1, done, out, depth, rng

    out = jnp.full((b, max_new), self.pad_id, jnp.int32)
    depth = jnp.zeros((b, max_new), jnp.int32)
    st = (jnp.zeros((), jnp.int32), cache, last_logits, lengths.astype(jnp.int32),
          jnp.zeros((b,), bool), out, depth, rng)
    st = jax.lax.while_loop(cond, body, st)
    return st[5], st[6], st[0]

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               stop_at_eos: bool = True) -> MoRGenerateOutput:
    """Like ``Engine.generate``; ``depths[i][j]`` is the number of recursions
    generated token j of row i went through when it was fed back."""
    if not prompts or min(len(p) for p in prompts) == 0:
      raise ValueError("generate() needs non-empty prompts")
    lengths = [len(p) for p in prompts]
    t = bucket_length(max(lengths))
    s = -(-(t + max_new_tokens) // 64) * 64
    if max(lengths) + max_new_tokens > self.cfg.max_seq_len:
      raise ValueError(f"prompt + max_new_tokens exceeds max_seq_len {self.cfg.max_seq_len}")
    tokens = np.full((len(prompts), t), self.pad_id, np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    cache = init_cache(self.cfg, len(prompts), s)
    lens = jnp.asarray(lengths, jnp.int32)
    t0 = time.perf_counter()
    last, cache = self._prefill(self.params, cache, jnp.asarray(tokens), lens)
    last.block_until_ready()
    t1 = time.perf_counter()
    out, depth, steps = self._generate(self.params, cache, last, lens,
                                       jax.random.key(seed), max_new=max_new_tokens,
                                       sampling=sampling, stop_at_eos=stop_at_eos)
    out, depth = np.asarray(out), np.asarray(depth)
    t2 = time.perf_counter()
    rows, depths = [], []
    for r, d in zip(out.tolist(), depth.tolist()):
      if stop_at_eos and self.eos_id is not None and self.eos_id in r:
        r = r[:r.index(self.eos_id) + 1]
      rows.append(r)
      depths.append(d[:len(r)])
    return MoRGenerateOutput(rows, lengths, t1 - t0, t2 - t1, int(steps), depths)


def calibrate_thresholds(cfg: ModelConfig, params, batches: Iterable[dict]
                         ) -> ModelConfig:
  """Per-recursion logit thresholds whose causal keep-rate matches training.

  Runs the top-k forward (training routing) on ``batches`` and picks, for
  recursion r, the quantile of the candidates' logits z that keeps the share
  cap_r / cap_{r-1} of them (recursions of capacity 1 keep all). Returns
  ``cfg`` with ``router.decode_thresholds`` set.
  """
  rc = cfg.router
  if rc is None or rc.kind != "expert":
    raise ValueError("threshold calibration applies to expert-choice routers")
  model = Transformer(cfg)
  fwd = jax.jit(lambda p, b: model.apply(
      {"params": p}, b["inputs"], positions=b.get("positions"),
      segment_ids=b.get("segment_ids"))["router"])
  zs = [[] for _ in range(cfg.plan.loops)]
  for b in batches:
    o = fwd(params, {k: jnp.asarray(v) for k, v in b.items()})
    z, cand = np.asarray(o["z"]), np.asarray(o["cand"])
    valid = np.ones(z.shape[1:], bool) if "segment_ids" not in b else (
        np.asarray(b["segment_ids"]) > 0)
    for r in range(cfg.plan.loops):
      zs[r].append(z[r][cand[r] & valid])
  caps = (1.0,) + rc.capacity_schedule(cfg.plan.loops)
  thr = []
  for r in range(cfg.plan.loops):
    keep = caps[r + 1] / caps[r]
    allz = np.concatenate(zs[r])
    thr.append(float(np.quantile(allz, 1.0 - keep)) if keep < 1 and allz.size else 0.0)
  return cfg.replace(router=dataclasses.replace(rc, decode_thresholds=tuple(thr)))

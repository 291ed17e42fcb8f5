"""Causal Mixture-of-Recursions decoding.

Expert-choice routers decide per token with ``z > threshold`` (default 0,
i.e. sigmoid(z) > 0.5; the auxiliary BCE trains z towards top-k membership),
or with per-recursion thresholds calibrated to the training capacities
(:func:`calibrate_thresholds`); token-choice routers decide each token's depth
once. Both are causal, so prefill + token-by-token decoding with the
recursion-wise (or shared / hybrid) KV cache reproduces the full forward with
``routing="threshold"`` (tests/test_mor_decode.py).

:class:`MoREngine` is ``decode.engine.Engine`` with the full-depth policy in
MoR threshold-routing mode (``decode.engine.FullDepth(mor_depth=True)``): the
one decode loop, plus a per-token record of the depth each generated token
reached when it was fed back.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.decode.engine import Engine, FullDepth, GenerateOutput
from recursive_lm.decode.sampling import SamplingConfig
from recursive_lm.nn.model import Transformer
from recursive_lm.nn.mor_block import token_depths  # noqa: F401  (re-exported)


@dataclasses.dataclass
class MoRGenerateOutput(GenerateOutput):
  depths: list[list[int]] = dataclasses.field(default_factory=list)  # per new token


class MoREngine(Engine):
  """Batched causal MoR generation (see module docstring)."""

  def __init__(self, cfg: ModelConfig, params, **kw):
    if cfg.router is None:
      raise ValueError("MoREngine needs a config with a router; use Engine otherwise")
    super().__init__(cfg, params, **kw)

  def _make_policy(self):
    return FullDepth(self.model, self.pad_id, mor_depth=True)

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               stop_at_eos: bool = True) -> MoRGenerateOutput:
    """Like ``Engine.generate``; ``depths[i][j]`` is the number of recursions
    generated token j of row i went through when it was fed back (0 for the
    last token, which is never fed back)."""
    out = super().generate(prompts, max_new_tokens, sampling, seed, stop_at_eos)
    depth = self._last_records["depth"]
    depths = [d[:len(r)].tolist() for r, d in zip(out.tokens, depth)]
    return MoRGenerateOutput(out.tokens, out.prompt_lengths, out.prefill_seconds,
                             out.decode_seconds, out.steps, depths)


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

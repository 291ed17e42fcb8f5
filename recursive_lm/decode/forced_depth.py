"""A seeded per-token depth distribution: exits decided independently of the model.

Speed benchmarks of adaptive depth must not depend on how good a model's exit
confidences are. ``ForcedDepth(probs, seed)`` gives token ``j`` of request
``r`` the depth ``d`` (1-based number of loops of the shared block, or of
exits) with probability ``probs[d - 1]``, drawn from a counter-based key
(``fold_in(fold_in(key(seed), r), j)``): the same token gets the same depth in
every engine, batch layout and schedule, so two servers given the same request
stream do exactly the same work per token and can be timed against each other.

Self-contained (jax only) so any engine can use it:

    rule = ForcedDepth((0.5, 0.5), seed=0)   # half the tokens stop after loop 1 of 2
    d = rule.depth(request_ids, token_index)  # int32 [B], traced is fine
    rule.mean_depth, rule.expected_max(batch=32)

``ideal_ratio(batch)`` is E[max depth in a batch of ``batch`` tokens] /
E[mean depth]: the speed-up of serving each token at its own depth over a
batch that advances at its deepest row, when cost is proportional to loops run.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ForcedDepth:
  """``probs[d - 1]``: probability that a token runs exactly ``d`` loops."""
  probs: tuple[float, ...]
  seed: int = 0

  def __post_init__(self):
    p = np.asarray(self.probs, np.float64)
    if p.ndim != 1 or p.size < 1 or (p < 0).any() or abs(p.sum() - 1) > 1e-6:
      raise ValueError(f"ForcedDepth probs must be a non-empty distribution over depths "
                       f"1..N summing to 1, got {self.probs}; e.g. (0.5, 0.5)")
    object.__setattr__(self, "probs", tuple(float(x) for x in self.probs))

  @classmethod
  def uniform(cls, max_depth: int, seed: int = 0) -> "ForcedDepth":
    return cls(tuple([1.0 / max_depth] * max_depth), seed)

  @classmethod
  def exit_after(cls, max_depth: int, depth: int, fraction: float,
                 seed: int = 0) -> "ForcedDepth":
    """``fraction`` of the tokens stop after ``depth`` loops, the rest run all."""
    p = [0.0] * max_depth
    p[depth - 1] += fraction
    p[-1] += 1.0 - fraction
    return cls(tuple(p), seed)

  @property
  def max_depth(self) -> int:
    return len(self.probs)

  @property
  def mean_depth(self) -> float:
    return float(sum((d + 1) * p for d, p in enumerate(self.probs)))

  def expected_max(self, batch: int) -> float:
    """E[max depth over ``batch`` independent tokens]."""
    cdf = np.cumsum(self.probs)
    below = np.concatenate([[0.0], cdf[:-1]])  # P(d <= k - 1)
    return float(sum((k + 1) * (cdf[k] ** batch - below[k] ** batch)
                     for k in range(self.max_depth)))

  def ideal_ratio(self, batch: int) -> float:
    return self.expected_max(batch) / self.mean_depth

  def depth(self, request: jax.Array, token: jax.Array) -> jax.Array:
    """Depth (1..N) of token ``token`` of request ``request`` (broadcasting int arrays)."""
    request, token = jnp.broadcast_arrays(jnp.asarray(request, jnp.int32),
                                          jnp.asarray(token, jnp.int32))
    logp = jnp.log(jnp.asarray(self.probs, jnp.float32))

    def one(r, t):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), r), t)
      return jax.random.categorical(key, logp)

    flat = jax.vmap(one)(request.reshape(-1), token.reshape(-1))
    return (flat.reshape(request.shape) + 1).astype(jnp.int32)

"""AdamW + schedules + clipping + gradient accumulation (optax).

Chain (per optimizer update)::

    clip_by_global_norm(clip_norm) -> adamw(schedule, b1, b2, eps, wd, mask)

wrapped in ``optax.MultiSteps(every_k_schedule=grad_accum)`` when
``grad_accum > 1``: each call of ``update`` is one *micro-step*; gradients are
averaged over ``grad_accum`` micro-steps and the inner chain (clip + AdamW)
runs on the average, so schedules count **optimizer updates**, not micro-steps.

Weight decay: applied to every parameter with ``ndim >= 2`` (matmul kernels,
embeddings, LoRA factors) and not to 1-D parameters (RMSNorm scales), the
GPT-2/nanoGPT/MaxText convention. Embeddings are decayed: with tied
embeddings the table is also the output projection.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

SCHEDULES = ("cosine", "wsd", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer hyper-parameters (defaults: MoR/RRT uptraining, App. E).

  ``warmup_steps`` / ``total_steps`` count optimizer updates. ``decay_fraction``
  is the share of ``total_steps`` spent in the final (linear) decay of WSD;
  the schedule ends at ``lr * min_lr_ratio``.
  """
  lr: float = 2e-4
  schedule: str = "cosine"
  warmup_steps: int = 200
  total_steps: int = 10_000
  decay_fraction: float = 0.2
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float | None = 1.0
  grad_accum: int = 1

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"OptimConfig.schedule={self.schedule!r}; choose from {SCHEDULES}")
    if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(
          f"OptimConfig needs total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
          f"got warmup_steps={self.warmup_steps}, total_steps={self.total_steps}")
    if not 0.0 <= self.decay_fraction <= 1.0:
      raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
    if self.grad_accum < 1:
      raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
    if self.clip_norm is not None and self.clip_norm <= 0:
      raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm}")


def schedule_fn(cfg: OptimConfig) -> optax.Schedule:
  """Learning rate as a function of the optimizer-update count.

  * cosine: linear warmup 0 -> lr over ``warmup_steps``, then cosine to
    ``lr * min_lr_ratio`` at ``total_steps`` (constant afterwards).
  * wsd: linear warmup, constant lr, then linear decay to ``lr * min_lr_ratio``
    over the last ``decay_fraction * total_steps`` steps.
  * constant: linear warmup, then constant lr.
  """
  lr, w, tot = cfg.lr, cfg.warmup_steps, cfg.total_steps
  end = lr * cfg.min_lr_ratio
  warm = optax.linear_schedule(0.0, lr, max(w, 1)) if w else optax.constant_schedule(lr)
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=w, decay_steps=max(tot, w + 1),
        end_value=end)
  if cfg.schedule == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(lr)], [w])
  decay = int(round(cfg.decay_fraction * tot))
  start = max(tot - decay, w)
  return optax.join_schedules(
      [warm, optax.constant_schedule(lr),
       optax.linear_schedule(lr, end, max(tot - start, 1))], [w, start])


def decay_mask(params: Any) -> Any:
  """True for params that get weight decay (``ndim >= 2``)."""
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW with decay mask, global-norm clipping and optional MultiSteps."""
  parts = []
  if cfg.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule_fn(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum).gradient_transformation()
  return tx


def lr_at(cfg: OptimConfig) -> Callable[[Any], Any]:
  """Learning rate for a *micro-step* count (divides by ``grad_accum``)."""
  sched = schedule_fn(cfg)
  return lambda micro_step: sched(micro_step // cfg.grad_accum)

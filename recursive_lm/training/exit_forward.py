"""Training forward passes that expose exit states, and LayerSkip layer dropout.

``exit_forward(cfg, params, batch, collect, keep)`` returns the raw residual
states after each layer count in ``collect`` plus the final logits:

* scanned path (fast; recursive models): when ``collect`` are loop boundaries
  and no layer dropout is asked for, ``Transformer(..., collect_loop_states=
  True)`` gives the per-loop states for free;
* unrolled path (any layer, any model): the same layers applied one by one
  (``nn.unrolled``'s pieces, identical math), with an optional per-sample
  keep mask ``keep`` [L, B] (LayerSkip: h_{l+1} = h_l + m_{l,b} f_l(h_l),
  kept outputs not rescaled). Mask-only: dropped rows still cost compute.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.nn import unrolled as D
from recursive_lm.nn import layers as L
from recursive_lm.nn.model import Transformer

Array = jax.Array


def layer_drop_rates(depth: int, p_max: float, shape: str = "exp",
                     time_scale: float = 1.0) -> np.ndarray:
  """f32 [L] LayerSkip rates p_l = p_max D(l) S(t): D(l) = exp(l ln2/(L-1)) - 1
  ("exp") or l/(L-1) ("linear"); 0 at the first layer, p_max at the last.
  ``time_scale`` is S(t) (1 for continual pretraining / finetuning)."""
  l = np.arange(depth, dtype=np.float64)
  den = max(depth - 1, 1)
  d = np.exp(l * np.log(2.0) / den) - 1.0 if shape == "exp" else l / den
  return (p_max * d * time_scale).astype(np.float32)


def layer_keep_mask(key: Array, rates: np.ndarray | Array, batch: int) -> Array:
  """Bool [L, B]: m_{l,b} ~ Bernoulli(1 - p_l), independent per layer and row."""
  rates = jnp.asarray(rates, jnp.float32)
  u = jax.random.uniform(key, (rates.shape[0], batch), jnp.float32)
  return u >= rates[:, None]


def final_norm(cfg: ModelConfig, params, h: Array) -> Array:
  """The shared final RMSNorm (no LM head) on h [..., D]."""
  return L.RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)).apply(
      {"params": params["final_norm"]}, h)


def _scan_ok(cfg: ModelConfig, collect: Sequence[int]) -> bool:
  return cfg.plan.loops > 1 and set(collect) <= set(D.loop_exits(cfg))


def exit_forward(cfg: ModelConfig, params, batch: dict, collect: Sequence[int],
                 keep: Array | None = None) -> tuple[Array, Array]:
  """(states [C, B, T, D] after each count in sorted(set(collect)), final logits
  [B, T, V]). Differentiable. ``keep`` [L, B] bool: layer dropout mask."""
  collect = sorted(set(int(c) for c in collect))
  depth = cfg.plan.effective_depth
  if not collect or collect[0] < 1 or collect[-1] > depth:
    raise ValueError(f"exit layers must lie in [1, {depth}], got {collect}")
  tokens = batch["inputs"]
  positions, segs = batch.get("positions"), batch.get("segment_ids")
  if keep is None and _scan_ok(cfg, collect):
    out = Transformer(cfg).apply({"params": params}, tokens, positions=positions,
                                 segment_ids=segs, collect_loop_states=True,
                                 return_hidden=True)
    exits = D.loop_exits(cfg)
    loop_states = out["loop_states"]
    states = [out["hidden"] if c == depth else loop_states[exits.index(c)]
              for c in collect]
    return jnp.stack(states), out["logits"]
  b, t = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cos, sin = L.rope_cos_sin(cfg.rope, cfg.head_dim, positions)
  mask = L.attention_mask(positions, segs)
  units = cfg.plan.unrolled()

  def one(h, i):
    u = units[i]
    # pylint: disable-next=protected-access
    return D._apply_unit(cfg, params, u, u[2], h, cos, sin, mask, None, None)[0]

  if cfg.remat != "none":
    one = jax.checkpoint(one, static_argnums=(1,))
  h = D.embed(cfg, params, tokens)
  states = []
  for i in range(depth):
    h_new = one(h, i)
    h = h_new if keep is None else jnp.where(keep[i][:, None, None], h_new, h)
    if i + 1 in collect:
      states.append(h)
  return jnp.stack(states), D.head(cfg, params, h)


__all__ = ["exit_forward", "final_norm", "layer_drop_rates", "layer_keep_mask"]

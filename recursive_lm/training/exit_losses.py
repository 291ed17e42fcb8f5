"""Early-exit training objectives: CALM, RRT aggressive (+ self-KD), FREE, LayerSkip.

Every exit reads the *shared* final norm + LM head (no new parameters). Exits
are unrolled layer counts (1-based): after every loop for a recursive model
(``decode.depth.loop_exits``), a chosen list for a vanilla one; the full depth
is always the last exit ("final").

The objective is split so the final exit goes through the existing fused
CE + teacher-KD path once (``losses.distill_loss``) with its CE scaled by
``w_final``; the intermediate exits add ``sum_i w_i * term_i``:

* ``calm_weighted`` (CALM ``loss_fn``, early_exit.md §2.2.1): w_i = a_i / sum a
  over all exits; ``aggregation`` "linear" a = 1, 2, ..., n (CALM default) |
  "uniform" | "geometric" 1, 2, 4, ... | int k > 1: 1, 1+k, 1+2k, ...
* ``aggressive`` (RRT §3.7, recursion.md §1.5): w_final = 1, w_i = c and
  term_i = CE_i + self_kd * KL(stop_grad(p_final) || p_i).
* ``free`` (FREE shallow-deep, §2.1.2): w_i = layers_i / sum(layers) (for the
  two-exit model: L_s / (L_s + L) and L / (L_s + L)), plus
  ``alpha * MSE`` between final-normed hidden states of the shallow layers
  1..L_s (student) and teacher layers T of the same model (detached), paired
  by ``kd_align`` "last" | "unif" | "dyna" (monotone greedy alignment,
  argmin not differentiated). With more than two exits the CE weights stay
  proportional to depth and the KD uses the first exit as L_s.
* ``layerskip`` (§2.3.1): w_l = C(t, l) e(l) / sum_i C(t, i) e(i) with the
  early-exit ``scale`` e and ``curriculum`` C ("none" | "rotational" |
  "gradual"); layer dropout is in ``exit_forward`` (``layer_dropout`` p_max).

All weights are jnp f32 arrays (they may depend on the traced step); every
term is a masked mean over the tokens with ``loss_mask != 0``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ConfigError, ModelConfig

Array = jax.Array
KINDS = ("calm_weighted", "aggressive", "free", "layerskip")
AGGREGATIONS = ("linear", "uniform", "geometric")
ALIGNS = ("last", "unif", "dyna")
CURRICULA = ("none", "rotational", "gradual")
SCALES = ("uniform", "linear", "sum", "sqrt", "inv", "inv_sqrt")
DROP_SHAPES = ("exp", "linear")


@dataclasses.dataclass(frozen=True)
class ExitLossConfig:
  """Early-exit objective added to the train step (``LossConfig.exit``).

  Attributes:
    kind: one of ``KINDS``.
    exit_layers: intermediate exits as unrolled layer counts; None = after
      every loop but the last (recursive models; required for vanilla ones).
    aggregation: calm_weighted weights: ``AGGREGATIONS`` or an int k > 1.
    c: aggressive coefficient of every intermediate exit.
    self_kd: aggressive: weight of KL(p_final.detach || p_i) inside c * (...).
    self_kd_temperature: temperature of that KL.
    alpha: free: weight of the hidden-state MSE.
    kd_align: free: ``ALIGNS``.
    teacher_layers: free: teacher layer counts; None = round(k L / L_s).
    scale: layerskip e(l): ``SCALES`` (l = 0-based layer index of the exit).
    e_scale: layerskip: multiplies e(l) of every exit but the final one.
    curriculum: layerskip: ``CURRICULA``.
    rotation_stride: rotational: every R-th exit on, rolled one per step.
    gradual_scale: gradual: exit l on once t/T >= s (L - l) / L.
    curriculum_steps: gradual T (micro-steps).
    layer_dropout: LayerSkip p_max (0 disables); per-sample masks, no rescale.
    dropout_shape: per-layer rate D(l): "exp" exp(l ln2/(L-1)) - 1 | "linear" l/(L-1).
  """
  kind: str = "aggressive"
  exit_layers: tuple[int, ...] | None = None
  aggregation: str | int = "linear"
  c: float = 0.1
  self_kd: float = 0.0
  self_kd_temperature: float = 1.0
  alpha: float = 0.5
  kd_align: str = "dyna"
  teacher_layers: tuple[int, ...] | None = None
  scale: str = "uniform"
  e_scale: float = 1.0
  curriculum: str = "none"
  rotation_stride: int = 2
  gradual_scale: float = 0.5
  curriculum_steps: int = 1000
  layer_dropout: float = 0.0
  dropout_shape: str = "exp"

  def __post_init__(self):
    for name in ("exit_layers", "teacher_layers"):
      v = getattr(self, name)
      if v is not None:
        object.__setattr__(self, name, tuple(int(x) for x in v))
    bad = []
    if self.kind not in KINDS:
      bad.append(f"kind={self.kind!r}: choose from {KINDS}")
    agg = self.aggregation
    if not (agg in AGGREGATIONS or (isinstance(agg, int) and not isinstance(agg, bool)
                                    and agg > 1)):
      bad.append(f"aggregation={agg!r}: choose from {AGGREGATIONS} or an int k > 1")
    if self.c < 0 or self.self_kd < 0 or self.alpha < 0 or self.e_scale < 0:
      bad.append("c, self_kd, alpha and e_scale must be >= 0")
    if self.self_kd_temperature <= 0:
      bad.append(f"self_kd_temperature={self.self_kd_temperature}: use > 0")
    if self.kd_align not in ALIGNS:
      bad.append(f"kd_align={self.kd_align!r}: choose from {ALIGNS}")
    if self.scale not in SCALES:
      bad.append(f"scale={self.scale!r}: choose from {SCALES}")
    if self.curriculum not in CURRICULA:
      bad.append(f"curriculum={self.curriculum!r}: choose from {CURRICULA}")
    if self.rotation_stride < 1 or self.curriculum_steps < 1:
      bad.append("rotation_stride and curriculum_steps must be >= 1")
    if not 0.0 <= self.layer_dropout < 1.0:
      bad.append(f"layer_dropout={self.layer_dropout}: use a rate in [0, 1)")
    if self.dropout_shape not in DROP_SHAPES:
      bad.append(f"dropout_shape={self.dropout_shape!r}: choose from {DROP_SHAPES}")
    if self.layer_dropout and self.kind != "layerskip":
      bad.append("layer_dropout is LayerSkip's recipe: set kind='layerskip' or "
                 "layer_dropout=0")
    if bad:
      raise ConfigError("invalid ExitLossConfig: " + "; ".join(bad))


# ----------------------------------------------------------------- exits
def resolve_exits(cfg: ModelConfig, ecfg: ExitLossConfig) -> tuple[int, ...]:
  """All exits (layer counts, ascending), the full depth last."""
  depth = cfg.plan.effective_depth
  if ecfg.exit_layers is None:
    if cfg.plan.loops < 2:
      raise ConfigError(
          "ExitLossConfig.exit_layers=None means 'after every loop', but this model "
          "has one loop; list the vanilla exits, e.g. exit_layers=(8, 16)")
    p, k = cfg.plan.prelude, cfg.plan.block
    inter = [p + k * (i + 1) for i in range(cfg.plan.loops - 1)]
  else:
    inter = sorted(set(ecfg.exit_layers))
  if not inter or inter[0] < 1 or inter[-1] >= depth:
    raise ConfigError(f"exit_layers must be non-empty counts in [1, {depth - 1}] "
                      f"(the final exit {depth} is implicit), got {ecfg.exit_layers}")
  return tuple(inter) + (depth,)


# ----------------------------------------------------------------- weights
def calm_weights(n: int, aggregation: str | int = "linear") -> np.ndarray:
  """CALM aggregation weights over n exits, normalised to sum 1."""
  i = np.arange(n, dtype=np.float64)
  if aggregation == "linear":
    a = i + 1
  elif aggregation == "uniform":
    a = np.ones(n)
  elif aggregation == "geometric":
    a = 2.0 ** i
  else:
    a = 1.0 + aggregation * i
  return (a / a.sum()).astype(np.float32)


def layerskip_scale(layers: Sequence[int], depth: int, kind: str,
                    e_scale: float = 1.0) -> np.ndarray:
  """Unnormalised e(l) per exit; l = count - 1 (0-based index of the layer
  whose output exits). The final exit (count == depth) is not e_scaled."""
  l = np.asarray(layers, np.float64) - 1
  e = {"uniform": np.ones_like(l), "linear": l + 1, "sum": (l + 1) * (l + 2) / 2,
       "sqrt": np.sqrt(l + 1), "inv": 1 / (l + 1), "inv_sqrt": 1 / np.sqrt(l + 1)}[kind]
  e = np.where(np.asarray(layers) < depth, e * e_scale, e)
  return e.astype(np.float32)


def curriculum_mask(ecfg: ExitLossConfig, layers: Sequence[int], depth: int,
                    step: Array | int) -> Array:
  """Bool [E]: exits with a loss at micro-step ``step``; the final one always.

  rotational: the mask with every R-th exit on (exit 0 first) ``np.roll``-ed
  by one position per step (torchtune ``RotationalEarlyExitCurriculum``);
  gradual: exit with 0-based layer l on iff step/T >= s (L - l) / L.
  """
  e = len(layers)
  step = jnp.asarray(step, jnp.int32)
  idx = jnp.arange(e, dtype=jnp.int32)
  if ecfg.curriculum == "rotational":
    on = jnp.mod(jnp.mod(idx - step, e), ecfg.rotation_stride) == 0
  elif ecfg.curriculum == "gradual":
    l = jnp.asarray(layers, jnp.float32) - 1
    frac = step.astype(jnp.float32) / ecfg.curriculum_steps
    on = frac >= ecfg.gradual_scale * (depth - l) / depth
  else:
    on = jnp.ones((e,), bool)
  return on | (idx == e - 1)


def exit_weights(ecfg: ExitLossConfig, layers: Sequence[int], depth: int,
                 step: Array | int = 0) -> Array:
  """f32 [E] weight of each exit's CE (final last), per ``ecfg.kind``."""
  e = len(layers)
  if ecfg.kind == "calm_weighted":
    return jnp.asarray(calm_weights(e, ecfg.aggregation))
  if ecfg.kind == "aggressive":
    return jnp.asarray([ecfg.c] * (e - 1) + [1.0], jnp.float32)
  if ecfg.kind == "free":
    a = np.asarray(layers, np.float32)
    return jnp.asarray(a / a.sum())
  s = jnp.asarray(layerskip_scale(layers, depth, ecfg.scale, ecfg.e_scale))
  s = s * curriculum_mask(ecfg, layers, depth, step).astype(jnp.float32)
  return s / jnp.sum(s)


# ----------------------------------------------------------------- FREE KD
def free_teacher_layers(ecfg: ExitLossConfig, shallow: int, depth: int) -> tuple[int, ...]:
  """FREE teacher layers: ``ecfg.teacher_layers`` or round(k L / L_s), k = 1..L_s
  (reproduces FREE's table for L=24, L_s in {4, 6, 8, 12} and L=12, L_s=3)."""
  if ecfg.teacher_layers is not None:
    t = tuple(sorted(set(ecfg.teacher_layers)))
    if t[0] < 1 or t[-1] > depth:
      raise ConfigError(f"teacher_layers must lie in [1, {depth}], got {t}")
    return t
  return tuple(sorted({int(math.floor(k * depth / shallow + 0.5))
                       for k in range(1, shallow + 1)}))


def dyna_align(cost: Array) -> Array:
  """FREE ``kd_dyna`` alignment of teacher rows to student columns.

  From the last teacher row backward, row k takes the column with the smallest
  cost among those strictly below the column taken by row k+1 (no restriction
  for the last row); with no candidate left it reuses the previous column.
  Returns int32 [K] (non-decreasing in k). Not differentiated.
  """
  cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
  n_s = cost.shape[1]
  cols = jnp.arange(n_s, dtype=jnp.int32)

  def body(prev, row):
    allowed = cols < prev
    pick = jnp.argmin(jnp.where(allowed, row, jnp.inf)).astype(jnp.int32)
    pick = jnp.where(jnp.any(allowed), pick, prev)
    return pick, pick

  _, picks = jax.lax.scan(body, jnp.asarray(n_s, jnp.int32), cost[::-1])
  return picks[::-1]


def _masked_mse(a: Array, b: Array, w: Array) -> Array:
  """sum_t w_t mean_d (a - b)^2; a, b [..., B, T, D], w [B, T] (sums to 1)."""
  d = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))
  return jnp.sum(jnp.mean(d, axis=-1) * w, axis=(-2, -1))


def free_kd(student: Array, teacher: Array, mask: Array, align: str = "dyna"
            ) -> tuple[Array, Array]:
  """FREE layer-wise hidden-state KD (MSE), teacher detached.

  As in FREE, the ``dyna`` alignment is chosen once per batch from the
  batch-mean MSE matrix (not per example); padding is excluded by ``mask``.

  Args:
    student: [S, B, T, D] final-normed states of layers 1..L_s (S = L_s).
    teacher: [K, B, T, D] final-normed states of the teacher layers.
    mask: [B, T] loss mask.
    align: "last" MSE(student[-1], teacher[-1]) | "unif" teacher k <-> student
      k (needs K == S) | "dyna" ``dyna_align`` on the [K, S] MSE matrix.

  Returns:
    (loss f32 scalar, alignment int32 [K] (student index per teacher layer)).
  """
  teacher = jax.lax.stop_gradient(teacher)
  m = mask.astype(jnp.float32)
  w = m / jnp.maximum(jnp.sum(m), 1.0)
  k, s = teacher.shape[0], student.shape[0]
  if align == "last":
    return _masked_mse(student[-1], teacher[-1], w), jnp.full((k,), s - 1, jnp.int32)
  if align == "unif":
    if k != s:
      raise ConfigError(f"kd_align='unif' pairs teacher layer k with student layer k "
                        f"and needs as many teacher layers ({k}) as shallow layers "
                        f"({s}); use kd_align='dyna' or set teacher_layers")
    idx = jnp.arange(k, dtype=jnp.int32)
  elif align == "dyna":
    # cost[k, s] = sum_t w_t |t_k - s_s|^2 / D, by expansion (alignment only).
    tf = jax.lax.stop_gradient(teacher).astype(jnp.float32)
    sf = jax.lax.stop_gradient(student).astype(jnp.float32)
    dd = tf.shape[-1]
    tn = jnp.einsum("kbtd,kbtd,bt->k", tf, tf, w)
    sn = jnp.einsum("sbtd,sbtd,bt->s", sf, sf, w)
    cross = jnp.einsum("kbtd,sbtd,bt->ks", tf, sf, w)
    idx = dyna_align((tn[:, None] + sn[None, :] - 2 * cross) / dd)
  else:
    raise ConfigError(f"kd_align={align!r}: choose from {ALIGNS}")
  return jnp.mean(_masked_mse(student[idx], teacher, w)), idx


__all__ = ["ALIGNS", "AGGREGATIONS", "CURRICULA", "DROP_SHAPES", "ExitLossConfig",
           "KINDS", "SCALES", "calm_weights", "curriculum_mask", "dyna_align",
           "exit_weights", "free_kd", "free_teacher_layers", "layerskip_scale",
           "resolve_exits"]

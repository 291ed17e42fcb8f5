"""Next-token cross-entropy and knowledge-distillation losses over logits.

All reductions run in float32 whatever the logits' dtype; every loss is a mean
over the tokens where ``mask`` is nonzero (``n = max(sum(mask), 1)``).

Memory/FLOPs. The vocabulary is large (49152 for SmolLM2), so ``[B, T, V]``
float32 temporaries dominate. The default path -- CE (+ z-loss) + forward KL,
``distill_loss(kd="forward_kl")`` -- is one ``jax.custom_vjp`` that keeps as
residuals only the two logit arrays (compute dtype) plus ``[B, T]`` log-sum-exps:

  forward: lse_s (max + exp-sum), one exp pass over the teacher shared by
    lse_t and sum_v p_t (t - s) (a batched dot, see ``_rowdot``), target logit;
  backward: one elementwise pass
    dL/ds = w * (g_ce (q - onehot) + g_z 2 lse_s q + g_kd tau (q_tau - p_tau)).

The other KD kinds (reverse KL, JSD, TVD) are plain autodiff (``kd_loss``).

KD losses use temperature ``tau`` on both sides and are scaled by ``tau**2``
(Hinton et al.) so gradient magnitudes stay comparable across temperatures.
Forward KL is ``KL(p_teacher || p_student)`` (the MoR/RRT choice).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array
KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd")


def _weights(mask: Array) -> tuple[Array, Array]:
  """(w [B, T] f32 = mask / n, n scalar f32), both gradient-free."""
  m = jax.lax.stop_gradient(mask.astype(jnp.float32))
  n = jnp.maximum(jnp.sum(m), 1.0)
  return m / n, n


def _lse(x: Array, scale: float = 1.0) -> Array:
  """logsumexp over the last axis of ``x * scale`` in f32. [..., V] -> [...]."""
  xf = x.astype(jnp.float32)
  if scale != 1.0:
    xf = xf * scale
  mx = jax.lax.stop_gradient(jnp.max(xf, axis=-1, keepdims=True))
  return jnp.log(jnp.sum(jnp.exp(xf - mx), axis=-1)) + mx[..., 0]


def _target_logit(logits: Array, targets: Array) -> Array:
  """logits[..., targets] in f32. [B, T, V], [B, T] -> [B, T]."""
  return jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32),
                             axis=-1)[..., 0].astype(jnp.float32)


def _rowdot(a: Array, b: Array) -> Array:
  """sum(a * b, -1) as a batched dot. [..., V] x [..., V] -> [...].

  On XLA:CPU a ``reduce(multiply)`` over a long axis is ~6x slower than a
  ``reduce(exp)`` or this dot (measured 160 vs 34 ms at [256, 49152]).
  """
  return jnp.einsum("...v,...v->...", a, b, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)


# ----------------------------------------------------------------- fused path
def _fused_fwd(s, t, targets, w, tau):
  lse_s = _lse(s)
  ce = jnp.sum(w * (lse_s - _target_logit(s, targets)))
  z = jnp.sum(w * jnp.square(lse_s))
  res_t = None
  if t is None:
    kd = jnp.zeros((), jnp.float32)
  else:
    inv = 1.0 / tau
    lse_st = lse_s if tau == 1.0 else _lse(s, inv)
    tf = t.astype(jnp.float32)
    # One exp pass over the teacher: e = exp(t/tau - max), Z = sum e.
    mx = jnp.max(tf, axis=-1) * inv
    e_t = jnp.exp(tf * inv - mx[..., None])
    z_t = jnp.sum(e_t, axis=-1)
    lse_tt = jnp.log(z_t) + mx
    # KL(p_t || q_s) = sum_v p_t (t - s) / tau + lse_s,tau - lse_t,tau
    cross = _rowdot(e_t, tf - s.astype(jnp.float32)) * (inv / z_t)
    kd = tau * tau * jnp.sum(w * (cross + lse_st - lse_tt))
    res_t = (t, lse_st, lse_tt)
  return (ce, z, kd), (s, targets, w, lse_s, res_t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_losses(s, t, targets, w, tau):
  """(ce, z, fkl) sums weighted by ``w``; gradient only w.r.t. ``s``."""
  return _fused_fwd(s, t, targets, w, tau)[0]


def _fused_bwd(tau, res, g):
  s, targets, w, lse_s, res_t = res
  g_ce, g_z, g_kd = g
  sf = s.astype(jnp.float32)
  q = jnp.exp(sf - lse_s[..., None])
  onehot = jax.lax.broadcasted_iota(jnp.int32, s.shape, s.ndim - 1) == targets[..., None]
  grad = g_ce * (q - onehot) + (g_z * 2.0) * lse_s[..., None] * q
  if res_t is not None:
    t, lse_st, lse_tt = res_t
    inv = 1.0 / tau
    q_t = q if tau == 1.0 else jnp.exp(sf * inv - lse_st[..., None])
    p_t = jnp.exp(t.astype(jnp.float32) * inv - lse_tt[..., None])
    grad = grad + (g_kd * tau) * (q_t - p_t)
  grad = (grad * w[..., None]).astype(s.dtype)
  return grad, None, None, None  # None: symbolic zero cotangent for the teacher


_fused_losses.defvjp(lambda s, t, targets, w, tau: _fused_fwd(s, t, targets, w, tau),
                     _fused_bwd)


# ----------------------------------------------------------------- public API
def cross_entropy(logits: Array, targets: Array, mask: Array, z_loss: float = 0.0
                  ) -> tuple[Array, dict[str, Array]]:
  """Masked mean next-token CE (+ ``z_loss * mean(lse**2)``).

  Args:
    logits: [B, T, V] any float dtype.
    targets: [B, T] int token ids.
    mask: [B, T] 0/1 (int or float) loss mask.
    z_loss: coefficient of the PaLM z-loss (0 disables it).

  Returns:
    (loss scalar f32, {"ce", "z_loss", "n_tokens"}).
  """
  w, n = _weights(mask)
  ce, z, _ = _fused_losses(logits, None, targets, w, 1.0)
  loss = ce + z_loss * z if z_loss else ce
  return loss, {"ce": ce, "z_loss": z, "n_tokens": n}


def kd_loss(student_logits: Array, teacher_logits: Array, mask: Array,
            kind: str = "forward_kl", temperature: float = 1.0) -> Array:
  """Masked mean distillation loss (plain autodiff), scaled by ``temperature**2``.

  Args:
    student_logits, teacher_logits: [B, T, V]; the teacher is stop-gradiented.
    mask: [B, T] loss mask.
    kind: "forward_kl" KL(p_t||p_s) | "reverse_kl" KL(p_s||p_t) |
      "jsd" (base e, mixture m = (p_s + p_t) / 2) | "tvd" 0.5 * sum|p_s - p_t|.
    temperature: softmax temperature on both sides.
  """
  if kind not in KD_KINDS:
    raise ValueError(f"unknown kd kind {kind!r}; choose from {KD_KINDS}")
  w, _ = _weights(mask)
  inv = 1.0 / temperature
  ls = jax.nn.log_softmax(student_logits.astype(jnp.float32) * inv, axis=-1)
  lt = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) * inv, axis=-1)
  if kind == "forward_kl":
    tok = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
  elif kind == "reverse_kl":
    tok = jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1)
  elif kind == "jsd":
    lm = jnp.logaddexp(ls, lt) - math.log(2.0)
    tok = 0.5 * jnp.sum(jnp.exp(lt) * (lt - lm) + jnp.exp(ls) * (ls - lm), axis=-1)
  else:
    tok = 0.5 * jnp.sum(jnp.abs(jnp.exp(ls) - jnp.exp(lt)), axis=-1)
  return temperature * temperature * jnp.sum(w * tok)


def distill_loss(student_logits: Array, teacher_logits: Array | None, targets: Array,
                 mask: Array, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 kd: str = "forward_kl", temperature: float = 1.0,
                 z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """``ce_weight * CE + kd_weight * KD(teacher, student) [+ z_loss * z]``.

  Args:
    student_logits: [B, T, V] (compute dtype).
    teacher_logits: [B, T, V] or None (pure CE); never receives gradient.
    targets: [B, T] int; mask: [B, T] loss mask.
    ce_weight, kd_weight: mixing weights (L = CE + 1 * FKL by default).
    kd: one of ``KD_KINDS``; "forward_kl" uses the fused custom-VJP path.
    temperature: KD temperature (CE always at temperature 1).
    z_loss: z-loss coefficient.

  Returns:
    (loss f32 scalar, {"loss", "ce", "kd", "z_loss", "n_tokens", "ppl"}).
  """
  if kd not in KD_KINDS:
    raise ValueError(f"unknown kd kind {kd!r}; choose from {KD_KINDS}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  w, n = _weights(mask)
  use_t = teacher_logits is not None and kd_weight != 0
  t = jax.lax.stop_gradient(teacher_logits) if use_t else None
  if use_t and kd == "forward_kl":
    ce, z, kd_val = _fused_losses(student_logits, t, targets, w, float(temperature))
  else:
    ce, z, _ = _fused_losses(student_logits, None, targets, w, 1.0)
    kd_val = (kd_loss(student_logits, t, mask, kd, temperature) if use_t
              else jnp.zeros((), jnp.float32))
  loss = ce_weight * ce + kd_weight * kd_val
  if z_loss:
    loss = loss + z_loss * z
  metrics = {"loss": loss, "ce": ce, "kd": kd_val, "z_loss": z, "n_tokens": n,
             "ppl": jnp.exp(jax.lax.stop_gradient(ce))}
  return loss, metrics

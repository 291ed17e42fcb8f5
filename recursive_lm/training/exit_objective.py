"""The early-exit train loss and per-exit evaluation (see ``exit_losses``).

``exit_train_loss`` is what ``train_step`` calls when ``LossConfig.exit`` is
set: it runs one forward that exposes the exit states, puts the final exit
through ``distill_loss`` (CE scaled by the exit weight ``w_final``, teacher KD
as configured), and adds the intermediate exits' terms. Per-exit logits are
made one exit at a time inside a rematerialised ``lax.scan`` (one [B, T, V]
logit array live at a time, recomputed in the backward pass), so memory does
not grow with the number of exits.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.nn import unrolled as D
from recursive_lm.training import exit_losses as X
from recursive_lm.training.exit_forward import (exit_forward, final_norm,
                                                layer_drop_rates, layer_keep_mask)
from recursive_lm.training.losses import distill_loss

Array = jax.Array


def _masked_mean(x: Array, mask: Array) -> Array:
  m = mask.astype(jnp.float32)
  return jnp.sum(x.astype(jnp.float32) * m) / jnp.maximum(jnp.sum(m), 1.0)


def per_exit_terms(cfg: ModelConfig, params, states: Array, final_logits: Array,
                   targets: Array, mask: Array, self_kd: bool = False,
                   temperature: float = 1.0) -> dict[str, Array]:
  """Per-exit losses and metrics for intermediate states [E, B, T, D].

  Returns f32 [E] arrays: ``ce``, ``kd`` (KL(stop_grad(p_final) || p_i) at
  ``temperature``; 0 unless ``self_kd``), ``z`` (mean lse^2), ``acc``
  (argmax == target) and ``agree`` (argmax == the final exit's argmax).
  """
  t = jax.lax.stop_gradient(final_logits)
  final_top = jnp.argmax(t, axis=-1)

  @jax.checkpoint
  def one(h):
    logits = D.head(cfg, params, h)
    _, m = distill_loss(logits, t if self_kd else None, targets, mask,
                        kd_weight=1.0 if self_kd else 0.0, temperature=temperature)
    top = jnp.argmax(logits, axis=-1)
    return {"ce": m["ce"], "kd": m["kd"], "z": m["z_loss"],
            "acc": _masked_mean(top == targets, mask),
            "agree": _masked_mean(top == final_top, mask)}

  _, out = jax.lax.scan(lambda c, h: (c, one(h)), None, states)
  return out


def exit_train_loss(model_cfg: ModelConfig, loss_cfg: Any, params, batch: dict,
                    teacher_logits: Array | None, step: Array,
                    key: Array) -> tuple[Array, dict[str, Array]]:
  """Total loss (final distillation + exits) and flat scalar metrics.

  Metrics: those of ``distill_loss`` for the final exit (``ce``, ``kd``,
  ``ppl``, ...), ``loss`` (the total), ``exit_loss`` (intermediate part),
  ``free_kd`` (free), and per exit ``exit<layers>_{w,ce,acc,agree}`` (+
  ``_kd`` with self-KD).
  """
  ecfg: X.ExitLossConfig = loss_cfg.exit
  layers = X.resolve_exits(model_cfg, ecfg)
  depth = layers[-1]
  w = X.exit_weights(ecfg, layers, depth, step)
  collect = set(layers)
  shallow, t_layers = layers[0], ()
  if ecfg.kind == "free":
    t_layers = X.free_teacher_layers(ecfg, shallow, depth)
    collect |= set(range(1, shallow + 1)) | set(t_layers)
  collect = sorted(collect)
  keep = None
  if ecfg.layer_dropout:
    rates = layer_drop_rates(depth, ecfg.layer_dropout, ecfg.dropout_shape)
    keep = layer_keep_mask(key, rates, batch["inputs"].shape[0])
  states, logits = exit_forward(model_cfg, params, batch, collect, keep)
  pos = {c: j for j, c in enumerate(collect)}
  targets, mask = batch["targets"], batch["loss_mask"]

  final_loss, metrics = distill_loss(
      logits, teacher_logits, targets, mask, ce_weight=loss_cfg.ce_weight * w[-1],
      kd_weight=loss_cfg.kd_weight, kd=loss_cfg.kd, temperature=loss_cfg.temperature,
      z_loss=loss_cfg.z_loss)
  self_kd = ecfg.kind == "aggressive" and ecfg.self_kd > 0
  inter = states[jnp.asarray([pos[c] for c in layers[:-1]])]
  terms = per_exit_terms(model_cfg, params, inter, logits, targets, mask, self_kd,
                         ecfg.self_kd_temperature)
  per = terms["ce"] + loss_cfg.z_loss * terms["z"]
  if self_kd:
    per = per + ecfg.self_kd * terms["kd"]
  exit_loss = jnp.sum(w[:-1] * per)
  if ecfg.kind == "free" and ecfg.alpha:
    norm = lambda idx: final_norm(model_cfg, params, states[jnp.asarray(idx)])
    kd_h, _ = X.free_kd(norm([pos[c] for c in range(1, shallow + 1)]),
                        norm([pos[c] for c in t_layers]), mask, ecfg.kd_align)
    exit_loss = exit_loss + ecfg.alpha * kd_h
    metrics["free_kd"] = kd_h
  loss = final_loss + exit_loss
  final_top = jnp.argmax(logits, axis=-1)
  metrics.update(loss=loss, exit_loss=exit_loss)
  for i, c in enumerate(layers[:-1]):
    metrics.update({f"exit{c}_w": w[i], f"exit{c}_ce": terms["ce"][i],
                    f"exit{c}_acc": terms["acc"][i], f"exit{c}_agree": terms["agree"][i]})
    if self_kd:
      metrics[f"exit{c}_kd"] = terms["kd"][i]
  metrics.update({f"exit{depth}_w": w[-1], f"exit{depth}_ce": metrics["ce"],
                  f"exit{depth}_acc": _masked_mean(final_top == targets, mask)})
  return loss, metrics


def make_exit_eval_step(cfg: ModelConfig, layers) -> Callable:
  """``eval_step(params, batch) -> (nll [E], correct [E], agree [E], n)``: sums
  over the batch's target tokens for each exit in ``layers`` (full depth last;
  ``agree`` counts argmax equal to the final exit's argmax)."""
  layers = tuple(int(c) for c in layers)
  if layers[-1] != cfg.plan.effective_depth:
    raise ValueError(f"the last exit must be the full depth "
                     f"{cfg.plan.effective_depth}, got {layers}")

  def eval_step(params, batch):
    states, logits = exit_forward(cfg, params, batch, layers)
    targets = batch["targets"]
    m = batch["loss_mask"].astype(jnp.float32)
    final_top = jnp.argmax(logits, axis=-1)

    def sums(lg):
      lg = lg.astype(jnp.float32)
      nll = jax.nn.logsumexp(lg, axis=-1) - jnp.take_along_axis(
          lg, targets[..., None], axis=-1)[..., 0]
      top = jnp.argmax(lg, axis=-1)
      return (jnp.sum(nll * m), jnp.sum((top == targets) * m),
              jnp.sum((top == final_top) * m))

    inter = jax.lax.map(lambda h: sums(D.head(cfg, params, h)), states[:-1])
    last = sums(logits)
    cat = lambda a, b: jnp.concatenate([a, b[None]])
    return (cat(inter[0], last[0]), cat(inter[1], last[1]), cat(inter[2], last[2]),
            jnp.sum(m))

  return eval_step


def exit_metrics(eval_fn: Callable, layers, params, batches) -> dict[str, float]:
  """Held-out per-exit figures over ``batches`` with a (jitted)
  ``make_exit_eval_step``: ``exit<c>_{nll,ppl,acc,agree}`` (agree: greedy
  token equal to the final exit's)."""
  tot = None
  for b in batches:
    out = [np.asarray(x, np.float64) for x in eval_fn(params, b)]
    tot = out if tot is None else [a + o for a, o in zip(tot, out)]
  if tot is None or tot[3] == 0:
    raise ValueError("exit evaluation needs batches with target tokens")
  nll, correct, agree, n = tot
  out: dict[str, float] = {}
  for i, c in enumerate(layers):
    out.update({f"exit{c}_nll": nll[i] / n, f"exit{c}_ppl": math.exp(nll[i] / n),
                f"exit{c}_acc": correct[i] / n, f"exit{c}_agree": agree[i] / n})
  return {k: float(v) for k, v in out.items()}


__all__ = ["exit_metrics", "exit_train_loss", "make_exit_eval_step", "per_exit_terms"]

"""MoR train/eval steps: the LM (+ KD) loss of ``training.losses`` plus the
router losses of ``mor.losses``; loss-free bias update after each step; the
trainer's held-out MoR evaluation (``make_eval_fn``, ``make_router_evaluator``).
(Formerly ``mor.train``: training imports ``mor``, ``mor`` never imports training.)

Same contract as ``training.train_step.make_train_step`` (``TrainState``,
``train_step(state, teacher_params, batch) -> (state, metrics)``), so the
sharded ``jit_train_step`` applies unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from recursive_lm.config import ModelConfig
from recursive_lm.mor.losses import router_loss, update_loss_free_bias
from recursive_lm.nn.model import Transformer
from recursive_lm.training.losses import distill_loss
from recursive_lm.training.optim import OptimConfig, lr_at, make_optimizer
from recursive_lm.training.train_step import LossConfig, TrainState

Batch = dict[str, jax.Array]


def _apply(model, params, batch, routing=None):
  return model.apply({"params": params}, batch["inputs"],
                     positions=batch.get("positions"),
                     segment_ids=batch.get("segment_ids"), routing=routing)


def _valid(batch):
  seg = batch.get("segment_ids")
  return None if seg is None else seg > 0


def make_mor_train_step(model_cfg: ModelConfig, optim_cfg: OptimConfig,
                        loss_cfg: LossConfig = LossConfig(kd_weight=0.0),
                        teacher_cfg: ModelConfig | None = None) -> Callable:
  """``train_step(state, teacher_params, batch)``; works for router=None too."""
  model = Transformer(model_cfg)
  teacher = Transformer(teacher_cfg or model_cfg)
  tx = make_optimizer(optim_cfg)
  lr = lr_at(optim_cfg)
  rc = model_cfg.router

  def train_step(state: TrainState, teacher_params: Any, batch: Batch):
    t_logits = None
    if teacher_params is not None and loss_cfg.kd_weight != 0:
      t_logits = jax.lax.stop_gradient(
          _apply(teacher, jax.lax.stop_gradient(teacher_params), batch)["logits"])

    def loss_fn(params):
      out = _apply(model, params, batch)
      loss, m = distill_loss(out["logits"], t_logits, batch["targets"],
                             batch["loss_mask"], ce_weight=loss_cfg.ce_weight,
                             kd_weight=loss_cfg.kd_weight, kd=loss_cfg.kd,
                             temperature=loss_cfg.temperature, z_loss=loss_cfg.z_loss)
      load = jnp.zeros((model_cfg.plan.loops,), jnp.float32)
      if rc is not None:
        rl, rm, load = router_loss(out["router"], rc, _valid(batch))
        loss = loss + rl
        m = dict(m, loss=loss, **rm)
      return loss, (m, load)

    (_, (metrics, load)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if rc is not None:
      params = update_loss_free_bias(params, load, rc)
    rng, _ = jax.random.split(state.rng)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   lr=jnp.asarray(lr(state.step), jnp.float32))
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                         rng=rng), metrics

  return train_step


def make_mor_eval_step(model_cfg: ModelConfig, routing: str | None = None) -> Callable:
  """``eval_step(params, batch) -> (sum NLL, n tokens, router metrics)``.

  ``routing="threshold"`` scores with causal decisions (what decoding does);
  the default top-k matches training (and the paper's teacher-forced NLL).
  """
  model = Transformer(model_cfg)
  rc = model_cfg.router

  def eval_step(params, batch):
    out = _apply(model, params, batch, routing if rc is not None else None)
    logits = out["logits"].astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    m = batch["loss_mask"].astype(jnp.float32)
    rm = {}
    if rc is not None:
      _, rm, _ = router_loss(out["router"], rc, _valid(batch))
    return jnp.sum((lse - tgt) * m), jnp.sum(m), rm

  return eval_step


def make_eval_fn(cfg: ModelConfig, routing: str | None = None) -> Callable:
  """``(params, batch) -> (sum NLL, n)`` of the MoR eval step (router metrics
  dropped): the trainer's ``make_eval_step`` contract."""
  step = make_mor_eval_step(cfg, routing)
  return lambda params, batch: step(params, batch)[:2]


def make_router_evaluator(cfg: ModelConfig, p_sh, b_sh, rep, batches
                          ) -> Callable[[Any], dict]:
  """``params -> dict``: held-out NLL/ppl with causal routing
  (``causal_nll``/``causal_ppl``; expert: sigma(z) > 0.5, token: argmax) and
  the top-k forward's router metrics averaged over ``batches``
  (``router_eval/...``: occupancy, sampling accuracy, dead-token ratio, MaxVio)."""
  topk = jax.jit(make_mor_eval_step(cfg), in_shardings=(p_sh, b_sh), out_shardings=rep)
  causal = jax.jit(make_mor_eval_step(cfg, "threshold"), in_shardings=(p_sh, b_sh),
                   out_shardings=rep)

  def evaluate(params) -> dict:
    nll = n = 0.0
    sums: dict[str, float] = {}
    for b in batches:
      s, c, _ = causal(params, b)
      nll, n = nll + float(s), n + float(c)
      _, _, rm = topk(params, b)
      for k, v in jax.device_get(rm).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    out = {f"router_eval/{k.split('/', 1)[-1]}": v / len(batches) for k, v in sums.items()}
    if n:
      out.update(causal_nll=nll / n, causal_ppl=math.exp(nll / n))
    return out

  return evaluate

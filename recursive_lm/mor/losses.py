"""MoR router losses and metrics over the router outputs of ``Transformer``.

Expert-choice (``out["router"]`` has z, cand, sel [N, B, T]):
* auxiliary BCE on the main router's logits over each recursion's candidates
  (target: selected by top-k), averaged per recursion and summed over
  recursions, weight ``aux_loss`` (paper: 0.001); it makes sigmoid(z) > 0.5
  a causal stand-in for top-k at decode time;
* auxiliary router BCE (logits of detached states), weight ``aux_router_loss``;
* z-loss: mean z^2 over candidates (a single logit's logsumexp is z).
Metrics: per-recursion occupancy, sampling accuracy (z > 0 agrees with
top-k over candidates), dead-token ratio (positions never selected at the
last recursion by any row of the batch).

Token-choice (token_logits, token_probs [B, T, N], depth [B, T]):
* balancing loss sum_i f_i P_i, f_i = N * share of tokens at depth i,
  P_i = mean gate of depth i (weight ``balance_loss``, paper 0.1);
* z-loss mean (logsumexp z)^2;
* loss-free bias: b_i += u * sign(mean load - load_i) after each update.
Metrics: per-depth load, MaxVio = max_i (load_i - mean)/mean, occupancy.

``valid`` [B, T] (e.g. segment_ids > 0) restricts every average to real tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from recursive_lm.config import RouterConfig

Array = jax.Array


def _bce(z: Array, target: Array) -> Array:
  z = z.astype(jnp.float32)
  return jnp.maximum(z, 0) - z * target + jnp.log1p(jnp.exp(-jnp.abs(z)))


def _mean(x: Array, w: Array, axis=None) -> Array:
  return jnp.sum(x * w, axis=axis) / jnp.maximum(jnp.sum(w, axis=axis), 1.0)


def router_loss(router_out: dict, rc: RouterConfig, valid: Array | None = None
                ) -> tuple[Array, dict, Array]:
  """(weighted loss, scalar metrics, per-depth load [N]) for one batch."""
  if rc.kind == "expert":
    return _expert(router_out, rc, valid)
  return _token(router_out, rc, valid)


def _expert(o: dict, rc: RouterConfig, valid):
  z, cand, sel = o["z"], o["cand"], o["sel"]
  n = z.shape[0]
  v = jnp.ones(z.shape[1:], jnp.float32) if valid is None else valid.astype(jnp.float32)
  w = cand.astype(jnp.float32) * v[None]  # [N, B, T]
  t = sel.astype(jnp.float32)
  bce = _mean(_bce(z, t), w, axis=(1, 2))  # [N]
  zl = _mean(jnp.square(z), w, axis=(1, 2))
  loss = rc.aux_loss * jnp.sum(bce) + rc.z_loss * jnp.sum(zl)
  m = {"router/aux_bce": jnp.sum(bce), "router/z_loss": jnp.sum(zl)}
  if "z_aux" in o:
    abce = _mean(_bce(o["z_aux"], t), w, axis=(1, 2))
    loss = loss + rc.aux_router_loss * jnp.sum(abce)
    m["router/aux_router_bce"] = jnp.sum(abce)
    m["router/aux_router_acc"] = _mean(((o["z_aux"] > 0) == sel).astype(jnp.float32), w)
  m["router/sampling_acc"] = _mean(((z > 0) == sel).astype(jnp.float32), w)
  occ = _mean(t, jnp.broadcast_to(v[None], t.shape), axis=(1, 2))  # [N]
  for r in range(n):
    m[f"router/occupancy_{r}"] = occ[r]
  last_any = jnp.any(sel[-1] & (v > 0), axis=0)  # [T]
  real = jnp.any(v > 0, axis=0)
  m["router/dead_token_ratio"] = _mean((~last_any).astype(jnp.float32),
                                       real.astype(jnp.float32))
  m["router/loss"] = loss
  return loss, m, occ


def _token(o: dict, rc: RouterConfig, valid):
  z, g, depth = o["token_logits"], o["token_probs"], o["depth"]
  n = z.shape[-1]
  v = jnp.ones(depth.shape, jnp.float32) if valid is None else valid.astype(jnp.float32)
  onehot = jax.nn.one_hot(depth, n, dtype=jnp.float32)
  load = _mean(onehot, v[..., None], axis=(0, 1))  # [N]
  p = _mean(g.astype(jnp.float32), v[..., None], axis=(0, 1))
  bal = jnp.sum(n * jax.lax.stop_gradient(load) * p)
  zl = _mean(jnp.square(jax.nn.logsumexp(z.astype(jnp.float32), -1)), v)
  loss = rc.balance_loss * bal + rc.z_loss * zl
  m = {"router/balance": bal, "router/z_loss": zl, "router/loss": loss,
       "router/max_vio": jnp.max(load - 1.0 / n) * n}
  for r in range(n):
    m[f"router/load_{r}"] = load[r]
    m[f"router/occupancy_{r}"] = jnp.sum(load[r:])
  mean_p = p / jnp.maximum(jnp.sum(p), 1e-9)
  m["router/entropy"] = -jnp.sum(mean_p * jnp.log(jnp.maximum(mean_p, 1e-9)))
  return loss, m, load


def update_loss_free_bias(params: dict, load: Array, rc: RouterConfig) -> dict:
  """b_i <- b_i + u * sign(mean(load) - load_i) (Wang et al. 2024)."""
  if rc.kind != "token" or not rc.loss_free_bias:
    return params
  r = dict(params["router"])
  r["bias"] = r["bias"] + rc.bias_update_rate * jnp.sign(
      jnp.mean(load) - load).astype(r["bias"].dtype)
  return {**params, "router": r}

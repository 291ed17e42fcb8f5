"""MoR routers: parameters (one bank per model, leading loops axis) and gates
(``recursive_lm.mor.routers`` re-exports them).

Expert-choice keeps one scalar-logit router per recursion (``w [N, d]`` or an
MLP ``w1 [N, d, 2d]``, ``w2 [N, 2d]``); token-choice keeps one router with N
outputs (``w [d, N]`` or ``w1 [d, 2d]``, ``w2 [2d, N]``) plus a selection bias
``bias [N]`` used only by ``argmax`` (loss-free balancing; it receives no
gradient and is rewritten after each optimizer step). An auxiliary expert
router (``aux_*``, same shapes) scores detached states. Router maths runs in
float32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recursive_lm.config import ModelConfig, RouterConfig
from recursive_lm.nn import layers as L

Array = jax.Array


class RouterBank(nn.Module):
  """Returns the router parameter dict (see module docstring)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self) -> dict:
    cfg, rc = self.cfg, self.cfg.router
    n, d = cfg.plan.loops, cfg.d_model
    pdt = jnp.dtype(cfg.param_dtype)
    init = nn.initializers.normal(0.02)
    p = lambda name, shape, axes, i=init: L.param_with_axes(self, name, i, shape, axes, pdt)
    out = {}
    prefixes = [""] + (["aux_"] if rc.kind == "expert" and rc.aux_router else [])
    for pre in prefixes:
      if rc.kind == "expert":
        if rc.router_type == "linear":
          out[pre + "w"] = p(pre + "w", (n, d), (L.LOOPS, L.EMBED))
        else:
          out[pre + "w1"] = p(pre + "w1", (n, d, 2 * d), (L.LOOPS, L.EMBED, L.MLP))
          out[pre + "w2"] = p(pre + "w2", (n, 2 * d), (L.LOOPS, L.MLP))
      else:
        if rc.router_type == "linear":
          out["w"] = p("w", (d, n), (L.EMBED, L.LOOPS))
        else:
          out["w1"] = p("w1", (d, 2 * d), (L.EMBED, L.MLP))
          out["w2"] = p("w2", (2 * d, n), (L.MLP, L.LOOPS))
        if rc.loss_free_bias:
          out["bias"] = p("bias", (n,), (L.LOOPS,), nn.initializers.zeros)
    return out


def loop_slice(router: dict, n) -> dict:
  """The expert routers' parameters of recursion ``n`` (leading axis removed)."""
  return {k: v[n] for k, v in router.items()}


def _mlp_or_linear(h: Array, w=None, w1=None, w2=None) -> Array:
  h = h.astype(jnp.float32)
  if w is not None:
    return h @ w.astype(jnp.float32)
  return jax.nn.gelu(h @ w1.astype(jnp.float32)) @ w2.astype(jnp.float32)


def expert_logits(router_n: dict, h: Array, rc: RouterConfig, aux: bool = False
                  ) -> Array:
  """z [B, T] of one recursion's expert router (``aux``: the auxiliary one,
  on ``stop_gradient(h)``)."""
  pre = "aux_" if aux else ""
  if aux:
    h = jax.lax.stop_gradient(h)
  z = _mlp_or_linear(h, router_n.get(pre + "w"), router_n.get(pre + "w1"),
                     router_n.get(pre + "w2"))
  return z / rc.temperature


def expert_gate(z: Array, rc: RouterConfig) -> Array:
  """g = alpha * act(z), float32."""
  act = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "identity": lambda x: x}[rc.gate]
  return rc.alpha * act(z)


def token_route(router: dict, h1: Array, rc: RouterConfig):
  """Token-choice decision from the first recursion's input ``h1`` [B, T, D].

  Returns (logits [B, T, N], probs [B, T, N] (alpha-scaled gates), depth [B, T]
  int32 in [0, N) = argmax(probs + bias), weight [B, T] = probs at depth).
  """
  z = _mlp_or_linear(h1, router.get("w"), router.get("w1"), router.get("w2"))
  z = z / rc.temperature
  g = rc.alpha * (jax.nn.softmax(z, -1) if rc.gate == "softmax" else jax.nn.sigmoid(z))
  score = g
  if "bias" in router:
    score = g + jax.lax.stop_gradient(router["bias"].astype(jnp.float32))
  depth = jnp.argmax(score, axis=-1).astype(jnp.int32)
  w = jnp.take_along_axis(g, depth[..., None], axis=-1)[..., 0]
  return z, g, depth, w


def combine(h: Array, y: Array, g: Array, gating: str) -> Array:
  """Update of a routed token: h + g*y (residual), h + y (additive) or
  h + g*(y - h) (delta). ``y`` is the block output including its residual."""
  g = g[..., None].astype(jnp.float32)
  hf, yf = h.astype(jnp.float32), y.astype(jnp.float32)
  if gating == "residual":
    out = hf + g * yf
  elif gating == "additive":
    out = hf + yf
  else:
    out = hf + g * (yf - hf)
  return out.astype(h.dtype)

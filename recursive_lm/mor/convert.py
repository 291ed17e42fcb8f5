"""MoR uptraining: add a router to a student converted from a pretrained model.

``training.trainer.train`` calls these when ``config.convert.router`` is set
(experiments/configs/mor_uptrain_smollm2.py):

* :func:`router_config` - ``RouterConfig`` from the config node, with every
  problem reported as a ``ConfigError`` that names the fix;
* :func:`add_router` - ``cfg.replace(router=...)`` plus freshly initialised
  router params (``params["router"]``); the converted block / LoRA params are
  kept as they are;
* :func:`router_param_count` - router parameters (``unique_param_count`` of
  ``recursive.convert`` counts the recursive model only).

The held-out evaluation with causal routing (``make_router_evaluator``) and the
MoR train/eval steps live in ``training.mor_step`` (training imports mor, never
the reverse).

Router init: the paper's linear router is N(0, 0.02) with the gate
0.1 * sigmoid(z) on a residual-inclusive update (spec §2.2), which is a
from-scratch recipe: on a converted pretrained block it scales every routed
token's block output by ~1.05 and its block delta by ~0.05 and destroys the
pretrained function. For uptraining, the default config uses the MoD-style
``gating="delta"`` (h + g * (F(h) - h)) with ``alpha=2`` and a small
``init_std``, so g = 2 * sigmoid(z) ~= 1 at init: every token that is routed
through a recursion computes what the converted recursive model computes, and
the only change at init is that 1/3 (2/3) of the tokens skip recursion 2 (3).
The logit is z = w . h, so std(z) ~= init_std * |h|: SmolLM2's hidden states
after layer 0 have |h| ~ 1e3, and ``init_std=0.001`` gives RMS z ~= 1 there
(g in ~[0.5, 1.5], measured; results/mor.md), not g ~= 1; use ~1e-5 for that.
``init_std`` rescales the RouterBank's N(0, 0.02) draw (``init_std=0.02`` is
the paper's); ``init_std=0`` gives zero router weights (ties in top-k).
Known issue (results/mor.md): with ``delta`` gating the router can learn
g -> 0, i.e. switch the deeper recursions off.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import flax.linen as nn

from recursive_lm.config import (ROUTER_GATES, ROUTER_GATING, ROUTER_IMPLS, ROUTER_KINDS,
                                 ROUTER_KV, ROUTER_TYPES, ConfigError, ModelConfig,
                                 RouterConfig)
from recursive_lm.nn.mor_routers import RouterBank

_ROUTER_STD = 0.02  # RouterBank's normal init
_CHOICES = {"kind": ROUTER_KINDS, "router_type": ROUTER_TYPES, "gate": ROUTER_GATES,
            "gating": ROUTER_GATING, "kv": ROUTER_KV, "impl": ROUTER_IMPLS}
EXTRA_KEYS = ("init_std",)


def router_problems(node: Mapping[str, Any], loops: int | None = None) -> list[str]:
  """Every problem with ``config.convert.router`` (empty list: fine)."""
  p = []
  fields = set(RouterConfig.__dataclass_fields__)
  for k, v in dict(node).items():
    if k not in fields and k not in EXTRA_KEYS:
      p.append(f"config.convert.router.{k} is not a router setting; valid keys: "
               f"{sorted(fields | set(EXTRA_KEYS))}")
    elif k in _CHOICES and v not in _CHOICES[k]:
      p.append(f"config.convert.router.{k}={v!r}: choose from {_CHOICES[k]}")
  std = node.get("init_std", 0.001)
  if not isinstance(std, (int, float)) or std < 0:
    p.append(f"config.convert.router.init_std={std!r}: use a float >= 0 (0.02 is the "
             "paper's N(0, 0.02); the uptraining default is 0.001)")
  caps = node.get("capacities")
  if caps is not None and loops is not None and len(caps) != loops:
    p.append(f"config.convert.router.capacities has {len(caps)} entries but "
             f"config.convert.loops={loops}; give one capacity per loop, or None for "
             "the default (N_r - r + 1) / N_r")
  if not p:
    try:
      router_config(node)
    except ConfigError as e:
      p.append(f"config.convert.router: {e}")
  return p


def router_config(node: Mapping[str, Any]) -> RouterConfig:
  """``RouterConfig`` from a config node (``init_std`` dropped)."""
  kw = {k: v for k, v in dict(node).items() if k not in EXTRA_KEYS}
  for k in ("capacities", "decode_thresholds"):
    if kw.get(k) is not None:
      kw[k] = tuple(float(c) for c in kw[k])
  return RouterConfig(**kw)


def init_router_params(cfg: ModelConfig, seed: int = 0, init_std: float = 0.001
                       ) -> dict:
  """Fresh router params of ``cfg.router`` (the tree under ``params["router"]``)."""
  if cfg.router is None:
    raise ValueError("init_router_params needs cfg.router")
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x4D6F52)  # "MoR"
  p = nn.unbox(RouterBank(cfg).init(key)["params"])
  scale = init_std / _ROUTER_STD
  return {k: (v if k == "bias" else v * scale) for k, v in p.items()}


def add_router(cfg: ModelConfig, params: Mapping, router: RouterConfig,
               seed: int = 0, init_std: float = 0.001) -> tuple[ModelConfig, dict]:
  """``(cfg with router, params + fresh params["router"])``; other params kept."""
  if cfg.router is not None:
    raise ConfigError("the student already has a router (e.g. config.init_from is a "
                      "MoR model); drop config.convert.router to keep it")
  if "router" in params:
    raise ConfigError("the student's params already hold a 'router' entry")
  mcfg = cfg.replace(router=router, name=f"{cfg.name}-mor-{router.kind}")
  return mcfg, {**params, "router": init_router_params(mcfg, seed, init_std)}


def router_param_count(cfg: ModelConfig) -> int:
  """Number of router parameters of ``cfg`` (0 without a router)."""
  if cfg.router is None:
    return 0
  shapes = jax.eval_shape(lambda: nn.unbox(RouterBank(cfg).init(jax.random.PRNGKey(0))))
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


__all__ = ["EXTRA_KEYS", "add_router", "init_router_params", "router_config",
           "router_param_count", "router_problems"]

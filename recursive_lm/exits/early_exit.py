"""FREE and CALM exiting through trained exit modules (issue 12).

The one early-exit engine (``decode.early_exit.EarlyExitEngine``, policies
``decode/free.py`` / ``decode/calm.py``) with

* ``exit_maps``: at exit e a row that exits emits from
  ``final_norm(module_e(h_e))`` through the LM head instead of the raw state
  (``ExitRule.exit_state``); the full depth keeps the raw state;
* a head-free confidence: ``ExitMeta``, the artifact's meta classifier on the
  raw exit state (``sigmoid(meta_logit)`` = P(the exit's token equals the
  full model's)), so a token that does not exit pays no vocabulary head at
  the exit. Softmax measures (``softmax_max``...) also work: they read the
  head on the module's state.

Skipped layers' KV comes from the raw exit state as before (FREE: exact, by
the deferred deep pass; CALM: ``kv="propagate"``).

Example::

    m = recursive_lm.api.load()
    eng = module_exit_engine(m.cfg, m.params, load_exits(default_artifact_path(),
                             m.cfg, m.params), policy="free", threshold=0.8)
    out = eng.generate([ids], 48)      # EarlyExitOutput: exit_fraction, avg_layers
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from recursive_lm.config import ModelConfig
from recursive_lm.decode.exit_rule import Measure
from recursive_lm.exits import modules as M
from recursive_lm.exits.artifact import REGENERATE, ExitArtifactError, ExitSet
from recursive_lm.exits.train import meta_logit

CONFIDENCES = ("meta", "softmax_max", "softmax_diff", "entropy")
# FREE: the shallowest shipped exit; CALM: every shipped exit.
DEFAULT_FREE_LAYER = 6


class ExitMeta(Measure):
  """Head-free confidence per exit: sigmoid of the exit's meta classifier on
  the raw exit state (``exits.train.meta_logit``); exits without one (the
  full depth) report 0 (never confident)."""
  name = "exit_meta"

  def __init__(self, metas: Sequence[dict | None], index: int = 0):
    self.metas = tuple(None if p is None else {k: jnp.asarray(v, jnp.float32)
                                               for k, v in p.items()} for p in metas)
    self.index = int(index)

  def at(self, i: int) -> "ExitMeta":
    m = ExitMeta.__new__(ExitMeta)
    m.metas, m.index = self.metas, int(i)
    return m

  def __call__(self, h, logits, prev_h, prev_logits):
    p = self.metas[self.index] if self.index < len(self.metas) else None
    if p is None:
      return jnp.zeros(h.shape[:1], jnp.float32)
    return jax.nn.sigmoid(meta_logit(p, h.astype(jnp.float32)))


def _apply(module: dict, h):
  return M.apply_exit(module, h)


def module_maps(exits: ExitSet, layers: Sequence[int]) -> tuple:
  """One callable per exit of ``layers`` (+ the full depth, identity)."""
  maps = []
  for e in layers:
    mod = {k: jnp.asarray(v, jnp.float32) for k, v in exits.exits[int(e)].items()}
    maps.append(functools.partial(_apply, mod))
  return tuple(maps) + (lambda h: h,)


def check_layers(exits: ExitSet, policy: str, layers: Sequence[int] | None) -> list[int]:
  """The exit layers to use, checked against the artifact (one clear line)."""
  have = sorted(int(e) for e in exits.exits)
  if not have:
    raise ExitArtifactError(f"the exit artifact holds no exit module; regenerate it with "
                            f"`{REGENERATE}`")
  if layers is None:
    layers = ([DEFAULT_FREE_LAYER if DEFAULT_FREE_LAYER in have else have[0]]
              if policy == "free" else have)
  layers = [int(e) for e in layers]
  missing = [e for e in layers if e not in exits.exits]
  if missing:
    raise ExitArtifactError(f"the exit artifact has no module at layer(s) {missing}; it has "
                            f"{have}: pass --exits from those (or retrain with `{REGENERATE}`)")
  if policy == "free" and len(layers) != 1:
    raise ValueError(f"FREE has one shallow exit; got exits {layers}: pass one of {have}")
  return layers


def module_exit_engine(cfg: ModelConfig, params, exits: ExitSet, policy: str = "free",
                       layers: Sequence[int] | None = None, threshold: float = 0.8,
                       confidence: str = "meta", check_model: bool = True, **engine_kw):
  """An ``EarlyExitEngine`` (FREE or CALM) exiting through the artifact's
  modules at ``layers`` (default: FREE at layer 6, CALM at every shipped exit)
  with the ``confidence`` measure ("meta": the head-free meta classifier;
  a softmax name: read on the module's head). ``engine_kw``: EarlyExitEngine
  options (k_max, sync, rule, kv, schedule, kernel_layout, fuse, weights...)."""
  from recursive_lm.decode.early_exit import EarlyExitEngine  # pylint: disable=g-import-not-at-top
  if confidence not in CONFIDENCES:
    raise ValueError(f"confidence must be one of {CONFIDENCES} with exit modules, got "
                     f"{confidence!r}")
  if check_model:
    exits.check_model(cfg, params)
  layers = check_layers(exits, policy, layers)
  if confidence == "meta":
    missing = [e for e in layers if e not in exits.meta]
    if missing:
      raise ExitArtifactError(f"the exit artifact has no meta classifier at layer(s) "
                              f"{missing} (it has {sorted(exits.meta)}); use a softmax "
                              f"confidence or retrain with `{REGENERATE}`")
    measure = ExitMeta([exits.meta[e] for e in layers] + [None])
  else:
    measure = confidence
  return EarlyExitEngine(cfg, params, exits=list(layers), policy=policy, confidence=measure,
                         threshold=threshold, exit_maps=module_maps(exits, layers),
                         **engine_kw)


def from_artifact(cfg: ModelConfig, params, policy: str = "free", path: str | None = None,
                  **kw):
  """``module_exit_engine`` with the artifact at ``path`` (default: the one
  shipped for the embedded SmolLM2). Raises ``ExitArtifactError`` when it is
  missing, truncated or made for another model."""
  from recursive_lm.exits.artifact import default_artifact_path, load_exits  # pylint: disable=g-import-not-at-top
  es = load_exits(path or default_artifact_path(), cfg, params)
  return module_exit_engine(cfg, params, es, policy, check_model=False, **kw)

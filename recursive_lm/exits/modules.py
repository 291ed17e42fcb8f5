"""Exit modules: maps from the residual state after layer e to the final-norm input.

Every module reads ``x = h / rms(h)`` (parameter-free RMS normalisation of the
layer-e residual state; the final RMSNorm is scale invariant, so only the
direction matters) and returns a state ``y`` [.., D] that goes through the
model's own final norm + LM head (or the vocabulary shortlist of that head):

* ``affine``:  ``y = x W + b`` (tuned-lens style translator; W starts from the
  closed-form least-squares fit, ``train.fit_affine``);
* ``lowrank``: ``y = x W + b + silu(x A) B`` (affine plus a rank-r MLP
  correction; B starts at zero so the module starts as the affine fit).

Parameters are plain dicts of arrays (``{"w", "b"[, "a", "bb"]}``) so that the
artifact stores them as they are; ``apply_exit`` is a pure function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
KINDS = ("affine", "lowrank")


def rms_normalize(h: Array, eps: float = 1e-6) -> Array:
  hf = h.astype(jnp.float32)
  return hf * jax.lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + eps)


def init_exit(kind: str, d_model: int, rank: int = 64, seed: int = 0,
              w: np.ndarray | None = None, b: np.ndarray | None = None) -> dict:
  """Parameters of one exit module (float32). ``w``/``b``: an affine start
  (e.g. the least-squares fit); default identity."""
  if kind not in KINDS:
    raise ValueError(f"unknown exit module kind {kind!r}; choose one of {KINDS}")
  p = {"w": jnp.asarray(np.eye(d_model, dtype=np.float32) if w is None else w, jnp.float32),
       "b": jnp.asarray(np.zeros(d_model, np.float32) if b is None else b, jnp.float32)}
  if kind == "lowrank":
    key = jax.random.key(seed)
    p["a"] = jax.random.normal(key, (d_model, rank), jnp.float32) / np.sqrt(d_model)
    p["bb"] = jnp.zeros((rank, d_model), jnp.float32)
  return p


def exit_kind(params: dict) -> str:
  return "lowrank" if "a" in params else "affine"


def apply_exit(params: dict, h: Array) -> Array:
  """Module output [..., D] (float32) for layer-e residual states h [..., D]."""
  x = rms_normalize(h)
  y = x @ params["w"].astype(jnp.float32) + params["b"].astype(jnp.float32)
  if "a" in params:
    y = y + jax.nn.silu(x @ params["a"].astype(jnp.float32)) @ params["bb"].astype(jnp.float32)
  return y


def final_norm(model_params, y: Array, eps: float) -> Array:
  """The model's shared final RMSNorm (with its scale) on module outputs."""
  scale = model_params["final_norm"]["scale"].astype(jnp.float32)
  return rms_normalize(y, eps) * scale


def shortlist_logits(model_params, shortlist_w: Array, y: Array, eps: float) -> Array:
  """Logits over the shortlist: final_norm(y) @ W_S^T, W_S [N, D] (rows of
  the tied embedding / LM head for the shortlist token ids)."""
  return final_norm(model_params, y, eps) @ shortlist_w.astype(jnp.float32).T


def module_bytes(params: dict, itemsize: int = 4) -> int:
  return int(sum(np.prod(v.shape) for v in params.values()) * itemsize)

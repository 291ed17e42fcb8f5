"""Exit modules: maps from the residual state after layer e to the final-norm input.

Every module reads ``x = h / rms(h)`` (parameter-free RMS normalisation of the
layer-e residual state; the final RMSNorm is scale invariant, so only the
direction matters) and returns a state ``y`` [.., D] that goes through the
model's own final norm + LM head (or the vocabulary shortlist of that head):

* ``affine``:  ``y = x W + b`` (tuned-lens style translator; W starts from the
  closed-form least-squares fit, ``train.fit_affine``);
* ``lowrank``: ``y = x W + b + silu(x A) B`` (affine plus a rank-r MLP
  correction; B starts at zero so the module starts as the affine fit);
* ``layer``: one Llama decoder layer on the raw state, ``z = layer(h_e)``
  (Kangaroo-style; causal attention over the positions before, so it needs
  whole sequences in training and its own KV cache in decoding), its
  parameters copied from the frozen model's layer e+1 or its last layer, then
  optionally an affine map ``y = rms(z) W + b`` (else ``y = z``). Applied by
  ``apply_layer_exit(cfg, params, h, positions)`` through the model's own
  ``nn.layers.DecoderLayer``.

Parameters are plain dicts of arrays (``{"w", "b"[, "a", "bb"]}``; the layer
kind adds ``"layer"``: the decoder layer's Flax param tree) so that the
artifact stores them as they are; ``apply_exit`` is a pure function.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.nn import layers as L

Array = jax.Array
KINDS = ("affine", "lowrank", "layer")
TOKEN_KINDS = ("affine", "lowrank")      # per-token maps (apply_exit)
LAYER_INITS = ("next", "last")


def rms_normalize(h: Array, eps: float = 1e-6) -> Array:
  hf = h.astype(jnp.float32)
  return hf * jax.lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + eps)


def init_exit(kind: str, d_model: int, rank: int = 64, seed: int = 0,
              w: np.ndarray | None = None, b: np.ndarray | None = None) -> dict:
  """Parameters of one exit module (float32). ``w``/``b``: an affine start
  (e.g. the least-squares fit); default identity."""
  if kind == "layer":
    raise ValueError("exit kind 'layer' copies a decoder layer of the model: build it with "
                     "init_layer_exit(cfg, model_params, e, ...)")
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
  if "layer" in params:
    return "layer"
  return "lowrank" if "a" in params else "affine"


def layer_source(cfg: ModelConfig, e: int, init: str) -> int:
  """0-based unrolled index of the model layer a ``layer`` exit at e copies."""
  units = len(cfg.plan.unrolled())
  if init not in LAYER_INITS:
    raise ValueError(f"layer_init={init!r}: choose one of {LAYER_INITS}")
  if not 1 <= e < units:
    raise ValueError(f"exit layer {e} must lie in [1, {units - 1}] for a 'layer' exit")
  return e if init == "next" else units - 1


def _module_cfg(cfg: ModelConfig) -> ModelConfig:
  """The config the exit's decoder layer runs under: float32, [in, out]
  kernels, separate projections, no LoRA (its params are its own copy)."""
  return dataclasses.replace(cfg, dtype="float32", param_dtype="float32",
                             kernel_layout="in_out", fused_projections=False, lora_ranks=())


def init_layer_exit(cfg: ModelConfig, model_params, e: int, init: str = "next",
                    affine: bool = True, w: np.ndarray | None = None,
                    b: np.ndarray | None = None) -> dict:
  """A ``layer`` exit at e: a float32 copy of model layer e+1 (``init="next"``)
  or of its last layer (``"last"``), plus an affine map (identity unless w/b)."""
  if cfg.kernel_layout != "in_out" or cfg.fused_projections:
    raise ValueError("init_layer_exit needs the model's training layout (kernel_layout="
                     f"'in_out', unfused; got {cfg.kernel_layout!r}, fused="
                     f"{cfg.fused_projections}); pass the params api.load() returns")
  unit = cfg.plan.unrolled()[layer_source(cfg, e, init)]
  group, idx, _ = unit
  src = model_params["block"][f"layer_{idx}"] if group == "block" else model_params[f"{group}_{idx}"]
  p = {"layer": jax.tree_util.tree_map(lambda v: jnp.array(v, jnp.float32), src)}
  if affine:
    d = cfg.d_model
    p["w"] = jnp.asarray(np.eye(d, dtype=np.float32) if w is None else w, jnp.float32)
    p["b"] = jnp.asarray(np.zeros(d, np.float32) if b is None else b, jnp.float32)
  return p


def layer_states(cfg: ModelConfig, params: dict, h: Array,
                 positions: Array | None = None) -> Array:
  """The exit's decoder layer on layer-e states h [B, T, D] (sequence mode,
  causal over the T positions; ``positions`` [B, T] default 0..T-1)."""
  b, t, _ = h.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cos, sin = L.rope_cos_sin(cfg.rope, cfg.head_dim, positions)
  mask = L.attention_mask(positions)
  z, _ = L.DecoderLayer(_module_cfg(cfg)).apply({"params": params["layer"]},
                                                h.astype(jnp.float32), cos, sin, mask)
  return z


def layer_output(params: dict, z: Array) -> Array:
  """Module output from the layer's output z: affine on rms(z), or z itself."""
  if "w" not in params:
    return z.astype(jnp.float32)
  return rms_normalize(z) @ params["w"].astype(jnp.float32) + params["b"].astype(jnp.float32)


def apply_layer_exit(cfg: ModelConfig, params: dict, h: Array,
                     positions: Array | None = None) -> Array:
  """Module output [B, T, D] (float32) of a ``layer`` exit on h [B, T, D]."""
  return layer_output(params, layer_states(cfg, params, h, positions))


def apply_exit(params: dict, h: Array) -> Array:
  """Module output [..., D] (float32) for layer-e residual states h [..., D]."""
  if "layer" in params:
    raise ValueError("a 'layer' exit attends over the positions before: apply it with "
                     "apply_layer_exit(cfg, params, h [B, T, D], positions)")
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
  return int(sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(params)) * itemsize)

"""Maps between Hugging Face Llama tensors and the Transformer param tree.

The canonical checkpoint (see ``recursive_lm.checkpoints``) is a flat dict of
float32 numpy arrays with HF names and layouts ([out, in] linear weights,
rotate-half Q/K rows). Our kernels are [in, out].
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from recursive_lm.config import ConfigError, ModelConfig
from recursive_lm.nn.model import LORA_SHAPES

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def layer_from_hf(w: Mapping[str, np.ndarray], i: int) -> dict:
  p = f"model.layers.{i}."
  get = lambda n: np.asarray(w[p + n], np.float32)
  return {
      "attn": {k: {"kernel": get(f"self_attn.{v}.weight").T} for k, v in _ATTN.items()},
      "mlp": {k: {"kernel": get(f"mlp.{v}.weight").T} for k, v in _MLP.items()},
      "attn_norm": {"scale": get("input_layernorm.weight")},
      "mlp_norm": {"scale": get("post_attention_layernorm.weight")},
  }


def layer_to_hf(layer: Mapping, i: int, lora: Mapping | None = None,
                lora_scale: float = 1.0) -> dict[str, np.ndarray]:
  """One layer's HF tensors; ``lora`` ({target: (a, b)}) is merged if given."""
  p = f"model.layers.{i}."
  lora = lora or {}
  out = {}
  for group, names, prefix in (("attn", _ATTN, "self_attn"), ("mlp", _MLP, "mlp")):
    for k, hf in names.items():
      kern = np.asarray(layer[group][k]["kernel"], np.float32)
      if k in lora:
        a, b = (np.asarray(x, np.float32) for x in lora[k])
        kern = kern + lora_scale * (a @ b)
      out[p + f"{prefix}.{hf}.weight"] = np.ascontiguousarray(kern.T)
  out[p + "input_layernorm.weight"] = np.asarray(layer["attn_norm"]["scale"], np.float32)
  out[p + "post_attention_layernorm.weight"] = np.asarray(
      layer["mlp_norm"]["scale"], np.float32)
  return out


def params_from_hf(cfg: ModelConfig, w: Mapping[str, np.ndarray]) -> dict:
  """Param tree for a plan whose unique layers map 1:1 onto the checkpoint's.

  Prelude layers take checkpoint layers [0, P), the block [P, P+K), the coda
  the rest. For a vanilla plan this is the whole model. Recursive conversion
  with sharing schemes lives in ``recursive_lm.recursive``.
  """
  plan = cfg.plan
  n_ckpt = sum(1 for k in w if k.endswith(".input_layernorm.weight"))
  if n_ckpt != plan.unique_layers:
    raise ConfigError(
        f"checkpoint has {n_ckpt} layers but the plan {plan} has {plan.unique_layers} "
        "unique layers; use recursive_lm.recursive.convert for sharing schemes")
  params = {"embed": {"embedding": np.asarray(w["model.embed_tokens.weight"], np.float32)},
            "final_norm": {"scale": np.asarray(w["model.norm.weight"], np.float32)}}
  for i in range(plan.prelude):
    params[f"prelude_{i}"] = layer_from_hf(w, i)
  params["block"] = {f"layer_{k}": layer_from_hf(w, plan.prelude + k)
                     for k in range(plan.block)}
  for i in range(plan.coda):
    params[f"coda_{i}"] = layer_from_hf(w, plan.prelude + plan.block + i)
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": np.asarray(w["lm_head.weight"], np.float32).T}
  if cfg.lora:
    params["lora"] = {}  # filled by conversion; zero-B LoRA otherwise
    for k in range(plan.block):
      for t, r in cfg.lora.items():
        d_in, d_out = LORA_SHAPES[t](cfg)
        rng = np.random.default_rng(k)
        params["lora"][f"layer_{k}_{t}_a"] = (rng.standard_normal(
            (plan.loops, d_in, r)) / np.sqrt(d_in)).astype(np.float32)
        params["lora"][f"layer_{k}_{t}_b"] = np.zeros((plan.loops, r, d_out), np.float32)
  return params


def hf_from_params(cfg: ModelConfig, params: Mapping) -> dict[str, np.ndarray]:
  """Unrolled vanilla checkpoint: every applied layer becomes its own HF layer,
  with that loop's LoRA merged. ``cfg.to_hf_config()`` is its config."""
  out = {"model.embed_tokens.weight": np.asarray(params["embed"]["embedding"], np.float32),
         "model.norm.weight": np.asarray(params["final_norm"]["scale"], np.float32)}
  lora_p = params.get("lora", {})
  for i, (group, idx, loop) in enumerate(cfg.plan.unrolled()):
    if group == "block":
      layer = params["block"][f"layer_{idx}"]
      lora = {t: (np.asarray(lora_p[f"layer_{idx}_{t}_a"][loop]),
                  np.asarray(lora_p[f"layer_{idx}_{t}_b"][loop]))
              for t in cfg.lora}
    else:
      layer, lora = params[f"{group}_{idx}"], None
    out.update(layer_to_hf(layer, i, lora, cfg.lora_scale))
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(
        np.asarray(params["lm_head"]["kernel"], np.float32).T)
  return out

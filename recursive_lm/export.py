"""Saving models: our own format (any depth plan, LoRA kept) and unrolled HF Llama.

* ``save_model`` / ``load_model``: ``params.safetensors`` (the param tree
  flattened with ``/`` keys, e.g. ``block/layer_0/attn/q/kernel``, dtypes kept)
  plus ``recursive_lm_config.json`` (``ModelConfig.to_dict()``), and the
  tokenizer files when a tokenizer is given.
* ``export_unrolled_hf``: a standard Hugging Face ``LlamaForCausalLM`` folder.
  Every applied layer becomes its own HF layer with that loop's LoRA merged
  (``recursive_lm.nn.weights.hf_from_params``), so the folder loads with
  ``recursive_lm.checkpoints.load_checkpoint`` and with transformers, and
  computes the same function (the sharing is lost).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np

from recursive_lm.checkpoints.hf_folder import (
    CheckpointError, read_safetensors, validate_weights)
from recursive_lm.config import ModelConfig
from recursive_lm.nn import weights as W
from recursive_lm.tokenizer import Tokenizer

CONFIG_FILE = "recursive_lm_config.json"
PARAMS_FILE = "params.safetensors"
FORMAT = "recursive_lm"
FORMAT_VERSION = "1"
_MAX_LISTED = 8


class LoadedModel(NamedTuple):
  """What ``load_model`` returns (unpacks as ``cfg, params, tokenizer``)."""
  config: ModelConfig
  params: dict
  tokenizer: Tokenizer | None


def flatten_params(params: Mapping, prefix: str = "") -> dict[str, Any]:
  """Nested dict -> ``{"a/b/c": leaf}``."""
  out: dict[str, Any] = {}
  for k, v in params.items():
    key = f"{prefix}{k}"
    if "/" in str(k):
      raise CheckpointError(f"param name {key!r} contains '/', which the flat "
                            "format uses as a separator")
    if isinstance(v, Mapping):
      out.update(flatten_params(v, key + "/"))
    else:
      out[key] = v
  return out


def unflatten_params(flat: Mapping[str, Any]) -> dict:
  """``{"a/b/c": leaf}`` -> nested dict (inverse of ``flatten_params``)."""
  out: dict = {}
  for key, v in flat.items():
    node = out
    *path, last = key.split("/")
    for p in path:
      node = node.setdefault(p, {})
    node[last] = v
  return out


def expected_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Flat name -> shape of the param tree ``Transformer(cfg)`` expects
  (abstract evaluation, nothing is computed)."""
  from recursive_lm.nn.model import init_params
  tree = jax.eval_shape(lambda: init_params(cfg, seq_len=1))
  return {k: tuple(v.shape) for k, v in flatten_params(tree).items()}


def _short(names: list[str]) -> str:
  more = len(names) - _MAX_LISTED
  return "[" + ", ".join(names[:_MAX_LISTED]) + (f", ... (+{more} more)" if more > 0
                                                 else "") + "]"


def check_params(cfg: ModelConfig, params: Mapping, source: str = "params") -> None:
  """Raises ``CheckpointError`` unless ``params`` has exactly the names and
  shapes ``cfg`` needs (missing, unexpected and wrong-shaped tensors listed)."""
  exp = expected_param_shapes(cfg)
  got = {k: tuple(np.shape(v)) for k, v in flatten_params(params).items()}
  problems = [f"{k}: shape {got[k]} but the config expects {exp[k]}"
              for k in exp if k in got and got[k] != exp[k]]
  missing = [k for k in exp if k not in got]
  extra = sorted(k for k in got if k not in exp)
  if missing:
    problems.append(f"missing {len(missing)} tensors {_short(missing)}")
  if extra:
    problems.append(f"{len(extra)} unexpected tensors {_short(extra)}")
  if problems:
    p = cfg.plan
    raise CheckpointError(
        f"{source} do not match the config (plan prelude={p.prelude} block="
        f"{p.block} loops={p.loops} coda={p.coda}, d_model={cfg.d_model}, "
        f"lora={cfg.lora or 'none'}):\n  " + "\n  ".join(problems[:_MAX_LISTED])
        + (f"\n  ... (+{len(problems) - _MAX_LISTED} more problems)"
           if len(problems) > _MAX_LISTED else ""))


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def _write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                       metadata: Mapping[str, str]) -> None:
  from safetensors.numpy import save_file
  tmp = path + ".tmp"
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
            metadata=dict(metadata))
  os.replace(tmp, path)


def save_model(folder: str | os.PathLike, cfg: ModelConfig, params: Mapping,
               tokenizer: Tokenizer | None = None) -> str:
  """Saves ``cfg`` + ``params`` (+ tokenizer) into ``folder``; see ``load_model``.

  Raises:
    CheckpointError: when ``params`` do not fit ``cfg`` (nothing is written).
  Returns:
    The folder path.
  """
  folder = os.fspath(folder)
  check_params(cfg, params)
  os.makedirs(folder, exist_ok=True)
  flat = {k: np.asarray(v) for k, v in flatten_params(params).items()}
  _write_safetensors(os.path.join(folder, PARAMS_FILE), flat,
                     {"format": FORMAT, "format_version": FORMAT_VERSION})
  _write_json(os.path.join(folder, CONFIG_FILE), cfg.to_dict())
  if tokenizer is not None:
    tokenizer.save(folder)
  return folder


def load_model(folder: str | os.PathLike) -> LoadedModel:
  """Loads a folder written by ``save_model``.

  Params are cast to ``cfg.param_dtype``.

  Raises:
    CheckpointError: missing folder/files, corrupt JSON or safetensors, a
      config that does not parse, or params that do not fit the config.
  """
  folder = os.path.expanduser(os.fspath(folder))
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder} is not a folder")
  cfg_path = os.path.join(folder, CONFIG_FILE)
  params_path = os.path.join(folder, PARAMS_FILE)
  for path in (cfg_path, params_path):
    if not os.path.exists(path):
      hint = (" (this looks like a Hugging Face folder: use "
              "recursive_lm.checkpoints.load_checkpoint)"
              if os.path.exists(os.path.join(folder, "config.json")) else "")
      raise CheckpointError(
          f"{path} not found: a saved recursive_lm model needs {CONFIG_FILE} and "
          f"{PARAMS_FILE}; the folder has {_short(sorted(os.listdir(folder)))}"
          f"{hint}")
  try:
    with open(cfg_path, encoding="utf-8") as f:
      d = json.load(f)
    cfg = ModelConfig.from_dict(d)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-save the "
                          "model") from e
  except (TypeError, KeyError, AttributeError, ValueError) as e:
    raise CheckpointError(f"{cfg_path} does not describe a ModelConfig "
                          f"({type(e).__name__}: {e})") from e
  flat = read_safetensors(params_path)
  params = unflatten_params(flat)
  check_params(cfg, params, source=params_path)
  dt = np.dtype(cfg.param_dtype)
  params = jax.tree_util.tree_map(lambda x: x if x.dtype == dt else x.astype(dt), params)
  tokenizer = None
  tok_json = os.path.join(folder, "tokenizer.json")
  if os.path.exists(tok_json):
    tokenizer = Tokenizer.from_file(
        tok_json, os.path.join(folder, "tokenizer_config.json"),
        defaults=dict(bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id))
  return LoadedModel(cfg, params, tokenizer)


EXPORT_DTYPES = ("float32", "bfloat16")
DEFAULT_SHARD_BYTES = 5 * 2**30


def _shards(weights: Mapping[str, np.ndarray], max_bytes: int) -> list[list[str]]:
  """Tensor names split in file order into groups of at most ``max_bytes``
  (a tensor larger than that gets a shard of its own)."""
  groups: list[list[str]] = [[]]
  size = 0
  for name, arr in weights.items():
    if groups[-1] and size + arr.nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += arr.nbytes
  return groups


def export_unrolled_hf(folder: str | os.PathLike, cfg: ModelConfig,
                       params: Mapping, tokenizer: Tokenizer | None = None, *,
                       dtype: str = "float32",
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
  """Writes a standard HF Llama folder for the unrolled form of the model.

  ``config.json`` is ``cfg.to_hf_config()`` (``num_hidden_layers`` = effective
  depth, ``torch_dtype`` = ``dtype``), the weights are ``hf_from_params``
  tensors (LoRA merged per loop, computed in float32, then stored as ``dtype``:
  "float32" or "bfloat16") with ``metadata={"format": "pt"}``: one
  ``model.safetensors``, or above ``max_shard_bytes`` shards
  ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``
  (transformers' layout). ``tokenizer.json`` / ``tokenizer_config.json`` are
  written when ``tokenizer`` is given.

  Raises:
    CheckpointError: when ``params`` do not fit ``cfg`` or ``dtype`` is not
      supported (nothing is written).
  Returns:
    The folder path.
  """
  folder = os.fspath(folder)
  if dtype not in EXPORT_DTYPES:
    raise CheckpointError(f"export dtype {dtype!r} is not supported; use one of "
                          f"{EXPORT_DTYPES}")
  if max_shard_bytes < 1:
    raise CheckpointError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
  check_params(cfg, params)
  hf_cfg = cfg.to_hf_config()
  hf_cfg["torch_dtype"] = dtype
  weights = W.hf_from_params(cfg, params)
  validate_weights(ModelConfig.from_hf_config(hf_cfg), weights,
                   source="export_unrolled_hf")
  if dtype == "bfloat16":
    import ml_dtypes
    weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}
  os.makedirs(folder, exist_ok=True)
  for old in os.listdir(folder):  # a previous export's files would shadow these
    if old.endswith(".safetensors") or old == "model.safetensors.index.json":
      os.remove(os.path.join(folder, old))
  groups = _shards(weights, max_shard_bytes)
  if len(groups) == 1:
    _write_safetensors(os.path.join(folder, "model.safetensors"), weights,
                       {"format": "pt"})
  else:
    weight_map = {}
    for i, names in enumerate(groups):
      file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
      _write_safetensors(os.path.join(folder, file), {k: weights[k] for k in names},
                         {"format": "pt"})
      weight_map.update({k: file for k in names})
    _write_json(os.path.join(folder, "model.safetensors.index.json"), {
        "metadata": {"total_size": int(sum(v.nbytes for v in weights.values()))},
        "weight_map": weight_map})
  _write_json(os.path.join(folder, "config.json"), hf_cfg)
  gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
         if k in hf_cfg}
  if gen:
    _write_json(os.path.join(folder, "generation_config.json"), gen)
  if tokenizer is not None:
    tokenizer.save(folder)
  return folder

"""Canonical checkpoint format and the Hugging Face folder importer.

The canonical in-memory checkpoint is a flat dict of float numpy arrays with
Hugging Face Llama names and layouts ([out, in] linear weights, Q/K rows in HF
"rotate-half" order): float32 from GGUF (dequantized), the stored dtype from
safetensors (bf16 stays bf16 on the host; ``weights_to_device`` casts it on
the device). Every importer returns a ``LoadedCheckpoint`` whose weights pass
``validate_weights``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from recursive_lm.config import ConfigError, ModelConfig
from recursive_lm.tokenizer import Tokenizer

_MAX_LISTED = 8


class CheckpointError(ConfigError):
  """A checkpoint file or folder is missing, corrupt or does not fit its config."""


@dataclasses.dataclass
class LoadedCheckpoint:
  """An imported checkpoint: vanilla config, canonical weights, tokenizer."""
  config: ModelConfig
  weights: dict[str, np.ndarray]
  tokenizer: Tokenizer | None
  source: str

  @property
  def n_params(self) -> int:
    return int(sum(w.size for w in self.weights.values()))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Canonical tensor name -> shape for the unrolled (vanilla) form of ``config``."""
  d, f, v, dh = config.d_model, config.d_ff, config.vocab_size, config.head_dim
  q, kv = config.n_heads * dh, config.n_kv_heads * dh
  out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
  for i in range(config.plan.effective_depth):
    p = f"model.layers.{i}."
    out.update({
        p + "input_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (q, d),
        p + "self_attn.k_proj.weight": (kv, d),
        p + "self_attn.v_proj.weight": (kv, d),
        p + "self_attn.o_proj.weight": (d, q),
        p + "post_attention_layernorm.weight": (d,),
        p + "mlp.gate_proj.weight": (f, d),
        p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f),
    })
  out["model.norm.weight"] = (d,)
  if not config.tie_embeddings:
    out["lm_head.weight"] = (v, d)
  return out


def _short_list(names: list[str]) -> str:
  shown = ", ".join(names[:_MAX_LISTED])
  more = len(names) - _MAX_LISTED
  return f"[{shown}{f', ... (+{more} more)' if more > 0 else ''}]"


def validate_weights(config: ModelConfig, weights: Mapping[str, np.ndarray],
                     source: str = "checkpoint") -> None:
  """Checks that ``weights`` has exactly the tensors ``config`` needs.

  Raises:
    CheckpointError: naming each tensor with a wrong shape (found vs expected)
      and listing missing and unexpected names (truncated when long).
  """
  exp = expected_shapes(config)
  problems = []
  for name, shape in exp.items():
    if name in weights:
      found = tuple(np.shape(weights[name]))
      if found != shape:
        problems.append(f"tensor {name!r} has shape {found} but the config "
                        f"expects {shape}")
  missing = [n for n in exp if n not in weights]
  unexpected = sorted(n for n in weights if n not in exp)
  if missing:
    hint = (" (the config says tie_embeddings=False, so lm_head.weight is needed)"
            if "lm_head.weight" in missing else "")
    problems.append(f"missing {len(missing)} tensors: {_short_list(missing)}{hint}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected tensors: "
                    f"{_short_list(unexpected)}")
  if problems:
    shown = problems[:_MAX_LISTED] + (
        [f"... (+{len(problems) - _MAX_LISTED} more shape mismatches)"]
        if len(problems) > _MAX_LISTED else [])
    raise CheckpointError(
        f"{source}: weights do not match the config ({config.plan.effective_depth} "
        f"layers, d_model={config.d_model}, vocab={config.vocab_size}):\n  "
        + "\n  ".join(shown))


# --- safetensors -------------------------------------------------------------
_FLOAT_KINDS = ("F64", "F32", "F16", "BF16")


def read_safetensors(path: str, dtype=None) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file, through the safetensors library.

  Args:
    path: the file.
    dtype: None keeps each tensor's stored dtype (BF16 comes back as an
      ``ml_dtypes.bfloat16`` numpy array, half the bytes of float32); a numpy
      dtype casts every tensor on the host (``np.float32``: the old behaviour).

  Raises:
    CheckpointError: when the file is not valid safetensors or holds
      non-float tensors (FP8 and integer tensors are not model weights here).
  """
  from safetensors import safe_open
  try:
    with safe_open(path, framework="numpy") as f:
      names = list(f.keys())
      kinds = {k: f.get_slice(k).get_dtype() for k in names}
      bad = [f"{k} ({kinds[k]})" for k in names if kinds[k] not in _FLOAT_KINDS]
      if bad:
        raise CheckpointError(f"{path}: non-float tensors {_short_list(bad)}; expected "
                              "F32/F16/BF16 weights")
      out = {}
      for k in names:
        a = f.get_tensor(k)
        out[k] = a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
  except CheckpointError:
    raise
  except Exception as e:  # SafetensorError, OSError, JSON/shape errors.
    raise CheckpointError(
        f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
        "re-download or re-export it") from e
  return out


def weights_to_device(weights: dict[str, Any], dtype="float32", sharding=None
                      ) -> dict[str, Any]:
  """Moves host weights to the device one tensor at a time, then casts there.

  A bf16 checkpoint crosses to the device in bf16 and becomes ``dtype`` on
  the device (``jax.device_put(x, sharding).astype(dtype)``); each host array
  is dropped from ``weights`` once it is on the device, so the host never
  holds a float32 copy. ``sharding``: one ``jax.sharding.Sharding`` for all,
  a ``{name: Sharding}`` dict, or None (default device).

  Returns:
    ``{name: jax.Array}`` in ``weights``' order (``weights`` ends up empty).
  """
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for name in list(weights):
    host = weights.pop(name)
    sh = sharding.get(name) if isinstance(sharding, Mapping) else sharding
    x = jax.device_put(host, sh)
    del host
    out[name] = x if dtype is None or x.dtype == np.dtype(dtype) else x.astype(dtype)
  return out


def _weight_files(folder: str) -> list[str]:
  """The safetensors files of ``folder`` (sharded via the index, or single)."""
  index = os.path.join(folder, "model.safetensors.index.json")
  single = os.path.join(folder, "model.safetensors")
  if os.path.exists(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"{index} is not a valid safetensors index (expected JSON with a "
          f"'weight_map' object): {e}") from e
    files = sorted(set(weight_map.values()))
    missing = [s for s in files if not os.path.exists(os.path.join(folder, s))]
    if missing:
      raise CheckpointError(
          f"{index} lists shards that are not in {folder}: {_short_list(missing)}")
    return [os.path.join(folder, s) for s in files]
  if os.path.exists(single):
    return [single]
  found = sorted(os.listdir(folder))
  shards = [x for x in found if x.endswith(".safetensors")]
  if shards:
    return [os.path.join(folder, s) for s in shards]
  bins = [x for x in found if x.endswith((".bin", ".pt", ".pth"))]
  hint = (f"; found PyTorch pickles {_short_list(bins)}, which are not read "
          "(convert them to safetensors)" if bins else "")
  raise CheckpointError(
      f"{folder}: no weights found: expected model.safetensors or "
      f"model.safetensors.index.json (+ shards); the folder has "
      f"{_short_list(found)}{hint}")


def load_hf_folder(path: str | os.PathLike, *, validate: bool = True,
                   dtype=None) -> LoadedCheckpoint:
  """Imports a Hugging Face Llama-family folder.

  Reads ``config.json``, ``model.safetensors`` (or the shards named by
  ``model.safetensors.index.json``) and, when present, ``tokenizer.json`` +
  ``tokenizer_config.json`` (chat template included). Weights keep their
  stored dtype unless ``dtype`` is given (see ``read_safetensors``).

  Raises:
    CheckpointError: for missing/corrupt files or weights that do not fit.
    ConfigError: for unsupported model types.
  """
  folder = os.path.expanduser(os.fspath(path))
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder} is not a folder")
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(
        f"{cfg_path} not found: a Hugging Face model folder needs config.json "
        f"(the folder has {_short_list(sorted(os.listdir(folder)))})")
  try:
    with open(cfg_path, encoding="utf-8") as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-download "
                          "or fix the file") from e
  if not isinstance(hf, dict):
    raise CheckpointError(f"{cfg_path} must hold a JSON object")
  config = ModelConfig.from_hf_config(hf, source=cfg_path)

  weights: dict[str, np.ndarray] = {}
  for file in _weight_files(folder):
    weights.update(read_safetensors(file, dtype))
  if "model.embed_tokens.weight" not in weights and "embed_tokens.weight" in weights:
    weights = {("model." + k if not k.startswith("lm_head.") else k): v
               for k, v in weights.items()}   # Saved from LlamaModel.
  weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
  if config.tie_embeddings:
    weights.pop("lm_head.weight", None)
  if validate:
    validate_weights(config, weights, source=folder)

  tokenizer = None
  tok_json = os.path.join(folder, "tokenizer.json")
  if os.path.exists(tok_json):
    tokenizer = Tokenizer.from_file(
        tok_json, os.path.join(folder, "tokenizer_config.json"),
        defaults=dict(bos_id=config.bos_id, eos_id=config.eos_id,
                      pad_id=config.pad_id))
  return LoadedCheckpoint(config=config, weights=weights, tokenizer=tokenizer,
                          source=folder)

"""Canonical checkpoint format and the Hugging Face folder importer.

The canonical in-memory checkpoint is a flat dict of float32 numpy arrays
with Hugging Face Llama names and layouts ([out, in] linear weights, Q/K rows
in HF "rotate-half" order). Every importer returns a ``LoadedCheckpoint``
whose weights pass ``validate_weights``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import numpy as np

from recursive_lm.config import ConfigError, ModelConfig
from recursive_lm.tokenizer import Tokenizer

_MAX_LISTED = 8
# safetensors dtypes that numpy lacks natively; read through ml_dtypes.
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2"}
_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
              "U8": np.uint8, "BOOL": np.bool_}


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
def _read_raw(path: str, names: list[str]) -> dict[str, np.ndarray]:
  """Reads tensors straight from the file bytes (for dtypes numpy lacks)."""
  import ml_dtypes
  with open(path, "rb") as f:
    n = int(np.frombuffer(f.read(8), dtype="<u8")[0])
    header = json.loads(f.read(n))
  base = 8 + n
  raw = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name in names:
    info = header[name]
    kind = info["dtype"]
    dt = (np.dtype(getattr(ml_dtypes, _ML_DTYPES[kind])) if kind in _ML_DTYPES
          else np.dtype(_NP_DTYPES[kind]))
    b, e = info["data_offsets"]
    buf = raw[base + b: base + e]
    out[name] = buf.view(dt.newbyteorder("<")).reshape(info["shape"])
  return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file, upcast to float32.

  BF16/FP8 tensors are read through ``ml_dtypes`` from the raw bytes, so this
  works whether or not the installed ``safetensors`` supports them in numpy.

  Raises:
    CheckpointError: when the file is not valid safetensors.
  """
  from safetensors import safe_open
  try:
    with safe_open(path, framework="numpy") as f:
      names = list(f.keys())
      kinds = {k: f.get_slice(k).get_dtype() for k in names}
      out = {k: f.get_tensor(k) for k in names if kinds[k] not in _ML_DTYPES}
    special = [k for k in names if kinds[k] in _ML_DTYPES]
    if special:
      out.update(_read_raw(path, special))
  except CheckpointError:
    raise
  except Exception as e:  # SafetensorError, OSError, JSON/shape errors.
    raise CheckpointError(
        f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
        "re-download or re-export it") from e
  bad = [f"{k} ({kinds[k]})" for k in names
         if kinds[k] not in _ML_DTYPES and kinds[k] not in ("F64", "F32", "F16")]
  if bad:
    raise CheckpointError(f"{path}: non-float tensors {_short_list(bad)}; expected "
                          "F32/F16/BF16 weights")
  for k, a in out.items():
    out[k] = np.asarray(a, dtype=np.float32)
  return {k: out[k] for k in names}


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


def load_hf_folder(path: str | os.PathLike, *, validate: bool = True
                   ) -> LoadedCheckpoint:
  """Imports a Hugging Face Llama-family folder.

  Reads ``config.json``, ``model.safetensors`` (or the shards named by
  ``model.safetensors.index.json``) and, when present, ``tokenizer.json`` +
  ``tokenizer_config.json`` (chat template included).

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
    weights.update(read_safetensors(file))
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

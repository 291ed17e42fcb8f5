"""Rewrites an exported HF folder's ``model.safetensors``: bf16 and/or shards.

``export.export_unrolled_hf`` writes one float32 ``model.safetensors``; the
``export`` command then calls ``rewrite(folder, dtype, max_shard_bytes)`` to
cast to bfloat16 (round to nearest even, via ``ml_dtypes``) and to split into
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` (the
Hugging Face sharded layout) above a size. Tensors are written in file order.
"""
from __future__ import annotations

import json
import os

import numpy as np

_DTYPES = {"float32": ("F32", np.float32), "bfloat16": ("BF16", None)}


def _np_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(np.float32)


def write_safetensors(path: str, tensors: dict, dtype_tag: str, metadata: dict) -> None:
  """Writes ``tensors`` (already in the target dtype) as one safetensors file."""
  header, offset = {}, 0
  for name, a in tensors.items():
    header[name] = {"dtype": dtype_tag, "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(np.uint64(len(blob)).tobytes())
    f.write(blob)
    for a in tensors.values():
      f.write(np.ascontiguousarray(a).tobytes())
  os.replace(tmp, path)


def rewrite(folder: str, dtype: str = "float32", max_shard_bytes: int | None = None) -> list[str]:
  """Casts/shards ``folder/model.safetensors`` in place; returns the files written."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if dtype not in _DTYPES:
    raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
  src = os.path.join(folder, "model.safetensors")
  tag, dt = _DTYPES[dtype][0], _np_dtype(dtype)
  with safe_open(src, framework="numpy") as f:
    names = list(f.keys())
    tensors = {k: np.asarray(f.get_tensor(k), np.float32).astype(dt) for k in names}
  shards: list[dict] = [{}]
  size = 0
  for k, a in tensors.items():
    if max_shard_bytes and shards[-1] and size + a.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = a
    size += a.nbytes
  meta = {"format": "pt"}
  if len(shards) == 1:
    write_safetensors(src, shards[0], tag, meta)
    files = ["model.safetensors"]
  else:
    n = len(shards)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for fname, shard in zip(files, shards):
      write_safetensors(os.path.join(folder, fname), shard, tag, meta)
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
             "weight_map": {k: fname for fname, shard in zip(files, shards) for k in shard}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
    os.remove(src)
  cfg_path = os.path.join(folder, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["torch_dtype"] = dtype
  with open(cfg_path, "w") as f:
    json.dump(cfg, f, indent=2)
  return files

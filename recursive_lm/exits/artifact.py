"""``ExitSet``: trained exit modules for one base model, saved beside it.

Layout of an artifact folder::

    exits.json          format, base model identity + fingerprint, exits
                        (layer -> kind, rank), shortlist size, training record,
                        sha256 and byte size of exits.safetensors
    exits.safetensors   exit.<e>.<w|b|a|bb>, meta.<e>.<...>, shortlist (int32);
                        a ``layer`` exit's decoder layer as exit.<e>.layer/<path>

Tensors are stored as float16 (computed in float32). ``load_exits`` checks the
json, the file size and hash, and the base model's identity: a missing,
truncated or mismatched artifact raises ``ExitArtifactError`` with one line
that names the problem and the fix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from recursive_lm.config import ModelConfig

FORMAT = "recursive_lm.exits/1"
JSON_NAME, TENSORS_NAME = "exits.json", "exits.safetensors"
REGENERATE = "python experiments/train_exits.py"


class ExitArtifactError(ValueError):
  """A missing, truncated or mismatched exit artifact."""


def model_identity(cfg: ModelConfig, params) -> dict:
  """Name, shape and a layout-independent fingerprint of a base model: sha256
  over its norm scales and the first 256 embedding rows (unchanged by kernel
  layout conversion and projection fusing)."""
  h = hashlib.sha256()
  h.update(np.asarray(params["final_norm"]["scale"], np.float32).tobytes())
  h.update(np.asarray(params["embed"]["embedding"][:256], np.float32).tobytes())
  for group in ("prelude", "block", "coda"):
    tree = params.get(group, {}) if group == "block" else None
    if group == "block":
      for k in range(cfg.plan.block):
        lp = tree[f"layer_{k}"]
        for n in ("attn_norm", "mlp_norm"):
          h.update(np.asarray(lp[n]["scale"], np.float32).tobytes())
    else:
      for i in range(getattr(cfg.plan, group)):
        lp = params[f"{group}_{i}"]
        for n in ("attn_norm", "mlp_norm"):
          h.update(np.asarray(lp[n]["scale"], np.float32).tobytes())
  return {"name": cfg.name, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
          "depth": cfg.plan.effective_depth, "fingerprint": h.hexdigest()}


@dataclasses.dataclass
class ExitSet:
  """Exit modules keyed by exit layer e (1-based unrolled layer count)."""
  exits: dict[int, dict]                 # e -> module params (see modules.py)
  shortlist: np.ndarray                  # int32 [N] token ids, most frequent first
  model: dict                            # model_identity() of the base model
  meta: dict[int, dict] = dataclasses.field(default_factory=dict)  # e -> meta classifier
  info: dict[str, Any] = dataclasses.field(default_factory=dict)   # training record

  def check_model(self, cfg: ModelConfig, params) -> None:
    got = model_identity(cfg, params)
    if got != self.model:
      diff = {k: (self.model.get(k), got[k]) for k in got if self.model.get(k) != got[k]}
      raise ExitArtifactError(
          f"exit artifact was trained for another base model (artifact vs given: {diff}); "
          f"use the artifact made for this model or retrain with `{REGENERATE}`")

  def shortlist_weights(self, params, n: int | None = None) -> np.ndarray:
    """Rows of the tied embedding (= LM head) for the first n shortlist ids."""
    ids = self.shortlist[:n] if n else self.shortlist
    return np.asarray(params["embed"]["embedding"])[np.asarray(ids)]


def _leaves(tree: dict, prefix: str = ""):
  """(name, array) of a nested dict; nested names joined with '/'."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", v


def _nest(tree: dict, name: str, value) -> None:
  *path, last = name.split("/")
  for k in path:
    tree = tree.setdefault(k, {})
  tree[last] = value


def _flatten(es: ExitSet) -> dict[str, np.ndarray]:
  out = {"shortlist": np.asarray(es.shortlist, np.int32)}
  for group, d in (("exit", es.exits), ("meta", es.meta)):
    for e, p in d.items():
      for k, v in _leaves(p):
        out[f"{group}.{int(e)}.{k}"] = np.asarray(v, np.float32).astype(np.float16)
  return out


def save_exits(es: ExitSet, path: str) -> str:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from recursive_lm.exits.modules import exit_kind  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  tpath = os.path.join(path, TENSORS_NAME)
  save_file(_flatten(es), tpath)
  with open(tpath, "rb") as f:
    blob = f.read()
  meta = {
      "format": FORMAT, "model": es.model,
      "exits": {str(e): {"kind": exit_kind(p),
                         "rank": int(p["a"].shape[1]) if "a" in p else 0}
                for e, p in sorted(es.exits.items())},
      "meta_classifiers": sorted(int(e) for e in es.meta),
      "shortlist_size": int(len(es.shortlist)),
      "tensors": {"file": TENSORS_NAME, "bytes": len(blob),
                  "sha256": hashlib.sha256(blob).hexdigest(), "dtype": "float16"},
      "info": es.info,
  }
  with open(os.path.join(path, JSON_NAME), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  return path


def load_exits(path: str, cfg: ModelConfig | None = None, params=None) -> ExitSet:
  """Loads an artifact folder; with (cfg, params) also checks the base model."""
  jpath, tpath = os.path.join(path, JSON_NAME), os.path.join(path, TENSORS_NAME)
  for p in (jpath, tpath):
    if not os.path.exists(p):
      raise ExitArtifactError(f"exit artifact file {p} is missing; point to a folder made "
                              f"by `{REGENERATE}` (it holds {JSON_NAME} + {TENSORS_NAME})")
  try:
    with open(jpath, encoding="utf-8") as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ExitArtifactError(f"{jpath} is not valid JSON ({err}); the artifact is "
                            f"truncated or corrupt: regenerate it with `{REGENERATE}`") from err
  if meta.get("format") != FORMAT:
    raise ExitArtifactError(f"{jpath} has format {meta.get('format')!r}, expected {FORMAT!r}; "
                            f"regenerate it with `{REGENERATE}`")
  with open(tpath, "rb") as f:
    blob = f.read()
  want = meta["tensors"]
  if len(blob) != want["bytes"] or hashlib.sha256(blob).hexdigest() != want["sha256"]:
    raise ExitArtifactError(
        f"{tpath} has {len(blob)} bytes / a different sha256 than {JSON_NAME} records "
        f"({want['bytes']} bytes): the file is truncated or was replaced; restore it or "
        f"regenerate with `{REGENERATE}`")
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
  flat = load(blob)
  exits: dict[int, dict] = {}
  metas: dict[int, dict] = {}
  for name, v in flat.items():
    if name == "shortlist":
      continue
    group, e, k = name.split(".", 2)
    _nest((exits if group == "exit" else metas).setdefault(int(e), {}), k, v.astype(np.float32))
  es = ExitSet(exits, flat["shortlist"].astype(np.int32), meta["model"], metas,
               meta.get("info", {}))
  if cfg is not None and params is not None:
    es.check_model(cfg, params)
  return es


def default_artifact_path(name: str = "smollm2_exits") -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "artifacts", name)

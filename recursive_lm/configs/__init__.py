"""Experiment configs shipped with the package (ml_collections ``get_config``).

Each module has ``get_config(arg)`` where ``arg`` is a big_vision-style
variant string (``"loops=2,init=average,rank=64,steps=200"``):

* ``uptrain_smollm2``: SmolLM2-135M -> (relaxed) recursive model, KD uptraining.
* ``exit_smollm2``: early-exit post-training of a recursive student.
* ``mor_uptrain_smollm2``: mixture-of-recursions uptraining.

``recursive-lm uptrain --config NAME:VARIANT`` takes these names (or a path to
any config file); ``experiments/configs/NAME.py`` re-export them.
"""
from __future__ import annotations

import importlib
import os

NAMES = ("uptrain_smollm2", "exit_smollm2", "mor_uptrain_smollm2")
HERE = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
  """The file of a packaged config (``name`` with or without ``.py``)."""
  base = name[:-3] if name.endswith(".py") else name
  if base not in NAMES:
    raise ValueError(f"unknown packaged config {name!r}; choose from {NAMES} or pass a "
                     "path to a config file")
  return os.path.join(HERE, base + ".py")


def get_config(name: str, arg: str | None = None):
  """``get_config("uptrain_smollm2", "loops=2,steps=3")`` -> ConfigDict."""
  path(name)
  base = name[:-3] if name.endswith(".py") else name
  return importlib.import_module(f"recursive_lm.configs.{base}").get_config(arg)

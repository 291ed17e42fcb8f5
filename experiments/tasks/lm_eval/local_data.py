"""Offline loader for the lm_eval task YAMLs here: reads ``experiments/tasks/*.jsonl``.

lm_eval calls ``load_jsonl(**metadata, **dataset_kwargs)`` (``custom_dataset``
in the YAML); ``data_files`` is relative to this folder. Nothing is downloaded:
the rows go straight into ``datasets.Dataset.from_list``.
"""
import json
import os

import datasets


def load_jsonl(data_files: str, split: str = "test", **_unused):
  path = data_files if os.path.isabs(data_files) else os.path.join(
      os.path.dirname(os.path.abspath(__file__)), data_files)
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if not rows:
    raise ValueError(f"{path}: no examples")
  return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})

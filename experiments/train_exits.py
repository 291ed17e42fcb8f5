r"""Trains exit modules on the frozen embedded SmolLM2 and writes the artifact.

Stages (each cached under ``config.workdir``): data (pydoc train split + the
model's own continuations), features (per-layer states, final states, argmax),
per exit layer and module kind: closed-form affine fit, then KD + CE training;
held-out agreement with the final layer per exit (metrics.jsonl, TensorBoard,
``agreement.json``, ``agreement_vs_layer.png``); meta classifiers for the
shipped exits; the artifact (``config.out``).

    python experiments/train_exits.py                 # shipped artifact
    python experiments/train_exits.py --config experiments/configs/train_exits.py:small
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                           "train_exits.py"))


def prepare_data(c, cfg, params, tok):
  """(train feature dirs, held-out feature dir) after extraction."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from recursive_lm.exits import features as F  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  train = F.corpus_stream(tok, "train", c.corpus_tokens, c.seed)
  held = F.corpus_stream(tok, "validation", c.heldout_tokens, c.seed)
  gen = F.self_generated(cfg, params, train, c.selfgen_prompts, c.selfgen_prompt_len,
                         c.selfgen_new_tokens, c.seed, c.workdir)
  print(f"data: {len(train)} corpus + {gen.size} self-generated train tokens, "
        f"{len(held)} held-out ({time.time() - t0:.0f}s)", flush=True)
  layers = list(c.exit_layers)
  fc = F.extract(cfg, params, F.as_sequences(train, c.seq_len), layers,
                 os.path.join(c.workdir, "feat_corpus"))
  fg = F.extract(cfg, params, gen, layers, os.path.join(c.workdir, "feat_selfgen"))
  fh = F.extract(cfg, params, F.as_sequences(held, c.seq_len), layers,
                 os.path.join(c.workdir, "feat_heldout"))
  print(f"features done ({time.time() - t0:.0f}s)", flush=True)
  return [fc, fg], fh


def main(argv):
  del argv
  c = _CONFIG.value
  t_start = time.time()
  from recursive_lm import api  # pylint: disable=g-import-not-at-top
  model = api.load(c.model or None)
  cfg, params, tok = model.cfg, model.params, model.tokenizer
  os.makedirs(c.workdir, exist_ok=True)
  train_feats, held = prepare_data(c, cfg, params, tok)
  if os.environ.get("EXITS_STOP_AFTER") == "features":
    return
  from recursive_lm.exits import train as T  # pylint: disable=g-import-not-at-top
  result = T.train_all(c, cfg, params, train_feats, held)
  result["wall_seconds"] = time.time() - t_start
  with open(os.path.join(c.workdir, "agreement.json"), "w") as f:
    json.dump(result["agreement"], f, indent=1)
  T.plot_agreement(result["agreement"], os.path.join(c.workdir, "agreement_vs_layer.png"))
  if c.results_merge:
    merged = T.merge_layer_curve(c.results_merge, result["agreement"], c, result["wall_seconds"],
                                 " ".join(["python"] + sys.argv))
    T.plot_agreement(merged, c.results_merge.replace(".json", "_vs_layer.png"))
    print(f"merged the layer curve into {c.results_merge}", flush=True)
  if c.ship:
    path = T.write_artifact(c, cfg, params, result)
    print(f"artifact: {path}", flush=True)
  print(f"total wall time {result['wall_seconds']:.0f}s", flush=True)


if __name__ == "__main__":
  app.run(main)

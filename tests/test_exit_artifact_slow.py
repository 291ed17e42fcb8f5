"""The shipped exit artifact on the embedded SmolLM2: lossless self-speculation,
size budget, and the fallback rules for a mismatched artifact."""
import json
import os
import shutil

import pytest

from recursive_lm.exits.artifact import (ExitArtifactError, JSON_NAME, default_artifact_path,
                                         load_exits)
from recursive_lm.exits.speculative import default_engine_or_none, from_artifact

PROMPTS = ["The difference between a list and a tuple in Python is",
           "Once upon a time,", "To read a file line by line, you can use the open function and"]


def test_shipped_artifact_fits_the_budget():
  path = default_artifact_path()
  size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
  assert size <= 8 * 2**20, size
  es = load_exits(path)
  assert es.exits and len(es.shortlist) > 0 and es.model["name"] == "smollm2-135m"


@pytest.mark.slow
def test_shipped_artifact_self_speculation_equals_plain_greedy(tmp_path):
  from recursive_lm import api  # pylint: disable=g-import-not-at-top
  from recursive_lm.decode.engine import Engine  # pylint: disable=g-import-not-at-top
  m = api.load()
  ids = [m.tokenizer.encode(p) for p in PROMPTS]
  ref = Engine(m.cfg, m.params, kernel_layout="panel", fuse=True).generate(ids, 24)
  eng = from_artifact(m.cfg, m.params)
  out = eng.generate(ids, 24)
  assert out.tokens == ref.tokens
  assert out.accepted > 0
  # A mismatched artifact: a clear error when speculation was asked for, None
  # (plain decoding) only on the default path.
  bad = tmp_path / "bad"
  shutil.copytree(default_artifact_path(), bad)
  meta = json.loads((bad / JSON_NAME).read_text())
  meta["model"]["fingerprint"] = "0" * 64
  (bad / JSON_NAME).write_text(json.dumps(meta))
  with pytest.raises(ExitArtifactError, match="another base model"):
    from_artifact(m.cfg, m.params, str(bad))
  assert default_engine_or_none(m.cfg, m.params, str(bad)) is None
  with pytest.raises(ExitArtifactError, match="missing"):
    from_artifact(m.cfg, m.params, str(tmp_path / "none"))


@pytest.mark.slow
def test_shipped_artifact_free_and_calm_through_api():
  """api.generate(early_exit=...) on the embedded model reads the shipped modules
  and meta classifiers: never exiting equals plain greedy, exiting changes depth."""
  from recursive_lm import api  # pylint: disable=g-import-not-at-top
  m = api.load()
  plain, _ = api.generate(m, PROMPTS[:2], 16)
  for policy in ("free", "calm"):
    never, out = api.generate(m, PROMPTS[:2], 16, early_exit=policy, threshold=1.01)
    assert never == plain and out.exit_fraction == 0.0
    _, out = api.generate(m, PROMPTS[:2], 16, early_exit=policy, threshold=0.0)
    assert out.exit_fraction == 1.0 and out.avg_layers == 6.0

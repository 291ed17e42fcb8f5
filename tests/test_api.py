"""``import recursive_lm``: load / generate / score_text, engine reuse, model specs."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import recursive_lm
from recursive_lm import api, compile_cache, export
from recursive_lm.checkpoints.hf_folder import CheckpointError
from recursive_lm.config import tiny_config
from recursive_lm.nn.model import init_params
from toy_tokenizer import ToyTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny_llama")



pytestmark = pytest.mark.usefixtures("fast_compile")


def tiny_model():
  cfg = tiny_config()
  return api.LoadedModel(cfg, init_params(cfg, seed=1), ToyTokenizer(), "tiny")


def test_package_exposes_the_api():
  for name in ("load", "generate", "score_text"):
    fn = getattr(recursive_lm, name)
    assert fn is getattr(api, name)
    assert "Example" in fn.__doc__
  assert "Quick start" in recursive_lm.__doc__
  with open(os.path.join(ROOT, "pyproject.toml")) as f:
    assert 'version = {attr = "recursive_lm.__version__"}' in f.read()
  assert re.fullmatch(r"\d+\.\d+\.\d+.*", recursive_lm.__version__)
  assert recursive_lm.api is api
  with pytest.raises(AttributeError):
    recursive_lm.no_such_thing  # pylint: disable=pointless-statement


def test_import_is_light():
  code = "import sys, recursive_lm; print('jax' in sys.modules, recursive_lm.__version__)"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
  assert out.stdout.split()[0] == "False", out.stderr


def test_str_prompt_is_one_prompt():
  m = tiny_model()
  text, out = recursive_lm.generate(m, "Hi", max_new_tokens=5)
  assert isinstance(text, str) and len(out.tokens) == 1
  texts, out2 = recursive_lm.generate(m, ["Hi"], max_new_tokens=5)
  assert texts == [text] and out2.tokens == out.tokens
  texts, out3 = recursive_lm.generate(m, ["Hi", "there"], max_new_tokens=5)
  assert len(texts) == 2 and texts[0] == text
  with pytest.raises(ValueError, match="at least one prompt"):
    recursive_lm.generate(m, [], max_new_tokens=5)


def test_engines_are_cached_and_compiled_once():
  m = tiny_model()
  assert m.engine(1) is m.engine(1)
  assert m.engine(None) is m.engine(None)
  eng = m.engine(2)
  recursive_lm.generate(m, ["ab", "cd"], max_new_tokens=4)
  n = eng._generate._cache_size()  # pylint: disable=protected-access
  texts1, _ = recursive_lm.generate(m, ["ab", "cd"], max_new_tokens=4)
  texts2, _ = recursive_lm.generate(m, ["abc", "d"], max_new_tokens=4)  # same bucket
  assert eng._generate._cache_size() == n  # pylint: disable=protected-access
  assert m.engine(2) is eng and len(texts2) == 2
  # Early-exit / speculative engines are cached per option set.
  ee = m.early_exit_engine(1, policy="calm", exits=[2], threshold=0.5)
  assert m.early_exit_engine(1, policy="calm", exits=[2], threshold=0.5) is ee
  assert m.early_exit_engine(1, policy="calm", exits=[2], threshold=0.7) is not ee
  sp = m.speculative_engine(1, draft_layers=2)
  assert m.speculative_engine(1, draft_layers=2) is sp
  text, out = recursive_lm.generate(m, "ab", max_new_tokens=4, engine=sp)
  assert isinstance(text, str) and hasattr(out, "acceptance_rate")
  assert len(m._engines) <= api.MAX_CACHED_ENGINES  # pylint: disable=protected-access
  m.clear_engines()
  assert m.engine(1) is not None


def test_score_text_checks_window():
  m = tiny_model()
  r = recursive_lm.score_text(m, "the cat sat on the mat")
  assert r["n_tokens"] == len("the cat sat on the mat") - 1 and r["ppl"] > 1
  w = recursive_lm.score_text(m, "the cat sat on the mat", window=8)
  assert w["n_tokens"] == r["n_tokens"]
  with pytest.raises(ValueError, match="window must be >= 1"):
    recursive_lm.score_text(m, "the cat", window=-1)
  with pytest.raises(ValueError, match="fewer than 2 tokens"):
    recursive_lm.score_text(m, "a")


def test_run_folder_resolves_to_final(tmp_path):
  cfg = tiny_config()
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "summary.json").write_text("{}")
  with pytest.raises(CheckpointError, match="final"):
    recursive_lm.load(str(run))
  export.save_model(run / "final", cfg, init_params(cfg, seed=2))
  assert api.resolve_model_path(str(run)) == str(run / "final")
  m = recursive_lm.load(str(run), compile_cache=False)
  assert m.source == str(run / "final") and m.cfg.d_model == cfg.d_model


def test_bad_model_specs_are_explained(tmp_path):
  bad = tmp_path / "random.gguf"
  bad.write_bytes(np.random.default_rng(0).bytes(512))
  with pytest.raises(CheckpointError, match="not a GGUF file"):
    api.resolve_model_path(str(bad))
  with pytest.raises(CheckpointError, match="not found"):
    api.resolve_model_path(str(tmp_path / "missing.gguf"))
  with pytest.raises(CheckpointError, match="not a model folder"):
    api.resolve_model_path(str(tmp_path))
  assert api.resolve_model_path("smollm2-135m") == "smollm2-135m"
  assert api.resolve_model_path(TINY) == TINY
  m = recursive_lm.load(TINY, compile_cache=False)
  assert m.cfg.plan.effective_depth == 4


def test_compile_cache_settings(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  assert compile_cache.configured_dir() == str(tmp_path / "recursive_lm" / "jax")
  for off in ("0", "off", "False"):
    monkeypatch.setenv(compile_cache.ENV, off)
    assert compile_cache.configured_dir() is None
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
  assert compile_cache.configured_dir() == str(tmp_path / "c")


def test_compile_cache_hits_in_a_second_process(tmp_path):
  """A fresh process reads the first one's compiled programs (tiny model)."""
  code = f"""
import json, recursive_lm
from recursive_lm import api, compile_cache
from recursive_lm.config import tiny_config
from recursive_lm.nn.model import init_params
print(json.dumps(compile_cache.enable()))
stats = compile_cache.CompileStats.start()
cfg = tiny_config()
eng = api.LoadedModel(cfg, init_params(cfg, seed=1), None, "tiny").engine(None)
eng.generate([[3, 4, 5]], 4)
print(json.dumps(stats.now()))
"""
  env = dict(os.environ, RECURSIVE_LM_COMPILE_CACHE=str(tmp_path / "jax"))
  env.pop("XLA_FLAGS", None)
  runs = []
  for _ in range(2):
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[0]) == str(tmp_path / "jax")
    runs.append(json.loads(lines[1]))
  assert runs[0]["misses"] > 0
  assert runs[1]["hits"] >= 2 and runs[1]["misses"] == 0, runs


@pytest.mark.slow
def test_generate_speculative_with_the_shipped_exit_artifact_equals_plain_greedy():
  import recursive_lm as rlm  # pylint: disable=g-import-not-at-top
  m = rlm.load()
  prompts = ["The capital of Germany is", "A Python list comprehension"]
  plain, _ = rlm.generate(m, prompts, max_new_tokens=24)
  spec, out = rlm.generate(m, prompts, max_new_tokens=24, speculative=True)
  assert spec == plain
  assert type(out).__name__ == "ExitDecodeOutput" and out.drafted >= 0
  with pytest.raises(ValueError, match="greedy only"):
    from recursive_lm.decode.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top
    rlm.generate(m, "Hi", 4, sampling=SamplingConfig(greedy=False), speculative=True)

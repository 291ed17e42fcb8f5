"""api.generate(early_exit=...) / recursive-lm generate --early_exit through exit
modules: a tiny vanilla model with an artifact made for it; one-line errors for
an artifact made for another model."""
import json
import os

import numpy as np
import pytest

from recursive_lm import api, cli
from recursive_lm.config import DepthPlan, tiny_config
from recursive_lm.exits.artifact import ExitArtifactError, ExitSet, model_identity, save_exits
from recursive_lm.exits import modules as M
from recursive_lm.nn.model import init_params
from toy_tokenizer import ToyTokenizer

pytestmark = pytest.mark.usefixtures("fast_compile")



def _exits_for(cfg, params, layers, seed=0):
  rng = np.random.default_rng(seed)
  d = cfg.d_model
  exits = {e: {k: np.asarray(v) for k, v in M.init_exit(
      "affine", d, w=np.eye(d, dtype=np.float32) + 0.5 * rng.standard_normal((d, d)).astype(
          np.float32)).items()} for e in layers}
  metas = {e: {"w1": rng.standard_normal((d, 8)).astype(np.float32),
               "b1": np.zeros(8, np.float32),
               "w2": rng.standard_normal((8, 1)).astype(np.float32),
               "b2": np.zeros(1, np.float32)} for e in layers}
  return ExitSet(exits, np.arange(16, dtype=np.int32), model_identity(cfg, params), metas)


def test_api_generate_early_exit_through_modules(tmp_path):
  cfg = tiny_config(plan=DepthPlan.vanilla(4), eos_id=None)
  m = api.LoadedModel(cfg, init_params(cfg, seed=1), ToyTokenizer(), "tiny")
  art = str(tmp_path / "art")
  save_exits(_exits_for(cfg, m.params, (1, 2)), art)
  prompts = ["Hello there", "Once"]
  plain, ref = api.generate(m, prompts, 8)
  for policy in ("free", "calm"):
    never, out = api.generate(m, prompts, 8, early_exit=policy, threshold=2.0,
                              exit_artifact=art)
    assert never == plain and out.tokens == ref.tokens and out.exit_fraction == 0.0
    _, out = api.generate(m, prompts, 8, early_exit=policy, threshold=0.0, exit_artifact=art)
    assert out.exit_fraction == 1.0
  # the same cached engine serves every threshold (no rebuild, no retrace)
  eng = m.exit_module_engine(2, "free", artifact=art)
  traces = eng.trace_count
  api.generate(m, prompts, 8, early_exit="free", threshold=0.3, exit_artifact=art)
  assert m.exit_module_engine(2, "free", artifact=art) is eng and eng.trace_count == traces
  # the shipped artifact was made for SmolLM2-135M: a clear error, no fallback
  with pytest.raises(ExitArtifactError, match="another base model"):
    api.generate(m, prompts, 4, early_exit="free")
  with pytest.raises(ValueError, match="exclude each other"):
    api.generate(m, prompts, 4, early_exit="free", speculative=True)
  with pytest.raises(ValueError, match="early_exit must be"):
    api.generate(m, prompts, 4, early_exit="fast")


def test_cli_generate_early_exit_through_modules(tmp_path, capsys):
  from recursive_lm import export  # pylint: disable=g-import-not-at-top
  from recursive_lm.checkpoints.gguf_file import _open_reader, tokenizer_from_gguf  # pylint: disable=g-import-not-at-top
  from recursive_lm.checkpoints.presets import resolve_preset  # pylint: disable=g-import-not-at-top
  os.environ["RECURSIVE_LM_COMPILE_CACHE"] = "0"
  tok = tokenizer_from_gguf(_open_reader(resolve_preset("smollm2-135m")))
  cfg = tiny_config(vocab_size=49152, plan=DepthPlan.vanilla(3), max_seq_len=128,
                    bos_id=1, eos_id=2, pad_id=2)
  params = init_params(cfg, seed=0)
  folder = str(tmp_path / "model")
  export.save_model(folder, cfg, params, tok)
  art = str(tmp_path / "art")
  loaded = api.load(folder, compile_cache=False)
  save_exits(_exits_for(loaded.cfg, loaded.params, (1, 2)), art)
  main = lambda *a: cli.main(["recursive-lm", *a])
  for policy, extra in (("free", ["--exits", "2"]), ("calm", [])):
    assert main("generate", "--model", folder, "--prompt", "Hello", "--prompt", "Once",
                "--max_new_tokens", "4", "--json", "--early_exit", policy, "--threshold",
                "0.5", "--exit_artifact", art, *extra) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert len(res["texts"]) == 2 and "exit fraction" in cap.err
  # a vanilla model without --exit_artifact reads the shipped one: made for
  # SmolLM2-135M, so one error line naming the fix
  assert main("generate", "--model", folder, "--prompt", "Hi", "--early_exit", "free",
              "--max_new_tokens", "3") == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert "artifact" in last and "train_exits" in last
  assert main("generate", "--model", folder, "--prompt", "Hi", "--early_exit", "free",
              "--exits", "3", "--exit_artifact", art, "--max_new_tokens", "3") == 2
  assert "no module at layer" in capsys.readouterr().err

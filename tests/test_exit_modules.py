"""Exit modules (recursive_lm.exits): lossless self-speculation through random
modules on random tiny models, FREE-style trust mode, artifact save/load
errors, the closed-form affine fit."""
import os

import jax
import numpy as np
import pytest

from recursive_lm.config import DepthPlan, tiny_config
from recursive_lm.decode.engine import Engine
from recursive_lm.exits import modules as M
from recursive_lm.exits.artifact import (ExitArtifactError, ExitSet, load_exits,
                                         model_identity, save_exits)
from recursive_lm.exits.speculative import ExitSpeculativeEngine
from recursive_lm.exits.train import auc, fit_affine
from recursive_lm.nn.model import init_params

PROMPTS = [[5, 17, 33, 2, 9], [11], [20, 21, 22, 40, 41, 42, 43, 44]]


def _model(seed, layers=4):
  cfg = tiny_config(plan=DepthPlan.vanilla(layers), eos_id=None)
  return cfg, init_params(cfg, seed=seed)


def _random_exits(cfg, params, layers, seed, n_short=24):
  rng = np.random.default_rng(seed)
  d = cfg.d_model
  exits, metas = {}, {}
  for i, e in enumerate(layers):
    kind = M.KINDS[i % 2]
    p = M.init_exit(kind, d, rank=8, seed=seed + i,
                    w=np.eye(d, dtype=np.float32) + 0.3 * rng.standard_normal((d, d)).astype(np.float32),
                    b=0.1 * rng.standard_normal(d).astype(np.float32))
    if kind == "lowrank":
      p["bb"] = 0.2 * rng.standard_normal(p["bb"].shape).astype(np.float32)
    exits[e] = {k: np.asarray(v) for k, v in p.items()}
    metas[e] = {"w1": rng.standard_normal((d, 8)).astype(np.float32),
                "b1": np.zeros(8, np.float32),
                "w2": rng.standard_normal((8, 1)).astype(np.float32),
                "b2": np.zeros(1, np.float32)}
  shortlist = rng.permutation(cfg.vocab_size)[:n_short].astype(np.int32)
  return ExitSet(exits, shortlist, model_identity(cfg, params), metas)


@pytest.mark.parametrize("seed,layout", [(3, None), (7, "panel")])
def test_verify_mode_equals_plain_greedy(seed, layout):
  """Property over random models and random modules: self-speculative greedy
  (ragged prompts, ragged acceptance, adaptive draft length) == Engine greedy."""
  cfg, params = _model(seed)
  es = _random_exits(cfg, params, (1, 2, 3), seed)
  ref = Engine(cfg, params).generate(PROMPTS, max_new_tokens=14)
  for e, k, conf, m in [(1, 1, "maxprob", 1), (2, 3, "maxprob", 0), (3, 5, "meta", 1),
                        (1, 4, "meta", 0)]:
    eng = ExitSpeculativeEngine(cfg, params, es, exit_layer=e, max_draft=k, confidence=conf,
                                min_draft=m, kernel_layout=layout, fuse=layout is not None)
    for tau in (0.0, 0.3, 2.0):
      out = eng.generate(PROMPTS, max_new_tokens=14, tau=tau)
      assert out.tokens == ref.tokens, (e, k, conf, m, tau)
      assert 0 <= out.accepted <= out.drafted
      if tau > 1:  # never confident: min_draft drafts per round
        assert out.drafted == m * out.row_rounds
      if tau == 0.0:  # always confident: max_draft drafts per round
        assert out.drafted == k * out.row_rounds


def test_trust_mode_never_confident_is_full_depth():
  cfg, params = _model(11)
  es = _random_exits(cfg, params, (2,), 11)
  ref = Engine(cfg, params).generate(PROMPTS, max_new_tokens=12)
  eng = ExitSpeculativeEngine(cfg, params, es, 2, max_draft=4, mode="trust")
  out = eng.generate(PROMPTS, max_new_tokens=12, tau=2.0)
  assert out.tokens == ref.tokens and out.accepted == 0
  out = eng.generate(PROMPTS, max_new_tokens=12, tau=0.0)   # always exit (3 of 4)
  assert [len(t) for t in out.tokens] == [12, 12, 12]
  assert out.accepted <= 3 * out.row_rounds
  assert 0 <= out.agree <= out.accepted


def test_artifact_roundtrip_and_errors(tmp_path):
  cfg, params = _model(2)
  es = _random_exits(cfg, params, (1, 3), 2)
  path = save_exits(es, str(tmp_path / "ex"))
  back = load_exits(path, cfg, params)
  assert sorted(back.exits) == [1, 3] and sorted(back.meta) == [1, 3]
  np.testing.assert_array_equal(back.shortlist, es.shortlist)
  np.testing.assert_allclose(back.exits[3]["w"], es.exits[3]["w"], atol=2e-3, rtol=1e-3)
  # missing folder / file
  with pytest.raises(ExitArtifactError, match="missing"):
    load_exits(str(tmp_path / "nowhere"))
  # truncated tensors
  tpath = os.path.join(path, "exits.safetensors")
  blob = open(tpath, "rb").read()
  open(tpath, "wb").write(blob[:-100])
  with pytest.raises(ExitArtifactError, match="truncated"):
    load_exits(path)
  open(tpath, "wb").write(blob)
  # another base model
  cfg2, params2 = _model(9)
  with pytest.raises(ExitArtifactError, match="another base model"):
    load_exits(path, cfg2, params2)
  with pytest.raises(ExitArtifactError, match="another base model"):
    ExitSpeculativeEngine(cfg2, params2, back, 1)
  # corrupt json
  open(os.path.join(path, "exits.json"), "w").write("{")
  with pytest.raises(ExitArtifactError, match="not valid JSON"):
    load_exits(path)


def test_bad_arguments():
  cfg, params = _model(1)
  es = _random_exits(cfg, params, (2,), 1)
  with pytest.raises(ValueError, match="no module at layer 3"):
    ExitSpeculativeEngine(cfg, params, es, 3)
  with pytest.raises(ValueError, match="mode"):
    ExitSpeculativeEngine(cfg, params, es, 2, mode="x")


def test_fit_affine_recovers_a_map():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4000, 16)).astype(np.float32)
  w = rng.standard_normal((16, 16)).astype(np.float32)
  b = rng.standard_normal(16).astype(np.float32)
  w2, b2 = fit_affine(x, x @ w + b, ridge=0.0)
  np.testing.assert_allclose(w2, w, atol=1e-3)
  np.testing.assert_allclose(b2, b, atol=1e-3)
  assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75

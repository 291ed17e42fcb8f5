"""FREE and CALM exiting through trained exit modules (recursive_lm.exits.early_exit):
engine output == the reference composition on random tiny models with random
modules and meta classifiers; artifact errors."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import DepthPlan, tiny_config
from recursive_lm.decode.early_exit import EarlyExitEngine
from recursive_lm.decode.engine import Engine
from recursive_lm.exits import modules as M
from recursive_lm.exits.artifact import (ExitArtifactError, ExitSet, JSON_NAME, TENSORS_NAME,
                                         model_identity, save_exits)
from recursive_lm.exits.early_exit import ExitMeta, from_artifact, module_exit_engine
from recursive_lm.exits.train import meta_logit
from recursive_lm.nn import unrolled as U
from recursive_lm.nn.model import init_params

PROMPTS = [[5, 17, 33, 2, 9], [11], [20, 21, 22, 40, 41, 42, 43, 44]]
NEW = 12


def _model(seed, layers=4):
  cfg = tiny_config(plan=DepthPlan.vanilla(layers), eos_id=None)
  return cfg, init_params(cfg, seed=seed)


def _random_exits(cfg, params, layers, seed, identity=False):
  rng = np.random.default_rng(seed)
  d = cfg.d_model
  exits, metas = {}, {}
  for i, e in enumerate(layers):
    kind = "affine" if identity else M.KINDS[i % 2]
    w = np.eye(d, dtype=np.float32)
    b = np.zeros(d, np.float32)
    if not identity:
      w = w + 0.5 * rng.standard_normal((d, d)).astype(np.float32)
      b = 0.1 * rng.standard_normal(d).astype(np.float32)
    p = M.init_exit(kind, d, rank=8, seed=seed + i, w=w, b=b)
    if kind == "lowrank":
      p["bb"] = 0.3 * rng.standard_normal(p["bb"].shape).astype(np.float32)
    exits[e] = {k: np.asarray(v) for k, v in p.items()}
    metas[e] = {"w1": rng.standard_normal((d, 8)).astype(np.float32),
                "b1": np.zeros(8, np.float32),
                "w2": rng.standard_normal((8, 1)).astype(np.float32),
                "b2": np.zeros(1, np.float32)}
  shortlist = rng.permutation(cfg.vocab_size)[:24].astype(np.int32)
  return ExitSet(exits, shortlist, model_identity(cfg, params), metas)


_SEQ = 32


@functools.lru_cache(maxsize=None)
def _states_fn(cfg, e):
  @jax.jit
  def f(params, tokens, last):
    states, h = U.hidden_states(cfg, params, tokens, [e, cfg.plan.effective_depth])
    return states[0, 0, last], h[0, last]
  return f


def _states(cfg, params, seq, e):
  """(layer-e state, final state) of the last token of ``seq`` (one compile:
  right-padded to a fixed length; causal, so the padding changes nothing)."""
  tok = np.zeros((1, _SEQ), np.int32)
  tok[0, :len(seq)] = seq
  return _states_fn(cfg, e)(params, jnp.asarray(tok), len(seq) - 1)


def _reference_free(cfg, params, es, e, thr, prompts, new):
  """Token by token on the whole sequence (no cache): exit at layer e iff
  sigmoid(meta(h_e)) >= thr, emitting argmax head(module(h_e)), else the full
  model's argmax. FREE's deep KV is exact, so this is what the engine must emit."""
  out = []
  for p in prompts:
    seq, row = list(p), []
    for t in range(new):
      he, hl = _states(cfg, params, seq, e)
      conf = float(jax.nn.sigmoid(meta_logit({k: jnp.asarray(v) for k, v in es.meta[e].items()},
                                             he[None])[0]))
      if t > 0 and conf >= thr:  # the first token comes from the full-depth prefill
        lg = U.head(cfg, params, M.apply_exit(es.exits[e], he[None]))[0]
      else:
        lg = U.head(cfg, params, hl[None])[0]
      nxt = int(jnp.argmax(lg))
      row.append(nxt)
      seq.append(nxt)
    out.append(row)
  return out


@pytest.mark.parametrize("seed,layout", [(3, None), (7, "panel")])
def test_free_through_modules_equals_reference(seed, layout):
  cfg, params = _model(seed)
  es = _random_exits(cfg, params, (1, 2), seed)
  kw = dict(kernel_layout=layout, fuse=layout is not None)
  for e, k_max in ((2, 3), (1, 8)):
    eng = module_exit_engine(cfg, params, es, "free", [e], threshold=0.5, k_max=k_max, **kw)
    for thr in (0.0, 0.5, 0.7, 2.0):
      out = eng.generate(PROMPTS, NEW, threshold=thr)
      ref = _reference_free(cfg, params, es, e, thr, PROMPTS, NEW)
      assert out.tokens == ref, (e, k_max, thr)
      frac = out.exit_fraction
      assert (frac == 1.0) if thr == 0.0 else (frac == 0.0) if thr == 2.0 else True
  plain = Engine(cfg, params).generate(PROMPTS, NEW)
  assert eng.generate(PROMPTS, NEW, threshold=2.0).tokens == plain.tokens


def test_free_modules_change_the_exited_tokens():
  """The module is really applied: identical rule, raw exit vs module exit differ."""
  cfg, params = _model(5)
  es = _random_exits(cfg, params, (2,), 5)
  mod = module_exit_engine(cfg, params, es, "free", [2], threshold=0.0)
  raw = EarlyExitEngine(cfg, params, exits=[2], policy="free", threshold=0.0,
                        confidence=ExitMeta([es.meta[2], None]))
  assert mod.generate(PROMPTS, NEW).tokens != raw.generate(PROMPTS, NEW).tokens


def _reference_first_exit(cfg, params, es, e, prompts, new):
  out = []
  for p in prompts:
    seq, row = list(p), []
    for t in range(new):
      he, hl = _states(cfg, params, seq, e)
      src = M.apply_exit(es.exits[e], he[None]) if t else hl[None]
      nxt = int(jnp.argmax(U.head(cfg, params, src)[0]))
      row.append(nxt)
      seq.append(nxt)
    out.append(row)
  return out


@pytest.mark.parametrize("layout", [None, "panel"])
def test_calm_through_modules(layout):
  cfg, params = _model(11)
  es = _random_exits(cfg, params, (1, 2, 3), 11)
  kw = dict(kernel_layout=layout, fuse=layout is not None)
  eng = module_exit_engine(cfg, params, es, "calm", None, threshold=0.5, **kw)
  assert eng.exits == (1, 2, 3, 4)
  # always exit at the first exit: layers [0, 1) are exact, so the tokens are
  # the first module's composition; never exit: plain greedy.
  always = eng.generate(PROMPTS, NEW, threshold=0.0)
  assert always.tokens == _reference_first_exit(cfg, params, es, 1, PROMPTS, NEW)
  assert all(i == 0 for row in always.exit_index for i in row[1:])
  assert eng.generate(PROMPTS, NEW, threshold=2.0).tokens == \
      Engine(cfg, params).generate(PROMPTS, NEW).tokens
  # mixed exits: identity modules == the raw-state engine with the same rule
  ident = _random_exits(cfg, params, (1, 2, 3), 11, identity=True)
  a = module_exit_engine(cfg, params, ident, "calm", None, threshold=0.6, **kw)
  b = EarlyExitEngine(cfg, params, exits=[1, 2, 3], policy="calm", threshold=0.6,
                      confidence=ExitMeta([ident.meta[e] for e in (1, 2, 3)] + [None]), **kw)
  oa, ob = a.generate(PROMPTS, NEW), b.generate(PROMPTS, NEW)
  assert oa.tokens == ob.tokens and oa.exit_index == ob.exit_index
  assert 0 < oa.exit_fraction < 1
  # random modules with mixed exits: every emitted token at exit 0 is the module's
  mixed = eng.generate(PROMPTS, NEW, threshold=0.6)
  assert 0 < mixed.exit_fraction < 1


def test_softmax_confidence_reads_the_module_head():
  cfg, params = _model(3)
  es = _random_exits(cfg, params, (2,), 3)
  eng = module_exit_engine(cfg, params, es, "free", [2], threshold=0.0,
                           confidence="softmax_max")
  ref = _reference_free(cfg, params, es, 2, -1.0, PROMPTS, NEW)  # always exit
  assert eng.generate(PROMPTS, NEW).tokens == ref


def test_artifact_errors(tmp_path):
  cfg, params = _model(3)
  es = _random_exits(cfg, params, (1, 2), 3)
  path = str(tmp_path / "art")
  save_exits(es, path)
  assert from_artifact(cfg, params, "calm", path).exits == (1, 2, 4)
  with pytest.raises(ExitArtifactError, match="missing"):
    from_artifact(cfg, params, "free", str(tmp_path / "none"))
  with pytest.raises(ExitArtifactError, match="no module at layer"):
    from_artifact(cfg, params, "free", path, layers=[3])
  other_cfg, other = _model(4)
  with pytest.raises(ExitArtifactError, match="another base model"):
    from_artifact(other_cfg, other, "free", path)
  no_meta = ExitSet(es.exits, es.shortlist, es.model, {1: es.meta[1]})
  save_exits(no_meta, str(tmp_path / "nometa"))
  with pytest.raises(ExitArtifactError, match="no meta classifier"):
    from_artifact(cfg, params, "free", str(tmp_path / "nometa"), layers=[2])
  tpath = os.path.join(path, TENSORS_NAME)
  blob = open(tpath, "rb").read()
  with open(tpath, "wb") as f:
    f.write(blob[:len(blob) // 2])
  with pytest.raises(ExitArtifactError, match="truncated"):
    from_artifact(cfg, params, "free", path)
  with open(os.path.join(path, JSON_NAME), "w") as f:
    f.write(json.dumps({"format": "x"})[:5])
  with pytest.raises(ExitArtifactError, match="not valid JSON"):
    from_artifact(cfg, params, "free", path)
  with pytest.raises(ValueError, match="one shallow exit"):
    module_exit_engine(cfg, params, es, "free", [1, 2])

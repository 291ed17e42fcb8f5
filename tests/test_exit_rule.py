"""The one exit-rule module: measures, forced decisions, head-free measures."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import DepthPlan, tiny_config
from recursive_lm.decode import exit_rule as X
from recursive_lm.decode.early_exit import EarlyExitEngine
from recursive_lm.decode.engine import Engine
from recursive_lm.early_exit import confidence as C
from recursive_lm.nn import unrolled as U
from recursive_lm.nn.model import init_params

INF = float("inf")
PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [11], [20, 21, 22]]
N_NEW = 8


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config(plan=DepthPlan(prelude=1, block=2, loops=3, coda=1), eos_id=None)
  return cfg, init_params(cfg, seed=1)


def test_measure_names_and_costs():
  assert X.measure_from_name("softmax_max").needs_logits
  assert X.measure_from_name("top2_gap").name == "softmax_diff"
  assert not X.measure_from_name("state").needs_logits
  assert X.measure_from_name("kl").pairwise
  with pytest.raises(ValueError, match="meta_params"):
    X.measure_from_name("meta")
  with pytest.raises(ValueError, match="unknown confidence"):
    X.measure_from_name("softmax")
  rule = X.make_rule("softmax_diff", "decaying", 4.0)
  assert isinstance(rule.schedule, X.Decaying) and rule.needs_logits


def test_decide_forced_table():
  conf = jnp.asarray([0.1, 0.9, 0.1])
  forced = jnp.asarray([0, 2, 1])
  np.testing.assert_array_equal(X.ExitRule.decide(0, conf, 0.5), [False, True, False])
  np.testing.assert_array_equal(X.ExitRule.decide(1, conf, INF, forced), [True, False, True])
  t = X.forced_exit_table(0, 4, 50, 0.5, 1, 3)
  assert t.shape == (4, 50) and set(np.unique(t)) == {1, 2}
  assert (X.forced_exit_table(0, 2, 5, 0.0, 1, 3) == 2).all()
  assert (X.forced_exit_table(0, 2, 5, 1.0, 1, 3) == 1).all()


def test_shortlist_over_the_whole_vocabulary_equals_softmax_max(model):
  cfg, params = model
  h = jax.random.normal(jax.random.key(0), (3, cfg.d_model))
  full = C.softmax_max(U.head(cfg, params, h))
  m = X.Shortlist(np.arange(cfg.vocab_size)).bind(cfg, params)
  np.testing.assert_allclose(m(h, None, None, None), full, rtol=1e-5, atol=1e-6)
  part = X.Shortlist([1, 5, 7]).bind(cfg, params)(h, None, None, None)
  assert part.shape == (3,) and bool(jnp.all(part >= 1 / 3 - 1e-6))


def test_forced_exits_equal_threshold_exits(model):
  cfg, params = model
  for policy in ("free", "calm"):
    eng = EarlyExitEngine(cfg, params, policy=policy, threshold=INF)
    always = eng.generate(PROMPTS, N_NEW, threshold=0.0)
    forced = eng.generate(PROMPTS, N_NEW, forced=np.zeros((3, N_NEW), np.int32))
    assert forced.tokens == always.tokens and forced.exit_index == always.exit_index
    never = eng.generate(PROMPTS, N_NEW, forced=np.full((3, N_NEW), 9, np.int32))
    assert all(i == len(eng.exits) - 1 for r in never.exit_index for i in r)
  with pytest.raises(ValueError, match="forced must be"):
    eng.generate(PROMPTS, N_NEW, forced=np.zeros((3, 2), np.int32))


def test_head_free_measures_never_exit_equal_full_decoding(model):
  cfg, params = model
  ref = Engine(cfg, params).generate(PROMPTS, N_NEW).tokens
  meta = C.MetaClassifier().init(jax.random.key(0), jnp.zeros((1, cfg.d_model)))
  for kw in (dict(policy="free", confidence="meta", meta_params=meta),
             dict(policy="calm", confidence="state"),
             dict(policy="calm", confidence=X.Shortlist(np.arange(10)))):
    out = EarlyExitEngine(cfg, params, threshold=INF, **kw).generate(PROMPTS, N_NEW)
    assert out.tokens == ref, kw

"""FREE's adaptive threshold: refits count only updates with pairs; the default
posterior rule is FREE's equal-prior one (issue 11)."""
import jax
import numpy as np
import pytest

from recursive_lm.config import DepthPlan, tiny_config
from recursive_lm.decode.early_exit import EarlyExitEngine
from recursive_lm.early_exit import thresholds as th
from recursive_lm.nn.model import init_params

A0, B0, A1, B1, PI1 = 2.0, 3.0, 3.0, 1.2, 0.65
PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [11], [20, 21, 22]]


def _batch(rng, n=200):
  y = rng.random(n) < PI1
  return np.where(y, rng.beta(A1, B1, n), rng.beta(A0, B0, n)).astype(np.float32), y


def test_update_without_pairs_is_not_a_refit():
  cfg = th.BetaMixtureConfig(min_count=20)
  upd = jax.jit(th.beta_mixture_update, static_argnames="config")
  rng = np.random.default_rng(0)
  state = th.beta_mixture_init(cfg)
  for _ in range(2):
    state, _ = upd(state, *_batch(rng), None, config=cfg)
  assert int(state.num_refits) == 2
  lam = float(state.threshold)
  # A deep pass whose rows had empty buffers: no valid pair.
  for _ in range(5):
    state, got = upd(state, np.full(8, 0.5, np.float32), np.ones(8, bool),
                     np.zeros(8, bool), config=cfg)
  assert int(state.num_refits) == 2 and float(got) == lam
  state, _ = upd(state, *_batch(rng), None, config=cfg)
  assert int(state.num_refits) == 3


def test_max_refits_budget_is_spent_only_on_pairs():
  cfg = th.BetaMixtureConfig(min_count=20, max_refits=3, method="bisect")
  upd = jax.jit(th.beta_mixture_update, static_argnames="config")
  rng = np.random.default_rng(1)
  state, _ = upd(th.beta_mixture_init(cfg), *_batch(rng, 60), None, config=cfg)
  for _ in range(10):  # empty updates must not use up the budget (freeze λ)
    state, _ = upd(state, np.zeros(4, np.float32), np.zeros(4, bool), np.zeros(4, bool),
                   config=cfg)
  assert int(state.num_refits) == 1
  lams = [float(state.threshold)]
  for _ in range(3):
    state, lam = upd(state, *_batch(rng, 60), None, config=cfg)
    lams.append(float(lam))
  assert int(state.num_refits) == 3
  assert lams[0] != lams[1] != lams[2] and lams[3] == lams[2]  # frozen after 3


def test_default_posterior_is_free_equal_prior():
  assert th.BetaMixtureConfig().prior == "equal"
  a, b, w = np.array([A0, A1]), np.array([B0, B1]), np.array([1 - PI1, PI1])
  x = np.linspace(0.05, 0.95, 7).astype(np.float32)
  got = th.consistent_posterior(x, a, b, w, th.BetaMixtureConfig().prior)
  want = th.consistent_posterior(x, a, b, np.array([0.5, 0.5]), "mixture")
  np.testing.assert_allclose(got, want, rtol=1e-5)  # π ignored == equal weights
  lam_default = th.beta_mixture_threshold(a, b, w, th.BetaMixtureConfig())
  lam_equal = th.beta_mixture_threshold(a, b, w, th.BetaMixtureConfig(prior="equal"))
  lam_mix = th.beta_mixture_threshold(a, b, w, th.BetaMixtureConfig(prior="mixture"))
  assert float(lam_default) == float(lam_equal) != float(lam_mix)


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config(plan=DepthPlan(prelude=1, block=2, loops=3, coda=1), eos_id=None)
  return cfg, init_params(cfg, seed=1)


def test_engine_adaptive_defaults_and_refit_count(model):
  cfg, params = model
  eng = EarlyExitEngine(cfg, params, policy="free", threshold="adaptive")
  assert eng.adaptive.prior == "equal"
  bmc = th.BetaMixtureConfig(init_threshold=0.0, min_count=2.0, grid_lo=0.3)
  eng = EarlyExitEngine(cfg, params, policy="free", threshold="adaptive", k_max=3,
                        adaptive_config=bmc)
  eng.generate(PROMPTS, 10)
  refits, count = int(eng.bmm_state.num_refits), float(eng.bmm_state.count.sum())
  assert refits >= 1
  # λ >= 0.3 now: every step goes deep with an empty buffer, adding no pairs.
  later = eng.generate(PROMPTS, 10)
  assert later.deep_passes == 9 and all(i == 1 for r in later.exit_index for i in r)
  assert float(eng.bmm_state.count.sum()) == count
  assert int(eng.bmm_state.num_refits) == refits

"""Confidence measures and exit thresholds (recursive_lm.early_exit)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.early_exit import confidence as cf
from recursive_lm.early_exit import thresholds as th

SHAPES = [(3, 17), (2, 5, 17)]  # [B, V] and [B, T, V]


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _logits(shape, seed=0, scale=3.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


# ----------------------------------------------------------------------------
# Measures vs numpy references.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_measures_match_numpy(shape):
  z = _logits(shape)
  p = _np_softmax(z)
  srt = np.sort(p, -1)
  ref = {
      "softmax_max": srt[..., -1],
      "softmax_diff": srt[..., -1] - srt[..., -2],
      "entropy": 1 + (p * np.log(p)).sum(-1) / np.log(shape[-1]),
  }
  for name, want in ref.items():
    got = jax.jit(cf.get_confidence_fn(name))(jnp.asarray(z))
    assert got.shape == shape[:-1]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_approx_top2_gap_close_to_exact(shape):
  z = jnp.asarray(_logits(shape, seed=1))
  exact = jax.jit(cf.softmax_margin)(z)
  approx = jax.jit(cf.softmax_margin_approx)(z)
  assert approx.shape == shape[:-1]
  np.testing.assert_allclose(np.asarray(approx), np.asarray(exact), atol=1e-5)
  # bf16 input: computed in float32, still a valid gap in [0, 1].
  bf = cf.softmax_margin(z.astype(jnp.bfloat16))
  assert bf.dtype == jnp.float32 and bool(jnp.all((bf >= 0) & (bf <= 1)))


@pytest.mark.parametrize("shape", SHAPES)
def test_consecutive_exit_measures(shape):
  a = _logits(shape, seed=2)
  b = _logits(shape, seed=3)
  # KL(p_b || p_a) per example.
  pa, pb = _np_softmax(a), _np_softmax(b)
  kl_ref = (pb * (np.log(pb) - np.log(pa))).sum(-1)
  np.testing.assert_allclose(np.asarray(jax.jit(cf.kl_divergence)(a, b)),
                             kl_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(cf.kl_confidence(a, b)),
                             np.exp(-kl_ref), rtol=1e-4)
  # Identical exits: KL 0 / confidence 1; cosine 1 (distance 0).
  np.testing.assert_allclose(np.asarray(cf.kl_divergence(a, a)), 0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(cf.kl_confidence(a, a)), 1, atol=1e-6)
  np.testing.assert_allclose(1 - np.asarray(cf.hidden_cosine(a, a)), 0,
                             atol=1e-6)
  # Per-example cosine (CALM's batch-global norm would fail this at B > 1).
  cos_ref = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  got = jax.jit(cf.get_confidence_fn("state"))(a, b)
  assert got.shape == shape[:-1]
  np.testing.assert_allclose(np.asarray(got), cos_ref, atol=1e-5)
  # Scaling one row changes nothing for the others or for itself.
  b2 = b.copy()
  b2[0] *= 7.0
  np.testing.assert_allclose(np.asarray(cf.hidden_cosine(a, b2)), cos_ref,
                             atol=1e-5)


def test_registry_and_exit_rule():
  with pytest.raises(ValueError, match="unknown confidence measure"):
    cf.get_confidence_fn("softmax")  # CALM's invalid gin default
  assert cf.get_confidence_fn("top2_gap") is cf.softmax_margin
  conf = jnp.array([0.2, 0.5, 0.9])
  np.testing.assert_array_equal(th.should_exit(conf, 0.5), [False, True, True])
  assert not bool(jnp.any(th.should_exit(jnp.ones(3), jnp.inf)))
  z = jnp.array([[5.0, 1.0, 0.0], [0.0, 5.0, 1.0]])
  y = jnp.array([[4.0, 0.0, 9.0], [0.0, 3.0, 1.0]])
  np.testing.assert_array_equal(cf.consistency_labels(z, y), [False, True])


def test_meta_classifier_learns_separable_problem():
  rng = np.random.default_rng(0)
  d, n = 8, 1500
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=d)
  labels = x @ w + 1.0 > 0  # imbalanced (~75% positive), linearly separable
  valid = np.ones(n, bool)
  valid[-100:] = False      # padding rows: garbage labels must not matter
  labels_noisy = labels.copy()
  labels_noisy[-100:] = ~labels_noisy[-100:]
  for hidden in (0, 16):
    params, losses = cf.train_meta_classifier(
        x.reshape(10, n // 10, d), labels_noisy.reshape(10, -1),
        valid_mask=valid.reshape(10, -1), hidden_dim=hidden, num_steps=300)
    assert float(losses[-1]) < 0.5 * float(losses[0])
    conf = jax.jit(cf.meta_confidence)(params, x.reshape(10, -1, d))
    assert conf.shape == (10, n // 10)
    pred = np.asarray(conf).reshape(-1) >= 0.5
    acc = (pred == labels).mean()
    assert acc > 0.95, (hidden, acc)
  # Minibatch path and the name registry.
  params, _ = cf.train_meta_classifier(x, labels, batch_size=128, num_steps=200)
  conf = cf.get_confidence_fn("meta")(params, x)
  assert ((np.asarray(conf) >= 0.5) == labels).mean() > 0.9


# ----------------------------------------------------------------------------
# Fixed and decaying thresholds.
# ----------------------------------------------------------------------------
def test_decaying_threshold_matches_formula_per_row():
  lam, n_max, tau = 0.8, 64, 4.0
  t = jnp.array([0, 10, 63, 10], jnp.int32)  # each row's own decode step
  got = np.asarray(jax.jit(th.decaying_threshold, static_argnums=(2,))(
      lam, t, n_max))
  want = np.clip(0.9 * lam + 0.1 * lam * np.exp(-tau * np.array([0, 10, 63, 10])
                                                / n_max), 0, 1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == pytest.approx(lam) and got[1] == got[3]
  assert got[0] > got[1] > got[2] > 0.9 * lam
  # Per-row λ, clipping, +inf passthrough, fixed threshold.
  np.testing.assert_allclose(
      th.decaying_threshold(jnp.array([0.5, 1.5]), jnp.array([0, 0]), 8),
      [0.5, 1.0])
  assert bool(jnp.isposinf(th.decaying_threshold(jnp.inf, jnp.array([3]), 8)[0]))
  np.testing.assert_allclose(th.fixed_threshold(0.7, t), np.full(4, 0.7))


# ----------------------------------------------------------------------------
# FREE's Beta-mixture adaptive threshold.
# ----------------------------------------------------------------------------
A0, B0, A1, B1, PI1 = 2.0, 3.0, 3.0, 1.2, 0.65  # analytic root ≈ 0.403


def _analytic(prior="mixture", zeta=0.4):
  """Reference threshold from the true parameters, float64 numpy."""
  def logpdf(x, a, b):
    return ((a - 1) * np.log(x) + (b - 1) * np.log1p(-x) - math.lgamma(a)
            - math.lgamma(b) + math.lgamma(a + b))
  def post(x):
    d = logpdf(x, A1, B1) - logpdf(x, A0, B0)
    if prior == "mixture":
      d += math.log(PI1 / (1 - PI1))
    return 1 / (1 + np.exp(-d))
  grid = np.linspace(0.3, 0.9, 10)
  grid_lam = grid[np.argmax(post(grid) > zeta)]
  lo, hi = 0.3, 0.9
  assert post(lo) < zeta < post(hi)
  for _ in range(60):  # posterior is monotone for these parameters
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if post(mid) > zeta else (mid, hi)
  return grid_lam, hi, post(grid)


def _stream(cfg, n_batches=40, b=8, k=64, seed=0):
  rng = np.random.default_rng(seed)
  upd = jax.jit(th.beta_mixture_update, static_argnames="config")
  state = th.beta_mixture_init(cfg)
  lams = []
  for _ in range(n_batches):
    y = rng.random((b, k)) < PI1
    c = np.where(y, rng.beta(A1, B1, (b, k)), rng.beta(A0, B0, (b, k)))
    valid = rng.random((b, k)) < 0.8
    c = np.where(valid, c, 0.999).astype(np.float32)  # garbage in padding
    y = np.where(valid, y, True)
    state, lam = upd(state, c, y, valid, config=cfg)
    lams.append(float(lam))
  return state, lams


@pytest.mark.parametrize("prior", ["mixture", "equal"])
def test_beta_mixture_recovers_analytic_threshold(prior):
  grid_lam, root, _ = _analytic(prior)
  state, lams = _stream(th.BetaMixtureConfig(method="bisect", prior=prior))
  assert lams[-1] == pytest.approx(root, abs=0.015)
  np.testing.assert_allclose(state.alpha, [A0, A1], rtol=0.15)
  np.testing.assert_allclose(state.beta, [B0, B1], rtol=0.15)
  if prior == "mixture":
    assert float(state.weights[1]) == pytest.approx(PI1, abs=0.02)
  state, lams = _stream(th.BetaMixtureConfig(method="grid", prior=prior))
  assert lams[-1] == pytest.approx(grid_lam, abs=1e-6)
  # Analytic mixture-weighted threshold differs from FREE's equal prior here.
  assert abs(_analytic("mixture")[1] - _analytic("equal")[1]) > 0.02


def test_beta_mixture_rule_matches_free_count_rule_and_exact_params():
  # On true parameters the jitted rule equals the reference, and for a
  # monotone posterior "smallest grid point" == FREE's G[clip(n - m, 0, n-1)].
  grid_lam, root, post = _analytic("equal")
  m = int((post > 0.4).sum())
  assert grid_lam == pytest.approx(np.linspace(0.3, 0.9, 10)[min(10 - m, 9)])
  a, b = jnp.array([A0, A1]), jnp.array([B0, B1])
  w = jnp.array([1 - PI1, PI1])
  for method, want in (("grid", grid_lam), ("bisect", root)):
    cfg = th.BetaMixtureConfig(method=method, prior="equal")
    got = jax.jit(th.beta_mixture_threshold, static_argnames="config")(
        a, b, w, config=cfg)
    assert float(got) == pytest.approx(want, abs=1e-5)


def test_beta_mixture_guards():
  cfg = th.BetaMixtureConfig(min_count=50, max_refits=3, init_threshold=0.9)
  upd = jax.jit(th.beta_mixture_update, static_argnames="config")
  state = th.beta_mixture_init(cfg)
  rng = np.random.default_rng(1)
  # Only consistent samples: class 0 unfitted, λ stays at its initial value.
  cs, ys = [rng.beta(A1, B1, 100)], [np.ones(100, bool)]
  state, lam = upd(state, cs[0], ys[0], None, config=cfg)
  assert float(lam) == pytest.approx(0.9) and int(state.num_refits) == 0
  np.testing.assert_allclose(state.alpha[0], cfg.init_alpha[0])
  # All-padding batch: statistics unchanged.
  state2, _ = upd(state, np.zeros(7), np.zeros(7, bool), np.zeros(7, bool),
                  config=cfg)
  np.testing.assert_allclose(state2.count, state.count)
  np.testing.assert_allclose(state2.mean, state.mean)
  # Both classes present: refits, then λ freezes after max_refits.
  lams = []
  for _ in range(6):
    y = rng.random(200) < PI1
    c = np.where(y, rng.beta(A1, B1, 200), rng.beta(A0, B0, 200))
    state, lam = upd(state, c, y, None, config=cfg)
    lams.append(float(lam))
    cs.append(c)
    ys.append(y)
  assert int(state.num_refits) == 3 and lams[2] == lams[3] == lams[5]
  assert lams[0] < 0.9
  # Streaming statistics equal the batch mean/variance of all samples.
  c = np.clip(np.concatenate(cs), 1e-4, 1 - 1e-4)
  y = np.concatenate(ys)
  for k, sel in enumerate((~y, y)):
    assert float(state.count[k]) == pytest.approx(sel.sum())
    assert float(state.mean[k]) == pytest.approx(c[sel].mean(), rel=1e-5)
    assert float(state.m2[k] / state.count[k]) == pytest.approx(
        c[sel].var(), rel=1e-4)


# ----------------------------------------------------------------------------
# Learn-then-Test.
# ----------------------------------------------------------------------------
def test_binom_cdf_exact():
  for n, p in ((10, 0.3), (37, 0.05), (200, 0.5)):
    k = np.arange(-1, n + 1)
    want = [sum(math.comb(n, i) * p**i * (1 - p)**(n - i) for i in range(j + 1))
            for j in k]
    np.testing.assert_allclose(th.binom_cdf(k, n, p), want, rtol=1e-9,
                               atol=1e-15)


def test_binom_cdf_vs_scipy_large_n():
  stats = pytest.importorskip("scipy.stats")
  k = np.array([0, 500, 1000, 1040, 2000])
  np.testing.assert_allclose(th.binom_cdf(k, 20000, 0.05),
                             stats.binom.cdf(k, 20000, 0.05), rtol=1e-8)


def test_hoeffding_bentkus_never_above_hoeffding():
  r = np.linspace(0, 0.3, 61)
  for n in (50, 1000, 20000):
    for delta in (0.05, 0.1, 0.2):
      hb = th.hoeffding_bentkus_pvalue(r, n, delta)
      ho = th.hoeffding_pvalue(r, n, delta)
      assert np.all(hb <= ho + 1e-12) and np.all((hb >= 0) & (hb <= 1))
      assert np.all(hb[r >= delta] == 1.0)
  # Known value: R̂ = 0 gives exp(-n h1(0, δ)) = (1 − δ)^n vs e·(1 − δ)^n.
  assert th.hoeffding_bentkus_pvalue(0.0, 100, 0.05) == pytest.approx(0.95**100)


def test_ltt_certifies_threshold_on_synthetic_risk_curve():
  lam = np.linspace(0, 1, 101)
  risk = 0.2 * (1 - lam) ** 2        # monotone: more exits -> more risk
  n, delta, eps = 100_000, 0.05, 0.05
  margin = math.sqrt(math.log(1 / eps) / (2 * n))
  res_h = th.ltt_calibrate(lam[::-1], risk[::-1], n, delta, eps, "hoeffding")
  want = lam[np.argmax(risk + margin <= delta)]
  assert res_h.threshold == pytest.approx(want)
  res = th.ltt_calibrate(lam, risk, n, delta, eps)   # Hoeffding-Bentkus
  assert res.threshold <= res_h.threshold            # tighter bound
  assert 0.2 * (1 - res.threshold) ** 2 <= delta     # valid
  lam_star = 1 - math.sqrt(delta / 0.2)              # r(λ*) = δ
  assert res.threshold - lam_star < 0.02             # close
  assert np.array_equal(res.certified, lam >= res.threshold)
  assert lam[res.index] == res.threshold
  # Sampled Bernoulli losses: still valid and close.
  rng = np.random.default_rng(0)
  n = 20_000
  r_hat = rng.binomial(n, risk) / n
  res = th.ltt_calibrate(lam, r_hat, n, delta, eps)
  assert 0.2 * (1 - res.threshold) ** 2 <= delta
  assert res.threshold - lam_star < 0.04


def test_fixed_sequence_testing_stops_at_first_non_rejection():
  p = np.array([0.001, 0.01, 0.5, 0.001, 0.001])
  assert th.fixed_sequence_test(p, 0.05) == 2
  assert th.fixed_sequence_test(np.zeros(4), 0.05) == 4
  # Non-monotone risk: λ = 0.7 has high risk, so 0.6 and below are never
  # tested even though their risk is low.
  lam = np.array([0.6, 0.9, 0.5, 1.0, 0.8, 0.7])
  risk = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.5])
  res = th.ltt_calibrate(lam, risk, 1000, 0.1, 0.05)
  assert res.threshold == 0.8 and res.index == 4
  np.testing.assert_array_equal(res.certified, [0, 1, 0, 1, 1, 0])
  # Nothing certified -> never exit.
  res = th.ltt_calibrate(lam, np.full(6, 0.5), 1000, 0.1, 0.05)
  assert math.isinf(res.threshold) and res.index == -1


def test_token_inconsistency_losses():
  conf = np.array([[0.9, 0.2, 0.6, 0.0], [0.95, 0.95, 0.1, 0.1]])
  agree = np.array([[True, False, False, True], [False, True, True, True]])
  valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  losses = th.token_inconsistency_losses(conf, agree, [1.0, 0.5, 0.0], valid)
  np.testing.assert_allclose(losses, [[0, 1 / 3, 2 / 3], [0, 0.25, 0.25]])

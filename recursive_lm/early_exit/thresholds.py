"""Exit thresholds: fixed, CALM's decaying schedule, FREE's adaptive Beta
mixture estimator and Learn-then-Test calibration (spec §2.1.5, §2.2.4-2.2.5).

Convention (see ``confidence.py``): a token exits iff ``confidence >=
threshold``; ``threshold = +inf`` never exits.

* ``fixed_threshold`` / ``decaying_threshold``: jit-able, per row.
* ``beta_mixture_init`` / ``beta_mixture_update``: FREE's estimator as a
  static-shape pytree and a jit-able update (``config`` is a static arg).
* ``ltt_calibrate`` and its p-values: offline, pure numpy (no scipy).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import betaln

Array = jax.Array


def should_exit(confidence: Array, threshold: Array) -> Array:
  """The library-wide exit rule: ``confidence >= threshold`` (bool)."""
  return confidence >= threshold


# ----------------------------------------------------------------------------
# Fixed and decaying thresholds.
# ----------------------------------------------------------------------------
def fixed_threshold(lam: float | Array, t: Array) -> Array:
  """Constant λ broadcast to the positions ``t`` (float32, shape of ``t``)."""
  return jnp.broadcast_to(jnp.asarray(lam, jnp.float32), jnp.shape(t))


def decaying_threshold(lam: float | Array, t: Array, max_len: int | Array,
                       temperature: float = 4.0, floor: float = 0.9,
                       clip: bool = True) -> Array:
  """CALM's position-decaying threshold (Schuster et al. 2022; spec §2.2.4).

    λ_t = clip_[0,1]( floor·λ + (1 − floor)·λ·exp(−τ·t / N) ),

  with floor = 0.9, τ = ``temperature`` (gin ``POS_TEMP`` = 4) and N =
  ``max_len``, the maximum decode length. It starts at λ (t = 0) and decays
  toward 0.9·λ: early tokens condition more of the output, so be stricter.

  ``t`` is each row's own decode step (0 for the first generated token), an
  int array of any shape, e.g. [B] = ``pos - prompt_len`` per row. CALM's code
  never passes ``pos`` (§4.2-ii), so its λ_t is constant; here t is required.
  ``lam = +inf`` passes through unclipped so it still means "never exit".

  Returns float32 λ_t with the broadcast shape of ``lam`` and ``t``.
  """
  lam = jnp.asarray(lam, jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  decay = jnp.exp(-temperature * t / jnp.asarray(max_len, jnp.float32))
  out = floor * lam + (1.0 - floor) * lam * decay
  if clip:
    out = jnp.where(jnp.isposinf(lam), lam, jnp.clip(out, 0.0, 1.0))
  return out


# ----------------------------------------------------------------------------
# FREE's adaptive threshold: supervised two-component Beta mixture.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BetaMixtureConfig:
  """Static settings of the adaptive threshold estimator (FREE §2.1.5).

  Component 0 = "inconsistent" (exit argmax != deep argmax), 1 = "consistent".

  Attributes:
    zeta: target posterior ζ; λ is the smallest confidence with
      P(consistent | c) > ζ (FREE: 0.4).
    grid_lo, grid_hi, grid_size: search range and grid (FREE: 10 points in
      [0.3, 0.9]); ``grid_hi`` is also the fallback when no point qualifies.
    method: "grid" (FREE's rule) or "bisect" (exact crossing: a dense
      ``bracket_size`` scan brackets the first crossing, then
      ``bisect_iters`` bisection steps).
    prior: "equal" (default) = FREE's posterior rule P(c*|x) = f_1 / (f_0 + f_1),
      π ignored, as in the authors' code (spec §2.1.5); "mixture" = the
      π-weighted posterior with π_k = n_k / n (the paper's mixture model).
    init_threshold: λ until both classes have ``min_count`` samples (FREE:
      ``shallow2deep_conf_threshold`` = 0.9).
    min_count: minimum (weighted) count per class before its Beta is fitted
      and before λ moves; guards against fits on a handful of tokens.
    max_refits: λ is frozen after this many refits (FREE: 300); None = never.
      Only updates that add calibration pairs count as refits.
    eps: confidences are clipped into [eps, 1 − eps] (FREE: 1e-4).
    init_alpha, init_beta, init_weights: the prior fit (FREE: α=(1,2),
      β=(2,1), π=(.5,.5)), used until a class has enough samples.
    decay: forgetting factor applied to the accumulated statistics before
      each update (1.0 = FREE's accumulate-everything; < 1 tracks drift).
  """
  zeta: float = 0.4
  grid_lo: float = 0.3
  grid_hi: float = 0.9
  grid_size: int = 10
  method: str = "grid"
  prior: str = "equal"
  init_threshold: float = 0.9
  min_count: float = 20.0
  max_refits: int | None = 300
  eps: float = 1e-4
  init_alpha: tuple[float, float] = (1.0, 2.0)
  init_beta: tuple[float, float] = (2.0, 1.0)
  init_weights: tuple[float, float] = (0.5, 0.5)
  decay: float = 1.0
  bracket_size: int = 256
  bisect_iters: int = 40

  def __post_init__(self):
    if self.method not in ("grid", "bisect"):
      raise ValueError(f"method must be 'grid' or 'bisect', got {self.method!r}")
    if self.prior not in ("mixture", "equal"):
      raise ValueError(f"prior must be 'mixture' or 'equal', got {self.prior!r}")
    if not 0.0 < self.grid_lo < self.grid_hi < 1.0:
      raise ValueError("need 0 < grid_lo < grid_hi < 1")
    if not 0.0 < self.zeta < 1.0:
      raise ValueError(f"zeta must be in (0, 1), got {self.zeta}")


class BetaMixtureState(NamedTuple):
  """Static-shape pytree. Per-class arrays are [2] (0 = inconsistent).

  Sufficient statistics are kept as (count, mean, M2) and merged with Chan et
  al.'s parallel update: the same information as (n, Σc, Σc²), but without
  float32 cancellation in Σc² − n·m².
  """
  count: Array        # [2] weighted sample count
  mean: Array         # [2] weighted mean of clipped confidences
  m2: Array           # [2] weighted sum of squared deviations
  alpha: Array        # [2] fitted Beta α
  beta: Array         # [2] fitted Beta β
  weights: Array      # [2] mixture weights π
  threshold: Array    # [] current λ
  num_refits: Array   # [] int32


def beta_mixture_init(config: BetaMixtureConfig = BetaMixtureConfig()
                      ) -> BetaMixtureState:
  """Initial state: the prior fit, empty statistics, λ = init_threshold."""
  z = jnp.zeros((2,), jnp.float32)
  return BetaMixtureState(
      count=z, mean=z, m2=z,
      alpha=jnp.asarray(config.init_alpha, jnp.float32),
      beta=jnp.asarray(config.init_beta, jnp.float32),
      weights=jnp.asarray(config.init_weights, jnp.float32),
      threshold=jnp.float32(config.init_threshold),
      num_refits=jnp.int32(0))


def beta_log_pdf(x: Array, a: Array, b: Array) -> Array:
  """log Beta(x; a, b) for x in (0, 1)."""
  return ((a - 1.0) * jnp.log(x) + (b - 1.0) * jnp.log1p(-x) - betaln(a, b))


def consistent_posterior(x: Array, alpha: Array, beta: Array, weights: Array,
                         prior: str = "mixture") -> Array:
  """P(consistent | c = x) under the two-component Beta mixture.

  ``prior="mixture"``: π_1 f_1 / (π_0 f_0 + π_1 f_1) (the paper's mixture
  posterior); ``"equal"``: f_1 / (f_0 + f_1) (the authors' code). x [...].
  """
  d = beta_log_pdf(x, alpha[1], beta[1]) - beta_log_pdf(x, alpha[0], beta[0])
  if prior == "mixture":
    d = d + jnp.log(weights[1]) - jnp.log(weights[0])
  return jax.nn.sigmoid(d)


def beta_mixture_threshold(alpha: Array, beta: Array, weights: Array,
                           config: BetaMixtureConfig = BetaMixtureConfig()
                           ) -> Array:
  """λ from a fitted mixture (FREE §2.1.5 "Threshold rule"), jit-able.

  grid:   λ = min{x ∈ G : P(consistent | x) > ζ}, G = linspace(lo, hi, n);
          ``grid_hi`` if no point qualifies.
  bisect: λ = the smallest root of P(consistent | x) = ζ in [lo, hi] (``lo``
          if P(lo) > ζ already, ``hi`` if P never exceeds ζ).

  FREE's code computes G[clip(n − m, 0, n−1)] with m = #{x ∈ G: P > ζ}; for a
  monotone posterior that is the same point. We use "smallest point" — the
  paper's stated rule — because a ratio of Beta densities can be unimodal, in
  which case the count rule picks an arbitrary grid point.
  """
  post = functools.partial(consistent_posterior, alpha=alpha, beta=beta,
                           weights=weights, prior=config.prior)
  size = config.grid_size if config.method == "grid" else config.bracket_size
  grid = jnp.linspace(config.grid_lo, config.grid_hi, size, dtype=jnp.float32)
  ok = post(grid) > config.zeta
  first = jnp.argmax(ok)  # 0 if none: handled below
  grid_lam = jnp.where(jnp.any(ok), grid[first], jnp.float32(config.grid_hi))
  if config.method == "grid":
    return grid_lam

  # Bracket [grid[first-1], grid[first]]: P <= ζ at lo_x, P > ζ at hi_x.
  def body(_, lr):
    lo_x, hi_x = lr
    mid = 0.5 * (lo_x + hi_x)
    above = post(mid) > config.zeta
    return jnp.where(above, lo_x, mid), jnp.where(above, mid, hi_x)

  lo_x = grid[jnp.maximum(first - 1, 0)]
  _, root = jax.lax.fori_loop(0, config.bisect_iters, body, (lo_x, grid[first]))
  needs_root = jnp.any(ok) & (first > 0)
  return jnp.where(needs_root, root, grid_lam)


def _moments_to_beta(mean: Array, var: Array) -> tuple[Array, Array]:
  """Method of moments: α = m(m(1−m)/v − 1), β = α(1−m)/m."""
  var = jnp.clip(var, 1e-12, mean * (1.0 - mean) * (1.0 - 1e-6))
  common = mean * (1.0 - mean) / var - 1.0
  return mean * common, (1.0 - mean) * common


def beta_mixture_update(
    state: BetaMixtureState,
    confidences: Array,
    agree_mask: Array,
    valid_mask: Array | None = None,
    config: BetaMixtureConfig = BetaMixtureConfig(),
) -> tuple[BetaMixtureState, Array]:
  """One streaming update + refit of FREE's adaptive threshold (§2.1.5).

  Jit with ``jax.jit(beta_mixture_update, static_argnames="config")``.

  Args:
    state: ``BetaMixtureState``.
    confidences: shallow-exit confidences, any shape (flattened), e.g. the
      top-2 gaps of the k+1 rows of a deferred deep pass.
    agree_mask: bool, same shape: shallow argmax == deep argmax.
    valid_mask: bool or float weights, same shape; False rows are ignored
      (padding, rows that were not part of a deep pass).
    config: static ``BetaMixtureConfig``.

  Returns:
    (new_state, threshold). The statistics always accumulate. Component k is
    refitted only once its count reaches ``min_count``; π and λ move only when
    both components are fitted and this update added at least one valid pair
    (an update with no pairs is not a refit and does not count), and λ
    freezes after ``max_refits`` refits.

  Follows the paper where the authors' code differs (§4.1-iii): labels are
  hard (the code's λ_r soft mixing is dead code) and π is re-estimated from
  the class counts; the posterior ignores π as FREE's rule does
  (``prior="equal"``, the default), ``prior="mixture"`` weights it by π.
  The consistent component is the one labelled consistent, not "the one with
  the larger mean".
  """
  c = jnp.clip(jnp.asarray(confidences, jnp.float32).reshape(-1),
               config.eps, 1.0 - config.eps)
  y = jnp.asarray(agree_mask).reshape(-1).astype(bool)
  v = (jnp.ones_like(c) if valid_mask is None
       else jnp.asarray(valid_mask).reshape(-1).astype(jnp.float32))
  w = jnp.stack([v * (~y), v * y])                       # [2, N]
  n_b = jnp.sum(w, axis=-1)
  mean_b = jnp.sum(w * c, axis=-1) / jnp.maximum(n_b, 1e-12)
  m2_b = jnp.sum(w * (c - mean_b[:, None]) ** 2, axis=-1)

  n_a = state.count * config.decay
  m2_a = state.m2 * config.decay
  n = n_a + n_b
  delta = mean_b - state.mean
  frac_b = jnp.where(n > 0, n_b / jnp.maximum(n, 1e-12), 0.0)
  mean = state.mean + delta * frac_b
  m2 = m2_a + m2_b + delta**2 * n_a * frac_b

  fit_ok = n >= config.min_count
  a_fit, b_fit = _moments_to_beta(mean, m2 / jnp.maximum(n, 1e-12))
  alpha = jnp.where(fit_ok, a_fit, state.alpha)
  beta = jnp.where(fit_ok, b_fit, state.beta)
  refit = jnp.all(fit_ok) & (jnp.sum(n_b) > 0)  # only updates that added pairs
  if config.max_refits is not None:
    refit &= state.num_refits < config.max_refits
  pi = jnp.clip(n / jnp.maximum(jnp.sum(n), 1e-12), 1e-6, 1.0)
  weights = jnp.where(refit, pi / jnp.sum(pi), state.weights)
  lam = beta_mixture_threshold(alpha, beta, weights, config)
  threshold = jnp.where(refit, lam, state.threshold)
  new = BetaMixtureState(
      count=n, mean=mean, m2=m2, alpha=alpha, beta=beta, weights=weights,
      threshold=threshold, num_refits=state.num_refits + refit.astype(jnp.int32))
  return new, threshold


# ----------------------------------------------------------------------------
# Learn-then-Test (Angelopoulos et al. 2021) as used by CALM (§2.2.5).
# Naming follows CALM: δ = tolerated risk (e.g. inconsistency rate), ε = the
# failure probability, so P(R(λ̂) <= δ) >= 1 − ε. The LTT paper calls these
# α and δ respectively. Offline, pure numpy.
# ----------------------------------------------------------------------------
def bernoulli_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """h1(a, b) = a ln(a/b) + (1−a) ln((1−a)/(1−b)), with 0·ln 0 = 0."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    t1 = np.where(a > 0, a * np.log(a / b), 0.0)
    t2 = np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - b)), 0.0)
  return t1 + t2


def binom_cdf(k: np.ndarray, n: int, p: float) -> np.ndarray:
  """P(Binomial(n, p) <= k), elementwise in k; log-space, numpy only.

  log C(n, i) is a cumulative sum of log((n − i + 1)/i), the pmf terms are
  accumulated with ``np.logaddexp.accumulate``: stable for n up to ~1e7.
  """
  n = int(n)
  if not 0.0 < p < 1.0:
    raise ValueError(f"p must be in (0, 1), got {p}")
  i = np.arange(1, n + 1, dtype=np.float64)
  log_comb = np.concatenate([[0.0], np.cumsum(np.log(n - i + 1) - np.log(i))])
  j = np.arange(n + 1, dtype=np.float64)
  log_pmf = log_comb + j * math.log(p) + (n - j) * math.log1p(-p)
  log_cdf = np.logaddexp.accumulate(log_pmf)
  k = np.asarray(k)
  kk = np.clip(np.floor(k), -1, n).astype(np.int64)
  out = np.where(kk < 0, 0.0, np.exp(log_cdf[np.maximum(kk, 0)]))
  return np.minimum(out, 1.0)


def hoeffding_pvalue(risk: np.ndarray, n: int, delta: float) -> np.ndarray:
  """Hoeffding p-value for H: R > δ: exp(−2n·(δ − R̂)_+²)."""
  gap = np.maximum(delta - np.asarray(risk, np.float64), 0.0)
  return np.exp(-2.0 * n * gap**2)


def bentkus_pvalue(risk: np.ndarray, n: int, delta: float) -> np.ndarray:
  """Bentkus p-value: min(1, e·P(Binomial(n, δ) <= ⌈n R̂⌉))."""
  # Round before ceil so that n·(m/n) == m is not pushed up by float error.
  k = np.ceil(np.round(n * np.asarray(risk, np.float64), 9))
  return np.minimum(math.e * binom_cdf(k, n, delta), 1.0)


def hoeffding_bentkus_pvalue(risk: np.ndarray, n: int,
                             delta: float) -> np.ndarray:
  """LTT's Hoeffding-Bentkus p-value (Angelopoulos et al. 2021, §3):

    p = min( exp(−n·h1(min(R̂, δ), δ)),  e·P(Binomial(n, δ) <= ⌈n R̂⌉) ),

  with h1 the Bernoulli KL. Never larger than ``hoeffding_pvalue`` (Pinsker:
  h1(a, b) >= 2(a − b)²).
  """
  r = np.asarray(risk, np.float64)
  hoeff_kl = np.exp(-n * bernoulli_kl(np.minimum(r, delta), delta))
  return np.minimum(np.minimum(hoeff_kl, bentkus_pvalue(r, n, delta)), 1.0)


_PVALUES = {"hoeffding": hoeffding_pvalue, "bentkus": bentkus_pvalue,
            "hoeffding_bentkus": hoeffding_bentkus_pvalue}


def fixed_sequence_test(p_values: np.ndarray, epsilon: float) -> int:
  """Fixed-sequence testing (LTT §4): walk the hypotheses in the given order
  (most conservative first) and reject while p_j <= ε; stop at the first
  non-rejection. Returns the number of rejected hypotheses (a prefix)."""
  p = np.asarray(p_values, np.float64)
  fail = np.nonzero(~(p <= epsilon))[0]
  return int(fail[0]) if fail.size else int(p.size)


@dataclasses.dataclass(frozen=True)
class LTTResult:
  """Output of ``ltt_calibrate``.

  threshold: the smallest certified λ (``never_exit`` if none is certified).
  index: its index in the caller's ``thresholds`` array (−1 if none).
  p_values: per threshold, in the caller's order.
  certified: bool per threshold (the rejected prefix of the descending walk).
  """
  threshold: float
  index: int
  p_values: np.ndarray
  certified: np.ndarray


def ltt_calibrate(thresholds: np.ndarray, risks: np.ndarray, n: int,
                  delta: float, epsilon: float,
                  bound: str = "hoeffding_bentkus",
                  never_exit: float = math.inf) -> LTTResult:
  """Learn-then-Test threshold calibration (CALM §2.2.5, Schuster et al. 2022
  §4 / App. E; Angelopoulos et al. 2021).

  For each candidate λ_j, H_j: R(λ_j) > δ is tested with a p-value from
  ``bound`` on the empirical risk R̂_j over n i.i.d. calibration prompts
  (losses bounded in [0, 1], e.g. token inconsistency with the full model or
  1 − ROUGE). Thresholds are walked from the most conservative (largest λ:
  fewest exits under ``confidence >= λ``) downward with fixed-sequence
  testing; the last rejected λ is returned. Then P(R(λ̂) <= δ) >= 1 − ε.

  Args:
    thresholds: candidate λ values [J], any order, no duplicates.
    risks: empirical risks R̂ [J] in [0, 1], aligned with ``thresholds``.
    n: number of calibration examples behind each R̂.
    delta: tolerated risk δ in (0, 1).
    epsilon: failure probability ε in (0, 1).
    bound: "hoeffding_bentkus" (default), "hoeffding" or "bentkus".
    never_exit: returned when nothing is certified (λ = +inf: never exit).
  """
  lam = np.asarray(thresholds, np.float64)
  r = np.asarray(risks, np.float64)
  if lam.shape != r.shape or lam.ndim != 1:
    raise ValueError("thresholds and risks must be 1-D of the same length")
  if not (0 < delta < 1 and 0 < epsilon < 1):
    raise ValueError("delta and epsilon must be in (0, 1)")
  if bound not in _PVALUES:
    raise ValueError(f"bound must be one of {sorted(_PVALUES)}")
  p = _PVALUES[bound](r, int(n), delta)
  order = np.argsort(-lam, kind="stable")
  k = fixed_sequence_test(p[order], epsilon)
  certified = np.zeros(lam.shape, bool)
  certified[order[:k]] = True
  if k == 0:
    return LTTResult(float(never_exit), -1, p, certified)
  idx = int(order[k - 1])
  return LTTResult(float(lam[idx]), idx, p, certified)


def token_inconsistency_losses(confidences: np.ndarray, agree: np.ndarray,
                               thresholds: np.ndarray,
                               valid: np.ndarray | None = None) -> np.ndarray:
  """Per-example losses [n, J] for ``ltt_calibrate``'s risks (mean over n).

  Loss of example i at λ_j: the fraction of its valid tokens that would exit
  (conf >= λ_j) with a prediction different from the full model's. This is a
  teacher-forced proxy (one full-model pass over each calibration sequence);
  CALM's exact procedure decodes each prompt once per λ and compares outputs.

  confidences, agree, valid: [n, T]; thresholds [J].
  """
  c = np.asarray(confidences, np.float64)
  bad = ~np.asarray(agree, bool)
  v = np.ones_like(c, bool) if valid is None else np.asarray(valid, bool)
  lam = np.asarray(thresholds, np.float64)
  wrong_exit = (c[:, :, None] >= lam[None, None, :]) & (bad & v)[:, :, None]
  return wrong_exit.sum(1) / np.maximum(v.sum(1), 1)[:, None]

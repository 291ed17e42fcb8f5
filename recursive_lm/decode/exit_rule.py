"""Exit decisions in one place: an ``ExitRule`` is a measure x a schedule.

Every early-exit policy (FREE, CALM, the forced-exit benchmark) asks the same
question at an exit ``i`` of a decode step: *does this row stop here?* The
answer is ``measure >= threshold``, optionally overridden by a precomputed
(forced) decision:

* **measures** (``Measure`` objects) say what a confidence costs:
  ``needs_logits`` measures read the full 49k-vocabulary head at the exit
  (softmax max / margin, entropy, KL); head-free ones read only the hidden
  state (``StateCosine`` between consecutive exits, the ``Meta`` classifier,
  the ``Shortlist`` head over a few hundred vocabulary rows). A policy with a
  head-free measure runs the full head once per emitted token, on the state
  the row actually emits from.
* **schedules** say what the threshold is at a step: ``Fixed`` (λ),
  ``Decaying`` (CALM's position-decaying λ_t), ``Adaptive`` (FREE's
  Beta-mixture estimator; the threshold lives in the policy state).
* **forced decisions**: ``decide(..., forced=idx)`` also exits row b at exit i
  when ``i >= idx[b]`` (``idx`` = the exit index this token must take, taken
  per step from a [B, T] table). The benchmark uses this with ``λ = +inf`` to
  replay a seeded exit mask while still paying for the measure.

Convention (``early_exit.confidence``): higher = more confident, exit iff
``confidence >= threshold``; ``+inf`` never exits.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from recursive_lm.early_exit import confidence as C
from recursive_lm.early_exit.thresholds import BetaMixtureConfig, decaying_threshold

Array = jax.Array


# ----------------------------------------------------------------------------
# Measures.
# ----------------------------------------------------------------------------
class Measure:
  """A per-row exit confidence [B] float32.

  ``__call__(h, logits, prev_h, prev_logits)``: h [B, D] the raw residual
  state at the exit, logits [B, V] its head output (None unless
  ``needs_logits``), prev_* the previous exit's (None at the first exit).
  ``bind(cfg, params)`` returns the measure ready for the (decode-layout)
  params; most measures need nothing from them.
  """
  name: str = "measure"
  needs_logits: bool = False   # reads the full LM head at the exit
  pairwise: bool = False       # compares with the previous exit

  def bind(self, cfg, params) -> "Measure":
    del cfg, params
    return self

  def at(self, i: int) -> "Measure":
    """The measure at exit index ``i`` (static); per-exit measures (e.g. one
    meta classifier per exit) override this."""
    del i
    return self

  def __call__(self, h, logits, prev_h, prev_logits) -> Array:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class LogitMeasure(Measure):
  """A softmax statistic of the exit's full-vocabulary logits."""
  fn: Callable[[Array], Array] = C.softmax_margin
  name: str = "softmax_diff"
  needs_logits: bool = True

  def __call__(self, h, logits, prev_h, prev_logits):
    return self.fn(logits).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class KLMeasure(Measure):
  """exp(-KL(p_cur || p_prev)) between consecutive exits (needs both heads)."""
  name: str = "kl"
  needs_logits: bool = True
  pairwise: bool = True

  def __call__(self, h, logits, prev_h, prev_logits):
    if prev_logits is None:  # no previous exit: never confident
      return jnp.zeros(h.shape[:1], jnp.float32)
    return C.kl_confidence(prev_logits, logits).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class StateCosine(Measure):
  """CALM ``state``: cosine of consecutive exits' hidden states (head-free)."""
  name: str = "state"
  pairwise: bool = True

  def __call__(self, h, logits, prev_h, prev_logits):
    if prev_h is None:  # CALM: the first exit has no previous state
      return jnp.zeros(h.shape[:1], jnp.float32)
    return C.hidden_cosine(prev_h, h).astype(jnp.float32)


class Meta(Measure):
  """FREE / CALM meta classifier on the exit state (head-free)."""
  name = "meta"

  def __init__(self, params: Any):
    if params is None:
      raise ValueError("confidence='meta' needs meta_params (see "
                       "early_exit.confidence.train_meta_classifier)")
    self.params = params

  def __call__(self, h, logits, prev_h, prev_logits):
    return C.meta_confidence(self.params, h).astype(jnp.float32)


class Shortlist(Measure):
  """Softmax statistic over a vocabulary shortlist: final norm + the head rows
  of ``token_ids`` only (a few hundred rows instead of the full vocabulary).

  ``token_ids``: the shortlist (e.g. the most frequent tokens of a corpus).
  ``fn``: a softmax measure on the shortlist logits (default softmax_max).
  """
  name = "shortlist"

  def __init__(self, token_ids, fn: Callable[[Array], Array] = C.softmax_max,
               _rows=None, _scale=None, _eps=1e-5):
    self.token_ids = jnp.asarray(token_ids, jnp.int32)
    if self.token_ids.ndim != 1 or self.token_ids.size < 2:
      raise ValueError("Shortlist needs a 1-D list of at least 2 token ids")
    self.fn, self._rows, self._scale, self._eps = fn, _rows, _scale, _eps

  def bind(self, cfg, params) -> "Shortlist":
    if cfg.tie_embeddings:
      table = params["embed"]["embedding"]                 # [V, D]
      rows = jnp.take(table, self.token_ids, axis=0)
    elif cfg.kernel_layout == "in_out":
      rows = jnp.take(params["lm_head"]["kernel"], self.token_ids, axis=1).T
    elif cfg.kernel_layout == "out_in":
      rows = jnp.take(params["lm_head"]["kernel"], self.token_ids, axis=0)
    else:
      raise ValueError("Shortlist on an untied panel-layout head: build the engine "
                       "with kernel_layout=None (or a tied model)")
    return Shortlist(self.token_ids, self.fn, jnp.asarray(rows, jnp.float32),
                     jnp.asarray(params["final_norm"]["scale"], jnp.float32),
                     cfg.norm_eps)

  def __call__(self, h, logits, prev_h, prev_logits):
    if self._rows is None:
      raise ValueError("Shortlist measure used before bind(cfg, params)")
    x = h.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self._eps)
    z = (x * self._scale) @ self._rows.T                    # [B, n_short]
    return self.fn(z).astype(jnp.float32)


_LOGIT_FNS = {C.softmax_max: "softmax_max", C.softmax_margin: "softmax_diff",
              C.softmax_margin_approx: "softmax_diff_approx",
              C.entropy_confidence: "entropy"}


def measure_from_name(name: str | Measure, meta_params=None) -> Measure:
  """A ``Measure`` from a confidence name (``early_exit.confidence``) or as is."""
  if isinstance(name, Measure):
    return name
  fn = C.get_confidence_fn(name)  # raises on unknown names
  if fn is C.hidden_cosine:
    return StateCosine()
  if fn is C.kl_confidence:
    return KLMeasure()
  if fn is C.meta_confidence:
    return Meta(meta_params)
  return LogitMeasure(fn, _LOGIT_FNS.get(fn, name))


# ----------------------------------------------------------------------------
# Schedules.
# ----------------------------------------------------------------------------
class Schedule:
  """Threshold per row [B] at decode step ``step`` (0 = first new token)."""
  adaptive: BetaMixtureConfig | None = None

  def __call__(self, base: Array, step: Array, max_new: int, batch: int) -> Array:
    return jnp.broadcast_to(jnp.asarray(base, jnp.float32), (batch,))


@dataclasses.dataclass(frozen=True)
class Fixed(Schedule):
  """λ at every step."""


@dataclasses.dataclass(frozen=True)
class Decaying(Schedule):
  """CALM's λ_t = 0.9 λ + 0.1 λ exp(-τ t / N), N = max_new_tokens."""
  temperature: float = 4.0

  def __call__(self, base, step, max_new, batch):
    return decaying_threshold(base, jnp.broadcast_to(step, (batch,)), max_new,
                              self.temperature)


@dataclasses.dataclass(frozen=True)
class Adaptive(Schedule):
  """FREE's Beta-mixture threshold; the policy reads it from its state."""
  config: BetaMixtureConfig = dataclasses.field(default_factory=BetaMixtureConfig)

  @property
  def adaptive(self) -> BetaMixtureConfig:  # type: ignore[override]
    return self.config


# ----------------------------------------------------------------------------
# The rule.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ExitRule:
  """measure x schedule; ``decide`` is the library's one exit decision.

  ``exit_maps``: optional, one callable per exit (index i, static) mapping the
  raw residual state at that exit [B, D] to the state that goes through the
  final norm + LM head when a row exits there (trained exit modules,
  ``recursive_lm.exits``); None = the raw state. Measures still read the raw
  state; skipped layers' KV still comes from it.
  """
  measure: Measure
  schedule: Schedule = Fixed()
  exit_maps: tuple | None = None

  @property
  def needs_logits(self) -> bool:
    """The policy must run the head at every checked exit."""
    return self.measure.needs_logits or self.schedule.adaptive is not None

  def bind(self, cfg, params) -> "ExitRule":
    return ExitRule(self.measure.bind(cfg, params), self.schedule, self.exit_maps)

  def thresholds(self, base, step, max_new: int, batch: int) -> Array:
    return self.schedule(base, step, max_new, batch)

  def confidence(self, h, logits, prev_h=None, prev_logits=None, i: int = 0) -> Array:
    return self.measure.at(i)(h, logits, prev_h, prev_logits).astype(jnp.float32)

  def exit_state(self, i: int, h: Array) -> Array:
    """The state read by the head when a row exits at exit ``i`` (static)."""
    if self.exit_maps is None:
      return h
    return self.exit_maps[i](h).astype(h.dtype)

  @staticmethod
  def decide(i, conf: Array, thr: Array, forced: Array | None = None) -> Array:
    """bool [B]: exit at exit index ``i`` (int or traced scalar)."""
    go = conf >= thr
    if forced is not None:
      go = go | (forced <= i)
    return go


def make_rule(confidence: str | Measure = "softmax_diff", schedule: str = "fixed",
              position_temp: float = 4.0, adaptive: BetaMixtureConfig | None = None,
              meta_params=None) -> ExitRule:
  """The rule for an engine's string arguments (``EarlyExitEngine``)."""
  measure = measure_from_name(confidence, meta_params)
  if adaptive is not None:
    return ExitRule(measure, Adaptive(adaptive))
  if schedule == "decaying":
    return ExitRule(measure, Decaying(float(position_temp)))
  if schedule != "fixed":
    raise ValueError(f"schedule must be 'fixed' or 'decaying', got {schedule!r}")
  return ExitRule(measure, Fixed())


def forced_exit_table(rng_seed: int, batch: int, max_new: int, rate: float,
                      exit_index: int, n_exits: int):
  """Seeded forced-exit table [B, max_new] int32 for ``generate(forced=...)``:
  each token takes exit ``exit_index`` with probability ``rate``, else the full
  depth (``n_exits - 1``). Host numpy (the benchmark's exit masks)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rs = np.random.default_rng(rng_seed)
  hit = rs.random((batch, max_new)) < rate
  return np.where(hit, exit_index, n_exits - 1).astype(np.int32)

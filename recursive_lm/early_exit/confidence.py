"""Per-token exit confidence measures (CALM §2.2.2, FREE §2.1.2 of the spec).

Every measure is pure, jit-able and reduces over the **last axis only**, so any
leading batch dims work: logits ``[..., V]`` -> confidence ``[...]``, hidden
states ``[..., d]`` -> confidence ``[...]``. Softmax statistics are computed in
float32 whatever the input dtype.

Convention (used by ``thresholds.py`` too): **higher = more confident, and a
token exits iff ``confidence >= threshold``.** Divergence-type quantities are
turned into confidences so that this holds:

* entropy  -> ``1 - H(p) / log V``          in [0, 1] (1 = one-hot);
* KL       -> ``exp(-KL(p_cur || p_prev))`` in (0, 1] (1 = identical exits);
* cosine similarity is already a confidence (1 = identical direction).

FREE's code exits iff ``conf > threshold`` (strict); with continuous
confidences the difference is measure-zero. To never exit use
``threshold = +inf``: a probability can round to exactly 1.0 in float32, so
``threshold = 1`` does not guarantee "never" under ``>=``.

Notes where we follow the paper, not the authors' code:
* CALM's ``state`` measure uses ``jnp.inner`` and norms over the whole batch
  array (spec §4.2-iv), which is only right at batch 1; ``hidden_cosine`` is
  per example.
* CALM's gin default ``CONF_METHOD="softmax"`` names no measure (§4.2-i);
  ``get_confidence_fn`` maps every documented name and raises on unknown ones.
* FREE's meta head has biases at deploy time but not at training time
  (§4.1-ii); here one module (``MetaClassifier``) serves both.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Array = jax.Array


# ----------------------------------------------------------------------------
# Softmax-based measures.
# ----------------------------------------------------------------------------
def _f32(x: Array) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def softmax_max(logits: Array) -> Array:
  """CALM ``softmax_max``: max_v softmax(z)_v.  logits [..., V] -> [...]."""
  z = _f32(logits)
  return jnp.exp(jnp.max(z, axis=-1) - jax.nn.logsumexp(z, axis=-1))


def softmax_margin(logits: Array) -> Array:
  """CALM ``softmax_diff`` / FREE ``softmax``: top-1 minus top-2 probability.

  Exact, via ``jax.lax.top_k(z, 2)`` on the logits (softmax is monotone, so
  the top-2 logits give the top-2 probabilities). logits [..., V] -> [...].
  """
  z = _f32(logits)
  top2, _ = jax.lax.top_k(z, 2)
  lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
  p = jnp.exp(top2 - lse)
  return p[..., 0] - p[..., 1]


def softmax_margin_approx(logits: Array, recall_target: float = 0.95) -> Array:
  """CALM ``softmax_diff_approx``: the top-2 gap from ``jax.lax.approx_max_k``.

  TPU-friendly (partial reduction); on CPU/GPU it falls back to an exact top-k.
  When the approximate search misses the true top-2 the gap is computed from
  the two largest values it found. logits [..., V] -> [...].
  """
  z = _f32(logits)
  top2, _ = jax.lax.approx_max_k(z, 2, recall_target=recall_target)
  lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
  p = jnp.exp(top2 - lse)
  return p[..., 0] - p[..., 1]


def entropy_confidence(logits: Array) -> Array:
  """Entropy measure as a confidence: ``1 - H(softmax z) / log V`` in [0, 1].

  Entropy-based exiting (DeeBERT, Xin et al. 2020): low entropy means
  confident, so we normalise by the maximum entropy and flip the sign.
  logits [..., V] -> [...].
  """
  z = _f32(logits)
  logp = jax.nn.log_softmax(z, axis=-1)
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return 1.0 - ent / jnp.log(jnp.float32(z.shape[-1]))


# ----------------------------------------------------------------------------
# Measures between consecutive exits.
# ----------------------------------------------------------------------------
def hidden_cosine(h_prev: Array, h_cur: Array, eps: float = 1e-8) -> Array:
  """CALM ``state``: cosine similarity of consecutive exits' hidden states.

  Per example over the last axis (fixes CALM's batch-global norm, §4.2-iv).
  ``h_prev``/``h_cur`` [..., d] -> [...] in [-1, 1]; 1 means the residual
  stream stopped changing direction (saturation). CALM gives the first exit
  confidence 0 (no previous state): pass ``first_exit_confidence`` yourself.
  """
  a, b = _f32(h_prev), _f32(h_cur)
  dot = jnp.sum(a * b, axis=-1)
  na = jnp.sqrt(jnp.sum(a * a, axis=-1))
  nb = jnp.sqrt(jnp.sum(b * b, axis=-1))
  return dot / jnp.maximum(na * nb, eps)


def kl_divergence(logits_prev: Array, logits_cur: Array) -> Array:
  """KL(p_cur || p_prev) between consecutive exits' softmax distributions.

  Not one of CALM's or FREE's measures: a saturation test in the spirit of
  CALM's ``state`` measure, on the output distributions instead of states.

  logits [..., V] -> [...], >= 0, exactly 0 for identical logits.
  """
  lp = jax.nn.log_softmax(_f32(logits_prev), axis=-1)
  lc = jax.nn.log_softmax(_f32(logits_cur), axis=-1)
  return jnp.maximum(jnp.sum(jnp.exp(lc) * (lc - lp), axis=-1), 0.0)


def kl_confidence(logits_prev: Array, logits_cur: Array) -> Array:
  """``exp(-KL(p_cur || p_prev))`` in (0, 1]: 1 when consecutive exits agree."""
  return jnp.exp(-kl_divergence(logits_prev, logits_cur))


def consistency_labels(exit_logits: Array, final_logits: Array) -> Array:
  """Meta-classifier / BMM labels: ``argmax z^i == argmax z^L`` (bool [...]).

  FREE §2.1.2 item 4 and §2.1.5; CALM §2.2.6.
  """
  return jnp.argmax(exit_logits, axis=-1) == jnp.argmax(final_logits, axis=-1)


# ----------------------------------------------------------------------------
# Learned meta classifier.
# ----------------------------------------------------------------------------
class MetaClassifier(nn.Module):
  """Exit-state classifier: P(exit prediction == final prediction | h).

  ``hidden_dim == 0``: CALM's linear d->2 head with bias (§2.2.2 ``meta``).
  ``hidden_dim > 0``: FREE's MLP d->hidden (ReLU)->2 (§2.1.2 item 4; FREE uses
  hidden = d). Biases are on in both, at training and deploy time alike.
  Input h [..., d] -> logits [..., 2] (float32); class 1 = consistent.
  """
  hidden_dim: int = 0

  @nn.compact
  def __call__(self, h: Array) -> Array:
    x = _f32(h)
    if self.hidden_dim > 0:
      x = nn.relu(nn.Dense(self.hidden_dim, name="hidden")(x))
    return nn.Dense(2, name="out")(x)


def _module_from_params(params: Any) -> MetaClassifier:
  p = params["params"] if "params" in params else params
  hidden = p["hidden"]["kernel"].shape[-1] if "hidden" in p else 0
  return MetaClassifier(hidden_dim=int(hidden))


def meta_confidence(params: Any, h: Array) -> Array:
  """Meta-classifier confidence softmax(f(h))[..., 1]; h [..., d] -> [...].

  The architecture (linear or MLP) is read from ``params``. With logit-adjusted
  training the raw logits f(h) are the balanced-prior scores (Menon et al.
  2021); that is what FREE/CALM threshold at deploy time.
  """
  logits = _module_from_params(params).apply(
      params if "params" in params else {"params": params}, h)
  return jax.nn.softmax(logits, axis=-1)[..., 1]


def logit_adjusted_ce(logits: Array, labels: Array, log_prior: Array,
                      weights: Array | None = None, tau: float = 1.0) -> Array:
  """Logit-adjusted cross-entropy (FREE ``train_meta_cm_head``, §2.1.2 item 4).

  CE(softmax(f(x) + tau * log pi), y): the log class prior
  [log P(neg), log P(pos)] is added before the CE, which counters the label
  imbalance. logits [N, 2], labels [N] bool/int, weights [N] -> scalar mean.
  """
  adj = _f32(logits) + tau * log_prior
  ce = optax.softmax_cross_entropy_with_integer_labels(
      adj, labels.astype(jnp.int32))
  if weights is None:
    return jnp.mean(ce)
  w = _f32(weights)
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


@functools.partial(
    jax.jit, static_argnames=("hidden_dim", "num_steps", "batch_size", "tau",
                              "learning_rate", "weight_decay"))
def _train(states, labels, weights, key, *, hidden_dim, num_steps, batch_size,
           tau, learning_rate, weight_decay):
  model = MetaClassifier(hidden_dim=hidden_dim)
  init_key, step_key = jax.random.split(key)
  params = model.init(init_key, states[:1])
  n_valid = jnp.maximum(jnp.sum(weights), 1.0)
  p_pos = jnp.sum(weights * labels) / n_valid
  p_pos = jnp.clip(p_pos, 1e-4, 1 - 1e-4)  # never log(0) on one-class data
  log_prior = jnp.log(jnp.stack([1.0 - p_pos, p_pos]))
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)
  opt_state = tx.init(params)
  n = states.shape[0]

  def loss_fn(p, x, y, w):
    return logit_adjusted_ce(model.apply(p, x), y, log_prior, w, tau)

  def step(carry, k):
    p, o = carry
    if batch_size is None or batch_size >= n:
      x, y, w = states, labels, weights
    else:
      idx = jax.random.randint(k, (batch_size,), 0, n)
      x, y, w = states[idx], labels[idx], weights[idx]
    loss, g = jax.value_and_grad(loss_fn)(p, x, y, w)
    upd, o = tx.update(g, o, p)
    return (optax.apply_updates(p, upd), o), loss

  keys = jax.random.split(step_key, num_steps)
  (params, _), losses = jax.lax.scan(step, (params, opt_state), keys)
  return params, losses


def train_meta_classifier(
    states: Array,
    labels: Array,
    *,
    valid_mask: Array | None = None,
    hidden_dim: int = 0,
    num_steps: int = 300,
    batch_size: int | None = None,
    learning_rate: float = 1e-2,
    weight_decay: float = 0.0,
    tau: float = 1.0,
    seed: int = 0,
) -> tuple[Any, Array]:
  """Fits a ``MetaClassifier`` on a frozen model's exit states.

  FREE ``train_meta_cm_head`` (§2.1.2 item 4) / CALM ``loss_fn_meta_cls``
  (§2.2.6): the backbone is frozen (states are plain arrays, no gradient
  reaches the model), labels are 1 iff the exit's argmax equals the final
  layer's (see ``consistency_labels``), and the loss is the logit-adjusted CE
  with the class prior estimated from the (valid) labels.

  Args:
    states: exit hidden states [..., d]; leading dims are flattened.
    labels: bool [...], True = exit prediction agrees with the final one.
    valid_mask: optional bool [...]; False rows (padding) are ignored.
    hidden_dim: 0 = linear head (CALM), > 0 = MLP (FREE uses d).
    num_steps: AdamW steps, run in one jitted ``lax.scan``.
    batch_size: minibatch size sampled with replacement; None = full batch.
    learning_rate, weight_decay: AdamW settings.
    tau: logit-adjustment strength (1 = Menon et al.'s default, 0 = plain CE).
    seed: PRNG seed for init and minibatches.

  Returns:
    (params, losses): Flax variables for ``meta_confidence`` and the per-step
    training loss [num_steps].
  """
  x = _f32(states).reshape(-1, states.shape[-1])
  y = jnp.asarray(labels).reshape(-1).astype(jnp.float32)
  w = (jnp.ones_like(y) if valid_mask is None
       else jnp.asarray(valid_mask).reshape(-1).astype(jnp.float32))
  return _train(x, y, w, jax.random.key(seed), hidden_dim=int(hidden_dim),
                num_steps=int(num_steps), batch_size=batch_size,
                tau=float(tau), learning_rate=float(learning_rate),
                weight_decay=float(weight_decay))


# ----------------------------------------------------------------------------
# Name registry.
# ----------------------------------------------------------------------------
# Single-exit measures take ``logits``; pairwise ones take (prev, cur).
_MEASURES: dict[str, Callable[..., Array]] = {
    "softmax_max": softmax_max,
    "softmax_diff": softmax_margin,
    "softmax_diff_approx": softmax_margin_approx,
    "entropy": entropy_confidence,
    "state": hidden_cosine,
    "kl": kl_confidence,
    "meta": meta_confidence,
}
_ALIASES = {"top2_gap": "softmax_diff", "softmax_margin": "softmax_diff",
            "max_prob": "softmax_max", "cosine": "state"}
CONFIDENCE_MEASURES = tuple(_MEASURES)


def get_confidence_fn(name: str) -> Callable[..., Array]:
  """Measure by name (CALM's names plus ``entropy``, ``kl`` and aliases).

  Raises ValueError for unknown names instead of failing at trace time the
  way CALM's ``"softmax"`` default does (§4.2-i).
  """
  key = _ALIASES.get(name, name)
  if key not in _MEASURES:
    raise ValueError(f"unknown confidence measure {name!r}; valid: "
                     f"{sorted(set(_MEASURES) | set(_ALIASES))}")
  return _MEASURES[key]


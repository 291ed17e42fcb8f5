"""Pure train/eval steps for (distillation) uptraining, and their sharded jit.

``train_step(state, teacher_params, batch) -> (state, metrics)``:

  1. teacher forward (if ``teacher_params`` is not None and ``kd_weight != 0``)
     under ``jax.lax.stop_gradient``, outside ``value_and_grad``;
  2. student forward + ``distill_loss`` under ``jax.value_and_grad``;
  3. optimizer update (AdamW, clipping, optional MultiSteps accumulation).

``batch`` is the data pipeline's dict of int32 ``[B, T]`` arrays ``inputs,
targets, loss_mask, segment_ids, positions``. Compute dtype and remat come
from ``ModelConfig`` (``dtype``, ``remat``); params and optimizer state stay
in ``param_dtype`` (float32). ``state.step`` counts micro-steps (calls);
with ``grad_accum = k`` the weights change every k-th call.

Sharded use (MaxText ``jit_train_step`` / big_vision ``update_fn``)::

    p_sh = param_shardings(abstract_params(cfg), mesh, RULES["fsdp_tensor"])
    st_sh = train_state_shardings(cfg, ocfg, p_sh, mesh)
    state = jax.device_put(init_train_state(cfg, ocfg, params), st_sh)
    step = jit_train_step(make_train_step(cfg, ocfg), mesh, st_sh, t_sh,
                          batch_sharding(mesh))
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from recursive_lm.config import ModelConfig
from recursive_lm.nn.model import Transformer
from recursive_lm.training.exit_losses import ExitLossConfig
from recursive_lm.training.exit_objective import exit_train_loss
from recursive_lm.training.losses import KD_KINDS, distill_loss
from recursive_lm.training.optim import OptimConfig, lr_at, make_optimizer

Array = jax.Array
Batch = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """L = ce_weight * CE + kd_weight * KD_kd(teacher || student; temperature)."""
  ce_weight: float = 1.0
  kd_weight: float = 1.0
  kd: str = "forward_kl"
  temperature: float = 1.0
  z_loss: float = 0.0
  # Early-exit objective on top (training/exit_losses.py): an ExitLossConfig
  # or its dict; None trains the final exit only.
  exit: Any = None

  def __post_init__(self):
    if self.exit is not None and not isinstance(self.exit, ExitLossConfig):
      object.__setattr__(self, "exit", ExitLossConfig(**dict(self.exit)))
    if self.kd not in KD_KINDS:
      raise ValueError(f"LossConfig.kd={self.kd!r}; choose from {KD_KINDS}")
    if self.temperature <= 0:
      raise ValueError(f"LossConfig.temperature must be > 0, got {self.temperature}")


@flax.struct.dataclass
class TrainState:
  """Training state pytree.

  Attributes:
    params: student params (unboxed, ``param_dtype``).
    opt_state: optax state of ``make_optimizer(optim_cfg)``.
    step: int32 scalar, number of ``train_step`` calls (micro-steps).
    rng: typed PRNG key (split every step; reserved for dropout/sampling).
  """
  params: Any
  opt_state: Any
  step: Array
  rng: Array


def init_train_state(model_cfg: ModelConfig, optim_cfg: OptimConfig, params: Any,
                     seed: int = 0) -> TrainState:
  """Fresh state around ``params`` (boxed or unboxed). Jittable."""
  del model_cfg  # the state does not depend on it (kept for a uniform API)
  params = nn.meta.unbox(params)
  tx = make_optimizer(optim_cfg)
  return TrainState(params=params, opt_state=tx.init(params),
                    step=jnp.zeros((), jnp.int32), rng=jax.random.key(seed))


def _forward(model: Transformer, params: Any, batch: Batch) -> Array:
  """Logits [B, T, V] (compute dtype) for a pipeline batch."""
  return model.apply({"params": params}, batch["inputs"],
                     positions=batch.get("positions"),
                     segment_ids=batch.get("segment_ids"))["logits"]


def make_train_step(model_cfg: ModelConfig, optim_cfg: OptimConfig,
                    loss_cfg: LossConfig = LossConfig(),
                    teacher_cfg: ModelConfig | None = None
                    ) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
  """Returns the pure ``train_step(state, teacher_params, batch)``.

  Metrics (f32 scalars): loss, ce, kd, z_loss, ppl (= exp(ce), student),
  n_tokens, grad_norm (before clipping; of the micro-batch gradient), lr.
  """
  model = Transformer(model_cfg)
  teacher = Transformer(teacher_cfg or model_cfg)
  tx = make_optimizer(optim_cfg)
  lr = lr_at(optim_cfg)

  def train_step(state: TrainState, teacher_params: Any, batch: Batch):
    t_logits = None
    if teacher_params is not None and loss_cfg.kd_weight != 0:
      t_logits = jax.lax.stop_gradient(
          _forward(teacher, jax.lax.stop_gradient(teacher_params), batch))

    def loss_fn(params):
      if loss_cfg.exit is not None:  # the key is the one split off below
        return exit_train_loss(model_cfg, loss_cfg, params, batch, t_logits,
                               state.step, jax.random.split(state.rng)[1])
      logits = _forward(model, params, batch)
      return distill_loss(logits, t_logits, batch["targets"], batch["loss_mask"],
                          ce_weight=loss_cfg.ce_weight, kd_weight=loss_cfg.kd_weight,
                          kd=loss_cfg.kd, temperature=loss_cfg.temperature,
                          z_loss=loss_cfg.z_loss)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng, _ = jax.random.split(state.rng)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   lr=jnp.asarray(lr(state.step), jnp.float32))
    new = state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                        rng=rng)
    return new, metrics

  return train_step


def make_eval_step(model_cfg: ModelConfig) -> Callable[[Any, Batch], tuple[Array, Array]]:
  """Returns ``eval_step(params, batch) -> (sum NLL f32, n tokens f32)``.

  Held-out perplexity is ``exp(sum(nll) / sum(n))`` over all batches.
  """
  model = Transformer(model_cfg)

  def eval_step(params, batch):
    logits = _forward(model, params, batch).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    m = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum((lse - tgt) * m), jnp.sum(m)

  return eval_step


def train_state_shardings(model_cfg: ModelConfig, optim_cfg: OptimConfig,
                          param_shardings: Any, mesh: Mesh) -> TrainState:
  """A TrainState of NamedShardings: optimizer moments (and MultiSteps
  accumulators) follow their parameter's sharding; scalars are replicated."""
  from recursive_lm.sharding import abstract_params  # avoid import cycle
  abstract = jax.eval_shape(
      lambda p: init_train_state(model_cfg, optim_cfg, p),
      nn.meta.unbox(abstract_params(model_cfg)))
  rep = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(
      make_optimizer(optim_cfg), lambda _, s: s, abstract.opt_state, param_shardings,
      transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(params=param_shardings, opt_state=opt_sh, step=rep, rng=rep)


# On XLA:CPU, handing only the matmuls to YNNPACK (not its default set of
# fusion kinds) makes the distillation step of SmolLM2-135M ~1.13x faster
# (9.97 s -> 8.85 s at 4 x 256 tokens, results/bench_train.md): the activation
# transposes feeding the weight-gradient matmuls run ~10x faster (a [1024,
# 1536] transpose: 17 ms -> 1.7 ms in the profile). Decoding is faster with
# XLA's defaults (batch 8: 46 vs 53 ms per step), so only train steps use it.
_CPU_TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.lru_cache(maxsize=None)
def _cpu_options_supported() -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_TRAIN_OPTIONS).lower(
        jnp.float32(0)).compile()
    return True
  except Exception:  # pylint: disable=broad-except  # an XLA without the option
    return False


def train_compiler_options() -> dict:
  """XLA options for jitting a train step on the default backend ({} off CPU)."""
  if jax.default_backend() != "cpu" or not _cpu_options_supported():
    return {}
  return dict(_CPU_TRAIN_OPTIONS)


def jit_train_step(train_step: Callable, mesh: Mesh, state_shardings: TrainState,
                   teacher_shardings: Any, batch_sharding: NamedSharding) -> Callable:
  """``jax.jit`` with explicit shardings; the state (arg 0) is donated.

  ``teacher_shardings`` may be None when the step is called with
  ``teacher_params=None``. ``batch_sharding`` applies to every batch array.
  Metrics come back replicated. Compiler options: ``train_compiler_options()``.
  """
  rep = NamedSharding(mesh, P())
  return jax.jit(train_step,
                 in_shardings=(state_shardings, teacher_shardings, batch_sharding),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,),
                 compiler_options=train_compiler_options() or None)

"""Uptraining: losses (CE, KD), optimizer, pure train/eval steps and sharded jit."""
from recursive_lm.training.losses import (KD_KINDS, cross_entropy, distill_loss,
                                          kd_loss)
from recursive_lm.training.optim import (OptimConfig, decay_mask, lr_at,
                                         make_optimizer, schedule_fn)
from recursive_lm.training.train_step import (LossConfig, TrainState,
                                              init_train_state, jit_train_step,
                                              make_eval_step, make_train_step,
                                              train_compiler_options,
                                              train_state_shardings)

__all__ = [
    "KD_KINDS", "cross_entropy", "distill_loss", "kd_loss", "OptimConfig",
    "decay_mask", "lr_at", "make_optimizer", "schedule_fn", "LossConfig",
    "TrainState", "init_train_state", "jit_train_step", "make_eval_step",
    "make_train_step", "train_compiler_options", "train_state_shardings",
]

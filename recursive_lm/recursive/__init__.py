"""Recursive models from pretrained vanilla checkpoints (RRT / MoR conversion).

See ``recursive_lm.recursive.convert`` for the sharing schemes, initialisations,
non-divisible layer counts and the SVD-initialised per-loop LoRA.
"""
from recursive_lm.recursive.convert import (
    INITS, LORA_INITS, NONDIVISIBLE, SHARINGS, Step, convert, describe,
    init_indices, init_shared, layer_sources, lora_residual,
    normalize_lora_ranks, plan_for, slot_positions, svd_lora,
    unique_param_count)

__all__ = [
    "INITS", "LORA_INITS", "NONDIVISIBLE", "SHARINGS", "Step", "convert",
    "describe", "init_indices", "init_shared", "layer_sources", "lora_residual",
    "normalize_lora_ranks", "plan_for", "slot_positions", "svd_lora",
    "unique_param_count",
]

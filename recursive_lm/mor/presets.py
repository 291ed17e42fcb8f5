"""The MoR paper's model shapes (Table 6) as ``ModelConfig`` presets.

``paper_config("360m", n_r=3, variant="expert")`` gives the Middle-Cycle
1+10+1 layout looped 3 times with an expert-choice router (recursion-wise KV).
Layouts follow Table 6 / Sec. 2.5: when (L - 2) is not divisible by N_r the
paper *adds* layers (135M, N_r=3: 30 -> 32 effective) rather than dropping them.
These are not trained here; tests check the unique-parameter and FLOP counts.
"""
from __future__ import annotations

import dataclasses

from recursive_lm.config import ConfigError, DepthPlan, ModelConfig, RopeConfig, RouterConfig

SHAPES = {  # L, d_model, heads, kv heads, d_ff
    "135m": (30, 576, 9, 3, 1536),
    "360m": (32, 960, 15, 5, 2560),
    "730m": (26, 1536, 24, 8, 4096),
    "1.7b": (24, 2048, 32, 32, 8192),
}
# Middle-Cycle shared-block size per (size, N_r): 1 + block + 1 unique layers.
BLOCKS = {
    ("135m", 2): 14, ("135m", 3): 10, ("135m", 4): 7,
    ("360m", 2): 15, ("360m", 3): 10, ("360m", 4): 8,
    ("730m", 2): 12, ("730m", 3): 8, ("730m", 4): 6,
    ("1.7b", 2): 11, ("1.7b", 3): 8, ("1.7b", 4): 6,
}
VARIANTS = ("vanilla", "recursive", "expert", "token")


def paper_config(size: str = "360m", n_r: int = 3, variant: str = "expert",
                 kv: str = "recursion", **router_kw) -> ModelConfig:
  """A SmolLM-shaped vanilla / Middle-Cycle recursive / MoR config."""
  if size not in SHAPES:
    raise ConfigError(f"size {size!r}; choose from {sorted(SHAPES)}")
  if variant not in VARIANTS:
    raise ConfigError(f"variant {variant!r}; choose from {VARIANTS}")
  layers, d, h, hkv, ff = SHAPES[size]
  base = ModelConfig(vocab_size=49152, d_model=d, n_heads=h, n_kv_heads=hkv, d_ff=ff,
                     plan=DepthPlan.vanilla(layers), rope=RopeConfig(theta=10000.0),
                     tie_embeddings=True, max_seq_len=2048,
                     name=f"smollm-{size}-{variant}")
  if variant == "vanilla":
    return base
  plan = DepthPlan(prelude=1, block=BLOCKS[(size, n_r)], loops=n_r, coda=1)
  router = None
  if variant == "expert":
    router = RouterConfig(kind="expert", gate="sigmoid", alpha=0.1, kv=kv, **router_kw)
  elif variant == "token":
    router = RouterConfig(kind="token", gate="softmax", alpha=1.0, kv=kv,
                          balance_loss=0.1, z_loss=1e-3, **router_kw)
  return dataclasses.replace(base, plan=plan, router=router,
                             name=f"smollm-{size}-{variant}-nr{n_r}")


def non_embedding_params(cfg: ModelConfig) -> int:
  """Unique non-embedding parameters (layers, norms, router), from shapes only."""
  d, dh = cfg.d_model, cfg.head_dim
  layer = (2 * d * cfg.n_heads * dh + 2 * d * cfg.n_kv_heads * dh + 3 * d * cfg.d_ff
           + 2 * d)
  n = cfg.plan.unique_layers * layer + d
  rc = cfg.router
  if rc is not None:
    per = d if rc.router_type == "linear" else 2 * d * d + 2 * d
    n += per * (cfg.plan.loops if rc.kind == "expert" else 1) * (
        2 if rc.kind == "expert" and rc.aux_router else 1)
    if rc.kind == "token" and rc.router_type == "linear":
      n += d * (cfg.plan.loops - 1)  # w is [d, N]
  return n

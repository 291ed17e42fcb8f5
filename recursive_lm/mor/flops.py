"""FLOP accounting of the MoR paper (App. D, Kaplan-style).

Forward FLOPs of one sequence of ``T`` tokens = 2 x (matmul params applied,
per token that passes them) + attention QK^T and AV counted on the causal
lower triangle only (4 * pairs * heads * head_dim per layer); norms,
nonlinearities and recomputation are ignored; training = 3 x forward.

Recursion r of a MoR model processes k_r = max(1, floor(cap_r * T)) tokens
(token-choice is charged as if perfectly balanced, like the paper). With
recursion-wise caching attention at r covers the k_r(k_r+1)/2 pairs among
them; with recursive KV sharing (and hybrid) its k_r queries attend to
about T/2 keys each, and shared recursions skip the k/v projections
(hybrid recomputes them). The router adds 2 * d (linear) or 2 * (2d*d + 2d)
(MLP) per scored token. The embedding lookup is free; the LM head is
2 * V * d per token (tied or not).
"""
from __future__ import annotations

import math

from recursive_lm.config import ModelConfig
from recursive_lm.nn.model import LORA_SHAPES


def _layer_linear(cfg: ModelConfig, kv: bool = True) -> int:
  d, dh = cfg.d_model, cfg.head_dim
  q_o = 2 * d * cfg.n_heads * dh
  kv_p = 2 * d * cfg.n_kv_heads * dh if kv else 0
  lora = sum(r * (a + b) for t, r in cfg.lora.items()
             for a, b in [_lora_dims(cfg, t)])
  return q_o + kv_p + 3 * d * cfg.d_ff + lora


def _lora_dims(cfg, t):
  return LORA_SHAPES[t](cfg)


def _attn(cfg: ModelConfig, pairs: float) -> float:
  return 4.0 * pairs * cfg.n_heads * cfg.head_dim


def forward_flops(cfg: ModelConfig, seq_len: int) -> dict:
  """Forward FLOPs of one sequence: linear, attention, router, head, total."""
  t, p = seq_len, cfg.plan
  full_pairs = t * (t + 1) / 2
  unique = p.prelude + p.coda
  lin = 2.0 * t * unique * _layer_linear(cfg)
  att = unique * _attn(cfg, full_pairs)
  router = 0.0
  rc = cfg.router
  if rc is None:
    lin += 2.0 * t * p.loops * p.block * _layer_linear(cfg)
    att += p.loops * p.block * _attn(cfg, full_pairs)
  else:
    caps = rc.capacity_schedule(p.loops)
    ks = [max(1, int(math.floor(c * t + 1e-9))) for c in caps]
    d = cfg.d_model
    per_score = 2 * d if rc.router_type == "linear" else 2 * (2 * d * d + 2 * d)
    for r, k in enumerate(ks):
      shared = rc.kv == "share_first" and r > 0
      lin += 2.0 * k * p.block * _layer_linear(cfg, kv=not shared)
      pairs = k * (k + 1) / 2 if (rc.kv == "recursion" or r == 0) else k * (t + 1) / 2
      att += p.block * _attn(cfg, pairs)
      if rc.kind == "expert":
        router += (t if r == 0 else ks[r - 1]) * per_score
    if rc.kind == "token":
      router = t * per_score * p.loops / 1.0
  head = 2.0 * t * cfg.vocab_size * cfg.d_model
  total = lin + att + router + head
  return {"linear": lin, "attention": att, "router": router, "head": head,
          "total": total}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """3 x forward FLOPs / T (forward + backward)."""
  return 3.0 * forward_flops(cfg, seq_len)["total"] / seq_len


def kv_cache_fraction(cfg: ModelConfig) -> float:
  """KV entries of the shared block relative to caching every recursion."""
  rc = cfg.router
  if rc is None:
    return 1.0
  caps = rc.capacity_schedule(cfg.plan.loops)
  if rc.kv == "share_first":
    return caps[0] / cfg.plan.loops
  return sum(caps) / cfg.plan.loops

"""Model configuration: Llama-family shape plus a *depth plan*.

A depth plan describes every model in recursive_lm: ``prelude`` unique layers,
then a shared block of ``block`` layers looped ``loops`` times, then ``coda``
unique layers. A vanilla model is the plan with ``loops == 1`` (and, by
convention, ``prelude == coda == 0``, every layer in the "block").
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
KERNEL_LAYOUTS = ("in_out", "out_in", "panel")


class ConfigError(ValueError):
  """A configuration or checkpoint does not describe a model we can build."""


@dataclasses.dataclass(frozen=True)
class DepthPlan:
  prelude: int = 0
  block: int = 1
  loops: int = 1
  coda: int = 0

  def __post_init__(self):
    for name in ("prelude", "block", "loops", "coda"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 0:
        raise ConfigError(f"DepthPlan.{name} must be a non-negative int, got {v!r}")
    if self.block < 1 or self.loops < 1:
      raise ConfigError(
          f"DepthPlan needs block >= 1 and loops >= 1, got block={self.block}, "
          f"loops={self.loops}")

  @classmethod
  def vanilla(cls, n_layers: int) -> "DepthPlan":
    return cls(prelude=0, block=n_layers, loops=1, coda=0)

  @property
  def effective_depth(self) -> int:
    """Number of layer applications in one forward pass (unrolled depth)."""
    return self.prelude + self.block * self.loops + self.coda

  @property
  def unique_layers(self) -> int:
    return self.prelude + self.block + self.coda

  @property
  def is_vanilla(self) -> bool:
    return self.loops == 1

  def unrolled(self) -> list[tuple[str, int, int]]:
    """Static schedule: one (group, index_in_group, loop) per applied layer."""
    out = [("prelude", i, 0) for i in range(self.prelude)]
    out += [("block", k, n) for n in range(self.loops) for k in range(self.block)]
    out += [("coda", i, 0) for i in range(self.coda)]
    return out


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """RoPE frequencies; the scaling types of Llama-family ``config.json``."""
  theta: float = 10000.0
  scaling: str = "default"  # default | linear | dynamic | llama3 | yarn
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192
  beta_fast: float = 32.0
  beta_slow: float = 1.0

  def __post_init__(self):
    if self.scaling not in ("default", "linear", "dynamic", "llama3", "yarn"):
      raise ConfigError(
          f"unsupported rope scaling type {self.scaling!r}; supported: default, "
          "linear, dynamic, llama3, yarn")



ROUTER_KINDS = ("expert", "token")
ROUTER_TYPES = ("linear", "mlp")
ROUTER_GATES = ("sigmoid", "tanh", "identity", "softmax")
ROUTER_GATING = ("residual", "additive", "delta")
ROUTER_KV = ("recursion", "share_first", "hybrid")
ROUTER_IMPLS = ("gather", "dense")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """Mixture-of-Recursions routing over the shared block (``recursive_lm.mor``).

  kind: "expert" (each recursion picks the top-k of the previous recursion's
    tokens; capacities ``capacities[r] * T``) or "token" (one router picks each
    token's depth once, at the input of the first recursion).
  router_type: "linear" (bias-free, N(0, 0.02)) or "mlp" (hidden 2d, GELU).
  gate: expert g = alpha * {sigmoid, tanh, identity}(z / temperature);
    token g = alpha * {softmax, sigmoid}(z / temperature) over the N depths.
  gating: "residual" (paper Eq. 2.1: h + g * F(h), F includes the block's own
    residual), "additive" (h + F(h), no gate) or "delta" (MoD-style
    h + g * (F(h) - h)).
  kv: "recursion" (a depth's attention sees only the tokens routed to that
    depth), "share_first" (deeper recursions read the first recursion's KV)
    or "hybrid" (first-recursion KV overwritten by the active tokens' fresh KV).
  impl: "gather" (top-k tokens gathered at static capacities, Python loop over
    recursions) or "dense" (every token runs every recursion under masks,
    ``nn.scan``); both compute the same function.
  aux_loss: weight of the expert BCE on the main router's logits (0.001).
  aux_router: also train a router on detached states (used at decode when
    ``decode_with_aux_router``).
  z_loss / balance_loss: router z-loss, token-choice balancing loss.
  loss_free_bias: token-choice selection bias updated by the sign rule with
    step ``bias_update_rate`` after each optimizer step.
  decode_thresholds: causal expert decisions z > threshold per recursion
    (default 0, i.e. sigmoid(z) > 0.5); a recursion of capacity 1 takes all
    candidates, as in training.
  """
  kind: str = "expert"
  router_type: str = "linear"
  gate: str = "sigmoid"
  alpha: float = 0.1
  temperature: float = 1.0
  capacities: tuple[float, ...] | None = None
  gating: str = "residual"
  kv: str = "recursion"
  impl: str = "gather"
  aux_loss: float = 0.001
  aux_router: bool = False
  aux_router_loss: float = 1.0
  z_loss: float = 0.0
  balance_loss: float = 0.1
  loss_free_bias: bool = False
  bias_update_rate: float = 1e-3
  decode_thresholds: tuple[float, ...] | None = None
  decode_with_aux_router: bool = False

  def __post_init__(self):
    for name, ok in (("kind", ROUTER_KINDS), ("router_type", ROUTER_TYPES),
                     ("gate", ROUTER_GATES), ("gating", ROUTER_GATING),
                     ("kv", ROUTER_KV), ("impl", ROUTER_IMPLS)):
      if getattr(self, name) not in ok:
        raise ConfigError(f"RouterConfig.{name}={getattr(self, name)!r}; choose from {ok}")
    if self.kind == "expert" and self.gate == "softmax":
      raise ConfigError("expert-choice routers score one logit per token; use gate "
                        "sigmoid, tanh or identity (softmax is for token-choice)")
    if self.kind == "token" and self.gate not in ("softmax", "sigmoid"):
      raise ConfigError("token-choice gate must be 'softmax' or 'sigmoid'")
    if self.capacities is not None:
      object.__setattr__(self, "capacities", tuple(float(c) for c in self.capacities))
      caps = self.capacities
      if any(not 0 < c <= 1 for c in caps) or any(a < b for a, b in zip(caps, caps[1:])):
        raise ConfigError(f"capacities must be in (0, 1] and non-increasing, got {caps}")
    if self.decode_thresholds is not None:
      object.__setattr__(self, "decode_thresholds",
                         tuple(float(c) for c in self.decode_thresholds))
    if self.temperature <= 0:
      raise ConfigError(f"temperature must be > 0, got {self.temperature}")

  def capacity_schedule(self, loops: int) -> tuple[float, ...]:
    """cap_r for r = 1..loops; default (N_r - r + 1) / N_r."""
    if self.capacities is not None:
      return self.capacities
    return tuple((loops - r) / loops for r in range(loops))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  plan: DepthPlan
  head_dim: int | None = None
  norm_eps: float = 1e-5
  rope: RopeConfig = RopeConfig()
  tie_embeddings: bool = True
  max_seq_len: int = 2048
  # Per-loop LoRA ranks on the shared block, as ((target, rank), ...).
  lora_ranks: tuple[tuple[str, int], ...] = ()
  lora_scale: float = 1.0
  dtype: str = "float32"        # compute dtype
  # Rematerialisation of each loop of the shared block: "none", "full", or a
  # jax.checkpoint_policies name (e.g. "dots_with_no_batch_dims_saveable").
  remat: str = "none"
  # XLA unroll factor of the scan over loops: 0 (default) unrolls fully, 1 keeps
  # a rolled while loop. Same params and numerics; on an H200 the rolled loop
  # made a 15 x 2 distillation step 1.26x a vanilla 30-layer step, fully
  # unrolled 0.99x (results/gpu/gpu_bench_train_engines.md).
  loop_unroll: int = 0
  # Storage of dense kernels: "in_out" ([in, out], the default for training and
  # checkpoints), "out_in" or "panel" (decode-only layouts; see
  # nn.model.decode_layout). "panel" also stores a tied LM head as its own
  # panel kernel (``lm_head``) beside the embedding table.
  kernel_layout: str = "in_out"
  # Decode layout: q/k/v and gate/up stored as one concatenated kernel each
  # (fewer, larger matmuls). Checkpoints and training use separate kernels.
  fused_projections: bool = False
  param_dtype: str = "float32"
  # Token ids the checkpoint declares (None when unknown).
  bos_id: int | None = None
  eos_id: int | None = None
  pad_id: int | None = None
  name: str = "llama"
  # Mixture-of-Recursions router over the shared block (None: no routing).
  router: RouterConfig | None = None

  def __post_init__(self):
    if self.head_dim is None:
      if self.d_model % self.n_heads:
        raise ConfigError(
            f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
            "set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(
          f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
          " (grouped-query attention)")
    if self.kernel_layout not in KERNEL_LAYOUTS:
      raise ConfigError(f"kernel_layout must be one of {KERNEL_LAYOUTS}, got "
                        f"{self.kernel_layout!r}")
    for t, r in self.lora_ranks:
      if t not in LORA_TARGETS:
        raise ConfigError(f"unknown LoRA target {t!r}; choose from {LORA_TARGETS}")
      if r < 0:
        raise ConfigError(f"LoRA rank for {t!r} must be >= 0, got {r}")
    if self.router is not None:
      n = self.plan.loops
      for name in ("capacities", "decode_thresholds"):
        v = getattr(self.router, name)
        if v is not None and len(v) != n:
          raise ConfigError(f"router.{name} has {len(v)} entries; the plan has {n} loops")

  @property
  def n_layers(self) -> int:
    return self.plan.effective_depth

  @property
  def lora(self) -> dict[str, int]:
    return {t: r for t, r in self.lora_ranks if r > 0}

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    d = dict(d)
    d["plan"] = DepthPlan(**d["plan"])
    d["rope"] = RopeConfig(**d["rope"])
    d["lora_ranks"] = tuple(tuple(x) for x in d.get("lora_ranks", ()))
    if d.get("router") is not None:
      d["router"] = RouterConfig(**d["router"])
    return cls(**d)

  # --- Hugging Face config.json ---------------------------------------------
  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], source: str = "config.json"
                     ) -> "ModelConfig":
    """Builds a vanilla config from a Llama-family ``config.json`` dict."""
    arch = hf.get("model_type") or "?"
    archs = hf.get("architectures") or []
    if arch not in ("llama", "mistral", "qwen2") and "LlamaForCausalLM" not in archs:
      raise ConfigError(
          f"{source}: model_type={arch!r} architectures={archs} is not a Llama-family "
          "decoder; recursive_lm imports model_type 'llama' (SmolLM/SmolLM2, TinyLlama, "
          "Llama-2/3 style checkpoints)")
    missing = [k for k in ("vocab_size", "hidden_size", "num_attention_heads",
                           "intermediate_size", "num_hidden_layers") if k not in hf]
    if missing:
      raise ConfigError(f"{source}: missing required keys {missing}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise ConfigError(f"{source}: attention_bias/mlp_bias=True is not supported "
                        "(Llama checkpoints have no projection biases)")
    rs = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    theta = float(hf.get("rope_theta", (rs or {}).get("rope_theta", 10000.0)))
    rope = RopeConfig(theta=theta)
    if rs:
      kind = rs.get("rope_type", rs.get("type", "default"))
      rope = RopeConfig(
          theta=theta, scaling=kind, factor=float(rs.get("factor", 1.0)),
          low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
          high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
          original_max_position=int(rs.get(
              "original_max_position_embeddings",
              hf.get("max_position_embeddings", 8192))),
          beta_fast=float(rs.get("beta_fast", 32.0)),
          beta_slow=float(rs.get("beta_slow", 1.0)))
    n_heads = int(hf["num_attention_heads"])

    def _first(x):
      return x[0] if isinstance(x, (list, tuple)) else x

    return cls(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        d_ff=int(hf["intermediate_size"]),
        head_dim=hf.get("head_dim"),
        plan=DepthPlan.vanilla(int(hf["num_hidden_layers"])),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope=rope,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        bos_id=_first(hf.get("bos_token_id")),
        eos_id=_first(hf.get("eos_token_id")),
        pad_id=_first(hf.get("pad_token_id")),
        name=str(hf.get("_name_or_path") or arch),
    )

  def to_hf_config(self) -> dict[str, Any]:
    """A ``config.json`` dict for the *unrolled* (vanilla) form of this model."""
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": self.vocab_size,
        "hidden_size": self.d_model,
        "intermediate_size": self.d_ff,
        "num_hidden_layers": self.plan.effective_depth,
        "num_attention_heads": self.n_heads,
        "num_key_value_heads": self.n_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": self.max_seq_len,
        "rms_norm_eps": self.norm_eps,
        "rope_theta": self.rope.theta,
        "tie_word_embeddings": self.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if self.rope.scaling != "default":
      r = self.rope
      d["rope_scaling"] = {
          "rope_type": r.scaling, "factor": r.factor,
          "low_freq_factor": r.low_freq_factor,
          "high_freq_factor": r.high_freq_factor,
          "original_max_position_embeddings": r.original_max_position,
          "beta_fast": r.beta_fast, "beta_slow": r.beta_slow}
    for k in ("bos_id", "eos_id", "pad_id"):
      v = getattr(self, k)
      if v is not None:
        d[k.replace("_id", "_token_id")] = v
    return d


def load_hf_config(folder: str | os.PathLike) -> ModelConfig:
  path = os.path.join(os.fspath(folder), "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"{path} not found: a Hugging Face model folder needs config.json")
  try:
    with open(path) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON ({e}); re-download or fix the file") from e
  return ModelConfig.from_hf_config(hf, source=path)


def tiny_config(**overrides) -> ModelConfig:
  """A tiny random-weight config for tests (vocab 97, d 32, 4 layers)."""
  base = dict(vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
              plan=DepthPlan.vanilla(4), max_seq_len=64, tie_embeddings=False,
              eos_id=1, bos_id=0, pad_id=0)
  base.update(overrides)
  return ModelConfig(**base)


SMOLLM2_135M = ModelConfig(
    vocab_size=49152, d_model=576, n_heads=9, n_kv_heads=3, d_ff=1536,
    plan=DepthPlan.vanilla(30), norm_eps=1e-5, rope=RopeConfig(theta=100000.0),
    tie_embeddings=True, max_seq_len=8192, bos_id=1, eos_id=2, pad_id=2,
    name="smollm2-135m")

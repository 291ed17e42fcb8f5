"""Llama-family building blocks in Flax Linen: RMSNorm, RoPE, GQA attention, SwiGLU.

Every parameter carries logical axis names (see ``recursive_lm.sharding``) so a
mesh and a rule preset are all sharding needs. Matmul kernels are stored
``[in, out]``; compute runs in ``cfg.dtype`` with norms and softmax in float32.

Attention runs in one of two modes:
* **sequence mode** (``cache is None``): attention among the tokens of the
  call, causal by index and restricted to equal ``segment_ids`` (packing).
* **cache mode**: the call's keys/values are scattered into a static-shape
  cache ``[B, Hkv, S, Dh]`` at per-token ``write_slots`` (slot == position;
  out-of-range slots are dropped, which is how padding writes nothing), then
  every query attends to the cache slots ``<=`` its own position. One primitive serves prefill,
  single-token decode, chunked verification and deferred deep passes.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig, RopeConfig
from recursive_lm.kernels import attention as native_attention
from recursive_lm.kernels import decode_ops
from recursive_lm.kernels.panel import PANEL, panel_matmul, panels_for

Array = jax.Array

# Logical axis names used by parameters and activations.
EMBED, VOCAB, HEADS, KV_HEADS, MLP = "embed", "vocab", "heads", "kv_heads", "mlp"
LOOPS, LORA_RANK = "loops", "lora_rank"


def _dtype(name: str):
  return jnp.dtype(name)


def param_with_axes(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


# --------------------------------------------------------------------------- RoPE
def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Inverse frequencies with the static scaling types of HF ``rope_scaling``."""
  inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if rope.scaling == "linear":
    inv = inv / rope.factor
  elif rope.scaling == "llama3":
    low_wl = rope.original_max_position / rope.low_freq_factor
    high_wl = rope.original_max_position / rope.high_freq_factor
    wl = 2 * math.pi / inv
    smooth = (rope.original_max_position / wl - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    scaled = np.where(wl > low_wl, inv / rope.factor, inv)
    mid = (wl <= low_wl) & (wl >= high_wl)
    inv = np.where(mid, (1 - smooth) * inv / rope.factor + smooth * inv, scaled)
  elif rope.scaling == "yarn":
    dim = head_dim

    def corr(n_rot):
      return (dim * math.log(rope.original_max_position / (n_rot * 2 * math.pi))) / (
          2 * math.log(rope.theta))

    low = max(math.floor(corr(rope.beta_fast)), 0)
    high = min(math.ceil(corr(rope.beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0, 1)
    extrap = 1 - ramp
    inv = (inv / rope.factor) * (1 - extrap) + inv * extrap
  return inv.astype(np.float32)


def rope_attention_scale(rope: RopeConfig) -> float:
  if rope.scaling == "yarn":
    return 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
  return 1.0


def rope_cos_sin(rope: RopeConfig, head_dim: int, positions: Array):
  """cos/sin of shape [B, T, head_dim] for integer ``positions`` [B, T]."""
  pos = positions.astype(jnp.float32)
  if rope.scaling == "dynamic":
    # HF dynamic NTK: grow the base once the sequence passes the original length.
    seq = jnp.maximum(jnp.max(positions) + 1, rope.original_max_position).astype(jnp.float32)
    base = rope.theta * ((rope.factor * seq / rope.original_max_position)
                         - (rope.factor - 1)) ** (head_dim / (head_dim - 2))
    inv = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  else:
    inv = jnp.asarray(rope_inv_freq(rope, head_dim))
  ang = pos[..., None] * inv  # [B, T, Dh/2]
  emb = jnp.concatenate([ang, ang], axis=-1)
  scale = rope_attention_scale(rope)
  # Computed once per call (on CPU through a native copy XLA cannot fuse):
  # otherwise XLA recomputes cos/sin per element inside every layer's and
  # head's RoPE fusion (~1 ms of a batch-8 decode step).
  return decode_ops.materialize(jnp.cos(emb) * scale), decode_ops.materialize(
      jnp.sin(emb) * scale)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotate-half RoPE (HF layout). x: [B, T, H, Dh]; cos/sin: [B, T, Dh]."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  rot = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (x.astype(jnp.float32) * cos + rot.astype(jnp.float32) * sin).astype(x.dtype)


# --------------------------------------------------------------------------- norm
class RMSNorm(nn.Module):
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],),
                            (EMBED,), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


# --------------------------------------------------------------------------- linear
class Linear(nn.Module):
  """Bias-free ``x @ kernel`` with logical axes, plus an optional LoRA delta.

  ``lora`` is ``(a [in, r], b [r, out])`` for the current loop, or None.
  """
  features: int
  axes: tuple[str, str]
  lora_scale: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  # "in_out" stores [in, out] (training default); "out_in" stores [out, in],
  # which makes batch-1 decoding a row-major GEMV (measured 30.5 vs 22.9 GB/s);
  # "panel" stores [ceil(out/32), in, 32] for the native decode matmul
  # (recursive_lm.kernels.panel), in float32, bfloat16 or int8 (+ scales).
  layout: str = "in_out"

  @nn.compact
  def __call__(self, x, lora=None):
    x = x.astype(self.dtype)
    if self.layout == "out_in":
      kernel = param_with_axes(self, "kernel", nn.initializers.normal(0.02),
                               (self.features, x.shape[-1]), self.axes[::-1],
                               self.param_dtype)
      y = jax.lax.dot_general(x, kernel.astype(self.dtype),
                              (((x.ndim - 1,), (1,)), ((), ())))
    elif self.layout == "panel":
      kernel = param_with_axes(self, "kernel", nn.initializers.normal(0.02),
                               (panels_for(self.features), x.shape[-1], PANEL),
                               (self.axes[1], self.axes[0], None), self.param_dtype)
      # The weight format is the kernel's dtype (decode_layout(weights=...)):
      # bf16 and int8 panels go to the kernel as they are; int8 also has a
      # per-output-column "kernel_scale" [P * 32].
      scale = (self.get_variable("params", "kernel_scale")
               if self.has_variable("params", "kernel_scale") else None)
      if kernel.dtype in (jnp.bfloat16, jnp.int8):
        y = panel_matmul(x, kernel, self.features, scale=scale).astype(self.dtype)
      else:
        y = panel_matmul(x, kernel.astype(self.dtype), self.features)
    else:
      kernel = param_with_axes(self, "kernel", nn.initializers.normal(0.02),
                               (x.shape[-1], self.features), self.axes, self.param_dtype)
      y = dense(x, kernel.astype(self.dtype))
    if lora is not None:
      a, b = lora
      y = y + dense(dense(x, a.astype(self.dtype)), b.astype(self.dtype)) * self.lora_scale
    return y


@jax.custom_vjp
def dense(x, w):
  """``x [..., in] @ w [in, out]``; the weight gradient is a plain [in, T] @ [T, out].

  Autodiff's weight gradient contracts the token dim of both operands, which
  XLA:CPU hands to Eigen instead of YNNPACK (~22 ms per [576, 1536] gradient,
  about half the matmul peak). On CPU the backward pass materialises x^T (one
  activation-sized copy) behind an optimization barrier so the gradient is a
  canonical matmul: the SmolLM2 distillation step went 8.61 -> 8.31 s
  (interleaved A/B, median of 8 steps each). Other platforms keep autodiff's form.
  """
  return x @ w


def _dense_fwd(x, w):
  return x @ w, (x, w)


def _dense_bwd(res, g):
  x, w = res
  k, n = w.shape
  x2, g2 = x.reshape(-1, k), g.reshape(-1, n)
  canonical = lambda x2, g2: jax.lax.optimization_barrier(x2.T) @ g2
  dw = jax.lax.platform_dependent(x2, g2, cpu=canonical, default=lambda x2, g2: x2.T @ g2)
  return g @ w.T, dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


# --------------------------------------------------------------------------- attention
def attention_mask(q_positions, segment_ids=None, kv_len=None, cache_mode=False):
  """Boolean mask [B, 1, 1, T, S] (broadcast over kv heads and group)."""
  if cache_mode:
    slots = jnp.arange(kv_len)
    m = slots[None, None, :] <= q_positions[:, :, None]  # [B, T, S]
  else:
    t = q_positions.shape[1]
    idx = jnp.arange(t)
    m = (idx[None, :] <= idx[:, None])[None]  # [1, T, T] causal by index
    if segment_ids is not None:
      same = segment_ids[:, :, None] == segment_ids[:, None, :]
      m = m & same & (segment_ids[:, None, :] != 0)
  return m[:, None, None]


def scatter_kv(cache: Array, new: Array, slots: Array) -> Array:
  """Writes new [B, T, Hkv, Dh] into cache [B, Hkv, S, Dh] at slots [B, T].

  Slots outside [0, S) are dropped (padding and masked-out tokens write nothing).
  The write goes through the flat [B*Hkv, S, Dh] view that the cached
  attention reads (``attend_cache``), so XLA updates the buffer in place and
  the attention consumes the scatter's result directly: with a [B, Hkv, ...]
  view, batch 1 makes XLA drop the unit dim for the matmul and duplicate the
  update into a second fusion, which costs whole-cache copies every step.
  """
  b, hkv, s, dh = cache.shape
  flat = cache.reshape(b * hkv, s, dh)
  rows = (jnp.arange(b)[:, None] * hkv + jnp.arange(hkv)[None])[:, None, :]  # [B,1,Hkv]
  flat = flat.at[rows, slots[:, :, None]].set(new.astype(cache.dtype), mode="drop")
  return flat.reshape(b, hkv, s, dh)


def attend_cache(q: Array, ck: Array, cv: Array, mask: Array, dtype) -> Array:
  """Attention of q [B, T, H, Dh] over a KV cache [B, Hkv, S, Dh]. Returns [B, T, H*Dh].

  Plain batched matmuls over the flat (B*Hkv) batch with the query group folded
  into rows: no transposed copy of the cache, no per-head loop. On CPU, f32
  decoding (up to ``MAX_NATIVE_QUERIES`` query rows) runs the same math in the
  native kernel of ``recursive_lm.kernels.attention``, which reads only the
  slots up to the last visible one.
  """
  b, t, h, dh = q.shape
  hkv, s = ck.shape[1], ck.shape[2]
  g = h // hkv
  q = q.reshape(b, t, hkv, g, dh).transpose(0, 2, 1, 3, 4).reshape(b * hkv, t * g, dh)
  k, v = ck.reshape(b * hkv, s, dh), cv.reshape(b * hkv, s, dh)
  mask = jnp.broadcast_to(mask.reshape(mask.shape[0], t, s), (b, t, s))
  fallback = lambda q, k, v, mask: _attend_flat(q, k, v, mask, hkv, dtype)
  if all(x.dtype == jnp.float32 for x in (q, k, v)) and native_attention.usable(b * t, dtype):
    out = native_attention.cache_attention(q, k, v, mask, fallback)
  else:
    out = fallback(q, k, v, mask)
  return out.reshape(b, hkv, t, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, h * dh)


def _attend_flat(q, k, v, mask, hkv, dtype):
  """XLA attention: q [B*Hkv, T*G, Dh], k/v [B*Hkv, S, Dh], mask [B, T, S]."""
  n, tg, dh = q.shape
  b, t, s = mask.shape
  scores = jnp.einsum("nqd,nsd->nqs", q, k.astype(dtype),
                      preferred_element_type=jnp.float32) / math.sqrt(dh)
  scores = jnp.where(mask.reshape(b, 1, t, 1, s), scores.reshape(b, hkv, t, tg // t, s),
                     jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(n, tg, s)
  return jnp.einsum("nqs,nsd->nqd", probs, v.astype(dtype))


def projections(module: nn.Module, cfg: ModelConfig, x, parts, fused_name, lora):
  """Several projections of the same input: separate kernels, or (decode layout,
  ``cfg.fused_projections``) one concatenated kernel whose output is split.
  Per-target LoRA deltas are added either way."""
  dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
  if not cfg.fused_projections:
    return [Linear(f, ax, cfg.lora_scale, dt, pdt, cfg.kernel_layout, parent=module,
                   name=n)(x, lora.get(n)) for n, f, ax in parts]
  total = sum(f for _, f, _ in parts)
  y = Linear(total, parts[0][2], 1.0, dt, pdt, cfg.kernel_layout, parent=module,
             name=fused_name)(x)
  outs, start = [], 0
  for n, f, _ in parts:
    o = y[..., start:start + f]
    start += f
    if lora.get(n) is not None:
      a, b = lora[n]
      xd = x.astype(dt)
      o = o + ((xd @ a.astype(dt)) @ b.astype(dt)) * cfg.lora_scale
    outs.append(o)
  return outs


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None, write_slots=None, lora=None,
               kv_hook=None, return_kv=False):
    """``kv_hook`` (sequence mode, optional): maps this call's post-RoPE (k, v)
    to the (k, v) attended to, e.g. another recursion's keys (MoR KV sharing);
    ``mask`` must then match the hook's key length. ``return_kv``: return the
    attended (k, v) in place of the (absent) cache in sequence mode."""
    cfg = self.cfg
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    h, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    lora = lora or {}
    lin = lambda feat, axes, name: Linear(feat, axes, cfg.lora_scale, dt, pdt,
                                         cfg.kernel_layout, name=name)
    b, t, _ = x.shape
    q, k, v = projections(self, cfg, x, (("q", h * dh, (EMBED, HEADS)),
                                         ("k", hkv * dh, (EMBED, KV_HEADS)),
                                         ("v", hkv * dh, (EMBED, KV_HEADS))), "qkv", lora)
    q, k, v = q.reshape(b, t, h, dh), k.reshape(b, t, hkv, dh), v.reshape(b, t, hkv, dh)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_cache = None
    if cache is not None:
      ck, cv = cache
      ck, cv = scatter_kv(ck, k, write_slots), scatter_kv(cv, v, write_slots)
      new_cache = (ck, cv)
      k, v = ck, cv
    elif kv_hook is not None:
      k, v = kv_hook(k, v)
    if return_kv and cache is None:
      new_cache = (k, v)
    g = h // hkv
    if cache is not None:
      out = attend_cache(q, k, v, mask, dt)
    else:
      q = q.reshape(b, t, hkv, g, dh)
      scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                          preferred_element_type=jnp.float32) / math.sqrt(dh)
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1).astype(dt)
      out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * dh)
    out = lin(cfg.d_model, (HEADS, EMBED), "o")(out, lora.get("o"))
    return out, new_cache


class SwiGLU(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, lora=None):
    cfg = self.cfg
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    lora = lora or {}
    lin = lambda feat, axes, name: Linear(feat, axes, cfg.lora_scale, dt, pdt,
                                         cfg.kernel_layout, name=name)
    gate, up = projections(self, cfg, x, (("gate", cfg.d_ff, (EMBED, MLP)),
                                          ("up", cfg.d_ff, (EMBED, MLP))), "gate_up", lora)
    return lin(cfg.d_model, (MLP, EMBED), "down")(jax.nn.silu(gate) * up, lora.get("down"))


class DecoderLayer(nn.Module):
  """Pre-norm Llama layer. Returns (h, new_cache)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h, cos, sin, mask, cache=None, write_slots=None, lora=None,
               kv_hook=None, return_kv=False):
    cfg = self.cfg
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    lora = lora or {}
    a, new_cache = Attention(cfg, name="attn")(
        RMSNorm(cfg.norm_eps, dt, pdt, name="attn_norm")(h), cos, sin, mask,
        cache, write_slots, lora, kv_hook, return_kv)
    h = h + a.astype(h.dtype)
    m = SwiGLU(cfg, name="mlp")(RMSNorm(cfg.norm_eps, dt, pdt, name="mlp_norm")(h), lora)
    return h + m.astype(h.dtype), new_cache

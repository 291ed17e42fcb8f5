"""The one model of recursive_lm: a Llama-family decoder described by a depth plan.

    tokens -> embed -> prelude layers -> [shared block of K layers] x N loops
           -> coda layers -> final norm -> LM head

The shared block runs under ``nn.scan`` over loops with its params broadcast
(every loop applies the same weights); per-loop pieces ride along as scanned
inputs: LoRA factors ``[N, ...]`` and an optional per-token loop mask
``[N, B, T]`` (a token whose mask is False at loop n passes through it
unchanged and writes no KV there). The KV cache of the block is ``[N, B, Hkv,
S, Dh]`` per layer and lives in the scan carry, so it is updated in place.
Layers inside a group are a Python loop over separately stored parameters:
on CPU, scanning stacked layer weights makes XLA copy each slice, which
halves decode speed (measured: 9.7 vs 16.2 GB/s effective at batch 1).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ConfigError, ModelConfig
from recursive_lm.kernels import decode_ops
from recursive_lm.kernels.panel import to_panels
from recursive_lm.nn import layers as L
from recursive_lm.nn import mor_block
from recursive_lm.nn.mor_routers import RouterBank
from recursive_lm.nn.cache import (KVCache, as_kv_cache, cache_length,  # noqa: F401
                                   init_cache)  # (re-exported)

Array = jax.Array

LORA_SHAPES = {  # target -> (d_in, d_out) as functions of cfg
    "q": lambda c: (c.d_model, c.n_heads * c.head_dim),
    "k": lambda c: (c.d_model, c.n_kv_heads * c.head_dim),
    "v": lambda c: (c.d_model, c.n_kv_heads * c.head_dim),
    "o": lambda c: (c.n_heads * c.head_dim, c.d_model),
    "gate": lambda c: (c.d_model, c.d_ff),
    "up": lambda c: (c.d_model, c.d_ff),
    "down": lambda c: (c.d_ff, c.d_model),
}
LORA_AXES = {"q": (L.EMBED, L.HEADS), "k": (L.EMBED, L.KV_HEADS),
             "v": (L.EMBED, L.KV_HEADS), "o": (L.HEADS, L.EMBED),
             "gate": (L.EMBED, L.MLP), "up": (L.EMBED, L.MLP),
             "down": (L.MLP, L.EMBED)}


class _LoopBody(nn.Module):
  """One application of the shared block (all K layers) for one loop."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, xs, cos, sin, mask, write_slots):
    h, cache, n = carry
    lora_n, loop_mask = xs
    h_in = h
    slots = write_slots
    if loop_mask is not None and write_slots is not None and cache is not None:
      # Tokens that skip this loop write no KV here (recursion-wise caching):
      # the cache's no-write slot S.
      slots = jnp.where(loop_mask, write_slots, cache[0][0].shape[3])
    new_cache = []
    for k in range(self.cfg.plan.block):
      c = None if cache is None else (cache[k][0][n], cache[k][1][n])
      lk = None if lora_n is None else lora_n.get(f"layer_{k}")
      h, c2 = L.DecoderLayer(self.cfg, name=f"layer_{k}")(
          h, cos, sin, mask, c, slots, lk)
      if cache is not None:
        new_cache.append((cache[k][0].at[n].set(c2[0]), cache[k][1].at[n].set(c2[1])))
    if loop_mask is not None:
      h = jnp.where(loop_mask[..., None], h, h_in)
    # Unused per-loop states are removed by scan's dead-code elimination.
    return (h, new_cache if cache is not None else None, n + 1), h


def _scanned_block(cfg: ModelConfig, name: str):
  body = _LoopBody
  if cfg.remat != "none":
    policy = None if cfg.remat == "full" else getattr(jax.checkpoint_policies, cfg.remat)
    body = nn.remat(_LoopBody, prevent_cse=False, policy=policy)
  return nn.scan(
      body, variable_broadcast="params", split_rngs={"params": False},
      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
      length=cfg.plan.loops, unroll=(cfg.plan.loops if cfg.loop_unroll <= 0
                                        else min(cfg.loop_unroll, cfg.plan.loops)))(
          cfg, name=name)


class LoraBank(nn.Module):
  """Per-loop LoRA factors for every shared-block layer: a [N, in, r], b [N, r, out]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self):
    cfg, n = self.cfg, self.cfg.plan.loops
    pdt = jnp.dtype(cfg.param_dtype)
    out = {}
    for k in range(cfg.plan.block):
      layer = {}
      for t, r in cfg.lora.items():
        d_in, d_out = LORA_SHAPES[t](cfg)
        ax_in, ax_out = LORA_AXES[t]
        a = L.param_with_axes(self, f"layer_{k}_{t}_a",
                              nn.initializers.normal(1.0 / max(d_in, 1) ** 0.5),
                              (n, d_in, r), (L.LOOPS, ax_in, L.LORA_RANK), pdt)
        b = L.param_with_axes(self, f"layer_{k}_{t}_b", nn.initializers.zeros,
                              (n, r, d_out), (L.LOOPS, L.LORA_RANK, ax_out), pdt)
        layer[t] = (a, b)
      out[f"layer_{k}"] = layer
    return out


class Transformer(nn.Module):
  """Decoder LM over a depth plan. See module docstring.

  ``__call__`` returns a dict with ``logits`` [B, T, V], ``cache`` (when one
  was given) and ``loop_states`` [N, B, T, D] (hidden state after each loop,
  when ``collect_loop_states``; exits apply ``head`` to them).
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=pdt,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (L.VOCAB, L.EMBED)))
    self.prelude = [L.DecoderLayer(cfg, name=f"prelude_{i}")
                    for i in range(cfg.plan.prelude)]
    if cfg.router is not None:  # Mixture-of-Recursions (nn.mor_block, recursive_lm.mor)
      self.block = mor_block.make_block(cfg, "block")
      self.router = RouterBank(cfg)
    else:
      self.block = _scanned_block(cfg, "block")
    self.coda = [L.DecoderLayer(cfg, name=f"coda_{i}") for i in range(cfg.plan.coda)]
    self.final_norm = L.RMSNorm(cfg.norm_eps, dt, pdt)
    if not cfg.tie_embeddings or cfg.kernel_layout == "panel":
      self.lm_head = L.Linear(cfg.vocab_size, (L.EMBED, L.VOCAB), 1.0, dt, pdt,
                              cfg.kernel_layout)
    if cfg.lora:
      self.lora = LoraBank(cfg)

  # -- pieces (also used by the decode engine through ``method=``) ------------
  def embed_tokens(self, tokens):
    table = self.embed.embedding
    if table.dtype != jnp.dtype(self.cfg.dtype):
      # A low-precision table (bf16/int8 decode layouts): gather the rows, then
      # convert them. nn.Embed converts the whole table first, which XLA hoists
      # out of the decode loop as a 113 MB f32 copy written on every generate
      # (and XLA's CPU backend does the same for a bf16 gather, which it runs
      # in f32), so the rows are gathered as 16-bit integers.
      # On CPU a bf16 table goes through one native call that reads only the
      # rows (the uint16 gather still copies the whole table once per call of
      # a jitted decode loop).
      def gather(table, tokens):
        bits = jax.lax.bitcast_convert_type(table, jnp.uint16)
        rows = jax.lax.bitcast_convert_type(jnp.take(bits, tokens, axis=0), table.dtype)
        return rows.astype(self.cfg.dtype)
      if jnp.dtype(self.cfg.dtype) == jnp.float32:
        return decode_ops.embed_rows(table, tokens, gather)
      return gather(table, tokens)
    return self.embed(tokens)

  def head(self, h):
    h = self.final_norm(h)
    if self.cfg.tie_embeddings and self.cfg.kernel_layout != "panel":
      return self.embed.attend(h)
    return self.lm_head(h)

  def layers(self, h, positions, segment_ids=None, cache=None, write_slots=None,
             loop_mask=None, collect_loop_states=False):
    return self._layers(h, positions, segment_ids, cache, write_slots, loop_mask,
                        collect_loop_states)[:3]

  def _layers(self, h, positions, segment_ids=None, cache=None, write_slots=None,
              loop_mask=None, collect_loop_states=False, routing=None):
    """Runs prelude, loops and coda. Returns (h, new_cache, loop_states)."""
    cfg = self.cfg
    cos, sin = L.rope_cos_sin(cfg.rope, cfg.head_dim, positions)
    cache_mode = cache is not None
    if cache_mode:
      cache = as_kv_cache(cache)
      if cfg.router is not None and cache.valid is None:
        raise ValueError("a MoR model's cache needs its per-recursion validity "
                         "(KVCache.valid); build it with init_cache(cfg, batch, length)")
    kv_len = cache.length if cache_mode else None
    mask = L.attention_mask(positions, segment_ids, kv_len, cache_mode)
    new_prelude, new_coda, valid = [], [], None
    for i, layer in enumerate(self.prelude):
      h, c = layer(h, cos, sin, mask, cache.prelude[i] if cache_mode else None,
                   write_slots)
      new_prelude.append(c)
    router_out = None
    if cfg.router is not None:
      if collect_loop_states:
        raise ValueError("collect_loop_states is not supported with a MoR router")
      h, block_cache, valid, router_out = mor_block.run(
          self, h, positions, segment_ids, cos, sin, mask, cache, write_slots,
          loop_mask, routing)
      states = None
    else:
      lora = self.lora() if cfg.lora else None
      carry = (h, list(cache.block) if cache_mode else None, jnp.zeros((), jnp.int32))
      (h, block_cache, _), states = self.block(carry, (lora, loop_mask), cos, sin,
                                               mask, write_slots)
    for i, layer in enumerate(self.coda):
      h, c = layer(h, cos, sin, mask, cache.coda[i] if cache_mode else None,
                   write_slots)
      new_coda.append(c)
    new = (KVCache(prelude=new_prelude, block=block_cache, coda=new_coda, valid=valid)
           if cache_mode else None)
    return (h, new,
            (states if collect_loop_states else None), router_out)

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None,
               write_slots=None, loop_mask=None, collect_loop_states=False,
               return_hidden=False, routing=None):
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is not None and write_slots is None:
      write_slots = positions
    h = self.embed_tokens(tokens)
    h, new_cache, states, router_out = self._layers(
        h, positions, segment_ids, cache, write_slots, loop_mask, collect_loop_states,
        routing)
    out: dict[str, Any] = {"logits": self.head(h)}
    if router_out is not None:
      out["router"] = router_out
    if cache is not None:
      out["cache"] = new_cache
    if collect_loop_states:
      out["loop_states"] = states
    if return_hidden:
      out["hidden"] = h
    return out


def init_params(cfg: ModelConfig, seed: int = 0, seq_len: int = 8):
  """Random parameters (unboxed) for ``cfg``."""
  model = Transformer(cfg)
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  variables = model.init(jax.random.key(seed), tokens)
  return nn.meta.unbox(variables["params"])


def to_kernel_layout(cfg: ModelConfig, params, layout: str):
  """(cfg, params) with every dense kernel stored in ``layout``.

  "in_out" <-> "out_in" transposes. "panel" (decode only, from either) also
  adds a panel copy of a tied embedding as ``lm_head``; it converts back to
  nothing else (keep the original params for training and export).
  """
  if layout == cfg.kernel_layout:
    return cfg, params
  if cfg.kernel_layout == "panel":
    raise ConfigError(f"panel kernels are decode-only and do not convert to {layout!r}; "
                      "convert the original in_out params instead")
  if layout == "panel":
    cfg, params = to_kernel_layout(cfg, params, "in_out")
    fix = lambda path, x: to_panels(x) if _is_kernel(path) else x
    params = jax.tree_util.tree_map_with_path(fix, params)
    if cfg.tie_embeddings:
      params = {**params, "lm_head": {"kernel": to_panels(params["embed"]["embedding"].T)}}
    return cfg.replace(kernel_layout="panel"), params
  fix = lambda path, x: x.T if _is_kernel(path) else x
  return (cfg.replace(kernel_layout=layout),
          jax.tree_util.tree_map_with_path(fix, params))


def _is_kernel(path) -> bool:
  return getattr(path[-1], "key", None) == "kernel"


def fuse_projections(cfg: ModelConfig, params):
  """(cfg, params) with q/k/v and gate/up kernels concatenated (decode layout)."""
  if cfg.fused_projections:
    return cfg, params
  if cfg.kernel_layout == "panel":
    raise ConfigError("fuse projections before converting to the panel layout "
                      "(nn.model.decode_layout does both in order)")
  axis = 1 if cfg.kernel_layout == "in_out" else 0

  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    if "attn" in tree and "mlp" in tree and "q" in tree["attn"]:
      attn, mlp = dict(tree["attn"]), dict(tree["mlp"])
      cat = lambda names, d: {"kernel": jnp.concatenate(
          [d.pop(n)["kernel"] for n in names], axis=axis)}
      attn["qkv"] = cat(("q", "k", "v"), attn)
      mlp["gate_up"] = cat(("gate", "up"), mlp)
      return {**tree, "attn": attn, "mlp": mlp}
    return {k: walk(v) for k, v in tree.items()}

  return cfg.replace(fused_projections=True), walk(params)


def decode_layout(cfg: ModelConfig, params, kernel_layout: str | None = None,
                  fuse: bool = False, weights: str = "f32"):
  """(cfg, params) for a decode engine: kernels in ``kernel_layout`` (None keeps
  them) and, with ``fuse``, q/k/v and gate/up concatenated; host arrays are
  moved to the device once. Every engine takes these options.

  ``weights`` is the format the weights are stored and streamed in:
  "f32"; "bf16" (panel layout: bf16 panels read by the native kernel with f32
  sums, norms, residual stream and KV cache staying f32; other layouts: the
  same model with ``dtype`` and ``param_dtype`` bfloat16, for XLA on other
  platforms); "int8" (panel layout only: int8 panels with a per-output-column
  scale ``kernel_scale``, quantized here from the f32/bf16 weights, the LM head
  included). With bf16 or int8 panels the embedding table, which decoding only
  gathers B rows from, is kept in bf16.
  """
  from recursive_lm.kernels import panel as P  # pylint: disable=g-import-not-at-top
  if weights not in P.WEIGHT_FORMATS:
    raise ConfigError(f"weights={weights!r} is not one of {'|'.join(P.WEIGHT_FORMATS)}")
  layout = kernel_layout or cfg.kernel_layout
  if weights == "int8" and layout != "panel":
    raise ConfigError("int8 weights are read by the native panel kernel: pass "
                      "kernel_layout='panel' (or use weights='bf16')")
  # Host (numpy) leaves would be copied to the device on every jitted call
  # (the embedded model's embedding table: 113 MB per generate call).
  params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, params)
  if fuse and kernel_layout == "panel" and cfg.kernel_layout != "panel":
    cfg, params = fuse_projections(*to_kernel_layout(cfg, params, "in_out"))
  if kernel_layout:
    cfg, params = to_kernel_layout(cfg, params, kernel_layout)
  if fuse:
    cfg, params = fuse_projections(cfg, params)
  if weights == "f32":
    return cfg, params
  if layout != "panel":  # bf16 XLA model
    cast = lambda x: (x.astype(jnp.bfloat16)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x)
    return (cfg.replace(dtype="bfloat16", param_dtype="bfloat16"),
            jax.tree_util.tree_map(cast, params))
  return cfg, _panels_in_format(params, weights)


def _panels_in_format(params, weights: str):
  """Panel kernels (float [P, in, 32]) -> bf16 paired panels or int8 panels +
  ``kernel_scale``; the embedding table -> bf16. bf16 panels are re-encoded
  from their values; int8 panels are kept."""
  from recursive_lm.kernels import panel as P  # pylint: disable=g-import-not-at-top

  def walk(tree, key=None):
    if not isinstance(tree, dict):
      if key == "embedding" and jnp.issubdtype(tree.dtype, jnp.floating):
        return tree.astype(jnp.bfloat16)
      return tree
    out = {}
    for k, v in tree.items():
      if (k == "kernel" and not isinstance(v, dict) and v.ndim == 3
          and v.shape[-1] == P.PANEL and jnp.issubdtype(v.dtype, jnp.floating)):
        plain = P.dequantized_panels(v)  # bf16 panels are paired; others plain
        if weights == "bf16":
          out[k] = P._pair_rows(plain.astype(jnp.bfloat16))  # pylint: disable=protected-access
        else:
          out[k], out["kernel_scale"] = P.int8_panels_from_panels(plain)
      elif k not in out:
        out[k] = walk(v, k)
    return out

  return walk(params)


def param_count(params) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))

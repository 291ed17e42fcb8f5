"""FREE synchronized parallel decoding, batched, static shapes (spec §2.1.3, §5.1-2).

One decode step for every row of the batch:

1. *Shallow step*: layers ``[0, e)`` on the new token (shallow KV is always
   complete), exit head, confidence ``c``.
2. *Decision*: the row's token exits iff ``c >= threshold``.
3. *Deferred deep pass* (``inplace.when``: skipped when no row needs it): layers
   ``[e, L)`` on the chunk ``[pending; current]`` of ``K_max + 1`` queries per
   row, at the true absolute positions ``pos - pending_len + j``, writing exact
   deep KV for the valid rows ``j <= pending_len`` (the rest write nothing).
   Afterwards every row's deep KV is complete up to its current token.
4. Rows that did not take the deep pass push their exit-layer state (raw
   residual, before the final norm) onto their pending buffer.

Per-row state (``FreeState``): ``pending_h [B, K_max, D]``, the shallow
confidence and argmax of each pending token (calibration pairs), and
``pending_len [B]``. The pending tokens of a row are always the consecutive
positions ``pos - pending_len .. pos - 1`` (everything since that row's last
deep pass), so their positions are derived, not stored.

Batch sync policies (``sync``):

* ``"any"`` (FREE-any): per-row exit decisions. The deep pass runs for the
  whole batch when any active row is not confident or has a full buffer.
  Every active row flushes its pending states *and its current token* through
  it (its deep KV becomes exact); confident rows still emit their shallow
  token. A row's tokens therefore do not depend on the other rows.
* ``"all"`` (CALM's batch-min rule): the batch exits only when every active
  row is confident; otherwise every active row emits the deep token.

Forced sync: an active, confident row whose buffer is full (``pending_len ==
K_max``) triggers the deep pass; its token is still emitted from the shallow
exit (it was confident). Counted in ``forced_syncs``.

Chunk width: by default every deep pass runs ``K_max + 1`` queries per row
(one compiled shape). ``buckets=(1, 2, 4, ..., K_max + 1)`` compiles one deep
branch per width and picks the smallest width that holds the longest active
``[pending; current]`` (``inplace.select_branch``), so short flushes cost less compute.

Adaptive threshold (FREE §2.1.5): at every deep pass, each active row with at
least one pending token contributes its ``pending_len + 1`` pairs (shallow
confidence, shallow argmax == deep argmax) to ``beta_mixture_update``; the
estimator's threshold is used from the next step on. Rows that went deep with
an empty buffer record nothing, as in FREE. This needs the deep logits of all
``K_max + 1`` chunk rows (one LM-head matmul each); without the adaptive
threshold only the current row goes through the head.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from recursive_lm.config import ModelConfig
from recursive_lm.nn import unrolled as D
from recursive_lm.decode.exit_rule import ExitRule
from recursive_lm.decode.inplace import select_branch, when
from recursive_lm.decode.sampling import argmax
from recursive_lm.nn.model import cache_length
from recursive_lm.early_exit.thresholds import (BetaMixtureConfig, BetaMixtureState,
                                                beta_mixture_init, beta_mixture_update)

Array = jax.Array
SYNC_POLICIES = ("any", "all")


@dataclasses.dataclass(frozen=True)
class FreeSpec:
  """Static settings of a FREE step.

  exit_layer: unrolled layer count of the shallow exit (1 <= e < L).
  k_max: pending-buffer size per row (the deep chunk has k_max + 1 queries).
  sync: "any" or "all" (module docstring).
  adaptive: BetaMixtureConfig for the adaptive threshold, None = fixed.
  """
  exit_layer: int
  k_max: int = 8
  sync: str = "any"
  adaptive: BetaMixtureConfig | None = None
  buckets: tuple[int, ...] | None = None

  @property
  def widths(self) -> tuple[int, ...]:
    """Compiled deep-chunk widths; the pass uses the smallest one holding every
    active row's [pending; current] (``inplace.select_branch``). Default: k_max + 1 only."""
    return self.buckets or (self.k_max + 1,)


class FreeState(NamedTuple):
  pending_h: Array      # [B, K, D] exit-layer states of pending tokens
  pending_conf: Array   # [B, K] their shallow confidences
  pending_arg: Array    # [B, K] their shallow argmax tokens
  pending_len: Array    # [B] int32
  bmm: BetaMixtureState


def free_init(cfg: ModelConfig, batch: int, spec: FreeSpec,
              bmm: BetaMixtureState | None = None) -> FreeState:
  k = spec.k_max
  if bmm is None:
    bmm = beta_mixture_init(spec.adaptive or BetaMixtureConfig())
  return FreeState(jnp.zeros((batch, k, cfg.d_model), jnp.dtype(cfg.dtype)),
                   jnp.zeros((batch, k), jnp.float32), jnp.zeros((batch, k), jnp.int32),
                   jnp.zeros((batch,), jnp.int32), bmm)


def _insert(buf: Array, plen: Array, x: Array) -> Array:
  """[B, K, ...] buffer + one slot, with x [B, ...] written at row b's plen."""
  pad = jnp.zeros((buf.shape[0], 1) + buf.shape[2:], buf.dtype)
  ext = jnp.concatenate([buf, pad], axis=1)
  return ext.at[jnp.arange(buf.shape[0]), plen].set(x.astype(buf.dtype))


def deep_pass(cfg: ModelConfig, params, spec: FreeSpec, cache, st: FreeState,
              h_cur: Array, conf_cur: Array, arg_cur: Array, pos: Array, active: Array,
              width: int | None = None, want_logits: bool = True):
  """Layers [e, L) on [pending; current] per row as one causal chunk of
  ``width`` (static, default k_max + 1) queries; every active row needs
  ``pending_len < width``.

  Returns (deep state of the current token [B, D], its deep logits [B, V] or
  None when not ``want_logits``, cache, bmm state).
  """
  b = st.pending_len.shape[0]
  width = width or spec.k_max + 1
  s = cache_length(cache)
  plen = st.pending_len
  j = jnp.arange(width, dtype=jnp.int32)[None]
  chunk = _insert(st.pending_h, plen, h_cur)[:, :width]       # [B, W, D]
  qpos = pos[:, None] - plen[:, None] + j                     # true positions
  valid = (j <= plen[:, None]) & active[:, None]
  slots = jnp.where(valid, qpos, s)                           # invalid: no write
  h, cache = D.run_layers(cfg, params, spec.exit_layer, cfg.plan.effective_depth,
                          chunk, qpos, cache, slots)
  rows = jnp.arange(b)
  bmm = st.bmm
  h_cur_deep = h[:, 0] if width == 1 else h[rows, plen]
  if spec.adaptive is None:
    return (h_cur_deep, D.head(cfg, params, h_cur_deep) if want_logits else None,
            cache, bmm)
  logits = D.head(cfg, params, h)                              # [B, W, V]
  deep_arg = argmax(logits)
  s_arg = _insert(st.pending_arg, plen, arg_cur)[:, :width]
  s_conf = _insert(st.pending_conf, plen, conf_cur)[:, :width]
  pairs = valid & (plen >= 1)[:, None]
  bmm, _ = beta_mixture_update(bmm, s_conf, s_arg == deep_arg, pairs, spec.adaptive)
  return h_cur_deep, logits[rows, plen], cache, bmm


def free_step(cfg: ModelConfig, params, spec: FreeSpec, rule: ExitRule, cache,
              tok: Array, pos: Array, active: Array, thr: Array, st: FreeState,
              forced: Array | None = None):
  """One FREE decode step (module docstring).

  rule: the bound ``ExitRule`` (its measure and, for the adaptive threshold,
  ``spec.adaptive``). tok, pos, active, thr: [B]; forced: [B] exit index
  table column (``ExitRule.decide``) or None. Returns (logits to sample from
  [B, V], exit index [B] (0 shallow, 1 deep), exit confidences [B, 2] (deep
  column NaN), cache, new FreeState, stats dict of int32 scalars).

  The full LM head runs once per emitted token with a head-free measure (on
  the state the row emits from); a softmax measure reads it at the shallow
  exit and, inside the deep branch only, at the full depth.
  """
  b, k = tok.shape[0], spec.k_max
  s = cache_length(cache)
  slots = jnp.where(active, pos, s)[:, None]
  h = D.embed(cfg, params, tok[:, None])
  h, cache = D.run_layers(cfg, params, 0, spec.exit_layer, h, pos[:, None], cache, slots)
  h_e = h[:, 0]
  h_x = rule.exit_state(0, h_e)  # what the head reads when the row exits (exit module)
  shallow_head = rule.needs_logits
  logits_s = D.head(cfg, params, h_x) if shallow_head else None
  conf = rule.confidence(h_e, logits_s)
  arg = argmax(logits_s) if spec.adaptive is not None else jnp.zeros((b,), jnp.int32)
  if spec.adaptive is not None:
    thr = jnp.broadcast_to(st.bmm.threshold, conf.shape)
  exits = rule.decide(0, conf, thr, forced)
  plen = st.pending_len
  full = plen >= k
  if spec.sync == "any":
    want_deep = active & ~exits
  else:  # "all": the batch exits together once every active row is confident
    want_deep = active & ~jnp.all(exits | ~active)
  need = jnp.any(want_deep | (active & full))

  def go_deep(width):
    def run(carry, pending_h, h_cur):
      _, cache, bmm = carry
      h_d, lg, cache, bmm = deep_pass(cfg, params, spec, cache,
                                      st._replace(bmm=bmm, pending_h=pending_h), h_cur,
                                      conf, arg, pos, active, width,
                                      want_logits=shallow_head)
      return ((h_d, lg) if shallow_head else h_d), cache, bmm
    return run

  # The deep pass runs in place on the cache (``inplace``: 0/1-trip loops; a
  # lax.cond/switch would copy the deep layers' cache every step). The chunk's
  # states go in as operands: closed over, XLA would hoist the first deep
  # layer's projections out of the loop and run them every step.
  z = jnp.zeros_like(h_e)
  carry = ((z, jnp.zeros_like(logits_s)) if shallow_head else z), cache, st.bmm
  widths = spec.widths
  ops = (st.pending_h, h_e)
  if len(widths) == 1:
    deep, cache, bmm = when(need, go_deep(widths[0]), carry, ops)
    width = jnp.where(need, widths[0], 0)
  else:
    longest = jnp.max(jnp.where(active, plen + 1, 1))
    bucket = jnp.searchsorted(jnp.asarray(widths, jnp.int32), longest)
    branch = jnp.where(need, bucket, -1)
    deep, cache, bmm = select_branch(branch, [go_deep(w) for w in widths], carry, ops)
    width = jnp.where(need, jnp.asarray(widths, jnp.int32)[jnp.clip(bucket, 0, len(widths) - 1)], 0)
  emit_deep = want_deep & need
  if shallow_head:
    logits = jnp.where(emit_deep[:, None], deep[1], logits_s)
  else:  # head-free measure: the one head, on the state each row emits from
    logits = D.head(cfg, params, jnp.where(emit_deep[:, None], deep, h_x))

  rows = jnp.arange(b)
  push = active & ~need
  new = FreeState(
      pending_h=st.pending_h.at[rows, jnp.where(push, plen, k)].set(
          h_e.astype(st.pending_h.dtype), mode="drop"),
      pending_conf=st.pending_conf.at[rows, jnp.where(push, plen, k)].set(conf, mode="drop"),
      pending_arg=st.pending_arg.at[rows, jnp.where(push, plen, k)].set(arg, mode="drop"),
      pending_len=jnp.where(need, jnp.where(active, 0, plen), plen + push),
      bmm=bmm)
  flushed = jnp.where(active, plen + (~emit_deep).astype(jnp.int32), 0)
  stats = {
      "deep_passes": need.astype(jnp.int32),
      "kv_catchup_tokens": jnp.where(need, jnp.sum(flushed), 0).astype(jnp.int32),
      "forced_syncs": (need & ~jnp.any(want_deep)).astype(jnp.int32),
      "deep_chunk_width": width.astype(jnp.int32),
  }
  exit_idx = emit_deep.astype(jnp.int32)
  confs = jnp.stack([conf, jnp.full_like(conf, jnp.nan)], axis=-1)
  return logits, exit_idx, confs, cache, new, stats

"""Self-speculation (lossless) and FREE-style exiting through trained exit modules.

``ExitSpeculativeEngine`` drafts with the frozen model's first ``E`` layers,
an exit module (``exits.modules``) and the vocabulary-shortlist head, and
checks with the full model in one chunked pass that reuses the draft's work
(the layer-E states of the drafted positions), as in
``decode.speculative`` but with

* an adaptive draft length: a row keeps drafting while the draft's confidence
  (shortlist max probability, or the head-free meta classifier) is >= ``tau``,
  up to ``max_draft`` tokens; the batch stops drafting when no row continues;
* two acceptance modes:
  - ``"verify"`` (lossless): accept the longest prefix the full model agrees
    with, then the full model's correction / bonus token. Greedy output is
    identical to plain greedy decoding.
  - ``"trust"`` (FREE): accept the confident drafts unchecked; the first
    unconfident position gets the full model's token from the deep pass over
    the stacked layer-E states (FREE's synchronised parallel decoding, exact
    deep KV). Lossy; ``agree`` counts emitted drafts equal to the full model's
    choice at that position (read from the same deep pass).

Every row keeps its own position pointer; rejected drafts leave stale KV
beyond it that the causal mask hides and later rounds overwrite. The engine
is a policy of ``decode.engine.decode_loop`` (the one generation loop; a
round is one step emitting 1..max_draft+1 tokens per row), with static shapes;
its conditional work (the last shallow step, the deep-pass width) runs as
copy-free 0/1-trip loops (``decode.inplace``).

Example::

    m = recursive_lm.api.load()
    es = recursive_lm.exits.artifact.load_exits(default_artifact_path(), m.cfg, m.params)
    eng = ExitSpeculativeEngine(m.cfg, m.params, es, exit_layer=8, max_draft=4, tau=0.5)
    out = eng.generate([ids], max_new_tokens=64)
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.decode import depth as D
from recursive_lm.decode.engine import (DecodeState, GenerateOutput, Policy, StepCtx, StepOut,
                                        decode_loop, prefill_step, prepare, token_ids,
                                        trim_rows)
from recursive_lm.decode.inplace import select_branch, when
from recursive_lm.decode.sampling import SamplingConfig
from recursive_lm.exits import modules as M
from recursive_lm.exits.artifact import ExitSet
from recursive_lm.exits.train import meta_logit
from recursive_lm.kernels.panel import panel_matmul, to_panels
from recursive_lm.nn.cache import cache_length, normalize_cache
from recursive_lm.nn.model import Transformer, decode_layout

Array = jax.Array
MODES = ("verify", "trust")
CONFIDENCES = ("maxprob", "meta")


@dataclasses.dataclass
class ExitDecodeOutput(GenerateOutput):
  drafted: int = 0       # draft tokens proposed by live rows
  accepted: int = 0      # of those, emitted
  agree: int = 0         # trust mode: emitted drafts equal to the full model's choice
  row_rounds: int = 0
  max_draft: int = 0
  exit_layer: int = 0
  mode: str = "verify"

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / max(self.drafted, 1)

  @property
  def tokens_per_round(self) -> float:
    return (self.new_tokens - len(self.tokens)) / max(self.row_rounds, 1)


class ExitSpeculativeEngine(Policy):
  """Drafts with layers [0, E) + exit module + shortlist head; see module docstring.

  Args:
    cfg, params: the frozen base model (e.g. ``api.load()``), original layout.
    exits: an ``ExitSet`` (``exits.artifact.load_exits``) made for this model.
    exit_layer: E, one of ``exits.exits``.
    max_draft: the most tokens drafted per round (>= 1).
    tau: draft while confidence >= tau (0 -> always ``max_draft``).
    mode: "verify" (lossless) or "trust" (FREE).
    confidence: "maxprob" (shortlist softmax max) or "meta" (head-free classifier).
    shortlist_size: use the first n shortlist ids (None: all).
    min_draft: 0 (verify only the leading confident drafts; an unconfident
      first draft makes the round a plain step) or 1 (always verify >= 1).
    kernel_layout, fuse: as for ``decode.engine.Engine`` (default: the panel
      layout with fused projections, the fastest measured decode layout).
  """

  def __init__(self, cfg: ModelConfig, params, exits: ExitSet, exit_layer: int,
               max_draft: int = 4, tau: float = 0.0, mode: str = "verify",
               confidence: str = "maxprob", shortlist_size: int | None = None,
               min_draft: int = 0,
               eos_id: int | None = None, pad_id: int | None = None,
               kernel_layout: str | None = "panel", fuse: bool = True, weights: str = "f32",
               check_model: bool = True):
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if confidence not in CONFIDENCES:
      raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
    if exit_layer not in exits.exits:
      raise ValueError(f"the exit artifact has no module at layer {exit_layer}; it has "
                       f"{sorted(exits.exits)}")
    if confidence == "meta" and exit_layer not in exits.meta:
      raise ValueError(f"the exit artifact has no meta classifier at layer {exit_layer}; "
                       f"use confidence='maxprob' (meta at {sorted(exits.meta)})")
    if not 1 <= exit_layer < cfg.plan.effective_depth:
      raise ValueError(f"exit_layer must lie in [1, {cfg.plan.effective_depth})")
    if min_draft not in (0, 1):
      raise ValueError(f"min_draft must be 0 or 1, got {min_draft}")
    self.min_draft = int(min_draft)
    if max_draft < 1:
      raise ValueError(f"max_draft must be >= 1, got {max_draft}")
    if check_model:
      exits.check_model(cfg, params)
    self.exit_layer, self.max_draft, self.tau = int(exit_layer), int(max_draft), float(tau)
    self.mode, self.confidence = mode, confidence
    ids = np.asarray(exits.shortlist[:shortlist_size] if shortlist_size else exits.shortlist)
    ws = jnp.asarray(exits.shortlist_weights(params, len(ids)), jnp.float32)   # [N, D]
    self.n_short = len(ids)
    self.shortlist = jnp.asarray(ids, jnp.int32)
    self.module = {k: jnp.asarray(v, jnp.float32) for k, v in exits.exits[exit_layer].items()}
    self.meta = ({k: jnp.asarray(v, jnp.float32) for k, v in exits.meta[exit_layer].items()}
                 if confidence == "meta" else None)
    self.norm_scale = jnp.asarray(params["final_norm"]["scale"], jnp.float32)
    cfg, params = decode_layout(cfg, params, kernel_layout, fuse, weights=weights)
    self.cfg, self.params = cfg, params
    self.panel = cfg.kernel_layout == "panel"
    self.ws = to_panels(ws.T) if self.panel else ws
    self.model = Transformer(cfg)
    self.eos_id, self.pad_id = token_ids(cfg, eos_id, pad_id)
    self._prefill = jax.jit(self._prefill_impl)
    self._generate = jax.jit(self._generate_impl, static_argnames=("max_new", "stop_at_eos"))
    self._ex = {"module": self.module, "ws": self.ws, "shortlist": self.shortlist,
                "scale": self.norm_scale, "meta": self.meta}

  # -- pieces -------------------------------------------------------------------
  def _prefill_impl(self, params, cache, tokens, lengths):
    last, cache = prefill_step(self.model, params, cache, tokens, lengths)
    return last, normalize_cache(cache)

  def _exit_token(self, ex, h):
    """Draft token ids [B] and confidence [B] from layer-E states h [B, D]."""
    y = M.final_norm({"final_norm": {"scale": ex["scale"]}}, M.apply_exit(ex["module"], h),
                     self.cfg.norm_eps)
    if self.panel:
      logits = panel_matmul(y, ex["ws"], self.n_short)
    else:
      logits = y @ ex["ws"].T
    arg = jnp.argmax(logits, -1)
    if self.confidence == "meta":
      conf = jax.nn.sigmoid(meta_logit(ex["meta"], h))
    else:
      conf = 1.0 / jnp.sum(jnp.exp(logits - jnp.max(logits, -1, keepdims=True)), -1)
    return ex["shortlist"][arg], conf

  def _draft(self, params, ex, cache, u, pos, done, tau):
    """Up to max_draft steps of layers [0, E) + exit. Returns (cache, Q [B,K,D],
    drafts [B,K], n [B] draft steps per row, n_conf [B] leading confident drafts)."""
    cfg, e, k = self.cfg, self.exit_layer, self.max_draft
    b = u.shape[0]
    s = cache_length(cache)

    def cond(st):
      i, _, _, active, _, _, _, _ = st
      return (i < k) & jnp.any(active)

    def body(st):
      i, cache, tok, active, q, drafts, n, n_conf = st
      p = (pos + i)[:, None]
      h = D.embed(cfg, params, tok[:, None])
      h, cache = D.run_layers(cfg, params, 0, e, h, p, cache,
                              jnp.where(active[:, None], p, s))
      nxt, conf = self._exit_token(ex, h[:, 0].astype(jnp.float32))
      q = jax.lax.dynamic_update_slice_in_dim(q, h.astype(q.dtype), i, axis=1)
      drafts = jax.lax.dynamic_update_slice_in_dim(drafts, nxt[:, None].astype(jnp.int32),
                                                   i, axis=1)
      n = n + active.astype(jnp.int32)
      ok = conf >= tau
      n_conf = n_conf + (active & ok).astype(jnp.int32)
      active = active & ok & (i + 1 < k)
      return i + 1, normalize_cache(cache), nxt.astype(jnp.int32), active, q, drafts, n, n_conf

    q = jnp.zeros((b, k, cfg.d_model), jnp.dtype(cfg.dtype))
    zb = jnp.zeros((b,), jnp.int32)
    st = (jnp.zeros((), jnp.int32), cache, u, ~done, q, jnp.zeros((b, k), jnp.int32), zb, zb)
    _, cache, _, _, q, drafts, n, n_conf = jax.lax.while_loop(cond, body, st)
    return cache, q, drafts, jnp.maximum(n, 1), n_conf

  def _deep_width(self, params, cache, chunk, pos, valid):
    """Layers [E, L) + head on chunk [B, W, D] at positions pos + j (valid: writes).
    Returns (cache, full-model argmax [B, W])."""
    s = cache_length(cache)
    w = chunk.shape[1]
    cpos = pos[:, None] + jnp.arange(w, dtype=jnp.int32)[None]
    chunk, cache = D.run_layers(self.cfg, params, self.exit_layer, self.cfg.plan.effective_depth,
                                chunk, cpos, cache, jnp.where(valid, cpos, s))
    logits = D.head(self.cfg, params, chunk).astype(jnp.float32)
    return normalize_cache(cache), jnp.argmax(logits, -1).astype(jnp.int32)

  def _deep(self, params, cache, chunk, pos, valid, rows):
    """``_deep_width`` on the narrowest width in (1, 2, 4, ..., W) that holds
    ``rows`` (the most valid rows of any row of the batch): a round whose
    drafts were all unconfident costs one plain step, not a W-row pass."""
    w = chunk.shape[1]
    widths = sorted({min(2 ** i, w) for i in range(w.bit_length() + 1)})

    def branch(wd):
      def f(carry, chunk, valid):
        c, t = self._deep_width(params, carry[0], chunk[:, :wd], pos, valid[:, :wd])
        return c, jnp.pad(t, ((0, 0), (0, w - wd)), constant_values=-1)
      return f

    idx = jnp.searchsorted(jnp.asarray(widths, jnp.int32), rows.astype(jnp.int32))
    idx = jnp.clip(idx, 0, len(widths) - 1)
    # A copy-free switch (decode/inplace.py): the branch's tokens ride in the
    # carry, and its inputs are operands so that no projection is hoisted.
    placeholder = jnp.full(chunk.shape[:2], -1, jnp.int32)
    return select_branch(idx, [branch(wd) for wd in widths],
                         (normalize_cache(cache), placeholder), (chunk, valid))

  def _round(self, params, ex, cache, u, pos, done, tau):
    """One draft + check round. Returns (cache, drafts [B,K], a [B] accepted,
    nxt [B], n [B] drafted, agree [B])."""
    cfg, e, k = self.cfg, self.exit_layer, self.max_draft
    s = cache_length(cache)
    cache, q, drafts, n_steps, n_conf = self._draft(params, ex, cache, u, pos, done, tau)
    j = jnp.arange(k + 1, dtype=jnp.int32)[None]
    live = ~done[:, None]
    if self.mode == "verify":
      # Drafts to check: every drafted token (min_draft=1) or only the leading
      # confident ones (min_draft=0: an unconfident first draft makes the round
      # a plain full-depth step on u).
      n = n_steps if self.min_draft == 1 else n_conf
      has = n > 0
      last = jnp.take_along_axis(drafts, jnp.maximum(n - 1, 0)[:, None], axis=1)   # x_n
      p = (pos + n)[:, None]

      def shallow_last(carry, last):
        cache = carry[1]
        h = D.embed(cfg, params, last)
        h, cache = D.run_layers(cfg, params, 0, e, h, p, cache,
                                jnp.where(live & has[:, None], p, s))
        return h.astype(q.dtype), normalize_cache(cache)

      h, cache = when(jnp.any(has & ~done), shallow_last,
                      (jnp.zeros_like(q[:, :1]), normalize_cache(cache)), (last,))
      chunk = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
      chunk = jnp.where(((j == n[:, None]) & has[:, None])[..., None], h, chunk)
      cache, target = self._deep(params, normalize_cache(cache), chunk, pos,
                                 live & (j <= n[:, None]),
                                 jnp.max(jnp.where(done, 0, n)) + 1)            # [B, K+1]
      ok = (drafts == target[:, :k]) & (j[:, :k] < n[:, None])
      a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
      nxt = jnp.take_along_axis(target, a[:, None], axis=1)[:, 0]
      agree = a
    else:
      n = n_steps
      cache, target = self._deep(params, cache, q, pos, live & (j[:, :k] < n[:, None]),
                                 jnp.max(jnp.where(done, 1, n)))                # [B, K]
      a = jnp.minimum(n_conf, n_steps - 1)
      nxt = jnp.take_along_axis(target, a[:, None], axis=1)[:, 0]
      agree = jnp.sum((drafts == target) & (j[:, :k] < a[:, None]), axis=1)
    return cache, drafts, a, nxt, n if self.mode == "verify" else a, agree

  # -- the policy (decode.engine.decode_loop) -----------------------------------
  max_emit = property(lambda self: self.max_draft + 1)
  stat_names = ("drafted", "accepted", "agree", "row_rounds")

  def step(self, params, cache, st: DecodeState, ctx: StepCtx) -> StepOut:
    """One round: draft while confident, check in one deep pass, emit the
    accepted drafts + the full model's token. ``params`` = (model params, exit
    pieces); ``ctx.threshold`` is tau."""
    params, ex = params
    cache, drafts, a, nxt, n, agree = self._round(params, ex, cache, st.tok, st.pos,
                                                  st.done, ctx.threshold)
    j = jnp.arange(self.max_draft + 1, dtype=jnp.int32)[None]
    padded = jnp.concatenate([drafts, drafts[:, :1]], axis=1)
    emit = jnp.where(j < a[:, None], padded, nxt[:, None])
    live = ~st.done
    w = lambda x: jnp.sum(jnp.where(live, x, 0), dtype=jnp.int32)
    stats = {"drafted": w(n), "accepted": w(a), "agree": w(agree),
             "row_rounds": jnp.sum(live, dtype=jnp.int32)}
    return StepOut(emit, jnp.where(live, a + 1, 0).astype(jnp.int32), cache, (), st.rng,
                   {}, stats)

  def _generate_impl(self, params, ex, cache, last_logits, lengths, tau, max_new,
                     stop_at_eos):
    ctx = StepCtx(max_new, SamplingConfig(), tau, None)
    st, _ = decode_loop(self, (params, ex), cache, last_logits, lengths, jax.random.key(0),
                        ctx, stop_at_eos, self.eos_id, self.pad_id)
    return st.out, st.n_out, st.step, tuple(st.stats[n] for n in self.stat_names)

  # -- public API ---------------------------------------------------------------
  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               tau: float | None = None, stop_at_eos: bool = True) -> ExitDecodeOutput:
    """Greedy generation of up to ``max_new_tokens`` per prompt (stops at EOS).

    In "verify" mode the tokens equal ``Engine(...).generate`` greedy tokens.
    ``tau`` overrides the constructor's threshold (no recompilation)."""
    # Drafts and the deep pass write up to max_draft + 1 slots past the last kept token.
    lengths, tokens, lens, cache = prepare(self.cfg, prompts, max_new_tokens, self.pad_id,
                                           extra_slots=self.max_draft + 2)
    t0 = time.perf_counter()
    last, cache = self._prefill(self.params, cache, tokens, lens)
    last.block_until_ready()
    t1 = time.perf_counter()
    out, n_out, rounds, stats = self._generate(
        self.params, self._ex, cache, last, lens, jnp.float32(self.tau if tau is None else tau),
        max_new=max_new_tokens, stop_at_eos=stop_at_eos)
    out, n_out = np.asarray(out), np.asarray(n_out)
    t2 = time.perf_counter()
    rows = trim_rows(out, n_out, stop_at_eos, self.eos_id)
    drafted, accepted, agree, row_rounds = (int(x) for x in stats)
    return ExitDecodeOutput(rows, lengths, t1 - t0, t2 - t1, int(rounds), drafted=drafted,
                            accepted=accepted, agree=agree, row_rounds=row_rounds,
                            max_draft=self.max_draft, exit_layer=self.exit_layer,
                            mode=self.mode)


# Settings used when the caller names none: the best measured configuration
# of the shipped artifact (results/bench_exits.md: exit 6, 3 drafts, tau 0.5: 0.99-1.11x at batch 1,
# below plain at batch 8); ``exits.info["recommended"]`` overrides.
DEFAULTS = {"exit_layer": 6, "max_draft": 3, "tau": 0.5}


def from_artifact(cfg: ModelConfig, params, path: str | None = None,
                  **overrides) -> ExitSpeculativeEngine:
  """The lossless self-speculative engine for ``speculative=True``.

  Loads the exit artifact at ``path`` (default: the one shipped for the
  embedded SmolLM2), checks it was made for this model and builds a "verify"
  engine with the artifact's recommended exit layer / draft length / tau
  (``overrides`` win). Raises ``ExitArtifactError`` (missing, truncated,
  mismatched): a caller that asked for speculation must surface it."""
  from recursive_lm.exits.artifact import default_artifact_path, load_exits  # pylint: disable=g-import-not-at-top
  es = load_exits(path or default_artifact_path(), cfg, params)
  kw = dict(DEFAULTS)
  kw.update(es.info.get("recommended", {}))
  kw.update(overrides)
  if kw["exit_layer"] not in es.exits:
    kw["exit_layer"] = sorted(es.exits)[0]
  return ExitSpeculativeEngine(cfg, params, es, mode="verify", check_model=False, **kw)


def default_engine_or_none(cfg: ModelConfig, params, path: str | None = None):
  """For the *default* generate path only: the speculative engine, or None
  (fall back to plain decoding) when no valid artifact matches this model."""
  from recursive_lm.exits.artifact import ExitArtifactError  # pylint: disable=g-import-not-at-top
  try:
    return from_artifact(cfg, params, path)
  except ExitArtifactError:
    return None

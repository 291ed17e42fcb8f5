"""Self-speculative decoding (LayerSkip §2.3.3 of the early-exit spec), batched.

The model drafts with its own first ``E`` unrolled layers (the shared final
norm + LM head on the layer-E residual state) and verifies with the full model
in one pass that reuses the draft's work:

1. **Draft** ``d`` tokens: layers ``[0, E)`` on the last accepted token ``u``
   and then on each draft token, writing their layer-<E KV as they go; the
   raw layer-E states go to an exit-query cache ``Q`` [B, d, D].
2. **Verify**: layers ``[0, E)`` on the last draft token only (completing the
   shallow KV), then layers ``[E, L)`` on the chunk ``[Q ; h^E(x_d)]`` of
   ``d + 1`` positions per row, in one call. This writes exact deep KV and gives
   full-model logits for every draft position plus a bonus position.
3. **Accept**: greedy (longest matching prefix + the full model's correction or
   bonus token; lossless w.r.t. full greedy decoding) or speculative sampling
   (accept ``x_i`` with probability ``min(1, p_i/q_i)``, resample the first
   rejection from ``normalize(max(0, p - q))``, bonus from ``p_{d+1}``), where
   ``p`` and ``q`` get the same temperature / top-k / top-p processing.
4. **Crop**: each row keeps its own position pointer ``pos`` (the slot of the
   last accepted, not yet processed token). Slots beyond it hold stale draft KV
   that the causal mask (slot <= query position) hides and later rounds
   overwrite, so rejection costs no copy.

Rows accept different numbers of tokens per round (ragged acceptance); every
row drafts ``d`` tokens per round under static shapes and finished rows
(EOS / ``max_new_tokens``) ride along without writing KV. All rounds run in
one jitted ``lax.while_loop``.

Example::

    cfg, params, tok = recursive_lm.api.load("...")   # or export.load_model
    eng = SelfSpeculativeEngine(cfg, params, draft_loops=1, draft_len=4)
    out = eng.generate([[1, 2, 3]], max_new_tokens=64)
    out.tokens, out.acceptance_rate, out.tokens_per_round
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.nn import unrolled as D
from recursive_lm.decode.engine import (DecodeState, GenerateOutput, Policy, StepCtx, StepOut,
                                        decode_loop, prefill_step, prepare, token_ids)
from recursive_lm.decode.sampling import SamplingConfig, argmax, sample
from recursive_lm.nn.cache import cache_length, normalize_cache
from recursive_lm.nn.model import Transformer, decode_layout

Array = jax.Array


@dataclasses.dataclass
class SpeculativeOutput(GenerateOutput):
  """``GenerateOutput`` plus self-speculation statistics.

  ``steps`` counts verification rounds (max over rows); ``row_rounds`` the
  rounds each live row took part in, summed over rows.
  """
  drafted: int = 0       # draft tokens proposed by live rows
  accepted: int = 0      # of those, accepted by verification
  row_rounds: int = 0
  draft_len: int = 0
  draft_layers: int = 0

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / max(self.drafted, 1)

  @property
  def tokens_per_round(self) -> float:
    """New tokens per row per verification round (the first token, which comes
    from prefill, is not counted)."""
    return (self.new_tokens - len(self.tokens)) / max(self.row_rounds, 1)


def sampling_probs(logits: Array, cfg: SamplingConfig) -> Array:
  """The distribution ``sample(logits, ., cfg)`` draws from, as probabilities.

  logits [..., V] -> float32 probs [..., V] (one-hot argmax when greedy).
  Mirrors ``decode.sampling.sample``: temperature, then top-k, then top-p.
  """
  z = logits.astype(jnp.float32)
  if cfg.greedy:
    return jax.nn.one_hot(jnp.argmax(z, axis=-1), z.shape[-1], dtype=jnp.float32)
  z = z / cfg.temperature
  neg = jnp.finfo(jnp.float32).min
  if cfg.top_k > 0:
    kth = jax.lax.top_k(z, cfg.top_k)[0][..., -1:]
    z = jnp.where(z < kth, neg, z)
  if cfg.top_p < 1.0:
    srt = jnp.flip(jnp.sort(z, axis=-1), axis=-1)
    probs = jax.nn.softmax(srt, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    keep = (cum - probs) < cfg.top_p
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    z = jnp.where(z < cutoff, neg, z)
  return jax.nn.softmax(z, axis=-1)


def resolve_draft_layers(cfg: ModelConfig, draft_layers: int | None,
                         draft_loops: int | None) -> int:
  """Unrolled draft depth E from ``draft_layers`` or ``draft_loops``."""
  total = cfg.plan.effective_depth
  if (draft_layers is None) == (draft_loops is None):
    raise ValueError("give exactly one of draft_layers= (unrolled layer count, "
                     f"1..{total - 1}) or draft_loops= (loops of the shared block, "
                     f"1..{cfg.plan.loops - 1})")
  if draft_loops is not None:
    if not 1 <= draft_loops <= cfg.plan.loops:
      raise ValueError(
          f"draft_loops={draft_loops} is outside the model's {cfg.plan.loops} "
          f"loop(s); choose 1..{max(cfg.plan.loops - 1, 1)}"
          + (" or, for a vanilla model, draft_layers=" if cfg.plan.loops == 1 else ""))
    return D.loop_exits(cfg)[draft_loops - 1]
  if not 1 <= draft_layers <= total:
    raise ValueError(f"draft_layers={draft_layers} is outside the model's {total} "
                     f"unrolled layers; choose 1..{total - 1} (draft_layers={total} "
                     "drafts with the full model, useful only for testing)")
  return int(draft_layers)


class SelfSpeculativeEngine(Policy):
  """Batched self-speculative generation for one model and parameter set.

  Args:
    cfg, params: the model, e.g. from ``recursive_lm.api.load(...)`` or
      ``recursive_lm.export.load_model(...)``.
    draft_layers: draft depth E as a count of unrolled layers (prelude, loops
      of the block, coda), 1 <= E < ``cfg.plan.effective_depth``.
    draft_loops: alternatively, draft with the prelude and this many loops of
      the shared block (E = ``decode.depth.loop_exits(cfg)[draft_loops - 1]``).
    draft_len: tokens drafted per round (d >= 1).
    eos_id, pad_id, kernel_layout, fuse: as for ``decode.engine.Engine``.
  """

  def __init__(self, cfg: ModelConfig, params, draft_layers: int | None = None,
               draft_loops: int | None = None, draft_len: int = 4,
               eos_id: int | None = None, pad_id: int | None = None,
               kernel_layout: str | None = None, fuse: bool = False, weights: str = "f32"):
    if draft_len < 1:
      raise ValueError(f"draft_len must be >= 1, got {draft_len}")
    self.draft_layers = resolve_draft_layers(cfg, draft_layers, draft_loops)
    self.draft_len = int(draft_len)
    cfg, params = decode_layout(cfg, params, kernel_layout, fuse, weights=weights)
    self.cfg, self.params = cfg, params
    self.model = Transformer(cfg)
    self.eos_id, self.pad_id = token_ids(cfg, eos_id, pad_id)
    self._prefill = jax.jit(self._prefill_impl)
    self._generate = jax.jit(self._generate_impl,
                             static_argnames=("max_new", "sampling", "stop_at_eos"))

  # -- jitted pieces -----------------------------------------------------------
  def _prefill_impl(self, params, cache, tokens, lengths):
    last, cache = prefill_step(self.model, params, cache, tokens, lengths)
    return last, normalize_cache(cache)

  def _draft(self, params, cache, u, pos, done, keys, sampling):
    """d draft steps through layers [0, E). Returns (cache, Q [B,d,D],
    draft tokens [B,d], draft logits [B,d,V])."""
    cfg, e = self.cfg, self.draft_layers
    s = cache_length(cache)

    def step(carry, xs):
      cache, tok = carry
      i, key = xs
      p = (pos + i)[:, None]
      h = D.embed(cfg, params, tok[:, None])
      h, cache = D.run_layers(cfg, params, 0, e, h, p, cache,
                              jnp.where(done[:, None], s, p))
      logits = D.head(cfg, params, h[:, 0])
      nxt = sample(logits, key, sampling)
      return (normalize_cache(cache), nxt), (h[:, 0], nxt, logits)

    idx = jnp.arange(self.draft_len, dtype=jnp.int32)
    (cache, _), (q_states, toks, logits) = jax.lax.scan(step, (cache, u), (idx, keys))
    sw = lambda x: jnp.swapaxes(x, 0, 1)
    return cache, sw(q_states), sw(toks), sw(logits)

  def _verify(self, params, cache, pos, done, q_states, last_draft):
    """Layers [0, E) on the last draft token, then [E, L) on [Q ; it]."""
    cfg, e, d = self.cfg, self.draft_layers, self.draft_len
    s = cache_length(cache)
    p = (pos + d)[:, None]
    h = D.embed(cfg, params, last_draft[:, None])
    h, cache = D.run_layers(cfg, params, 0, e, h, p, cache, jnp.where(done[:, None], s, p))
    chunk = jnp.concatenate([q_states.astype(h.dtype), h], axis=1)    # [B, d+1, D]
    cpos = pos[:, None] + jnp.arange(d + 1, dtype=jnp.int32)[None]
    chunk, cache = D.run_layers(cfg, params, e, cfg.plan.effective_depth, chunk, cpos,
                                cache, jnp.where(done[:, None], s, cpos))
    return normalize_cache(cache), D.head(cfg, params, chunk)      # [B, d+1, V]

  def _accept(self, drafts, q_logits, p_logits, key, sampling, forced=None):
    """Returns (accepted count a [B], next token after the accepted prefix [B]).
    ``forced`` [B, d] bool replaces the greedy acceptance test (benchmark)."""
    d = self.draft_len
    b = drafts.shape[0]
    if sampling.greedy or forced is not None:
      target = argmax(p_logits.astype(jnp.float32))
      ok = drafts == target[:, :d] if forced is None else forced
      a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
      return a, jnp.take_along_axis(target, a[:, None], axis=1)[:, 0]
    k_acc, k_res = jax.random.split(key)
    pp = sampling_probs(p_logits, sampling)                      # [B, d+1, V]
    qq = sampling_probs(q_logits, sampling)                      # [B, d, V]
    px = jnp.take_along_axis(pp[:, :d], drafts[..., None], axis=-1)[..., 0]
    qx = jnp.take_along_axis(qq, drafts[..., None], axis=-1)[..., 0]
    r = jax.random.uniform(k_acc, (b, d))
    ok = r * qx < px                                             # r < p/q
    a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    # Residual at the first rejection; q padded with 0 so a == d gives p_{d+1}.
    qq = jnp.concatenate([qq, jnp.zeros_like(qq[:, :1])], axis=1)
    pa = jnp.take_along_axis(pp, a[:, None, None], axis=1)[:, 0]
    qa = jnp.take_along_axis(qq, a[:, None, None], axis=1)[:, 0]
    res = jnp.maximum(pa - qa, 0.0)
    mass = jnp.sum(res, axis=-1, keepdims=True)
    res = jnp.where(mass > 0, res / jnp.maximum(mass, 1e-30), pa)
    tok = jax.random.categorical(k_res, jnp.log(res), axis=-1).astype(jnp.int32)
    return a, tok

  # -- the policy (decode_loop) -----------------------------------------------
  max_emit = property(lambda self: self.draft_len + 1)
  stat_names = ("drafted", "accepted", "row_rounds")

  def step(self, params, cache, st: DecodeState, ctx: StepCtx) -> StepOut:
    """One round: draft d tokens, verify them in one deep pass, accept a
    prefix; emits the accepted drafts + the verifier's token (a + 1)."""
    d, sampling = self.draft_len, ctx.sampling
    rng, k_draft, k_acc = jax.random.split(st.rng, 3)
    done, pos = st.done, st.pos
    cache, q_states, drafts, q_logits = self._draft(
        params, cache, st.tok, pos, done, jax.random.split(k_draft, d), sampling)
    cache, p_logits = self._verify(params, cache, pos, done, q_states, drafts[:, -1])
    f = (None if ctx.forced is None else jax.lax.dynamic_index_in_dim(
        ctx.forced, jnp.minimum(st.step, ctx.forced.shape[1] - 1), 1, False))
    a, nxt = self._accept(drafts, q_logits, p_logits, k_acc, sampling, f)
    j = jnp.arange(d + 1, dtype=jnp.int32)[None]
    padded = jnp.concatenate([drafts, drafts[:, :1]], axis=1)
    emit = jnp.where(j < a[:, None], padded, nxt[:, None])
    live = ~done
    stats = {"drafted": d * jnp.sum(live, dtype=jnp.int32),
             "accepted": jnp.sum(jnp.where(live, a, 0), dtype=jnp.int32),
             "row_rounds": jnp.sum(live, dtype=jnp.int32)}
    return StepOut(emit, jnp.where(live, a + 1, 0).astype(jnp.int32), cache, (), rng,
                   {}, stats)

  def _generate_impl(self, params, cache, last_logits, lengths, rng, forced, max_new,
                     sampling, stop_at_eos):
    ctx = StepCtx(max_new, sampling, jnp.float32(0), forced)
    st, _ = decode_loop(self, params, cache, last_logits, lengths, rng, ctx, stop_at_eos,
                        self.eos_id, self.pad_id)
    return st.out, st.n_out, st.step, tuple(st.stats[n] for n in self.stat_names)

  # -- public API --------------------------------------------------------------
  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               stop_at_eos: bool = True, forced=None) -> SpeculativeOutput:
    """Generates up to ``max_new_tokens`` per prompt (stopping at EOS per row).

    Greedy ``sampling`` reproduces ``Engine`` greedy decoding exactly (up to
    float ties); sampling draws from the full model's processed distribution.
    ``forced``: bool [B, max_new_tokens, draft_len], acceptance of draft token
    j at round r replayed from a table instead of tested (the forced-exit
    benchmark; the output is then the accepted drafts + the verifier's token).
    """
    # Drafts write up to d slots past the last kept token.
    lengths, tokens, lens, cache = prepare(self.cfg, prompts, max_new_tokens, self.pad_id,
                                           extra_slots=self.draft_len + 1)
    t0 = time.perf_counter()
    last, cache = self._prefill(self.params, cache, tokens, lens)
    last.block_until_ready()
    t1 = time.perf_counter()
    if forced is not None:
      forced = np.asarray(forced, bool)
      want = (len(prompts), max_new_tokens, self.draft_len)
      if forced.shape != want:
        raise ValueError(f"forced must be a bool table [batch, max_new_tokens, draft_len]"
                         f" = {list(want)}, got shape {list(forced.shape)}")
      forced = jnp.asarray(forced)
    out, n_out, rounds, stats = self._generate(
        self.params, cache, last, lens, jax.random.key(seed), forced,
        max_new=max_new_tokens,
        sampling=sampling, stop_at_eos=stop_at_eos)
    out, n_out = np.asarray(out), np.asarray(n_out)
    t2 = time.perf_counter()
    rows = [r[:n].tolist() for r, n in zip(out, n_out)]
    drafted, accepted, row_rounds = (int(x) for x in stats)
    return SpeculativeOutput(rows, lengths, t1 - t0, t2 - t1, int(rounds),
                             drafted=drafted, accepted=accepted, row_rounds=row_rounds,
                             draft_len=self.draft_len, draft_layers=self.draft_layers)

"""Early-exit decoding engine (FREE and CALM), batched, static shapes, one jit.

Example::

    eng = EarlyExitEngine(cfg, params, policy="free", threshold=0.8)
    out = eng.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)
    out.tokens, out.exit_index, out.confidence, out.avg_layers, out.deep_passes

    model = recursive_lm.api.load("smollm2-135m")
    eng = EarlyExitEngine.from_loaded(model, policy="calm", exits=[10, 20, 30])

Prompts are prefilled at full depth (all layers' KV exact) and the first new
token comes from the full model (exit index ``n - 1``, confidence NaN). Every
later token is produced by one decode step of the policy:

* ``policy="free"`` (``decode/free.py``): one shallow exit + full depth,
  synchronized parallel decoding with a per-row pending buffer, deferred exact
  deep KV, sync policies ``"any"``/``"all"``, forced sync when the buffer is
  full, optional adaptive Beta-mixture threshold (``threshold="adaptive"``).
* ``policy="calm"`` (``decode/calm.py``): every exit checked in order, per-row
  (or batch-min) exits, skipped layers' KV from the exit-layer state
  (``kv="propagate"``) or copied from the first loop (``kv="first_loop"``),
  oracle modes ``"cache"`` / ``"tokens"`` / ``"noisy_cache"`` for analysis.

Exits are unrolled layer counts (1-based: exit ``e`` reads the residual state
after ``e`` layers). Default: after each loop (``depth.loop_exits``) for a
recursive model; a vanilla model needs an explicit list. The full depth is
appended when missing. FREE uses the first exit as its shallow exit.

Thresholds: a token exits iff ``confidence >= threshold``; ``float("inf")``
never exits, ``0.0`` always exits (for the softmax measures). The threshold is
a traced argument: changing it per call does not recompile. ``schedule=
"decaying"`` applies CALM's position-decaying λ_t with t = the index of the new
token (0 = first new token) and N = ``max_new_tokens`` (fix of §4.2-ii).

Exit decisions are ``decode.exit_rule.ExitRule`` objects (measure x schedule);
each step is a policy of the one decode loop (``decode.engine.decode_loop``).

Compiled code is reused across calls with the same prompt bucket, batch size,
``max_new_tokens`` and sampling settings (``trace_count`` counts traces).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.nn import unrolled as D
from recursive_lm.decode.calm import KV_POLICIES, ORACLES, RULES, CalmSpec, calm_step
from recursive_lm.decode.engine import (DecodeState, GenerateOutput, Record, StepCtx,
                                        StepOut, decode_loop, prefill_step, prepare,
                                        token_ids)
from recursive_lm.decode.free import SYNC_POLICIES, FreeSpec, free_init, free_step
from recursive_lm.decode.sampling import SamplingConfig, sample
from recursive_lm.decode import exit_rule as X
from recursive_lm.early_exit.thresholds import BetaMixtureConfig, beta_mixture_init
from recursive_lm.nn.cache import normalize_cache
from recursive_lm.nn.model import Transformer, decode_layout

POLICIES = ("free", "calm")
SCHEDULES = ("fixed", "decaying")
_PAIRWISE = {"state", "kl"}


@dataclasses.dataclass
class EarlyExitOutput(GenerateOutput):
  """``GenerateOutput`` plus per-token exit records and counters.

  exits: the exit layer counts; ``exit_index[b][t]`` indexes into it.
  confidence[b][t]: the confidence of the last *checked* exit (for an exited
    token the one at its exit, >= threshold; for a full-depth token the last
    early exit checked, < threshold unless a batch rule overrode it); NaN for
    the first token (prefill).
  exit_confidences: [B, max_new, n_exits] raw records (NaN = not checked; the
    final exit is never checked).
  deep_passes / kv_catchup_tokens / forced_syncs: FREE counters (tokens whose
    deep KV was computed late by a deep pass; syncs caused only by full
    buffers). deep_query_rows: query rows the deep passes computed (batch x
    chunk width, padding included: the compute actually spent).
    pending_at_end: per-row pending tokens whose deep KV was never
    computed (generation ended).
  kv_filled_layers: CALM, (row, layer) KV entries filled by propagation/copy.
  threshold_final: λ after the call (the adaptive estimator's, or the base).
  cache / final_positions: the final KV cache and each row's next position
    (only with ``return_cache=True``).
  """
  exits: tuple[int, ...] = ()
  exit_index: list[list[int]] = dataclasses.field(default_factory=list)
  confidence: list[list[float]] = dataclasses.field(default_factory=list)
  exit_confidences: np.ndarray | None = None
  deep_passes: int = 0
  kv_catchup_tokens: int = 0
  forced_syncs: int = 0
  deep_query_rows: int = 0
  kv_filled_layers: int = 0
  pending_at_end: list[int] = dataclasses.field(default_factory=list)
  threshold_final: float = float("nan")
  cache: Any = None
  final_positions: np.ndarray | None = None

  @property
  def exit_layers(self) -> list[list[int]]:
    return [[self.exits[i] for i in row] for row in self.exit_index]

  @property
  def avg_layers(self) -> float:
    """Mean layers used per token produced by a decode step (the prefill
    token is excluded); the full depth when there is none."""
    used = [self.exits[i] for row in self.exit_index for i in row[1:]]
    return float(np.mean(used)) if used else float(self.exits[-1])

  @property
  def exit_fraction(self) -> float:
    """Fraction of decode-step tokens emitted before the final exit."""
    idx = [i for row in self.exit_index for i in row[1:]]
    return float(np.mean([i < len(self.exits) - 1 for i in idx])) if idx else 0.0


def _check_exits(cfg: ModelConfig, exits) -> tuple[int, ...]:
  depth = cfg.plan.effective_depth
  if exits is None:
    if cfg.plan.loops < 2:
      raise ValueError("a vanilla model has no loop exits; pass exits=[e1, e2, ...] "
                       f"(unrolled layer counts in [1, {depth}))")
    exits = D.loop_exits(cfg)
  exits = [int(e) for e in exits]
  if exits and exits[-1] != depth:
    exits.append(depth)
  if len(exits) < 2 or any(a >= b for a, b in zip(exits, exits[1:])) or exits[0] < 1:
    raise ValueError(f"exits must be strictly increasing layer counts in [1, {depth}] with "
                     f"at least one early exit below {depth}; got {exits}")
  if exits[-1] > depth:
    raise ValueError(f"exit {exits[-1]} is beyond the model's {depth} unrolled layers")
  return tuple(exits)


class ExitPolicy:
  """Decode policy of FREE and CALM (``decode_loop``): one token per row per
  step, its depth decided by the engine's ``ExitRule``."""
  max_emit = 1
  stat_names = ("deep_passes", "kv_catchup_tokens", "forced_syncs", "deep_chunk_width",
                "kv_filled_layers")

  def __init__(self, cfg: ModelConfig, spec, rule: X.ExitRule, n_exits: int, pad_id: int):
    self.cfg, self.spec, self.rule, self.n, self.pad_id = cfg, spec, rule, n_exits, pad_id
    self.is_free = isinstance(spec, FreeSpec)

  def init(self, batch):
    return free_init(self.cfg, batch, self.spec) if self.is_free else None

  def records(self):
    return {"idx": Record(-1, first=self.n - 1),
            "confs": Record(jnp.nan, (self.n,), jnp.float32)}

  def step(self, params, cache, st: DecodeState, ctx: StepCtx) -> StepOut:
    b = st.tok.shape[0]
    active = ~st.done
    t = st.step + 1  # index of the token this step emits
    thr = self.rule.thresholds(ctx.threshold, t, ctx.max_new, b)
    f = None if ctx.forced is None else jax.lax.dynamic_index_in_dim(ctx.forced, t, 1, False)
    fn = free_step if self.is_free else calm_step
    logits, e_idx, e_conf, cache, pstate, d = fn(self.cfg, params, self.spec, self.rule,
                                                 cache, st.tok, st.pos, active, thr,
                                                 st.pstate, f)
    rng, sub = jax.random.split(st.rng)
    new = jnp.where(active, sample(logits, sub, ctx.sampling), self.pad_id)
    recs = {"idx": jnp.where(active, e_idx, -1)[:, None],
            "confs": jnp.where(active[:, None], e_conf, jnp.nan)[:, None]}
    return StepOut(new[:, None], active.astype(jnp.int32), cache, pstate, rng, recs, d)


class EarlyExitEngine:
  """Batched early-exit generation for one model (module docstring).

  Args:
    cfg, params: the model (any depth plan; ``Transformer`` params).
    exits: unrolled layer counts of the exits (see module docstring).
    policy: "free" or "calm".
    confidence: a measure name from ``early_exit.confidence`` (softmax_diff,
      softmax_max, entropy, meta; CALM also state, kl) or a ``decode.exit_rule``
      ``Measure`` (e.g. ``Shortlist(token_ids)``). Head-free measures (meta,
      state, shortlist) make a non-exiting token pay only its exit check: the
      full head runs once per emitted token.
    threshold: float λ, or "adaptive" (FREE only: Beta-mixture estimator,
      initial λ = ``adaptive_config.init_threshold``; its state persists
      across ``generate`` calls, see ``reset_adaptive``).
    k_max, sync: FREE pending-buffer size and batch sync policy ("any"/"all").
    deep_buckets: FREE deep-chunk widths compiled as ``lax.switch`` branches,
      increasing and ending at k_max + 1 (e.g. (1, 2, 4, 9) for k_max=8);
      None = always k_max + 1.
    rule, kv, oracle: CALM exit rule ("per_row"/"batch_min"), skipped-layer
      KV ("propagate"/"first_loop"), oracle mode (None/"cache"/"tokens"/"noisy_cache", see ``decode/calm.py``).
    schedule, position_temp: "fixed" or CALM's "decaying" threshold.
    adaptive_config: ``BetaMixtureConfig`` for ``threshold="adaptive"``.
    meta_params: meta-classifier params for ``confidence="meta"``.
    exit_maps: one callable per exit (the full depth included) mapping the raw
      exit state to what the head reads when a row exits there (trained exit
      modules, ``recursive_lm.exits.early_exit``); None = the raw state.
    eos_id, pad_id, kernel_layout, fuse: as ``Engine``.
  """

  def __init__(self, cfg: ModelConfig, params, exits: Sequence[int] | None = None,
               policy: str = "free", confidence: str = "softmax_diff",
               threshold: float | str = 0.9, *, k_max: int = 8, sync: str = "any",
               deep_buckets: Sequence[int] | None = None,
               rule: str = "per_row", kv: str = "propagate", oracle: str | None = None,
               schedule: str = "fixed", position_temp: float = 4.0,
               adaptive_config: BetaMixtureConfig | None = None, meta_params=None,
               exit_maps: Sequence[Any] | None = None,
               eos_id: int | None = None, pad_id: int | None = None,
               kernel_layout: str | None = None, fuse: bool = False, weights: str = "f32"):
    if policy not in POLICIES:
      raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if policy == "free" and exits is None and cfg.plan.loops >= 2:
      exits = D.loop_exits(cfg)[:1]  # FREE: shallow exit after the first loop
    self.exits = _check_exits(cfg, exits)
    rule_measure = X.measure_from_name(confidence, meta_params)  # raises on bad names
    measure = ("state" if isinstance(rule_measure, X.StateCosine) else
               "kl" if isinstance(rule_measure, X.KLMeasure) else rule_measure.name)
    adaptive = None
    if isinstance(threshold, str):
      if threshold != "adaptive":
        raise ValueError(f"threshold must be a number or 'adaptive', got {threshold!r}")
      if policy != "free":
        raise ValueError("threshold='adaptive' calibrates on FREE's deep passes; use "
                         "policy='free' or a numeric threshold")
      adaptive = adaptive_config or BetaMixtureConfig()
      threshold = adaptive.init_threshold
    if policy == "free":
      if len(self.exits) != 2:
        raise ValueError(f"FREE has one shallow exit plus the full depth; got exits "
                         f"{list(self.exits)}. Pass exits=[e] or use policy='calm'")
      if measure in _PAIRWISE:
        raise ValueError(f"confidence={confidence!r} compares consecutive exits; FREE has "
                         "a single early exit. Use softmax_diff, softmax_max, entropy or meta")
      if sync not in SYNC_POLICIES:
        raise ValueError(f"sync must be one of {SYNC_POLICIES}, got {sync!r}")
      if not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"k_max must be a positive int, got {k_max!r}")
      if deep_buckets is not None:
        deep_buckets = tuple(int(w) for w in deep_buckets)
        if (not deep_buckets or deep_buckets[0] < 1 or deep_buckets[-1] != k_max + 1
            or any(a >= b for a, b in zip(deep_buckets, deep_buckets[1:]))):
          raise ValueError(f"deep_buckets must increase from >= 1 to k_max + 1 = "
                           f"{k_max + 1}, e.g. (1, 2, 4, {k_max + 1}); got {deep_buckets}")
      self.spec = FreeSpec(self.exits[0], k_max, sync, adaptive, deep_buckets)
    else:
      if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
      if kv not in KV_POLICIES:
        raise ValueError(f"kv must be one of {KV_POLICIES}, got {kv!r}")
      if kv == "first_loop" and cfg.plan.loops < 2:
        raise ValueError("kv='first_loop' reads the first loop's KV in deeper loops and "
                         "needs a recursive model (plan.loops >= 2); use kv='propagate'")
      if oracle not in ORACLES:
        raise ValueError(f"oracle must be one of {ORACLES}, got {oracle!r}")
      self.spec = CalmSpec(self.exits, rule, kv, oracle)
    cfg, params = decode_layout(cfg, params, kernel_layout, fuse, weights=weights)
    self.cfg, self.params = cfg, params
    self.policy, self.schedule, self.position_temp = policy, schedule, float(position_temp)
    self.threshold = float(threshold)
    self.adaptive = adaptive
    self.model = Transformer(cfg)
    self.eos_id, self.pad_id = token_ids(cfg, eos_id, pad_id)
    rule_ = X.make_rule(rule_measure, schedule, position_temp, adaptive)
    if exit_maps is not None:
      if len(exit_maps) != len(self.exits):
        raise ValueError(f"exit_maps needs one map per exit {list(self.exits)}, got "
                         f"{len(exit_maps)}")
      rule_ = dataclasses.replace(rule_, exit_maps=tuple(exit_maps))
    self.rule = rule_.bind(cfg, params)
    self.bmm_state = beta_mixture_init(adaptive or BetaMixtureConfig())
    self.exit_policy = ExitPolicy(cfg, self.spec, self.rule, len(self.exits), self.pad_id)
    self.trace_count = 0
    self._prefill = jax.jit(self._prefill_impl)
    self._generate = jax.jit(self._generate_impl,
                             static_argnames=("max_new", "sampling", "stop_at_eos"))

  @classmethod
  def from_loaded(cls, model, **kwargs) -> "EarlyExitEngine":
    """From ``recursive_lm.api.load(...)``'s ``LoadedModel``; kwargs as __init__."""
    return cls(model.cfg, model.params, **kwargs)

  def reset_adaptive(self) -> None:
    """Forget the adaptive threshold's accumulated calibration pairs."""
    self.bmm_state = beta_mixture_init(self.adaptive or BetaMixtureConfig())

  # -- jitted pieces ---------------------------------------------------------
  def _prefill_impl(self, params, cache, tokens, lengths):
    last, cache = prefill_step(self.model, params, cache, tokens, lengths)
    return last, normalize_cache(cache)

  def _generate_impl(self, params, cache, last_logits, lengths, rng, thr_base, pstate,
                     forced, max_new, sampling, stop_at_eos):
    self.trace_count += 1  # trace-time side effect: counts compilations
    ctx = StepCtx(max_new, sampling, thr_base, forced)
    st, cache = decode_loop(self.exit_policy, params, cache, last_logits, lengths, rng, ctx,
                            stop_at_eos, self.eos_id, self.pad_id, pstate=pstate)
    return (st.out, st.records["idx"], st.records["confs"], st.step + 1, cache, st.pos,
            st.pstate, st.stats)

  # -- public API ------------------------------------------------------------
  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               stop_at_eos: bool = True, threshold: float | None = None,
               return_cache: bool = False, forced=None) -> EarlyExitOutput:
    """Generates up to ``max_new_tokens`` per prompt (token id lists).

    ``threshold`` overrides the engine's λ for this call (no recompilation);
    not allowed with the adaptive threshold. ``return_cache`` keeps the final
    KV cache and positions on the output (tests, analysis). ``forced``: an
    int table [B, max_new_tokens] of exit indices (``exit_rule.
    forced_exit_table``): token t of row b also exits at exit i when ``i >=
    forced[b, t]`` (the forced-exit benchmark; column 0 is the prefill token).

    Timing: ``prefill_seconds``/``decode_seconds`` are wall-clock around the
    jitted calls with ``block_until_ready``; the first call for a new shape
    includes compilation, so benchmarks should call once to warm up.
    ``steps`` counts new tokens produced (max over rows, the prefill token
    included), i.e. decode steps + 1.
    """
    if threshold is not None and self.adaptive is not None:
      raise ValueError("this engine uses the adaptive threshold; build one with a numeric "
                       "threshold to override it per call")
    thr = self.threshold if threshold is None else float(threshold)
    b = len(prompts)
    lengths, tokens, lens, cache = prepare(self.cfg, prompts, max_new_tokens, self.pad_id)
    pstate = (free_init(self.cfg, b, self.spec, self.bmm_state) if self.policy == "free"
              else None)
    t0 = time.perf_counter()
    last, cache = self._prefill(self.params, cache, tokens, lens)
    last.block_until_ready()
    t1 = time.perf_counter()
    if forced is not None:
      forced = np.asarray(forced, np.int32)
      if forced.shape != (b, max_new_tokens):
        raise ValueError(f"forced must be an int table [batch, max_new_tokens] = "
                         f"{[b, max_new_tokens]}, got shape {list(forced.shape)}")
      forced = jnp.asarray(forced)
    res = self._generate(self.params, cache, last, lens, jax.random.key(seed),
                         jnp.float32(thr), pstate, forced, max_new=max_new_tokens,
                         sampling=sampling, stop_at_eos=stop_at_eos)
    out, idx, confs, steps, cache, pos, pstate, stats = jax.block_until_ready(res)
    t2 = time.perf_counter()
    out, idx, confs = np.asarray(out), np.asarray(idx), np.asarray(confs)
    if pstate is not None:
      self.bmm_state = pstate.bmm
    rows, rows_idx, rows_conf = [], [], []
    n = len(self.exits)
    for r in range(b):
      row = out[r].tolist()
      keep = int(steps)
      if stop_at_eos and self.eos_id is not None and self.eos_id in row[:keep]:
        keep = row.index(self.eos_id) + 1
      rows.append(row[:keep])
      rows_idx.append(idx[r, :keep].tolist())
      checked = np.minimum(idx[r, :keep], n - 2)
      rows_conf.append([float(confs[r, j, checked[j]]) for j in range(keep)])
    thr_final = (float(pstate.bmm.threshold) if self.adaptive is not None else thr)
    return EarlyExitOutput(
        tokens=rows, prompt_lengths=lengths, prefill_seconds=t1 - t0,
        decode_seconds=t2 - t1, steps=int(steps), exits=self.exits, exit_index=rows_idx,
        confidence=rows_conf, exit_confidences=confs,
        deep_passes=int(stats["deep_passes"]),
        kv_catchup_tokens=int(stats["kv_catchup_tokens"]),
        forced_syncs=int(stats["forced_syncs"]),
        deep_query_rows=int(stats["deep_chunk_width"]) * b,
        kv_filled_layers=int(stats["kv_filled_layers"]),
        pending_at_end=(np.asarray(pstate.pending_len).tolist() if pstate is not None
                        else [0] * b),
        threshold_final=thr_final,
        cache=cache if return_cache else None,
        final_positions=np.asarray(pos) if return_cache else None)

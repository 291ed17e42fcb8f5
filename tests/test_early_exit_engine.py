"""Early-exit decode engine (FREE and CALM): equivalences and KV exactness."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import DepthPlan, tiny_config
from recursive_lm.decode import depth as D
from recursive_lm.decode.early_exit import EarlyExitEngine
from recursive_lm.decode.engine import Engine
from recursive_lm.decode.sampling import SamplingConfig
from recursive_lm.api import LoadedModel
from recursive_lm.early_exit.thresholds import BetaMixtureConfig, decaying_threshold
from recursive_lm.nn.model import Transformer, cache_length, init_cache, init_params

INF = float("inf")
PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [11], [20, 21, 22]]
N_NEW = 10
MIXED = 1e-3  # about the median top-2 gap of the random model: mixed exits
REF_LEN = 32  # references pad sequences to one length (one compile, causal)


def _pad(seq):
  return jnp.asarray([list(seq) + [0] * (REF_LEN - len(seq))])


@functools.partial(jax.jit, static_argnums=(0, 3))
def _exit_logits(cfg, params, tokens, e):
  states, _ = D.hidden_states(cfg, params, tokens, [e])
  return D.head(cfg, params, states[0])


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _propagated_cache(cfg, params, tokens, e, s):
  """K/V of layers [e, L) projected from the teacher-forced exit-e states."""
  states, _ = D.hidden_states(cfg, params, tokens, [e])
  pos = jnp.arange(tokens.shape[1])[None]
  return D.propagate_kv(cfg, params, e, cfg.plan.effective_depth, states[0], pos,
                        init_cache(cfg, 1, s))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _ref_cache(cfg, params, tokens, s):
  pos = jnp.arange(tokens.shape[1])[None]
  return Transformer(cfg).apply({"params": params}, tokens, positions=pos,
                                cache=init_cache(cfg, 1, s))["cache"]


@pytest.fixture(scope="module")
def rec():
  """Recursive plan with prelude, coda and per-loop LoRA; exits [3, 5, 8]."""
  cfg = tiny_config(plan=DepthPlan(prelude=1, block=2, loops=3, coda=1),
                    lora_ranks=(("q", 4), ("v", 2), ("down", 3)), eos_id=None)
  params = init_params(cfg, seed=1)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if p[-1].key.endswith("_b") else x, params)
  return cfg, params, Engine(cfg, params).generate(PROMPTS, N_NEW).tokens


@pytest.fixture(scope="module")
def free(rec):
  cfg, params, _ = rec
  return EarlyExitEngine(cfg, params, policy="free", threshold=INF, k_max=3)


@pytest.fixture(scope="module")
def free_all(rec):
  cfg, params, _ = rec
  return EarlyExitEngine(cfg, params, policy="free", sync="all", threshold=INF, k_max=3)


@pytest.fixture(scope="module")
def calm(rec):
  cfg, params, _ = rec
  return EarlyExitEngine(cfg, params, policy="calm", threshold=INF)


def _full_cache(cfg, params, seq, s):
  """Teacher-forced full-depth KV of one token sequence (batch 1); slots past
  ``len(seq)`` hold padding and are never compared."""
  return _ref_cache(cfg, params, _pad(seq), s)


def _layer_kv(cfg, cache, i, row):
  """(K, V) [S, H, Dh] of unrolled layer i for one row."""
  group, k, n = cfg.plan.unrolled()[i]
  if group == "block":
    ck, cv = cache["block"][k]
    ck, cv = ck[n], cv[n]
  else:
    ck, cv = cache[group][k]
  return ck[row].swapaxes(0, 1), cv[row].swapaxes(0, 1)  # cache rows are [H, S, Dh]


# ---------------------------------------------------------------- never exit
def test_never_exit_reproduces_full_decoding(rec, free, free_all, calm):
  cfg, params, ref = rec
  for eng in (free, free_all, calm):
    out = eng.generate(PROMPTS, N_NEW)
    assert out.tokens == ref
    assert all(i == len(eng.exits) - 1 for row in out.exit_index for i in row)
    assert out.avg_layers == cfg.plan.effective_depth
  assert free.generate(PROMPTS, N_NEW).deep_passes == N_NEW - 1
  assert free.generate(PROMPTS, N_NEW, threshold=1.0).tokens == ref  # top-2 gap < 1
  for kw in (dict(policy="calm", oracle="cache"),):
    assert EarlyExitEngine(cfg, params, threshold=INF, **kw).generate(
        PROMPTS, N_NEW).tokens == ref, kw


def test_vanilla_plan_with_chosen_exits():
  cfg = tiny_config(plan=DepthPlan.vanilla(4), eos_id=None)
  params = init_params(cfg, seed=3)
  ref = Engine(cfg, params).generate(PROMPTS, N_NEW).tokens
  f = EarlyExitEngine(cfg, params, exits=[2], policy="free", threshold=INF, k_max=2)
  c = EarlyExitEngine(cfg, params, exits=[1, 3], policy="calm", threshold=INF)
  assert f.exits == (2, 4) and c.exits == (1, 3, 4)
  assert f.generate(PROMPTS, N_NEW).tokens == ref
  assert c.generate(PROMPTS, N_NEW).tokens == ref
  # The decode layouts of api.LoadedModel.engine: fused [out, in] or panel kernels.
  for layout in ("out_in", "panel"):
    fused = EarlyExitEngine(cfg, params, exits=[2], policy="free", threshold=INF, k_max=2,
                            kernel_layout=layout, fuse=True)
    assert fused.generate(PROMPTS, N_NEW).tokens == ref, layout
  # Exact deep KV after syncs on the vanilla plan too.
  out = f.generate(PROMPTS, N_NEW, threshold=MIXED, return_cache=True)
  _check_deep_kv(cfg, params, out)


# ---------------------------------------------------------------- FREE
def _static_exit_reference(cfg, params, prompt, first, n, e):
  """First token from the full model (prefill: ``first``), then argmax of exit e."""
  seq = list(prompt) + [first]
  for _ in range(n - 1):
    logits = _exit_logits(cfg, params, _pad(seq), e)
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_free_always_exit_equals_static_shallow_exit(rec, free):
  cfg, params, ref = rec
  out = free.generate(PROMPTS, N_NEW, threshold=0.0)
  for p, got, full in zip(PROMPTS, out.tokens, ref):
    assert got == _static_exit_reference(cfg, params, p, full[0], N_NEW, free.exits[0])
  assert all(row[1:] == [0] * (N_NEW - 1) for row in out.exit_index)
  assert out.avg_layers == free.exits[0]


def test_forced_sync_when_buffer_fills(free):
  out = free.generate(PROMPTS, N_NEW, threshold=0.0)
  k1 = free.spec.k_max + 1
  steps = N_NEW - 1  # decode steps (the first token comes from the prefill)
  assert out.deep_passes == out.forced_syncs == steps // k1
  assert out.kv_catchup_tokens == len(PROMPTS) * k1 * (steps // k1)
  assert out.pending_at_end == [steps % k1] * len(PROMPTS)


def _check_deep_kv(cfg, params, out):
  """Every layer's KV up to the last sync == teacher-forced full decoding."""
  s = cache_length(out.cache)
  depth = cfg.plan.effective_depth
  shallow = out.exits[0]
  for r, (p, toks) in enumerate(zip(PROMPTS, out.tokens)):
    fed = list(p) + toks[:-1]  # the last token is emitted, never fed
    assert out.final_positions[r] == len(fed)
    exact_until = len(fed) - out.pending_at_end[r]
    ref = _full_cache(cfg, params, fed, s)
    for i in range(depth):
      upto = len(fed) if i < shallow else exact_until
      for a, b in zip(_layer_kv(cfg, out.cache, i, r), _layer_kv(cfg, ref, i, 0)):
        np.testing.assert_allclose(a[:upto], b[:upto], atol=2e-5, err_msg=f"layer {i}")


def test_deferred_deep_pass_writes_sequential_kv(rec, free):
  cfg, params, _ = rec
  out = free.generate(PROMPTS, N_NEW, threshold=MIXED, return_cache=True)
  assert out.kv_catchup_tokens > 0 and out.deep_passes > 0
  _check_deep_kv(cfg, params, out)
  # Forced syncs only (always exit): every flush is a multi-token chunk.
  _check_deep_kv(cfg, params, free.generate(PROMPTS, N_NEW, threshold=0.0,
                                            return_cache=True))


def test_bucketed_deep_pass_equals_full_width(rec, free):
  cfg, params, _ = rec
  eng = EarlyExitEngine(cfg, params, policy="free", threshold=MIXED, k_max=3,
                        deep_buckets=(1, 2, 4))
  for thr in (MIXED, 0.0):
    ref = free.generate(PROMPTS, N_NEW, threshold=thr)
    out = eng.generate(PROMPTS, N_NEW, threshold=thr, return_cache=True)
    assert out.tokens == ref.tokens and out.exit_index == ref.exit_index
    assert out.deep_passes == ref.deep_passes
    assert ref.deep_query_rows == ref.deep_passes * len(PROMPTS) * 4
    _check_deep_kv(cfg, params, out)
  assert out.deep_query_rows == ref.deep_query_rows  # forced syncs: full width
  mixed = eng.generate(PROMPTS, N_NEW, threshold=MIXED)
  assert mixed.deep_query_rows < free.generate(PROMPTS, N_NEW, threshold=MIXED).deep_query_rows


def test_any_policy_rows_independent_of_batch(free):
  batch = free.generate(PROMPTS, N_NEW, threshold=MIXED)
  idx = np.array([row[1:] for row in batch.exit_index])
  assert (idx == 0).any() and (idx == 1).any()
  assert any(len(set(col)) > 1 for col in idx.T)  # rows disagreed at some step
  for r, p in enumerate(PROMPTS):
    alone = free.generate([p], N_NEW, threshold=MIXED)
    assert alone.tokens[0] == batch.tokens[r]
    assert alone.exit_index[0] == batch.exit_index[r]


def test_all_policy_exits_together(free_all):
  out = free_all.generate(PROMPTS, N_NEW, threshold=MIXED)
  idx = np.array([row[1:] for row in out.exit_index])
  assert all(len(set(col)) == 1 for col in idx.T)
  conf = np.array([row[1:] for row in out.confidence])
  for t in range(idx.shape[1]):  # the batch exits iff every row is confident
    assert (idx[0, t] == 0) == bool(np.all(conf[:, t] >= MIXED))


def test_recorded_exits_consistent_with_thresholds(free, calm):
  out = free.generate(PROMPTS, N_NEW, threshold=MIXED)
  for idx, conf in zip(out.exit_index, out.confidence):
    assert np.isnan(conf[0])
    for i, c in zip(idx[1:], conf[1:]):
      assert (i == 0) == (c >= MIXED)
  out = calm.generate(PROMPTS, N_NEW, threshold=MIXED)
  n = len(calm.exits)
  used = set()
  for r, idx in enumerate(out.exit_index):
    for t, i in enumerate(idx[1:], start=1):
      used.add(i)
      checked = out.exit_confidences[r, t]
      assert np.all(checked[:min(i, n - 1)] < MIXED)   # earlier exits were not confident
      assert np.all(np.isnan(checked[i + 1:]))          # later exits never ran
      if i < n - 1:
        assert checked[i] >= MIXED
  assert len(used) > 1


def test_adaptive_threshold_updates(rec):
  cfg, params, _ = rec
  bmc = BetaMixtureConfig(init_threshold=0.0, min_count=2.0, grid_lo=0.3)
  eng = EarlyExitEngine(cfg, params, policy="free", threshold="adaptive", k_max=3,
                        adaptive_config=bmc)
  out = eng.generate(PROMPTS, N_NEW)
  # The first deep pass is a forced sync of 3 full buffers: 3 x 4 pairs.
  assert out.deep_passes >= 1
  assert float(eng.bmm_state.count.sum()) >= len(PROMPTS) * 4
  assert int(eng.bmm_state.num_refits) >= 1
  assert out.threshold_final >= bmc.grid_lo  # moved off the initial 0.0
  # Later steps use it: nothing is that confident in a random model.
  later = eng.generate(PROMPTS, N_NEW)
  assert all(i == 1 for row in later.exit_index for i in row)
  eng.reset_adaptive()
  assert float(eng.bmm_state.count.sum()) == 0.0


# ---------------------------------------------------------------- CALM
def _check_propagated(cfg, params, out):
  """Layers past the first exit hold K/V projected from the exit-layer state
  of every decode-step token (not the first segment's or any other state)."""
  e0 = out.exits[0]
  s = cache_length(out.cache)
  for r, (p, toks) in enumerate(zip(PROMPTS, out.tokens)):
    fed = list(p) + toks[:-1]
    prop = _propagated_cache(cfg, params, _pad(fed), e0, s)
    gen = slice(len(p), len(fed))  # positions fed by decode steps
    for i in range(e0, cfg.plan.effective_depth):
      for a, b in zip(_layer_kv(cfg, out.cache, i, r), _layer_kv(cfg, prop, i, 0)):
        np.testing.assert_allclose(a[gen], b[gen], atol=2e-5)


def test_calm_propagates_the_exit_layer_state(rec, calm):
  """Always exit at the first exit: skipped layers' KV == K/V projected from the
  exit-layer state."""
  cfg, params, _ = rec
  out = calm.generate(PROMPTS, N_NEW, threshold=0.0, return_cache=True)
  _check_propagated(cfg, params, out)
  e0 = calm.exits[0]
  assert out.kv_filled_layers == len(PROMPTS) * (N_NEW - 1) * (
      cfg.plan.effective_depth - e0)


def test_calm_per_row_exits_independent_of_batch(calm):
  """Masked segment compute + in-loop propagation for rows that already exited
  leave the other rows untouched: batch == each row alone."""
  batch = calm.generate(PROMPTS, N_NEW, threshold=MIXED)
  idx = np.array([row[1:] for row in batch.exit_index])
  assert any(len(set(col)) > 1 for col in idx.T)  # rows left at different exits
  for r, p in enumerate(PROMPTS):
    alone = calm.generate([p], N_NEW, threshold=MIXED)
    assert alone.tokens[0] == batch.tokens[r]
    assert alone.exit_index[0] == batch.exit_index[r]


def test_calm_batch_min_rule(rec):
  """CALM's original rule: the batch leaves at the first exit where its least
  confident row is confident; == full decoding when nothing exits."""
  cfg, params, ref = rec
  eng = EarlyExitEngine(cfg, params, policy="calm", rule="batch_min", threshold=INF)
  assert eng.generate(PROMPTS, N_NEW).tokens == ref
  lam = 2e-4  # the batch minimum is low: a lower λ gives mixed exits
  out = eng.generate(PROMPTS, N_NEW, threshold=lam)
  idx = np.array([row[1:] for row in out.exit_index])
  assert all(len(set(col)) == 1 for col in idx.T) and len(set(idx.ravel())) == 3
  for t in range(idx.shape[1]):
    i = idx[0, t]
    checked = out.exit_confidences[:, t + 1]
    if i < len(eng.exits) - 1:
      assert np.all(checked[:, i] >= lam)
    assert all(np.any(checked[:, j] < lam) for j in range(i))


def test_calm_first_loop_kv_sharing(rec):
  cfg, params, _ = rec
  # CALM's state (cosine) measure gives the first exit confidence 0: with
  # threshold 0 every token exits there.
  eng = EarlyExitEngine(cfg, params, policy="calm", kv="first_loop", threshold=0.0,
                        confidence="state")
  out = eng.generate(PROMPTS, N_NEW, return_cache=True)
  assert all(row[1:] == [0] * (N_NEW - 1) for row in out.exit_index)
  assert all(c == 0.0 for row in out.confidence for c in row[1:])
  units = cfg.plan.unrolled()
  for r, p in enumerate(PROMPTS):
    gen = slice(len(p), int(out.final_positions[r]))
    for i, (group, k, n) in enumerate(units):
      if group == "block" and n > 0:
        for a, b in zip(_layer_kv(cfg, out.cache, i, r),
                        _layer_kv(cfg, out.cache, cfg.plan.prelude + k, r)):
          np.testing.assert_array_equal(a[gen], b[gen])


def test_calm_oracle_tokens_equal_full_decoding(rec):
  cfg, params, ref = rec
  eng = EarlyExitEngine(cfg, params, policy="calm", oracle="tokens", threshold=INF)
  out = eng.generate(PROMPTS, N_NEW)
  assert out.tokens == ref
  assert out.avg_layers <= cfg.plan.effective_depth


def test_calm_oracle_noisy_cache(rec):
  """Final-layer tokens over the propagated cache: == full decoding when nothing
  exits; with every token exiting, the cache past the exit is propagated."""
  cfg, params, ref = rec
  eng = EarlyExitEngine(cfg, params, policy="calm", oracle="noisy_cache", threshold=INF)
  assert eng.generate(PROMPTS, N_NEW).tokens == ref
  out = eng.generate(PROMPTS, N_NEW, threshold=0.0, return_cache=True)
  assert all(row[1:] == [0] * (N_NEW - 1) for row in out.exit_index)
  _check_propagated(cfg, params, out)


def test_decaying_threshold_uses_the_decode_position(rec):
  """CALM's λ_t = 0.9λ + 0.1λ·exp(-τ t/N) with t the new token's index (the fix
  of §4.2-ii); FREE-any exits exactly where conf >= λ_t."""
  cfg, params, _ = rec
  lam = MIXED
  eng = EarlyExitEngine(cfg, params, policy="free", threshold=lam, k_max=3,
                        schedule="decaying", position_temp=4.0)
  out = eng.generate(PROMPTS, N_NEW)
  lam_t = np.asarray(decaying_threshold(lam, jnp.arange(N_NEW), N_NEW, 4.0))
  assert lam_t[1] < lam and np.all(np.diff(lam_t) < 0)
  between = 0  # tokens a fixed λ would have kept deep
  for idx, conf in zip(out.exit_index, out.confidence):
    for t in range(1, N_NEW):
      assert (idx[t] == 0) == (conf[t] >= lam_t[t])
      between += lam_t[t] <= conf[t] < lam
  assert between > 0


# ---------------------------------------------------------------- engine
def test_eos_stops_rows_independently(rec, free, calm):
  """Rows that hit EOS stop (no writes, no deep-pass triggers); the others are
  unchanged: each row == its no-EOS output cut at its first EOS."""
  cfg, params, _ = rec
  for base, kw in ((free, dict(policy="free", k_max=3)), (calm, dict(policy="calm"))):
    plain = base.generate(PROMPTS, N_NEW, threshold=MIXED)
    eos = plain.tokens[0][3]
    eng = EarlyExitEngine(cfg, params, threshold=MIXED, eos_id=eos, **kw)
    out = eng.generate(PROMPTS, N_NEW)
    stopped = 0
    for row, idx, full, full_idx in zip(out.tokens, out.exit_index, plain.tokens,
                                        plain.exit_index):
      cut = full.index(eos) + 1 if eos in full else len(full)
      stopped += cut < len(full)
      assert row == full[:cut] and idx == full_idx[:cut]
    assert stopped >= 1


def test_no_recompilation_across_calls(free):
  before = free.trace_count
  free.generate([[5, 6, 7], [8], [9, 10]], N_NEW, threshold=0.5)
  free.generate([[1, 2], [3, 4, 5, 6], [7]], N_NEW, threshold=0.0)
  assert free.trace_count == before  # same bucket, batch, length: no retrace


def test_sampling_matches_engine_at_never_exit(rec, free):
  cfg, params, _ = rec
  s = SamplingConfig(greedy=False, temperature=0.8, top_k=5)
  ref = Engine(cfg, params).generate(PROMPTS, N_NEW, sampling=s, seed=4).tokens
  assert free.generate(PROMPTS, N_NEW, sampling=s, seed=4).tokens == ref


def test_bad_options_have_clear_errors(rec):
  cfg, params, _ = rec
  bad = [
      (dict(policy="medusa"), "policy"),
      (dict(policy="free", exits=[3, 5]), "one shallow exit"),
      (dict(policy="calm", exits=[5, 3]), "strictly increasing"),
      (dict(policy="free", confidence="softmax"), "unknown confidence"),
      (dict(policy="free", confidence="state"), "consecutive exits"),
      (dict(policy="calm", confidence="meta"), "meta_params"),
      (dict(policy="calm", threshold="adaptive"), "policy='free'"),
      (dict(policy="free", threshold="auto"), "adaptive"),
      (dict(policy="free", sync="some"), "sync"),
      (dict(policy="free", k_max=0), "k_max"),
      (dict(policy="free", k_max=3, deep_buckets=(2, 3)), "deep_buckets"),
      (dict(policy="calm", oracle="cheat"), "oracle"),
      (dict(policy="calm", schedule="linear"), "schedule"),
  ]
  for kw, msg in bad:
    with pytest.raises(ValueError, match=msg):
      EarlyExitEngine(cfg, params, **kw)
  eng = EarlyExitEngine.from_loaded(LoadedModel(cfg, params, None, "test"), policy="calm",
                                    exits=[5])
  assert eng.exits == (5, cfg.plan.effective_depth)
  van = tiny_config(plan=DepthPlan.vanilla(4))
  vp = init_params(van, seed=0)
  with pytest.raises(ValueError, match="pass exits"):
    EarlyExitEngine(van, vp)
  with pytest.raises(ValueError, match="recursive model"):
    EarlyExitEngine(van, vp, exits=[2], policy="calm", kv="first_loop")

"""Continuous depth-wise batching: same tokens as one-request-at-a-time decoding."""
import functools

import jax
import jax.numpy as jnp
import pytest

from recursive_lm.config import DepthPlan, tiny_config
from recursive_lm.decode import depth as D
from recursive_lm.decode.depthwise import DepthwiseBatcher, ExitPolicy
from recursive_lm.decode.engine import Engine
from recursive_lm.decode.sampling import SamplingConfig
from recursive_lm.decode.sequencewise import SequenceBatcher
from recursive_lm.early_exit import confidence as C
from recursive_lm.nn.model import Transformer, init_cache, init_params

PROMPTS = [[5, 17, 33, 2, 9], [11], [20, 21, 22], [7, 8], [30] * 20, [44, 45, 46, 47],
           [3, 9]]
N_NEW = 9


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config(plan=DepthPlan(1, 2, 3, 1), lora_ranks=(("q", 4), ("down", 2)),
                    eos_id=None)
  params = init_params(cfg, seed=3)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if p[-1].key.endswith("_b") else x, params)
  return cfg, params


# -- an obviously sequential reference: one request, one token, one loop at a time.
@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _layers(cfg, params, start, end, h, pos, cache):
  return D.run_layers(cfg, params, start, end, h, pos, cache)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _loop(cfg, params, m, h, pos, cache):
  return D.apply_loop(cfg, params, m, h, pos, cache)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _copy_kv(cfg, params, start, end, h, pos, cache):
  return D.propagate_kv(cfg, params, start, end, h, pos, cache)


def _as_lists(cache):
  return {g: [tuple(c) for c in v] for g, v in cache.items()}


def static_exit_reference(cfg, params, prompt, n_new, policy):
  """Greedy decoding of one request where each token leaves after the first
  loop whose confidence >= threshold; skipped layers get K/V from the exit state."""
  plan, total = cfg.plan, cfg.plan.effective_depth
  pos = jnp.arange(len(prompt))[None]
  out = Transformer(cfg).apply({"params": params}, jnp.asarray([prompt]), positions=pos,
                               cache=init_cache(cfg, 1, 64))
  cache = _as_lists(out["cache"])
  toks, loops = [int(jnp.argmax(out["logits"][0, -1]))], [plan.loops]
  measure = C.get_confidence_fn(policy.measure)
  while len(toks) < n_new:
    p = jnp.asarray([[len(prompt) + len(toks) - 1]])
    h = D.embed(cfg, params, jnp.asarray([[toks[-1]]]))
    h, cache = _layers(cfg, params, 0, plan.prelude, h, p, _as_lists(cache))
    for m in range(plan.loops):
      h, cache = _loop(cfg, params, m, h, p, _as_lists(cache))
      if m == plan.loops - 1:
        h, cache = _layers(cfg, params, total - plan.coda, total, h, p, _as_lists(cache))
        logits = D.head(cfg, params, h[:, 0])
        break
      logits = D.head(cfg, params, h[:, 0])
      if float(measure(logits)[0]) >= policy.threshold:
        cache = _copy_kv(cfg, params, plan.prelude + plan.block * (m + 1), total, h, p,
                         _as_lists(cache))
        break
    toks.append(int(jnp.argmax(logits[0])))
    loops.append(m + 1)
  return toks, loops


def test_never_exit_equals_engine_with_refill(model):
  """threshold +inf (and exit=None): every request's tokens == Engine greedy for
  that request alone; 7 requests through 3 slots exercises refilling."""
  cfg, params = model
  eng = Engine(cfg, params)
  ref = [eng.generate([p], max_new_tokens=N_NEW).tokens[0] for p in PROMPTS]
  for policy in (None, ExitPolicy("softmax_max", float("inf"))):
    out = DepthwiseBatcher(cfg, params, slots=3, exit=policy).generate(
        PROMPTS, max_new_tokens=N_NEW)
    assert out.tokens == ref
    assert out.mean_loops_per_token == cfg.plan.loops
    # 7 * 8 tokens after prefill, 3 loops each, over 3 slots.
    assert out.steps >= 7 * 8 * 3 // 3 and 0 < out.utilization <= 1
  base = SequenceBatcher(cfg, params, slots=3).generate(PROMPTS, max_new_tokens=N_NEW)
  assert base.tokens == ref


@pytest.mark.parametrize("threshold", [-float("inf"), 0.0134])
def test_exits_match_static_exit_reference(model, threshold):
  """With exits (all at loop 1, or mixed), depth-wise and sequence-wise batching
  emit per request exactly the tokens and exit loops of the sequential reference."""
  cfg, params = model
  policy = ExitPolicy("softmax_max", threshold)
  ref = [static_exit_reference(cfg, params, p, N_NEW, policy) for p in PROMPTS]
  out = DepthwiseBatcher(cfg, params, slots=3, exit=policy).generate(
      PROMPTS, max_new_tokens=N_NEW)
  assert out.tokens == [r[0] for r in ref]
  assert out.loops == [r[1] for r in ref]
  base = SequenceBatcher(cfg, params, slots=3, exit=policy).generate(
      PROMPTS, max_new_tokens=N_NEW)
  assert base.tokens == out.tokens and base.loops == out.loops
  mean = out.mean_loops_per_token
  if threshold == -float("inf"):
    # every decoded token exits after loop 1 (the prefill token is full depth)
    assert all(l == [3] + [1] * (N_NEW - 1) for l in out.loops)
  else:
    assert 1 < mean < 3  # the threshold really mixes depths
  # Here (3 slots, 7 requests) the baseline's lockstep bubble costs block steps.
  assert out.steps <= base.steps
  if threshold > 0:
    assert out.steps < base.steps and out.utilization > base.utilization


def test_exits_with_per_loop_kv_lora_match_reference():
  """With LoRA on k and v the skipped loops' K/V differ per loop (one projection
  per loop); without (the fixture) one projection per shared layer serves every
  skipped loop. Both match the sequential reference's state copying."""
  cfg = tiny_config(plan=DepthPlan(1, 2, 3, 1), lora_ranks=(("k", 2), ("v", 2)),
                    eos_id=None)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if p[-1].key.endswith("_b") else x, init_params(cfg, seed=4))
  policy = ExitPolicy("softmax_max", 0.0134)
  ref = [static_exit_reference(cfg, params, p, N_NEW, policy) for p in PROMPTS[:4]]
  out = DepthwiseBatcher(cfg, params, slots=3, exit=policy).generate(
      PROMPTS[:4], max_new_tokens=N_NEW)
  assert out.tokens == [r[0] for r in ref] and out.loops == [r[1] for r in ref]
  assert any(1 in l for l in out.loops)  # some tokens skip two loops


def test_eos_sampling_and_determinism(model):
  cfg, params = model
  free = Engine(cfg, params).generate([PROMPTS[0]], max_new_tokens=N_NEW).tokens[0]
  cfg_eos = cfg.replace(eos_id=free[3])
  eng = Engine(cfg_eos, params)
  ref = [eng.generate([p], max_new_tokens=N_NEW).tokens[0] for p in PROMPTS]
  b = DepthwiseBatcher(cfg_eos, params, slots=2)
  assert b.generate(PROMPTS, max_new_tokens=N_NEW).tokens == ref
  assert len(ref[0]) == 4
  s = SamplingConfig(greedy=False, temperature=0.9, top_k=30)
  x = b.generate(PROMPTS, max_new_tokens=N_NEW, sampling=s, seed=5).tokens
  assert x == b.generate(PROMPTS, max_new_tokens=N_NEW, sampling=s, seed=5).tokens
  assert x != b.generate(PROMPTS, max_new_tokens=N_NEW, sampling=s, seed=6).tokens


def test_bad_options_are_named(model):
  cfg, params = model
  vcfg = tiny_config()
  with pytest.raises(ValueError, match="needs a recursive model"):
    DepthwiseBatcher(vcfg, init_params(vcfg))
  with pytest.raises(ValueError, match="needs a recursive model"):
    SequenceBatcher(vcfg, init_params(vcfg))
  with pytest.raises(ValueError, match="not supported for depth-wise"):
    ExitPolicy("kl", 0.5)
  with pytest.raises(ValueError, match="slots"):
    DepthwiseBatcher(cfg, params, slots=0)
  with pytest.raises(ValueError, match="max_seq_len"):
    DepthwiseBatcher(cfg, params).generate([[1] * 60], max_new_tokens=10)

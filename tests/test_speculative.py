"""Self-speculative decoding: greedy is lossless, sampling is exact and seeded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import DepthPlan, tiny_config
from recursive_lm.decode.engine import Engine
from recursive_lm.decode.sampling import SamplingConfig
from recursive_lm.decode.speculative import SelfSpeculativeEngine, sampling_probs
from recursive_lm.nn.model import init_params

PROMPTS = [[5, 17, 33, 2, 9], [11], [20, 21, 22, 40, 41, 42, 43, 44]]
SAMPLE = SamplingConfig(greedy=False, temperature=0.8, top_k=20, top_p=0.9)


def _model(plan, seed, lora=True, eos_id=None):
  cfg = tiny_config(plan=plan, eos_id=eos_id,
                    lora_ranks=(("q", 4), ("down", 2)) if lora else ())
  params = init_params(cfg, seed=seed)
  # Non-zero LoRA b so the loops differ.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if p[-1].key.endswith("_b") else x, params)
  return cfg, params


@pytest.mark.parametrize("plan,seed,cases", [
    # recursive: (draft_layers, draft_len) across prelude, mid-loop, loop exits
    (DepthPlan(1, 2, 3, 1), 3, [(1, 1), (3, 4), (4, 2), (7, 3)]),
    (DepthPlan.vanilla(4), 5, [(1, 3), (2, 1), (3, 5)]),
])
def test_greedy_equals_full_greedy(plan, seed, cases):
  """Property over random models, draft depths and draft lengths: batched
  self-speculative greedy (ragged prompts, ragged acceptance) == Engine greedy."""
  cfg, params = _model(plan, seed, lora=not plan.is_vanilla)
  ref = Engine(cfg, params).generate(PROMPTS, max_new_tokens=13)
  for e, d in cases:
    out = SelfSpeculativeEngine(cfg, params, draft_layers=e, draft_len=d).generate(
        PROMPTS, max_new_tokens=13)
    assert out.tokens == ref.tokens, (e, d)
    assert out.drafted > 0 and 0 <= out.accepted <= out.drafted
    assert out.steps <= 12  # at least one token per round


def test_per_row_eos_and_draft_loops():
  """Rows stop at their own EOS; draft_loops= picks the loop exit."""
  cfg, params = _model(DepthPlan(0, 2, 2, 0), 11)
  free = Engine(cfg, params).generate(PROMPTS, max_new_tokens=12).tokens
  eos = free[0][4]  # a token row 0 emits mid-way
  cfg = cfg.replace(eos_id=eos)
  ref = Engine(cfg, params).generate(PROMPTS, max_new_tokens=12)
  assert len(ref.tokens[0]) == ref.tokens[0].index(eos) + 1 <= 5
  eng = SelfSpeculativeEngine(cfg, params, draft_loops=1, draft_len=3)
  assert eng.draft_layers == 2
  assert eng.generate(PROMPTS, max_new_tokens=12).tokens == ref.tokens
  assert eng.generate(PROMPTS, max_new_tokens=1).tokens == [t[:1] for t in ref.tokens]


def test_full_depth_draft_accepts_everything_when_sampling():
  cfg, params = _model(DepthPlan(1, 1, 2, 1), 2)
  eng = SelfSpeculativeEngine(cfg, params, draft_layers=cfg.plan.effective_depth,
                              draft_len=3)
  out = eng.generate(PROMPTS, max_new_tokens=11, sampling=SAMPLE, seed=4)
  assert out.acceptance_rate == 1.0
  assert out.steps == 3  # 10 tokens after the first, d + 1 = 4 per round
  assert all(len(t) == 11 for t in out.tokens)


def test_sampling_is_seeded():
  cfg, params = _model(DepthPlan(1, 1, 2, 1), 2)
  eng = SelfSpeculativeEngine(cfg, params, draft_loops=1, draft_len=2)
  a = eng.generate(PROMPTS, max_new_tokens=10, sampling=SAMPLE, seed=1).tokens
  b = eng.generate(PROMPTS, max_new_tokens=10, sampling=SAMPLE, seed=1).tokens
  c = eng.generate(PROMPTS, max_new_tokens=10, sampling=SAMPLE, seed=2).tokens
  assert a == b and a != c
  assert all(len(t) == 10 for t in a)


def test_speculative_sampling_draws_from_target():
  """The accept/resample rule's first emitted token is distributed as p (not q)."""
  cfg, params = _model(DepthPlan(1, 1, 2, 1), 2)
  eng = SelfSpeculativeEngine(cfg, params, draft_layers=1, draft_len=1)
  sampling = SamplingConfig(greedy=False, temperature=1.0)
  v = cfg.vocab_size
  p_logits = jnp.full((1, 2, v), -30.0).at[0, 0, :4].set(jnp.log(jnp.array([.5, .2, .2, .1])))
  q_logits = jnp.full((1, 1, v), -30.0).at[0, 0, :4].set(jnp.log(jnp.array([.1, .3, .3, .3])))
  q = sampling_probs(q_logits, sampling)[0, 0]

  def one(key):
    kd, ka = jax.random.split(key)
    draft = jax.random.categorical(kd, jnp.log(q))[None, None].astype(jnp.int32)
    a, nxt = eng._accept(draft, q_logits, p_logits, ka, sampling)
    return jnp.where(a[0] > 0, draft[0, 0], nxt[0])

  toks = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), 40000))
  freq = np.bincount(np.asarray(toks), minlength=v)[:5] / 40000
  np.testing.assert_allclose(freq, [.5, .2, .2, .1, 0], atol=0.01)


def test_sampling_probs_matches_sampler_support():
  logits = jax.random.normal(jax.random.key(0), (3, 50))
  p = sampling_probs(logits, SamplingConfig(greedy=False, temperature=0.7, top_k=10,
                                            top_p=0.8))
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
  assert int((p[0] > 0).sum()) <= 10
  g = sampling_probs(logits, SamplingConfig())
  np.testing.assert_array_equal(jnp.argmax(g, -1), jnp.argmax(logits, -1))


def test_bad_options_are_named():
  cfg, params = _model(DepthPlan(1, 1, 2, 1), 2)
  with pytest.raises(ValueError, match="draft_layers=9 is outside"):
    SelfSpeculativeEngine(cfg, params, draft_layers=9)
  with pytest.raises(ValueError, match="draft_loops=3 is outside"):
    SelfSpeculativeEngine(cfg, params, draft_loops=3)
  with pytest.raises(ValueError, match="exactly one of"):
    SelfSpeculativeEngine(cfg, params)
  with pytest.raises(ValueError, match="draft_len"):
    SelfSpeculativeEngine(cfg, params, draft_layers=1, draft_len=0)

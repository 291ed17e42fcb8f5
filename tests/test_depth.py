"""Layer-at-a-time pieces (recursive_lm.decode.depth) reproduce the model exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import DepthPlan, tiny_config
from recursive_lm.decode import depth as D
from recursive_lm.nn.model import Transformer, init_cache, init_params

PLAN = DepthPlan(prelude=1, block=2, loops=3, coda=1)


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config(plan=PLAN, lora_ranks=(("q", 4), ("v", 2), ("down", 3)))
  params = init_params(cfg, seed=1)
  # Non-zero LoRA b so per-loop differences matter.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if p[-1].key.endswith("_b") else x, params)
  return cfg, params


def _tokens(b=2, t=7, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 2, 97)


def test_run_layers_equals_model(model):
  cfg, params = model
  tok = _tokens()
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  ref = Transformer(cfg).apply({"params": params}, tok, positions=pos,
                               cache=init_cache(cfg, 2, 16))
  h = D.embed(cfg, params, tok)
  n = cfg.plan.effective_depth
  h, cache = D.run_layers(cfg, params, 0, 4, h, pos, init_cache(cfg, 2, 16))
  h, cache = D.run_layers(cfg, params, 4, n, h, pos, cache)
  np.testing.assert_allclose(D.head(cfg, params, h), ref["logits"], atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(ref["cache"])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_loop_exits_and_hidden_states(model):
  cfg, params = model
  assert D.loop_exits(cfg) == [3, 5, 8]
  tok = _tokens()
  ref = Transformer(cfg).apply({"params": params}, tok, collect_loop_states=True,
                               return_hidden=True)
  states, h = D.hidden_states(cfg, params, tok, [3, 5, 7, 8])
  np.testing.assert_allclose(states[0], ref["loop_states"][0], atol=1e-5)
  np.testing.assert_allclose(states[1], ref["loop_states"][1], atol=1e-5)
  np.testing.assert_allclose(states[2], ref["loop_states"][2], atol=1e-5)
  np.testing.assert_allclose(D.head(cfg, params, h), ref["logits"], atol=1e-5)
  with pytest.raises(ValueError, match="exit_layers"):
    D.hidden_states(cfg, params, tok, [9])


def test_apply_loop_per_row_depth(model):
  """Rows at different loop depths in one call == each row at its own depth."""
  cfg, params = model
  tok = _tokens(b=3, t=5, seed=2)
  pos = jnp.broadcast_to(jnp.arange(5), (3, 5))
  h0 = D.embed(cfg, params, tok)
  h0, cache0 = D.run_layers(cfg, params, 0, 1, h0, pos, init_cache(cfg, 3, 8))
  loops = jnp.array([2, 0, 1])
  h, cache = D.apply_loop(cfg, params, loops, h0, pos, cache0)
  for r, n in enumerate([2, 0, 1]):
    hr, cr = D.apply_loop(cfg, params, n, h0, pos, cache0)
    np.testing.assert_allclose(h[r], hr[r], atol=1e-5)
    for k in range(cfg.plan.block):
      np.testing.assert_allclose(cache["block"][k][0][n, r], cr["block"][k][0][n, r],
                                 atol=1e-5)
      other = [m for m in range(3) if m != n]
      np.testing.assert_array_equal(cache["block"][k][0][other, r],
                                    cache0["block"][k][0][other, r])


def test_propagate_kv_matches_layer_kv(model):
  """K/V-only propagation writes exactly the K/V a full layer computes from the same state."""
  cfg, params = model
  tok = _tokens(b=2, t=4, seed=3)
  pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
  h = D.embed(cfg, params, tok)
  for fused in (False, True):
    c, p = cfg, params
    if fused:
      from recursive_lm.nn.model import fuse_projections
      c, p = fuse_projections(cfg, params)
    for i in (0, 2, 7):
      _, full = D.run_layers(c, p, i, i + 1, h, pos, init_cache(c, 2, 8))
      kv = D.propagate_kv(c, p, i, i + 1, h, pos, init_cache(c, 2, 8))
      for a, b in zip(jax.tree_util.tree_leaves(kv), jax.tree_util.tree_leaves(full)):
        np.testing.assert_allclose(a, b, atol=1e-5)

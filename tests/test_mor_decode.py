"""Causal MoR generation: the engine's tokens and depths equal the full forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import DepthPlan, RouterConfig, tiny_config
from recursive_lm.mor.decode import MoREngine, calibrate_thresholds, token_depths
from recursive_lm.nn.model import Transformer, init_params


@pytest.mark.parametrize("rc", [RouterConfig(kv="recursion"),
                                RouterConfig(kv="hybrid", impl="dense"),
                                RouterConfig(kind="token", gate="softmax", alpha=1.0,
                                             kv="share_first")])
def test_engine_matches_teacher_forced_threshold_forward(rc):
  cfg = tiny_config(plan=DepthPlan(1, 1, 3, 1), router=rc)
  params = init_params(cfg, seed=2)
  params["router"] = jax.tree_util.tree_map(lambda x: x * 50.0, params["router"])
  prompts = [[5, 9, 17, 3, 44], [7, 8]]  # per-row lengths
  out = MoREngine(cfg, params).generate(prompts, max_new_tokens=6, stop_at_eos=False)
  model = Transformer(cfg)
  for p, new, dep in zip(prompts, out.tokens, out.depths):
    seq = jnp.asarray([p + new])
    full = model.apply({"params": params}, seq, routing="threshold")
    greedy = np.asarray(jnp.argmax(full["logits"][0], -1))
    # each generated token is the argmax after its prefix
    np.testing.assert_array_equal(greedy[len(p) - 1:-1], new)
    # the depth of each fed-back token equals the full forward's routing
    d = np.asarray(token_depths(full["router"])[0])
    np.testing.assert_array_equal(d[len(p):len(p) + len(new) - 1], dep[:-1])
  assert len({x for row in out.depths for x in row}) > 1  # tokens differ in depth


def test_calibrated_thresholds_match_capacities():
  cfg = tiny_config(plan=DepthPlan(0, 1, 3, 0), router=RouterConfig())
  params = init_params(cfg, seed=3)
  params["router"] = jax.tree_util.tree_map(lambda x: x * 50.0, params["router"])
  toks = np.random.default_rng(0).integers(2, 97, (4, 48))
  batches = [{"inputs": toks}]
  cal = calibrate_thresholds(cfg, params, batches)
  assert cal.router.decode_thresholds[0] == 0.0  # capacity 1: everyone
  out = Transformer(cal).apply({"params": params}, jnp.asarray(toks), routing="threshold")
  occ = np.asarray(out["router"]["sel"]).mean(axis=(1, 2))
  np.testing.assert_allclose(occ, [1.0, 2 / 3, 1 / 3], atol=0.12)

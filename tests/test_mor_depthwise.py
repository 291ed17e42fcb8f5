"""MoR depth-wise batching reproduces MoREngine per request (tokens and depths)."""
import jax
import pytest

from recursive_lm.config import DepthPlan, RouterConfig, tiny_config
from recursive_lm.decode.depthwise import DepthwiseBatcher
from recursive_lm.mor.decode import MoREngine
from recursive_lm.mor.depthwise import MoRDepthwiseBatcher
from recursive_lm.nn.model import init_params

PROMPTS = [[5, 9, 17, 3, 44], [7, 8], [12, 30, 31], [60], [2, 3, 4, 5, 6, 7, 8, 9, 10],
           [44, 45]]


@pytest.mark.parametrize("rc", [
    RouterConfig(kv="recursion"),
    RouterConfig(kind="token", gate="softmax", alpha=1.0, kv="share_first"),
], ids=["expert-recursion", "token-share_first"])
def test_matches_engine_per_request_with_refill(rc):
  cfg = tiny_config(plan=DepthPlan(1, 1, 3, 1), router=rc)
  params = init_params(cfg, seed=2)
  params["router"] = jax.tree_util.tree_map(lambda x: x * 50.0, params["router"])
  max_new = 7
  batcher = MoRDepthwiseBatcher(cfg, params, slots=2)  # 6 requests: refills
  out = batcher.generate(PROMPTS, max_new_tokens=max_new, stop_at_eos=False)
  engine = MoREngine(cfg, params)
  depths_seen = set()
  for i, p in enumerate(PROMPTS):
    ref = engine.generate([p], max_new_tokens=max_new, stop_at_eos=False)
    assert out.tokens[i] == ref.tokens[0], i
    # MoREngine never feeds its last token back (depth 0); the server routes it.
    assert out.loops[i][:-1] == ref.depths[0][:-1] and ref.depths[0][-1] == 0, i
    depths_seen.update(ref.depths[0][:-1])
  assert len(depths_seen) > 1  # tokens really differ in depth
  assert out.steps < sum(len(t) for t in out.tokens) * cfg.plan.loops


def test_requires_router():
  cfg = tiny_config(plan=DepthPlan(1, 1, 3, 1))
  params = init_params(cfg, seed=0)
  with pytest.raises(ValueError, match="router"):
    MoRDepthwiseBatcher(cfg, params, slots=2)
  DepthwiseBatcher(cfg, params, slots=2)  # the plain batcher serves it

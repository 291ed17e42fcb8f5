"""Model equivalences: cache mode == sequence mode, depth plans, packing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import DepthPlan, tiny_config
from recursive_lm.nn.model import Transformer, init_cache, init_params
from recursive_lm.nn import weights as W


def _run(cfg, params, tokens, **kw):
  return Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), **kw)


@pytest.mark.parametrize("plan", [DepthPlan.vanilla(3), DepthPlan(1, 2, 3, 1)])
def test_cached_decode_equals_full_forward(plan):
  cfg = tiny_config(plan=plan, lora_ranks=(("q", 2), ("up", 3)))
  params = init_params(cfg, seed=1)
  # make LoRA non-trivial
  params["lora"] = jax.tree_util.tree_map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), params["lora"])
  toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
  full = _run(cfg, params, toks)["logits"]
  cache = init_cache(cfg, 2, 16)
  # prefill 5 tokens, then one token at a time
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  out = _run(cfg, params, toks[:, :5], positions=pos, cache=cache)
  got = [out["logits"]]
  cache = out["cache"]
  for t in range(5, 12):
    p = jnp.full((2, 1), t)
    out = _run(cfg, params, toks[:, t:t + 1], positions=p, cache=cache)
    cache = out["cache"]
    got.append(out["logits"])
  np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-5, rtol=1e-5)


def test_segment_ids_isolate_documents():
  cfg = tiny_config()
  params = init_params(cfg)
  rng = np.random.default_rng(1)
  a, b = rng.integers(0, 97, 5), rng.integers(0, 97, 7)
  packed = np.concatenate([a, b])[None]
  seg = np.array([[1] * 5 + [2] * 7])
  pos = np.array([list(range(5)) + list(range(7))])
  out = _run(cfg, params, packed, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
  la = _run(cfg, params, a[None])["logits"]
  lb = _run(cfg, params, b[None])["logits"]
  np.testing.assert_allclose(out["logits"][:, :5], la, atol=1e-5)
  np.testing.assert_allclose(out["logits"][:, 5:], lb, atol=1e-5)


def test_loop_mask_skips_loops():
  cfg = tiny_config(plan=DepthPlan(0, 2, 3, 0))
  params = init_params(cfg)
  toks = np.random.default_rng(2).integers(0, 97, (1, 6))
  full = _run(cfg, params, toks, collect_loop_states=True, return_hidden=True)
  # all tokens active in loop 0 only == the state after loop 0
  mask = jnp.asarray(np.array([1, 0, 0], bool)[:, None, None] * np.ones((1, 1, 6), bool))
  one = _run(cfg, params, toks, loop_mask=mask, return_hidden=True)
  np.testing.assert_allclose(one["hidden"], full["loop_states"][0], atol=1e-6)


def test_weights_round_trip_and_unroll():
  cfg = tiny_config(plan=DepthPlan(1, 2, 2, 1), lora_ranks=(("v", 2), ("down", 2)))
  params = init_params(cfg, seed=4)
  params["lora"] = jax.tree_util.tree_map(
      lambda x: x + 0.1 * jax.random.normal(jax.random.key(5), x.shape), params["lora"])
  hf = W.hf_from_params(cfg, params)
  vcfg = cfg.replace(plan=DepthPlan.vanilla(cfg.plan.effective_depth), lora_ranks=())
  vparams = W.params_from_hf(vcfg, hf)
  toks = np.random.default_rng(3).integers(0, 97, (2, 9))
  np.testing.assert_allclose(_run(cfg, params, toks)["logits"],
                             _run(vcfg, vparams, toks)["logits"], atol=1e-5)


@pytest.mark.parametrize("layout", ["in_out", "out_in", "panel"])
def test_decode_layouts_give_same_logits(layout):
  from recursive_lm.nn.model import decode_layout
  cfg = tiny_config(plan=DepthPlan(1, 2, 2, 0), lora_ranks=(("k", 2), ("up", 2)))
  params = init_params(cfg, seed=2)
  params["lora"] = jax.tree_util.tree_map(
      lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), params["lora"])
  toks = np.random.default_rng(5).integers(0, 97, (2, 7))
  ref = _run(cfg, params, toks)["logits"]
  c2, p2 = decode_layout(cfg, params, layout, fuse=True)
  assert "qkv" in p2["block"]["layer_0"]["attn"]
  np.testing.assert_allclose(_run(c2, p2, toks)["logits"], ref, atol=1e-5)


def test_loop_unroll_is_numerically_the_same_model():
  """loop_unroll only changes how XLA lays out the scan: same params, same logits and grads."""
  from recursive_lm.config import DepthPlan, tiny_config
  from recursive_lm.nn.model import Transformer, init_params
  cfg = tiny_config(plan=DepthPlan(prelude=1, block=1, loops=3, coda=1),
                    lora_ranks=(("q", 2),))
  params = init_params(cfg, seed=3)
  tok = jax.random.randint(jax.random.key(0), (2, 6), 2, 97)

  def loss(p, c):
    return jnp.mean(Transformer(c).apply({"params": p}, tok)["logits"] ** 2)

  ref, g_ref = jax.value_and_grad(loss)(params, cfg.replace(loop_unroll=1))
  out, g = jax.value_and_grad(loss)(params, cfg)  # default: fully unrolled
  np.testing.assert_allclose(out, ref, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

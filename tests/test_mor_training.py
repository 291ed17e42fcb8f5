"""MoR training: router losses and metrics, train step, presets, FLOPs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import DepthPlan, RouterConfig, tiny_config
from recursive_lm.mor import flops as F
from recursive_lm.mor import presets
from recursive_lm.mor.losses import router_loss, update_loss_free_bias
from recursive_lm.training.mor_step import make_mor_eval_step, make_mor_train_step
from recursive_lm.nn.model import Transformer, init_params, param_count
from recursive_lm.training.optim import OptimConfig
from recursive_lm.training.train_step import LossConfig, init_train_state


def _batch(b=2, t=16, seed=0):
  toks = np.random.default_rng(seed).integers(2, 97, (b, t + 1))
  return {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
          "loss_mask": jnp.ones((b, t), jnp.int32),
          "segment_ids": jnp.ones((b, t), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(t), (b, t))}


def test_expert_aux_bce_and_metrics_by_hand():
  z = jnp.array([[[2.0, -1.0, 0.5, 3.0]], [[0.0, 0.0, -2.0, 1.0]]])  # [N=2, B=1, T=4]
  cand = jnp.array([[[1, 1, 1, 1]], [[1, 0, 1, 1]]], bool)
  sel = jnp.array([[[1, 0, 1, 1]], [[0, 0, 0, 1]]], bool)
  rc = RouterConfig(aux_loss=1.0, z_loss=0.0)
  loss, m, occ = router_loss({"z": z, "cand": cand, "sel": sel}, rc)
  bce = lambda x, y: -(y * np.log(1 / (1 + np.exp(-x))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-x))))
  want = np.mean([bce(2, 1), bce(-1, 0), bce(.5, 1), bce(3, 1)]) + np.mean(
      [bce(0, 0), bce(-2, 0), bce(1, 1)])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # threshold z > 0 agrees with top-k on 7 of 7 candidates except z=0 (not > 0, unselected)
  np.testing.assert_allclose(m["router/sampling_acc"], 1.0)
  np.testing.assert_allclose(occ, [0.75, 0.25])
  np.testing.assert_allclose(m["router/dead_token_ratio"], 0.75)


def test_token_balance_and_loss_free_bias():
  n = 3
  depth = jnp.array([[0, 0, 0, 1]])
  g = jax.nn.one_hot(depth, n) * 0.5 + 0.5 / n
  rc = RouterConfig(kind="token", gate="softmax", alpha=1.0, balance_loss=1.0,
                    loss_free_bias=True, bias_update_rate=0.1)
  loss, m, load = router_loss({"token_logits": jnp.zeros((1, 4, n)), "token_probs": g,
                               "depth": depth}, rc)
  np.testing.assert_allclose(load, [0.75, 0.25, 0.0])
  np.testing.assert_allclose(m["router/max_vio"], (0.75 - 1 / 3) * 3, rtol=1e-6)
  p = update_loss_free_bias({"router": {"bias": jnp.zeros(n)}}, load, rc)
  np.testing.assert_allclose(p["router"]["bias"], [-0.1, 0.1, 0.1])


@pytest.mark.parametrize("rc", [
    RouterConfig(aux_router=True, z_loss=1e-3),
    RouterConfig(kind="token", gate="softmax", alpha=1.0, loss_free_bias=True,
                 z_loss=1e-3, impl="dense"),
    RouterConfig(router_type="mlp", kv="share_first")])
def test_train_step_reduces_loss_and_updates_router(rc):
  cfg = tiny_config(plan=DepthPlan(1, 1, 3, 1), router=rc)
  params = init_params(cfg)
  ocfg = OptimConfig(lr=3e-3, warmup_steps=0, total_steps=20, schedule="constant")
  step = jax.jit(make_mor_train_step(cfg, ocfg, LossConfig(kd_weight=0.0)))
  state = init_train_state(cfg, ocfg, params)
  batch = _batch()
  losses, first = [], None
  for _ in range(8):
    state, m = step(state, None, batch)
    losses.append(float(m["ce"]))
    first = first or state.params["router"]
  assert losses[-1] < losses[0]
  assert "router/occupancy_0" in m and np.isfinite(float(m["router/loss"]))
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                 params["router"], first)
  assert all(v > 0 for v in jax.tree_util.tree_leaves(moved)), moved
  nll, n, rm = jax.jit(make_mor_eval_step(cfg, "threshold"))(state.params, batch)
  assert float(n) == 32 and np.isfinite(float(nll))


def test_aux_loss_teaches_threshold_to_mimic_topk():
  """With a large aux weight, sigmoid(z) > 0.5 agrees with top-k on most tokens."""
  cfg = tiny_config(plan=DepthPlan(0, 1, 2, 0), router=RouterConfig(aux_loss=1.0))
  params = init_params(cfg)
  ocfg = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=60, schedule="constant")
  step = jax.jit(make_mor_train_step(cfg, ocfg, LossConfig(kd_weight=0.0)))
  state = init_train_state(cfg, ocfg, params)
  batch = _batch(b=4, t=32)
  for _ in range(60):
    state, m = step(state, None, batch)
  assert float(m["router/sampling_acc"]) > 0.9


def test_paper_presets_param_and_flop_counts():
  # Table 6: 135M 106M non-embedding; N_r=3 M-Cyc 1+10+1 42M; 360M 315M / 118M.
  for size, n_r, want in [("135m", 3, 42.5e6), ("360m", 3, 118e6), ("360m", 2, 167e6),
                          ("360m", 4, 98e6)]:
    cfg = presets.paper_config(size, n_r, "expert")
    got = presets.non_embedding_params(cfg)
    assert abs(got - want) / want < 0.02, (size, n_r, got)
  van = presets.paper_config("360m", variant="vanilla")
  assert abs(presets.non_embedding_params(van) - 315e6) / 315e6 < 0.02
  # the shape-only count matches the model's real parameters (tiny analogue)
  cfg = tiny_config(plan=DepthPlan(1, 2, 3, 1), tie_embeddings=True,
                    router=RouterConfig(router_type="mlp", aux_router=True))
  p = init_params(cfg)
  emb = p["embed"]["embedding"].size
  assert presets.non_embedding_params(cfg) == param_count(p) - emb
  # abstract init of the paper shape builds (no allocation)
  big = presets.paper_config("135m", 3, "token")
  shapes = jax.eval_shape(lambda: Transformer(big).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  assert shapes["params"]["router"]["w"].value.shape == (576, 3)
  # FLOPs: recursive == vanilla at equal effective depth; MoR (1, 2/3, 1/3) cheaper
  t = 2048
  rec = presets.paper_config("360m", 3, "recursive")
  mor = presets.paper_config("360m", 3, "expert")
  share = presets.paper_config("360m", 3, "expert", kv="share_first")
  van32 = van.replace(plan=DepthPlan.vanilla(32))
  assert F.forward_flops(rec, t)["total"] == pytest.approx(
      F.forward_flops(van32, t)["total"])
  r_block = F.forward_flops(rec, t)["linear"]
  m_block = F.forward_flops(mor, t)["linear"]
  # block linear FLOPs scale with sum(cap) / N_r = 2/3; unique layers unchanged
  per_layer = F.forward_flops(rec, t)["linear"] / 32
  np.testing.assert_allclose(m_block, r_block - 30 * per_layer / 3, rtol=1e-3)
  assert F.forward_flops(share, t)["attention"] > F.forward_flops(mor, t)["attention"]
  assert F.kv_cache_fraction(mor) == pytest.approx(2 / 3)
  assert F.kv_cache_fraction(share) == pytest.approx(1 / 3)

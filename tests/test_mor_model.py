"""Mixture-of-Recursions model: gathered == dense, reductions to vanilla and
recursive models, causal routing, cached decoding == full forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import ConfigError, DepthPlan, ModelConfig, RouterConfig, tiny_config
from recursive_lm.nn.model import Transformer, init_cache, init_params

KVS = ("recursion", "share_first", "hybrid")


def _cfg(router=None, plan=DepthPlan(1, 2, 3, 1), **kw):
  return tiny_config(plan=plan, router=router, **kw)


def _params(cfg, seed=0, router_scale=1.0):
  p = init_params(cfg, seed=seed)
  if "router" in p:  # random init gives |z| ~ 1e-3; make decisions non-trivial
    p["router"] = jax.tree_util.tree_map(lambda x: x * router_scale, p["router"])
  return p


def _run(cfg, params, toks, **kw):
  return Transformer(cfg).apply({"params": params}, jnp.asarray(toks), **kw)


def _toks(b=2, t=16, seed=0):
  return np.random.default_rng(seed).integers(2, 97, (b, t))


@pytest.mark.parametrize("kv", KVS)
@pytest.mark.parametrize("caps", [None, (1.0, 1.0, 1.0), (0.75, 0.5, 0.25)])
def test_gathered_equals_dense(kv, caps):
  rc = RouterConfig(kv=kv, capacities=caps, aux_router=True)
  g_cfg = _cfg(rc, lora_ranks=(("q", 2), ("down", 2)))
  d_cfg = g_cfg.replace(router=RouterConfig(kv=kv, capacities=caps, aux_router=True,
                                            impl="dense"))
  params = _params(g_cfg, seed=1, router_scale=50.0)
  params["lora"] = jax.tree_util.tree_map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), params["lora"])
  # two packed documents per row
  toks = _toks()
  seg = np.array([[1] * 9 + [2] * 7, [1] * 16])
  pos = np.array([list(range(9)) + list(range(7)), list(range(16))])
  kw = dict(positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
  g = _run(g_cfg, params, toks, **kw)
  d = _run(d_cfg, params, toks, **kw)
  np.testing.assert_array_equal(g["router"]["sel"], d["router"]["sel"])
  np.testing.assert_array_equal(g["router"]["cand"], d["router"]["cand"])
  np.testing.assert_allclose(g["router"]["z"], d["router"]["z"], atol=1e-5)
  np.testing.assert_allclose(g["router"]["z_aux"], d["router"]["z_aux"], atol=1e-5)
  np.testing.assert_allclose(g["logits"], d["logits"], atol=2e-5, rtol=1e-5)
  # static capacities: recursion r keeps exactly k_r tokens per row
  ks = [max(1, int(c * 16)) for c in (caps or (1.0, 2 / 3, 1 / 3))]
  np.testing.assert_array_equal(np.asarray(g["router"]["sel"]).sum(-1),
                                np.repeat(np.array(ks)[:, None], 2, axis=1))


def test_param_tree_matches_recursive_model():
  rec = _cfg(None)
  mor = _cfg(RouterConfig())
  pr, pm = init_params(rec), init_params(mor)
  shape = lambda t: jax.tree_util.tree_map(lambda x: x.shape, t)
  assert set(pm) == set(pr) | {"router"}
  for k in pr:
    assert shape(pm[k]) == shape(pr[k]), k
  assert pm["router"]["w"].shape == (3, 32)
  dense = init_params(_cfg(RouterConfig(impl="dense")))
  assert shape(dense) == shape(pm)


def test_config_round_trip_and_validation():
  cfg = _cfg(RouterConfig(kind="token", gate="softmax", alpha=1.0, kv="share_first",
                          impl="dense", capacities=(1.0, 0.5, 0.5),
                          decode_thresholds=(0.0, 0.1, -0.2)))
  import json
  again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
  assert again == cfg
  assert ModelConfig.from_dict(tiny_config().to_dict()).router is None
  with pytest.raises(ConfigError):
    RouterConfig(capacities=(0.5, 1.0))
  with pytest.raises(ConfigError):
    _cfg(RouterConfig(capacities=(1.0, 0.5)))
  with pytest.raises(ConfigError):
    RouterConfig(kind="expert", gate="softmax")


def _unit_gate(cfg, params):
  """Router weights 0 and alpha 2 with sigmoid: g = 2 * sigmoid(0) = 1."""
  params = dict(params)
  params["router"] = jax.tree_util.tree_map(jnp.zeros_like, params["router"])
  return params


@pytest.mark.parametrize("impl", ["gather", "dense"])
def test_single_recursion_equals_vanilla(impl):
  van = tiny_config(plan=DepthPlan.vanilla(4))
  mor = tiny_config(plan=DepthPlan(0, 4, 1, 0), router=RouterConfig(
      alpha=2.0, gating="delta", impl=impl))
  pv = init_params(van, seed=3)
  pm = _unit_gate(mor, init_params(mor, seed=3))
  pm = {**pv, "router": pm["router"]}
  toks = _toks()
  np.testing.assert_allclose(_run(mor, pm, toks)["logits"], _run(van, pv, toks)["logits"],
                             atol=1e-5)


@pytest.mark.parametrize("impl", ["gather", "dense"])
@pytest.mark.parametrize("kv", KVS)
def test_full_capacity_equals_recursive_with_unit_gate(impl, kv):
  rec = _cfg(None)
  mor = _cfg(RouterConfig(alpha=2.0, gating="delta", capacities=(1.0,) * 3, impl=impl,
                          kv="recursion"))
  pr = init_params(rec, seed=4)
  pm = {**pr, "router": _unit_gate(mor, init_params(mor))["router"]}
  toks = _toks()
  np.testing.assert_allclose(_run(mor, pm, toks)["logits"], _run(rec, pr, toks)["logits"],
                             atol=1e-5)
  if kv != "recursion":
    # KV sharing changes the function: deeper recursions attend to recursion 1's keys
    share = mor.replace(router=RouterConfig(alpha=2.0, gating="delta", kv=kv,
                                            capacities=(1.0,) * 3, impl=impl))
    diff = np.abs(_run(share, pm, toks)["logits"] - _run(rec, pr, toks)["logits"]).max()
    assert diff > 1e-4 if kv == "share_first" else diff < 1e-5  # hybrid at cap 1 == own KV


def test_full_capacity_residual_gate_is_h_plus_gF():
  """Paper gating at capacity 1: h_{r+1} = h_r + g_r * F(h_r), F = recursive block."""
  plan = DepthPlan(0, 2, 3, 0)
  mor = tiny_config(plan=plan, router=RouterConfig(capacities=(1.0,) * 3))
  one = tiny_config(plan=DepthPlan(0, 2, 1, 0))
  pm = _params(mor, seed=5, router_scale=30.0)
  p1 = {k: v for k, v in pm.items() if k != "router"}
  toks = jnp.asarray(_toks())
  m1 = Transformer(one)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  h = m1.apply({"params": p1}, toks, method=lambda m, t: m.embed_tokens(t))
  for r in range(3):
    f = m1.apply({"params": p1}, h, pos, method=lambda m, x, p: m.layers(x, p)[0])
    z = h @ pm["router"]["w"][r]
    h = h + (0.1 * jax.nn.sigmoid(z))[..., None] * f
  want = m1.apply({"params": p1}, h, method=lambda m, x: m.head(x))
  np.testing.assert_allclose(_run(mor, pm, toks)["logits"], want, atol=1e-5)


def _causal_check(cfg, params, routing):
  toks = _toks(b=1, t=14, seed=7)
  other = toks.copy()
  other[:, 8:] = _toks(b=1, t=6, seed=8)
  a = _run(cfg, params, toks, routing=routing)
  b = _run(cfg, params, other, routing=routing)
  return np.abs(np.asarray(a["logits"][:, :8] - b["logits"][:, :8])).max()


@pytest.mark.parametrize("kv", KVS)
@pytest.mark.parametrize("kind", ["expert", "token"])
def test_causal_routing_logits_ignore_future(kind, kv):
  rc = (RouterConfig(kv=kv) if kind == "expert"
        else RouterConfig(kind="token", gate="softmax", alpha=1.0, kv=kv))
  cfg = _cfg(rc)
  params = _params(cfg, seed=6, router_scale=50.0)
  assert _causal_check(cfg, params, "threshold") == 0.0


def test_topk_routing_is_not_causal():
  """Training-time top-k looks at the whole sequence (why decode thresholds)."""
  cfg = _cfg(RouterConfig())
  params = _params(cfg, seed=6, router_scale=50.0)
  assert _causal_check(cfg, params, "topk") > 1e-4


def _decode(cfg, params, toks, lengths, s=24):
  """Prefill each row's prompt (padded), then decode token by token with
  per-row positions; returns the logits of every real position per row."""
  b, t = toks.shape
  cache = init_cache(cfg, b, s)
  p0 = min(lengths)
  pos = np.broadcast_to(np.arange(p0), (b, p0))
  out = _run(cfg, params, toks[:, :p0], positions=jnp.asarray(pos), cache=cache)
  cache, got = out["cache"], [[out["logits"][i, j] for j in range(p0)] for i in range(b)]
  for step in range(p0, t):
    p = np.full((b, 1), step)
    out = _run(cfg, params, toks[:, step:step + 1], positions=jnp.asarray(p), cache=cache)
    cache = out["cache"]
    for i in range(b):
      got[i].append(out["logits"][i, 0])
  return np.stack([np.stack(r) for r in got]), cache


@pytest.mark.parametrize("impl", ["gather", "dense"])
@pytest.mark.parametrize("kv", KVS)
@pytest.mark.parametrize("kind", ["expert", "token"])
def test_cached_decode_equals_full_forward(kind, kv, impl):
  rc = (RouterConfig(kv=kv, impl=impl) if kind == "expert"
        else RouterConfig(kind="token", gate="softmax", alpha=1.0, kv=kv, impl=impl))
  cfg = _cfg(rc, lora_ranks=(("v", 2),))
  params = _params(cfg, seed=9, router_scale=50.0)
  toks = _toks(b=2, t=12, seed=10)
  got, cache = _decode(cfg, params, toks, [5, 5])
  full = _run(cfg, params, toks, routing="threshold")
  np.testing.assert_allclose(got, full["logits"], atol=2e-5, rtol=1e-5)
  # per-row depths differ, and the cache saw exactly the routed tokens
  sel = np.asarray(full["router"]["sel"])  # [N, B, T]
  assert sel[1:].sum() < sel[0].sum() * 2  # not every token went deep
  valid = np.asarray(cache["block_valid"])[:, :, :12]
  if kv == "recursion":
    np.testing.assert_array_equal(valid, sel)


def test_forced_decisions_match_between_cache_and_sequence():
  """Cached decoding under given routing decisions == full forward under them."""
  cfg = _cfg(RouterConfig())
  params = _params(cfg, seed=11)
  toks = _toks(b=2, t=10, seed=12)
  rng = np.random.default_rng(0)
  d = rng.integers(1, 4, (2, 10))  # per-token depth 1..3
  forced = jnp.asarray(np.arange(3)[:, None, None] < d[None])
  full = _run(cfg, params, toks, loop_mask=forced)
  np.testing.assert_array_equal(full["router"]["sel"], forced)
  cache = init_cache(cfg, 2, 16)
  got = []
  for t in range(10):
    out = _run(cfg, params, toks[:, t:t + 1], positions=jnp.full((2, 1), t), cache=cache,
               loop_mask=forced[:, :, t:t + 1])
    cache = out["cache"]
    got.append(out["logits"])
  np.testing.assert_allclose(np.concatenate(got, 1), full["logits"], atol=2e-5)


def test_topk_refused_in_cache_mode():
  cfg = _cfg(RouterConfig())
  params = _params(cfg)
  with pytest.raises(ValueError, match="future"):
    _run(cfg, params, _toks(t=4), cache=init_cache(cfg, 2, 8), routing="topk")

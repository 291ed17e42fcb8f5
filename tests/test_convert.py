"""Recursive conversion: index rules, equivalences (N=1, full rank), LoRA init."""
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.checkpoints import expected_shapes, load_checkpoint
from recursive_lm.config import ConfigError, DepthPlan, tiny_config
from recursive_lm.nn import weights as W
from recursive_lm.nn.model import Transformer
from recursive_lm.recursive import (
    convert, describe, init_indices, init_shared, layer_sources, lora_residual,
    plan_for, slot_positions, svd_lora, unique_param_count)

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tiny_llama"
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 11)).astype(np.int32)
FULL = 10_000  # clipped to min(d_in, d_out) per matrix


def _logits(cfg, params, tokens):
  # Eager (no jit): tiny models run in ~0.1 s and nothing is compiled per config.
  with jax.disable_jit():
    return Transformer(cfg).apply({"params": params}, tokens)["logits"]


@functools.lru_cache(maxsize=None)
def _fixture():
  ck = load_checkpoint(str(FIXTURE))
  return ck.config, ck.weights


@functools.lru_cache(maxsize=None)
def _random_source(n_layers, seed=0):
  """A random vanilla tiny model (HF names) with distinct norm scales per layer."""
  cfg = tiny_config(plan=DepthPlan.vanilla(n_layers))
  rng = np.random.default_rng(seed)
  shapes = expected_shapes(cfg)
  w = {k: (1 + 0.2 * rng.standard_normal(s) if len(s) == 1
           else 0.2 * rng.standard_normal(s)).astype(np.float32)
       for k, s in shapes.items()}
  return cfg, w


def _vanilla_logits(cfg, w, sources=None):
  """Logits of the vanilla model whose layers are ``w``'s layers ``sources``."""
  if sources is not None:
    n = cfg.plan.effective_depth
    w2 = {k: v for k, v in w.items() if not k.startswith("model.layers.")}
    for j, s in enumerate(sources):
      p = f"model.layers.{s}."
      w2.update({f"model.layers.{j}." + k[len(p):]: v for k, v in w.items()
                 if k.startswith(p)})
    cfg, w = cfg.replace(plan=DepthPlan.vanilla(len(sources))), w2
    assert n >= 1
  return np.asarray(_logits(cfg, W.params_from_hf(cfg, w), TOKENS))


def _converted_logits(cfg, params):
  return np.asarray(_logits(cfg, jax.tree_util.tree_map(jnp.asarray, params), TOKENS))


# --- index rules -------------------------------------------------------------
def test_stepwise_index_rules_bankers_rounding():
  assert init_indices(6, 2, "stepwise") == [(0,), (2,), (5,)]        # 2.5 -> 2
  assert init_indices(18, 2, "stepwise") == [
      (0,), (2,), (4,), (6,), (8,), (11,), (13,), (15,), (17,)]       # 8.5 -> 8
  # Middle variants sample linspace(1, L-2, K) on absolute indices.
  assert init_indices(8, 2, "stepwise", "middle_cycle") == [(1,), (4,), (6,)]
  assert init_indices(14, 4, "stepwise", "middle_cycle") == [(1,), (6,), (12,)]
  assert init_indices(14, 4, "stepwise", "middle_sequence") == [(1,), (6,), (12,)]


def test_average_lower_upper_random_rules():
  assert init_indices(6, 3, "average", "cycle") == [(0, 2, 4), (1, 3, 5)]
  assert init_indices(6, 3, "average", "sequence") == [(0, 1, 2), (3, 4, 5)]
  assert init_indices(8, 3, "average", "middle_cycle") == [(1, 3, 5), (2, 4, 6)]
  assert init_indices(8, 3, "average", "middle_sequence") == [(1, 2, 3), (4, 5, 6)]
  assert init_indices(6, 3, "lower") == [(0,), (1,)]
  assert init_indices(8, 3, "lower", "middle_cycle") == [(1,), (2,)]
  assert init_indices(6, 3, "upper") == [(4,), (5,)]
  assert init_indices(8, 3, "upper", "middle_cycle") == [(5,), (6,)]
  r = init_indices(11, 3, "random", "middle_cycle", seed=3)
  assert r == init_indices(11, 3, "random", "middle_cycle", seed=3)
  flat = [i for (i,) in r]
  assert len(flat) == 3 and flat == sorted(set(flat)) and all(1 <= i <= 9 for i in flat)
  assert slot_positions(6, 2, "cycle") == [(0, 3), (1, 4), (2, 5)]
  with pytest.raises(ConfigError, match="divisible"):
    init_indices(7, 2)
  with pytest.raises(ConfigError, match="init"):
    init_indices(6, 2, "middle")


def test_init_shared_average_covers_norms():
  _, w = _random_source(6)
  layers = [W.layer_from_hf(w, i) for i in range(6)]
  shared = init_shared(layers, 2, "average", "cycle")
  assert len(shared) == 3
  for leaf in (("attn_norm", "scale"), ("mlp", "down", "kernel")):
    get = lambda l: functools.reduce(lambda d, k: d[k], leaf, l)
    np.testing.assert_allclose(get(shared[1]), (get(layers[1]) + get(layers[4])) / 2,
                               rtol=1e-6)
  np.testing.assert_array_equal(
      init_shared(layers, 2, "stepwise")[2]["attn"]["q"]["kernel"],
      layers[5]["attn"]["q"]["kernel"])


def test_plans_and_nondivisible_sources():
  assert plan_for(4, 2)[0] == DepthPlan(0, 2, 2, 0)
  assert plan_for(6, 1)[0] == DepthPlan.vanilla(6)
  assert plan_for(8, 3, "middle_cycle")[0] == DepthPlan(1, 2, 3, 1)
  # MoR Table 6/9 layouts with added layers.
  assert plan_for(30, 3, "middle_cycle", "add")[0] == DepthPlan(1, 10, 3, 1)
  assert plan_for(24, 3, "middle_cycle", "add")[0].effective_depth == 26
  assert plan_for(32, 4, "middle_cycle", "add")[0].effective_depth == 34
  assert plan_for(30, 3, "middle_cycle", "select")[0] == DepthPlan(1, 9, 3, 1)
  assert layer_sources(6, 4, "cycle", "select") == [0, 2, 3, 5]
  assert layer_sources(6, 4, "cycle", "add") == [0, 1, 1, 2, 3, 4, 4, 5]
  assert layer_sources(8, 4, "middle_cycle", "select") == [0, 1, 3, 4, 6, 7]
  assert layer_sources(8, 4, "middle_cycle", "add") == [0, 1, 2, 2, 3, 4, 5, 5, 6, 7]
  src = layer_sources(30, 3, "middle_cycle", "add")
  assert sorted(set(src)) == list(range(30)) and len(src) == 32
  plan, steps = plan_for(8, 2, "middle_cycle")
  assert [(s.group, s.index, s.loop, s.source) for s in steps] == [
      ("prelude", 0, 0, 0), ("block", 0, 0, 1), ("block", 1, 0, 2),
      ("block", 2, 0, 3), ("block", 0, 1, 4), ("block", 1, 1, 5),
      ("block", 2, 1, 6), ("coda", 0, 0, 7)]
  with pytest.raises(ConfigError, match="nondivisible='add'"):
    plan_for(3, 4, "cycle", "select")
  with pytest.raises(ConfigError, match="at least 3"):
    plan_for(2, 1, "middle_cycle")


def test_sequence_only_with_one_shared_layer():
  with pytest.raises(ConfigError, match="CYCLE order.*sharing='cycle'"):
    plan_for(6, 3, "sequence")
  with pytest.raises(ConfigError, match="middle_cycle"):
    plan_for(8, 3, "middle_sequence")
  assert plan_for(3, 3, "sequence")[0] == DepthPlan(0, 1, 3, 0)
  assert plan_for(5, 3, "middle_sequence")[0] == DepthPlan(1, 1, 3, 1)
  cfg, w = _random_source(5)
  rcfg, params = convert(cfg, w, 3, "middle_sequence", "average", lora_ranks=FULL)
  np.testing.assert_allclose(_converted_logits(rcfg, params), _vanilla_logits(cfg, w),
                             atol=1e-4)


# --- equivalences ----------------------------------------------------------------
@pytest.mark.parametrize("sharing", ["cycle", "middle_cycle"])
@pytest.mark.parametrize("init", ["stepwise", "average"])
def test_one_loop_is_vanilla(sharing, init):
  cfg, w = _fixture()
  ref = _vanilla_logits(cfg, w)
  rcfg, params = convert(cfg, w, 1, sharing, init)
  assert rcfg.plan.loops == 1 and rcfg.plan.effective_depth == 4
  np.testing.assert_allclose(_converted_logits(rcfg, params), ref, atol=1e-5)
  rcfg, params = convert(cfg, w, 1, sharing, init, lora_ranks=3)
  assert not any(np.any(v) for k, v in params["lora"].items() if k.endswith("_b"))
  np.testing.assert_allclose(_converted_logits(rcfg, params), ref, atol=1e-5)


@pytest.mark.parametrize("n_layers,loops,sharing", [
    (6, 2, "cycle"), (6, 3, "cycle"), (8, 2, "middle_cycle"), (8, 3, "middle_cycle")])
@pytest.mark.parametrize("init", ["stepwise", "average"])
def test_full_rank_relaxation_reproduces_original(n_layers, loops, sharing, init):
  cfg, w = _random_source(n_layers)
  ref = _vanilla_logits(cfg, w)
  rcfg, params = convert(cfg, w, loops, sharing, init, lora_ranks=FULL)
  assert rcfg.lora_scale == 1.0 and rcfg.lora == {
      "q": 32, "k": 16, "v": 16, "o": 32, "gate": 32, "up": 32, "down": 32}
  np.testing.assert_allclose(_converted_logits(rcfg, params), ref, atol=1e-4)
  # Without relaxation the model really is different (the test is not vacuous).
  pcfg, plain = convert(cfg, w, loops, sharing, init)
  assert np.max(np.abs(_converted_logits(pcfg, plain) - ref)) > 1e-2


def test_full_rank_on_fixture_checkpoint():
  cfg, w = _fixture()
  rcfg, params = convert(cfg, w, 2, "cycle", "average", lora_ranks=FULL)
  np.testing.assert_allclose(_converted_logits(rcfg, params), _vanilla_logits(cfg, w),
                             atol=1e-4)


def test_rank_zero_is_plain_recursive_model():
  cfg, w = _fixture()
  for ranks in (None, 0, {"q": 0}):
    rcfg, params = convert(cfg, w, 2, "cycle", "stepwise", lora_ranks=ranks)
    assert rcfg.lora == {} and "lora" not in params
  assert rcfg.plan == DepthPlan(0, 2, 2, 0)
  for k, src in enumerate((0, 3)):          # round(linspace(0, 3, 2)) = 0, 3
    ref = W.layer_from_hf(w, src)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params["block"][f"layer_{k}"],
                           ref)
  np.testing.assert_allclose(_converted_logits(rcfg, params),
                             _vanilla_logits(cfg, w, [0, 3, 0, 3]), atol=1e-5)


def test_lora_scale_is_one_and_zero_residuals_get_zero_b():
  cfg, w = _fixture()
  rcfg, params = convert(cfg.replace(lora_scale=2.0), w, 2, "cycle", "stepwise",
                         lora_ranks={"q": 4, "down": 4})
  assert rcfg.lora_scale == 1.0
  lora = params["lora"]
  # Slot 0 = layer 0 (its loop 0 position); slot 1 = layer 3 (its loop 1 position).
  for k, n in ((0, 0), (1, 1)):
    for t, d_in in (("q", 32), ("down", 64)):
      a, b = lora[f"layer_{k}_{t}_a"][n], lora[f"layer_{k}_{t}_b"][n]
      assert not np.any(b)
      assert 0.5 < np.std(a) * np.sqrt(d_in) < 1.5       # Gaussian, std 1/sqrt(in)
  for k, n in ((0, 1), (1, 0)):              # real residuals: SVD factors
    a, b = lora[f"layer_{k}_q_a"][n], lora[f"layer_{k}_q_b"][n]
    assert np.any(b)
    np.testing.assert_allclose(a.T @ a, np.eye(4), atol=1e-5)  # a = U_r
  _, std = convert(cfg, w, 2, "cycle", "average", lora_ranks=4, lora_init="standard")
  assert not any(np.any(v) for k, v in std["lora"].items() if k.endswith("_b"))


def test_svd_truncation_error_decreases_with_rank():
  cfg, w = _fixture()
  layers = [W.layer_from_hf(w, i) for i in range(4)]
  shared = init_shared(layers, 2, "average")
  res = lora_residual("up", layers[2], shared[0])          # [32, 64]
  errs = []
  for r in (1, 2, 4, 8, 16, 24, 32):
    a, b = svd_lora(res, r)
    assert a.shape == (32, r) and b.shape == (r, 64)
    errs.append(np.linalg.norm(res - a @ b))
  assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), errs
  assert errs[-1] < 1e-4 * np.linalg.norm(res)
  a, b = svd_lora(res, 99)                                   # clipped to 32
  assert a.shape == (32, 32)
  # Function-level: merged q reproduces the norm-folded original kernel.
  g_t, g_s = layers[2]["attn_norm"]["scale"], shared[0]["attn_norm"]["scale"]
  a, b = svd_lora(lora_residual("q", layers[2], shared[0]), 32)
  np.testing.assert_allclose(
      g_s[:, None] * (shared[0]["attn"]["q"]["kernel"] + a @ b),
      g_t[:, None] * layers[2]["attn"]["q"]["kernel"], atol=1e-5)
  # Logit error of the converted model shrinks with rank too.
  ref = _vanilla_logits(cfg, w)
  e = [np.max(np.abs(_converted_logits(*convert(cfg, w, 2, "cycle", "average",
                                                lora_ranks=r)) - ref))
       for r in (0, FULL)]
  assert e[1] < 1e-4 < e[0]


@pytest.mark.parametrize("sharing,loops", [("cycle", 4), ("middle_cycle", 4)])
@pytest.mark.parametrize("nondivisible", ["select", "add"])
def test_nondivisible_layer_counts(sharing, loops, nondivisible):
  cfg, w = _random_source(6 if sharing == "cycle" else 8)
  src = layer_sources(cfg.plan.effective_depth, loops, sharing, nondivisible)
  rcfg, params = convert(cfg, w, loops, sharing, "average", lora_ranks=FULL,
                         nondivisible=nondivisible)
  assert rcfg.plan.effective_depth == len(src)
  assert rcfg.name.endswith(f"-{nondivisible}")
  # Full rank reproduces the effective model (selected / duplicated layers).
  np.testing.assert_allclose(_converted_logits(rcfg, params),
                             _vanilla_logits(cfg, w, src), atol=1e-4)


# --- accounting, errors ----------------------------------------------------------------
def test_unique_param_count_and_describe():
  cfg, w = _random_source(8)
  rcfg, params = convert(cfg, w, 3, "middle_cycle", "stepwise",
                         lora_ranks={"q": 2, "k": 100})
  assert rcfg.lora == {"q": 2, "k": 16}
  n = unique_param_count(rcfg, params)
  assert n == sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert unique_param_count(rcfg, non_embedding=True) == n - 2 * 97 * 32
  with pytest.raises(ConfigError, match="do not belong"):
    unique_param_count(rcfg.replace(plan=DepthPlan(1, 2, 2, 1)), params)
  text = describe(rcfg, params)
  for s in ("sharing: middle_cycle", "init: stepwise", "effective depth: 8",
            "block 2 x 3 loops", f"{n:,}", "q=2, k=16"):
    assert s in text, text
  assert "init: unknown" in describe(cfg.replace(plan=DepthPlan(1, 2, 3, 1)))


def test_conversion_errors():
  cfg, w = _fixture()
  with pytest.raises(ConfigError, match="sharing"):
    convert(cfg, w, 2, "cycle_rev")
  with pytest.raises(ConfigError, match="init"):
    convert(cfg, w, 2, init="fixed_start")
  with pytest.raises(ConfigError, match="unknown LoRA target"):
    convert(cfg, w, 2, lora_ranks={"qkv": 4})
  with pytest.raises(ConfigError, match=">= 0"):
    convert(cfg, w, 2, lora_ranks={"q": -1})
  with pytest.raises(ConfigError, match="vanilla"):
    convert(cfg.replace(plan=DepthPlan(0, 2, 2, 0)), w, 2)
  with pytest.raises(ConfigError, match="missing"):
    convert(cfg, {k: v for k, v in w.items() if "layers.3." not in k}, 2)

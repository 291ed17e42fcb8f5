"""Early-exit objectives: weights, self-KD detachment, FREE alignment, curricula,
layer dropout, the exit train step (incl. sharded) and per-exit evaluation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm import sharding as S
from recursive_lm.config import ConfigError, DepthPlan, tiny_config
from recursive_lm.decode import depth as D
from recursive_lm.nn.model import Transformer, init_params
from recursive_lm.training import (LossConfig, OptimConfig, cross_entropy,
                                   init_train_state, jit_train_step, make_train_step,
                                   train_state_shardings)
from recursive_lm.training import exit_losses as X
from recursive_lm.training.exit_forward import (exit_forward, layer_drop_rates,
                                                layer_keep_mask)
from recursive_lm.training.exit_objective import (exit_train_loss, make_exit_eval_step,
                                                  per_exit_terms)

REC = tiny_config(plan=DepthPlan(1, 1, 3, 0), lora_ranks=(("q", 2),))  # exits 2, 3, 4
VAN = tiny_config(plan=DepthPlan.vanilla(4))


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest: XLA optimisations off


@functools.lru_cache(maxsize=None)
def _cached(cfg, seed):
  p = jax.jit(lambda: init_params(cfg, seed=seed))()
  if "lora" in p:  # non-zero LoRA so loops differ
    p = dict(p, lora=jax.tree_util.tree_map(lambda x: x + 0.05, p["lora"]))
  return p


def _params(cfg, seed=0):
  return jax.tree_util.tree_map(lambda x: x, _cached(cfg, seed))


def _batch(cfg, b=4, t=16, seed=0):
  """Two packed documents per row, some masked targets."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(2, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  half = t // 2
  seg = np.concatenate([np.ones((b, half)), 2 * np.ones((b, t - half))], 1)
  pos = np.concatenate([np.arange(half), np.arange(t - half)])[None].repeat(b, 0)
  mask = np.ones((b, t))
  mask[:, half - 1] = 0
  mask[0, -3:] = 0
  return {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
          "loss_mask": jnp.asarray(mask, jnp.int32),
          "segment_ids": jnp.asarray(seg, jnp.int32),
          "positions": jnp.asarray(pos, jnp.int32)}


def _ref_exit_ce(cfg, params, batch, layers):
  """Independent reference: decode.depth.hidden_states + head + cross_entropy."""
  states, _ = D.hidden_states(cfg, params, batch["inputs"], layers,
                              batch["segment_ids"], batch["positions"])
  return [float(cross_entropy(D.head(cfg, params, h), batch["targets"],
                              batch["loss_mask"])[0]) for h in states]


# ------------------------------------------------------------------ weights
def test_calm_weights_match_formulas():
  np.testing.assert_allclose(X.calm_weights(3, "linear"), np.array([1, 2, 3]) / 6, 1e-6)
  np.testing.assert_allclose(X.calm_weights(4, "uniform"), np.full(4, 0.25), 1e-6)
  np.testing.assert_allclose(X.calm_weights(3, "geometric"), np.array([1, 2, 4]) / 7, 1e-6)
  np.testing.assert_allclose(X.calm_weights(3, 3), np.array([1, 4, 7]) / 12, 1e-6)
  w = X.exit_weights(X.ExitLossConfig(kind="calm_weighted"), (2, 3, 4), 4)
  np.testing.assert_allclose(w, np.array([1, 2, 3]) / 6, 1e-6)
  w = X.exit_weights(X.ExitLossConfig(kind="aggressive", c=0.3), (2, 3, 4), 4)
  np.testing.assert_allclose(w, [0.3, 0.3, 1.0], 1e-6)
  w = X.exit_weights(X.ExitLossConfig(kind="free"), (6, 24), 24)  # FREE: 0.2 / 0.8
  np.testing.assert_allclose(w, [0.2, 0.8], 1e-6)


def test_layerskip_scales_and_curricula():
  np.testing.assert_allclose(X.layerskip_scale([1, 2, 4], 4, "sum", 0.5),
                             [0.5 * 1, 0.5 * 3, 10], 1e-6)
  np.testing.assert_allclose(X.layerskip_scale([1, 4], 4, "inv_sqrt"), [1, 0.5], 1e-6)
  ecfg = X.ExitLossConfig(kind="layerskip", curriculum="rotational", rotation_stride=2)
  init = np.arange(5) % 2 == 0
  for t in range(7):  # np.roll of the initial every-2nd mask, last always on
    want = np.roll(init, t)
    want[-1] = True
    got = np.asarray(X.curriculum_mask(ecfg, [1, 2, 3, 4, 5], 5, t))
    np.testing.assert_array_equal(got, want, err_msg=f"step {t}")
  g = X.ExitLossConfig(kind="layerskip", curriculum="gradual", gradual_scale=0.5,
                       curriculum_steps=100)
  layers = [2, 4, 6, 8]  # l = 1, 3, 5, 7; on iff t/100 >= 0.5 (8 - l) / 8
  for t, want in [(0, [0, 0, 0, 1]), (10, [0, 0, 0, 1]), (19, [0, 0, 1, 1]),
                  (32, [0, 1, 1, 1]), (44, [1, 1, 1, 1]), (90, [1, 1, 1, 1])]:
    np.testing.assert_array_equal(X.curriculum_mask(g, layers, 8, t), np.bool_(want),
                                  err_msg=f"step {t}")
  w = X.exit_weights(g, layers, 8, 19)  # enabled: l = 5, 7 with uniform e
  np.testing.assert_allclose(w, [0, 0, 0.5, 0.5], 1e-6)


def test_exits_resolve_and_bad_configs_are_explained():
  assert X.resolve_exits(REC, X.ExitLossConfig()) == (2, 3, 4)
  assert X.resolve_exits(VAN, X.ExitLossConfig(exit_layers=(3, 1))) == (1, 3, 4)
  with pytest.raises(ConfigError, match="exit_layers=\\(8, 16\\)"):
    X.resolve_exits(VAN, X.ExitLossConfig())
  with pytest.raises(ConfigError, match="final exit 4 is implicit"):
    X.resolve_exits(VAN, X.ExitLossConfig(exit_layers=(4,)))
  with pytest.raises(ConfigError, match="kind='nope'"):
    X.ExitLossConfig(kind="nope")
  with pytest.raises(ConfigError, match="set kind='layerskip'"):
    X.ExitLossConfig(kind="aggressive", layer_dropout=0.1)
  assert isinstance(LossConfig(exit={"kind": "free"}).exit, X.ExitLossConfig)


# ------------------------------------------------------------------ FREE
def _brute_align(cost):
  k, s = cost.shape
  out, prev = [0] * k, s
  for i in reversed(range(k)):
    cand = [j for j in range(s) if j < prev]
    if cand:
      prev = min(cand, key=lambda j: (cost[i, j], j))
    out[i] = prev
  return out


@pytest.mark.parametrize("k,s", [(3, 3), (4, 6), (6, 3), (5, 5)])
def test_dyna_alignment_monotone_and_matches_brute_force(k, s):
  rng = np.random.default_rng(k * 10 + s)
  for _ in range(20):
    cost = rng.random((k, s)).astype(np.float32)
    got = np.asarray(X.dyna_align(jnp.asarray(cost)))
    assert list(got) == _brute_align(cost)
    assert np.all(np.diff(got) >= 0)
    # strictly increasing except where column 0 was reached and is reused
    assert np.all((np.diff(got) > 0) | (got[:-1] == 0))


def test_free_teacher_layer_table():
  t = lambda ls, l: X.free_teacher_layers(X.ExitLossConfig(kind="free"), ls, l)
  assert t(6, 24) == (4, 8, 12, 16, 20, 24)
  assert t(8, 24) == tuple(range(3, 25, 3))
  assert t(4, 24) == (6, 12, 18, 24)
  assert t(12, 24) == tuple(range(2, 25, 2))
  assert t(3, 12) == (4, 8, 12)


def test_free_kd_values_and_detached_teacher():
  rng = np.random.default_rng(0)
  st = jnp.asarray(rng.normal(size=(3, 2, 4, 5)), jnp.float32)
  te = jnp.asarray(rng.normal(size=(3, 2, 4, 5)), jnp.float32)
  mask = jnp.asarray([[1, 1, 0, 1], [1, 0, 1, 1]])
  m = np.asarray(mask, np.float64)
  mse = lambda a, b: float(((np.asarray(a) - np.asarray(b)) ** 2).mean(-1).__mul__(m).sum()
                           / m.sum())
  last, _ = X.free_kd(st, te, mask, "last")
  np.testing.assert_allclose(last, mse(st[-1], te[-1]), rtol=1e-5)
  unif, idx = X.free_kd(st, te, mask, "unif")
  np.testing.assert_allclose(unif, np.mean([mse(st[i], te[i]) for i in range(3)]), rtol=1e-5)
  dyna, idx = X.free_kd(st, te, mask, "dyna")
  cost = np.array([[mse(te[a], st[b]) for b in range(3)] for a in range(3)])
  assert list(np.asarray(idx)) == _brute_align(cost)
  np.testing.assert_allclose(dyna, np.mean([cost[a, int(idx[a])] for a in range(3)]),
                             rtol=1e-5)
  g_s, g_t = jax.grad(lambda a, b: X.free_kd(a, b, mask, "dyna")[0], (0, 1))(st, te)
  assert float(jnp.abs(g_s).sum()) > 0 and float(jnp.abs(g_t).sum()) == 0


# ------------------------------------------------------------------ losses
def test_aggressive_weights_and_per_exit_ce_match_reference():
  params, batch = _params(REC), _batch(REC)
  ref = _ref_exit_ce(REC, params, batch, (2, 3, 4))
  step, key = jnp.zeros((), jnp.int32), jax.random.key(0)
  f = jax.jit(lambda p, lc: exit_train_loss(REC, lc, p, batch, None, step, key),
              static_argnums=1)
  l0, m0 = f(params, LossConfig(kd_weight=0, exit=X.ExitLossConfig(c=0.0)))
  np.testing.assert_allclose(l0, ref[-1], rtol=1e-5)  # c = 0: the final CE
  l1, m1 = f(params, LossConfig(kd_weight=0, exit=X.ExitLossConfig(c=0.1)))
  np.testing.assert_allclose(l1, ref[2] + 0.1 * (ref[0] + ref[1]), rtol=1e-5)
  for c, want in zip((2, 3, 4), ref):
    np.testing.assert_allclose(m1[f"exit{c}_ce"], want, rtol=1e-5)
  lc, _ = f(params, LossConfig(kd_weight=0, exit=X.ExitLossConfig(kind="calm_weighted")))
  np.testing.assert_allclose(lc, (ref[0] + 2 * ref[1] + 3 * ref[2]) / 6, rtol=1e-5)
  # vanilla exits through the unrolled path
  vp, vb = _params(VAN), _batch(VAN, seed=1)
  vref = _ref_exit_ce(VAN, vp, vb, (1, 3, 4))
  lv, _ = exit_train_loss(VAN, LossConfig(kd_weight=0, exit=X.ExitLossConfig(
      exit_layers=(1, 3), c=0.5)), vp, vb, None, step, key)
  np.testing.assert_allclose(lv, vref[2] + 0.5 * (vref[0] + vref[1]), rtol=1e-5)


def test_self_kd_target_is_detached():
  params, batch = _params(REC), _batch(REC)
  states, logits = exit_forward(REC, params, batch, (2, 3, 4))

  def kd(st, lg):
    return jnp.sum(per_exit_terms(REC, params, st, lg, batch["targets"],
                                  batch["loss_mask"], self_kd=True)["kd"])

  g_states, g_logits = jax.grad(kd, (0, 1))(states[:2], logits)
  assert float(jnp.abs(g_logits).max()) == 0.0
  assert float(jnp.abs(g_states).max()) > 0.0
  k = per_exit_terms(REC, params, states[:2], logits, batch["targets"],
                     batch["loss_mask"], self_kd=True)["kd"]
  assert np.all(np.asarray(k) > 0)
  # an exit identical to the final one has zero KD and full agreement
  same = per_exit_terms(REC, params, states[2:], logits, batch["targets"],
                        batch["loss_mask"], self_kd=True)
  np.testing.assert_allclose(same["kd"], 0.0, atol=1e-6)
  np.testing.assert_allclose(same["agree"], 1.0)


def test_free_objective_runs_and_adds_hidden_kd():
  params, batch = _params(VAN), _batch(VAN)
  step, key = jnp.zeros((), jnp.int32), jax.random.key(0)
  lc = LossConfig(kd_weight=0, exit=X.ExitLossConfig(kind="free", exit_layers=(2,),
                                                     alpha=0.5))
  loss, m = exit_train_loss(VAN, lc, params, batch, None, step, key)
  ref = _ref_exit_ce(VAN, params, batch, (2, 4))
  np.testing.assert_allclose(loss, (2 * ref[0] + 4 * ref[1]) / 6 + 0.5 * m["free_kd"],
                             rtol=1e-5)
  assert float(m["free_kd"]) > 0


# ------------------------------------------------------------------ forward / dropout
def test_scanned_and_unrolled_exit_states_agree_and_match_model():
  params, batch = _params(REC), _batch(REC)
  s_scan, lg_scan = exit_forward(REC, params, batch, (2, 3, 4))
  keep = jnp.ones((4, 4), bool)  # forces the unrolled path
  s_unr, lg_unr = exit_forward(REC, params, batch, (2, 3, 4), keep)
  np.testing.assert_allclose(s_scan, s_unr, atol=1e-5)
  ref = Transformer(REC).apply({"params": params}, batch["inputs"],
                               positions=batch["positions"],
                               segment_ids=batch["segment_ids"])["logits"]
  np.testing.assert_allclose(lg_unr, ref, atol=1e-5)
  np.testing.assert_allclose(lg_scan, ref, atol=1e-5)


def test_layer_dropout_rates_masks_and_rate_zero():
  r = layer_drop_rates(5, 0.2, "exp")
  assert r[0] == 0 and abs(r[-1] - 0.2) < 1e-6 and np.all(np.diff(r) > 0)
  np.testing.assert_allclose(layer_drop_rates(5, 0.2, "linear"), 0.2 * np.arange(5) / 4,
                             1e-6)
  keep = np.asarray(layer_keep_mask(jax.random.key(1), np.array([0.0, 0.5, 1.0]), 4000))
  assert keep[0].all() and not keep[2].any() and abs(keep[1].mean() - 0.5) < 0.03
  # rate 0 == the plain forward; a dropped layer is the identity for that row only
  params, batch = _params(VAN), _batch(VAN)
  plain, _ = exit_forward(VAN, params, batch, (1, 2, 3, 4))
  k0 = layer_keep_mask(jax.random.key(0), layer_drop_rates(4, 0.0), 4)
  z, _ = exit_forward(VAN, params, batch, (1, 2, 3, 4), k0)
  np.testing.assert_allclose(z, plain, atol=1e-6)
  keep = np.ones((4, 4), bool)
  keep[1, 0] = False  # row 0 skips layer 2
  d, _ = exit_forward(VAN, params, batch, (1, 2, 3, 4), jnp.asarray(keep))
  np.testing.assert_allclose(d[1, 0], d[0, 0], atol=0)
  np.testing.assert_allclose(d[:, 1:], plain[:, 1:], atol=1e-6)
  assert float(jnp.abs(d[3, 0] - plain[3, 0]).max()) > 1e-3


def test_exit_eval_step_matches_reference():
  params, batch = _params(REC), _batch(REC)
  nll, correct, agree, n = jax.jit(make_exit_eval_step(REC, (2, 3, 4)))(params, batch)
  ref = _ref_exit_ce(REC, params, batch, (2, 3, 4))
  np.testing.assert_allclose(nll / n, ref, rtol=1e-5)
  assert float(n) == float(batch["loss_mask"].sum())
  assert float(agree[-1]) == float(n) and np.all(np.asarray(correct) <= float(n))


# ------------------------------------------------------------------ train step
@pytest.mark.parametrize("ecfg", [
    X.ExitLossConfig(kind="aggressive", c=0.1, self_kd=1.0),
    X.ExitLossConfig(kind="layerskip", curriculum="rotational", layer_dropout=0.2,
                     scale="sum"),
    X.ExitLossConfig(kind="free", kd_align="dyna"),
], ids=["aggressive_kd", "layerskip", "free"])
def test_exit_train_step_decreases_loss(ecfg):
  tcfg = tiny_config(plan=DepthPlan.vanilla(2))
  ocfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")
  step = jax.jit(make_train_step(REC, ocfg, LossConfig(kd_weight=0.5, exit=ecfg), tcfg))
  state = init_train_state(REC, ocfg, _params(REC))
  teacher, batch = _params(tcfg, seed=1), _batch(REC)
  first = {}
  for i in range(6):
    state, m = step(state, teacher, batch)
    first = first or m
  assert float(m["exit2_ce"]) < float(first["exit2_ce"]) - 0.2
  assert float(m["ce"]) < float(first["ce"]) - 0.2
  if ecfg.kind != "layerskip":  # layerskip's loss mixes rotating exits
    assert float(m["loss"]) < float(first["loss"]) - 0.2
  for k in ("exit2_acc", "exit2_agree", "exit4_acc", "exit_loss", "kd"):
    assert np.isfinite(float(m[k])), k
  if ecfg.self_kd:
    assert float(m["exit2_kd"]) > 0


def test_exit_train_step_sharded_equals_unsharded():
  cfg = tiny_config(plan=DepthPlan(1, 1, 2, 0), lora_ranks=(("gate", 2),))
  tcfg = tiny_config(plan=DepthPlan.vanilla(1))
  ocfg = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant")
  params, teacher = _params(cfg), _params(tcfg, seed=1)
  batch = _batch(cfg)
  train_step = make_train_step(cfg, ocfg, LossConfig(exit=X.ExitLossConfig(self_kd=1.0)),
                               tcfg)
  ref_state, ref_m = jax.jit(train_step)(init_train_state(cfg, ocfg, params), teacher,
                                         batch)
  mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
  rules = S.RULES["fsdp_tensor"]
  p_sh = S.param_shardings(S.abstract_params(cfg), mesh, rules)
  t_sh = S.param_shardings(S.abstract_params(tcfg), mesh, rules)
  st_sh = train_state_shardings(cfg, ocfg, p_sh, mesh)
  fresh = jax.tree_util.tree_map(jnp.copy, params)
  state = jax.device_put(init_train_state(cfg, ocfg, fresh), st_sh)
  b_sh = S.batch_sharding(mesh)
  step = jit_train_step(train_step, mesh, st_sh, t_sh, b_sh)
  new, m = step(state, S.shard_params(teacher, t_sh), jax.device_put(batch, b_sh))
  for k in ("loss", "exit2_ce", "exit2_kd", "exit3_ce"):
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-7, err_msg=k)
  for a, b in zip(jax.tree_util.tree_leaves(new.params),
                  jax.tree_util.tree_leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# ------------------------------------------------------------------ trainer
def test_exit_posttraining_end_to_end(tmp_path):
  """Fresh conversion + aggressive/self-KD exits, then post-training of the
  saved student (``init_from``) with CALM weights; per-exit held-out metrics
  land in metrics.jsonl and the summary."""
  import json
  import os
  import sys
  from recursive_lm.training import metrics as M
  from recursive_lm.training.trainer import train
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.join(root, "experiments", "configs"))
  import exit_smollm2  # pylint: disable=g-import-not-at-top
  words = "the cat sat on a mat while dogs ran in the park".split()
  rng = np.random.default_rng(0)
  corpus = tmp_path / "docs.jsonl"
  with open(corpus, "w") as f:
    for _ in range(200):
      f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(10, 50)))}) + "\n")

  def config(variant, workdir):
    c = exit_smollm2.get_config(f"steps=4,seq_len=32,batch=8,lr=1e-2,eval_batches=2,"
                                f"{variant}")
    c.model = os.path.join(root, "tests", "fixtures", "tiny_llama")
    c.workdir = str(workdir)
    c.data.source = str(corpus)
    c.data.encode = "bytes"
    c.train.peak_matmul_size = 0
    return c

  s1 = train(config("init_from=none,loss=aggressive,c=0.1,self_kd=1", tmp_path / "a"))
  assert s1["status"] == "completed"
  for k in ("exit2_ppl_init", "exit2_ppl_final", "exit4_ppl_final", "exit2_agree_final"):
    assert np.isfinite(s1[k]), k
  assert s1["exit2_ppl_final"] < s1["exit2_ppl_init"]
  np.testing.assert_allclose(s1["exit4_ppl_final"], s1["student_ppl_final"], rtol=1e-5)
  assert s1["exit4_agree_final"] == 1.0
  recs = M.read_metrics(os.path.join(tmp_path / "a", M.METRICS_FILE))
  train_recs = [r for r in recs if r["kind"] == "train"]
  assert len(train_recs) == 4 and {"exit2_ce", "exit2_kd", "exit2_agree"} <= set(train_recs[0])
  s2 = train(config(f"init_from={s1['final_dir']},loss=calm_weighted", tmp_path / "b"))
  np.testing.assert_allclose(s2["exit2_ppl_init"], s1["exit2_ppl_final"], rtol=1e-4)
  np.testing.assert_allclose(s2["student_ppl_init"], s1["student_ppl_final"], rtol=1e-4)

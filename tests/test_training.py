"""Training: losses, optimizer, train step, sharded == unsharded, remat."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm import sharding as S
from recursive_lm.config import DepthPlan, tiny_config
from recursive_lm.nn.model import Transformer, init_params
from recursive_lm.training import (KD_KINDS, LossConfig, OptimConfig, cross_entropy,
                                   distill_loss, init_train_state, jit_train_step,
                                   kd_loss, make_eval_step, make_optimizer,
                                   make_train_step, schedule_fn, train_state_shardings)


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest: XLA optimisations off


@functools.lru_cache(maxsize=None)
def _cached_params(cfg, seed):
  return jax.jit(lambda: init_params(cfg, seed=seed))()


def _params(cfg, seed=0):
  """Random params (fresh dict structure around cached arrays)."""
  return jax.tree_util.tree_map(lambda x: x, _cached_params(cfg, seed))


def _batch(cfg, b=4, t=16, seed=0, full_mask=False):
  """A packed pipeline-style batch: two documents per row."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(2, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  half = t // 2
  seg = np.concatenate([np.ones((b, half)), 2 * np.ones((b, t - half))], 1)
  pos = np.concatenate([np.arange(half), np.arange(t - half)])[None].repeat(b, 0)
  mask = np.ones((b, t))
  if not full_mask:
    mask[:, half - 1] = 0  # last token of the first document
    mask[0, -3:] = 0
  return {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
          "loss_mask": jnp.asarray(mask, jnp.int32),
          "segment_ids": jnp.asarray(seg, jnp.int32),
          "positions": jnp.asarray(pos, jnp.int32)}


def _logits(seed, shape=(2, 3, 7), scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _assert_trees_close(a, b, atol, rtol=0.0):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------- losses
def test_cross_entropy_matches_numpy():
  s = _logits(0, (2, 5, 11), 3.0)
  tg = np.random.default_rng(1).integers(0, 11, (2, 5))
  mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]])
  sn = np.asarray(s, np.float64)
  lse = np.log(np.exp(sn).sum(-1))
  nll = lse - np.take_along_axis(sn, tg[..., None], -1)[..., 0]
  want = (nll * mask).sum() / mask.sum()
  loss, m = cross_entropy(s, jnp.asarray(tg), jnp.asarray(mask))
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(m["n_tokens"]) == mask.sum()
  loss_z, m = cross_entropy(s, jnp.asarray(tg), jnp.asarray(mask), z_loss=1e-2)
  np.testing.assert_allclose(loss_z, want + 1e-2 * ((lse ** 2) * mask).sum() / mask.sum(),
                             rtol=1e-6)
  # bf16 logits reduce in f32
  lb, _ = cross_entropy(s.astype(jnp.bfloat16), jnp.asarray(tg), jnp.asarray(mask))
  assert lb.dtype == jnp.float32 and abs(float(lb) - want) < 0.05


@pytest.mark.parametrize("kind", KD_KINDS)
def test_kd_zero_iff_equal(kind):
  s, t = _logits(0), _logits(1)
  mask = jnp.ones((2, 3))
  assert abs(float(kd_loss(s, s, mask, kind))) < 1e-6
  assert float(kd_loss(s, t, mask, kind)) > 1e-3
  _, m = distill_loss(s, s + 5.0, jnp.zeros((2, 3), jnp.int32), mask, kd=kind)
  assert abs(float(m["kd"])) < 1e-5  # softmax is shift invariant
  _, m = distill_loss(s, t, jnp.zeros((2, 3), jnp.int32), mask, kd=kind)
  assert float(m["kd"]) > 1e-3


def test_forward_kl_matches_numpy():
  s, t = _logits(2), _logits(3)
  tau = 2.0
  ls = jax.nn.log_softmax(np.asarray(s, np.float64) / tau)
  lt = jax.nn.log_softmax(np.asarray(t, np.float64) / tau)
  want = tau ** 2 * np.mean((np.exp(lt) * (lt - ls)).sum(-1))
  _, m = distill_loss(s, t, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3)),
                      temperature=tau)
  np.testing.assert_allclose(m["kd"], want, rtol=1e-5)


@pytest.mark.parametrize("kind,tau", [("forward_kl", 1.0), ("forward_kl", 2.0),
                                      ("reverse_kl", 1.5), ("jsd", 1.0), ("tvd", 1.0)])
def test_distill_loss_gradient_finite_differences(kind, tau):
  s, t = _logits(4, (1, 2, 5)), _logits(5, (1, 2, 5))
  tg = jnp.asarray([[1, 3]])
  mask = jnp.asarray([[1, 1]])

  def f(x):
    return distill_loss(x, t, tg, mask, ce_weight=0.7, kd_weight=1.3, kd=kind,
                        temperature=tau, z_loss=0.05)[0]

  g = np.asarray(jax.grad(f)(s))
  eps = 1e-2
  fd = np.zeros_like(g)
  for idx in np.ndindex(*s.shape):
    e = np.zeros(s.shape, np.float32)
    e[idx] = eps
    fd[idx] = (f(s + e) - f(s - e)) / (2 * eps)
  np.testing.assert_allclose(g, fd, atol=2e-3, rtol=1e-2)


def test_fused_forward_kl_grad_matches_autodiff():
  s, t = _logits(6, (2, 4, 13), 2.0), _logits(7, (2, 4, 13), 2.0)
  tg = jnp.asarray(np.random.default_rng(8).integers(0, 13, (2, 4)))
  mask = jnp.asarray([[1, 1, 0, 1], [0, 1, 1, 1]])

  def ref(x):
    z = jax.nn.logsumexp(x, -1)
    nll = z - jnp.take_along_axis(x, tg[..., None], -1)[..., 0]
    n = mask.sum()
    return ((nll + 0.1 * z ** 2) * mask).sum() / n + 0.5 * kd_loss(x, t, mask, temperature=3.0)

  fused = lambda x: distill_loss(x, t, tg, mask, kd_weight=0.5, temperature=3.0,
                                 z_loss=0.1)[0]
  np.testing.assert_allclose(fused(s), ref(s), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(fused))(s), jax.jit(jax.grad(ref))(s),
                             atol=1e-7)


def test_teacher_gets_no_gradient():
  s, t = _logits(0), _logits(1)
  tg, mask = jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))
  for kind in KD_KINDS:
    gt = jax.grad(lambda y: distill_loss(s, y, tg, mask, kd=kind)[0])(t)
    assert not np.any(np.asarray(gt))
  # Through the whole train step: d loss / d teacher params == 0.
  cfg = tiny_config(plan=DepthPlan.vanilla(1))
  student, teacher = _params(cfg, seed=0), _params(cfg, seed=1)
  ocfg = OptimConfig(warmup_steps=0, total_steps=10)
  step = make_train_step(cfg, ocfg)
  state = init_train_state(cfg, ocfg, student)
  batch = _batch(cfg, b=2, t=8)
  g = jax.jit(jax.grad(lambda tp: step(state, tp, batch)[1]["loss"]))(teacher)
  assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(g))


# ---------------------------------------------------------------------- optimizer
def test_schedules():
  lr = 1e-3
  c = schedule_fn(OptimConfig(lr=lr, schedule="cosine", warmup_steps=10,
                              total_steps=110, min_lr_ratio=0.1))
  np.testing.assert_allclose([c(0), c(5), c(10), c(60), c(110), c(200)],
                             [0, lr / 2, lr, lr * 0.55, lr * 0.1, lr * 0.1], rtol=1e-5)
  w = schedule_fn(OptimConfig(lr=lr, schedule="wsd", warmup_steps=10, total_steps=100,
                              decay_fraction=0.2, min_lr_ratio=0.0))
  np.testing.assert_allclose([w(0), w(5), w(10), w(50), w(80), w(90), w(100)],
                             [0, lr / 2, lr, lr, lr, lr / 2, 0], rtol=1e-5, atol=1e-12)
  k = schedule_fn(OptimConfig(lr=lr, schedule="constant", warmup_steps=4,
                              total_steps=10))
  np.testing.assert_allclose([k(0), k(2), k(4), k(1000)], [0, lr / 2, lr, lr])
  with pytest.raises(ValueError, match="schedule"):
    OptimConfig(schedule="linear")


def test_no_weight_decay_on_1d_params():
  cfg = tiny_config(plan=DepthPlan.vanilla(1))
  params = _params(cfg)
  ocfg = OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5)
  tx = make_optimizer(ocfg)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  for p, u in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(updates)):
    if p.ndim <= 1:
      assert not np.any(np.asarray(u))
    else:  # pure decoupled decay: -lr * wd * p
      np.testing.assert_allclose(u, -0.1 * 0.5 * p, rtol=1e-5, atol=1e-9)


def test_grad_accumulation_equals_big_batch():
  cfg = tiny_config(plan=DepthPlan.vanilla(1))
  params = _params(cfg, seed=3)
  big = _batch(cfg, b=4, t=8, seed=5, full_mask=True)
  halves = [jax.tree_util.tree_map(lambda x, i=i: x[2 * i:2 * i + 2], big) for i in (0, 1)]
  base = dict(lr=1e-3, warmup_steps=0, schedule="constant", clip_norm=0.5)
  one = OptimConfig(**base)
  acc = OptimConfig(**base, grad_accum=2)
  s1, m1 = jax.jit(make_train_step(cfg, one))(init_train_state(cfg, one, params), None, big)
  step2 = jax.jit(make_train_step(cfg, acc))
  s2 = init_train_state(cfg, acc, params)
  s2, ma = step2(s2, None, halves[0])
  _assert_trees_close(s2.params, params, atol=0)  # no update after 1 micro-step
  s2, mb = step2(s2, None, halves[1])
  np.testing.assert_allclose((ma["loss"] + mb["loss"]) / 2, m1["loss"], rtol=1e-6)
  d1 = jax.tree_util.tree_map(lambda a, b: a - b, s1.params, params)
  d2 = jax.tree_util.tree_map(lambda a, b: a - b, s2.params, params)
  _assert_trees_close(d2, d1, atol=2e-6)
  assert int(s2.step) == 2


# ---------------------------------------------------------------------- train step
def test_train_steps_decrease_loss_with_kd_and_eval():
  cfg = tiny_config(plan=DepthPlan.vanilla(1), dtype="bfloat16")
  tcfg = tiny_config(plan=DepthPlan.vanilla(2))  # f32 teacher
  ocfg = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=50)
  step = jax.jit(make_train_step(cfg, ocfg, LossConfig(kd_weight=0.5), tcfg))
  state = init_train_state(cfg, ocfg, _params(cfg, seed=0))
  teacher = _params(tcfg, seed=1)
  batch = _batch(cfg)
  losses = []
  for _ in range(8):
    state, m = step(state, teacher, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.3, losses
  assert set(m) >= {"loss", "ce", "kd", "grad_norm", "lr", "n_tokens", "ppl"}
  assert float(m["kd"]) > 0 and float(m["n_tokens"]) == float(batch["loss_mask"].sum())
  np.testing.assert_allclose(m["ppl"], np.exp(m["ce"]), rtol=1e-5)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
  # eval: sum NLL / n == the CE the next step measures (before its update)
  nll, n = jax.jit(make_eval_step(cfg))(state.params, batch)
  assert float(n) == float(batch["loss_mask"].sum())
  _, m = step(state, teacher, batch)
  np.testing.assert_allclose(nll / n, m["ce"], rtol=1e-5)


def test_recursive_lora_trains():
  cfg = tiny_config(plan=DepthPlan(1, 2, 2, 1), lora_ranks=(("q", 2), ("up", 4)))
  ocfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")
  step = jax.jit(make_train_step(cfg, ocfg))
  params = _params(cfg)
  state = init_train_state(cfg, ocfg, params)
  batch = _batch(cfg)
  losses = []
  for _ in range(6):
    state, m = step(state, None, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.2, losses
  b0 = np.asarray(state.params["lora"]["layer_0_q_b"])
  assert np.abs(b0).max() > 0 and not np.allclose(b0[0], b0[1])  # per-loop LoRA


def test_remat_full_matches_no_remat():
  base = tiny_config(plan=DepthPlan(0, 2, 2, 0), lora_ranks=(("v", 2),))
  params = _params(base, seed=2)
  params["lora"] = jax.tree_util.tree_map(lambda x: x + 0.05, params["lora"])
  batch = _batch(base, b=2, t=8)
  out = []
  for remat in ("none", "full"):
    cfg = base.replace(remat=remat)

    def loss(p, cfg=cfg):
      lg = Transformer(cfg).apply({"params": p}, batch["inputs"],
                                  positions=batch["positions"],
                                  segment_ids=batch["segment_ids"])["logits"]
      return cross_entropy(lg, batch["targets"], batch["loss_mask"])[0]

    out.append(jax.jit(jax.value_and_grad(loss))(params))
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
  _assert_trees_close(out[0][1], out[1][1], atol=1e-6)


# ---------------------------------------------------------------------- sharding
def test_make_mesh_validates():
  mesh = S.make_mesh(data=-1, fsdp=2, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(S.ShardingError, match="8 available devices"):
    S.make_mesh(data=3, fsdp=2, tensor=1)
  with pytest.raises(S.ShardingError, match="not divisible"):
    S.make_mesh(data=-1, fsdp=3)


def test_param_shardings_fallback_for_indivisible_dims():
  cfg = tiny_config()  # vocab 97 is not divisible by tensor=2
  mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
  sh = S.param_shardings(S.abstract_params(cfg), mesh, S.RULES["fsdp_tensor"])
  assert sh["embed"]["embedding"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert sh["block"]["layer_0"]["mlp"]["up"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  with pytest.raises(S.ShardingError, match="not divisible"):
    S.param_shardings(S.abstract_params(cfg), mesh, "fsdp_tensor", strict=True)


def test_sharded_step_equals_unsharded():
  cfg = tiny_config(plan=DepthPlan(1, 1, 2, 0), lora_ranks=(("gate", 2),))
  tcfg = tiny_config(plan=DepthPlan.vanilla(1))
  ocfg = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant")
  params, teacher = _params(cfg, seed=0), _params(tcfg, seed=1)
  batch = _batch(cfg)
  train_step = make_train_step(cfg, ocfg, LossConfig(), tcfg)
  ref_state, ref_m = jax.jit(train_step)(init_train_state(cfg, ocfg, params), teacher,
                                         batch)

  mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
  rules = S.RULES["fsdp_tensor"]
  p_sh = S.param_shardings(S.abstract_params(cfg), mesh, rules)
  t_sh = S.param_shardings(S.abstract_params(tcfg), mesh, rules)
  st_sh = train_state_shardings(cfg, ocfg, p_sh, mesh)
  # (copy first: the donated state must not alias the cached test params)
  fresh = jax.tree_util.tree_map(jnp.copy, params)
  state = jax.device_put(init_train_state(cfg, ocfg, fresh), st_sh)
  teacher_s = S.shard_params(teacher, t_sh)
  b_sh = S.batch_sharding(mesh)
  batch_s = jax.device_put(batch, b_sh)
  step = jit_train_step(train_step, mesh, st_sh, t_sh, b_sh)
  new, m = step(state, teacher_s, batch_s)

  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-6)
  np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-5)
  _assert_trees_close(new.params, ref_state.params, atol=1e-5)
  _assert_trees_close(new.opt_state, ref_state.opt_state, atol=1e-5)
  q = new.params["block"]["layer_0"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor") and not q.sharding.is_fully_replicated
  assert all(s.data.shape == (q.shape[0] // 2, q.shape[1] // 2)
             for s in q.addressable_shards)
  mu = new.opt_state[1][0].mu["block"]["layer_0"]["attn"]["q"]["kernel"]
  assert mu.sharding.spec == q.sharding.spec
  assert S.sharded_fraction(new.params) > 0.5
  new2, _ = step(new, teacher_s, batch_s)  # donated state round-trips
  assert int(new2.step) == 2


def test_cpu_train_compiler_options_keep_the_step_numerics():
  """The XLA options jit_train_step uses on CPU (a speed choice) change no result."""
  from recursive_lm.training import train_compiler_options
  opts = train_compiler_options()
  assert opts, "expected XLA:CPU train-step options on the CPU backend"
  cfg = tiny_config(plan=DepthPlan(0, 2, 2, 0))
  ocfg = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant")
  batch, params = _batch(cfg), _params(cfg)
  outs = [jax.jit(make_train_step(cfg, ocfg), compiler_options=o)(
      init_train_state(cfg, ocfg, params), None, batch) for o in (None, opts)]
  np.testing.assert_allclose(outs[0][1]["loss"], outs[1][1]["loss"], rtol=1e-6)
  # One Adam step from float-rounding-level gradient differences (other matmul paths).
  _assert_trees_close(outs[0][0].params, outs[1][0].params, atol=1e-5)


def test_dense_custom_vjp_matches_autodiff():
  """layers.dense (canonical weight-gradient matmul on CPU) == autodiff of x @ w."""
  from recursive_lm.nn.layers import dense
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((12, 7)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 5, 7)), jnp.float32)
  ref = jax.grad(lambda x, w: jnp.sum((x @ w) * g), (0, 1))(x, w)
  got = jax.jit(jax.grad(lambda x, w: jnp.sum(dense(x, w) * g), (0, 1)))(x, w)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dense(x, w), x @ w, rtol=1e-6)

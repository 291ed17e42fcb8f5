"""MoR uptraining through ``training.trainer.train``: a converted Middle-Cycle
student of the tiny random Llama (tests/fixtures/tiny_llama) gets a fresh
expert-choice router and is trained with KD + router losses; router metrics in
metrics.jsonl; SIGTERM + resume equals the uninterrupted run; the exported
model loads and decodes with ``MoREngine``; bad router settings are explained."""
import dataclasses
import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import ConfigError, RouterConfig
from recursive_lm.training import metrics as M
from recursive_lm.training.trainer import train, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments", "configs"))
import mor_uptrain_smollm2  # noqa: E402  pylint: disable=g-import-not-at-top

TINY = os.path.join(ROOT, "tests", "fixtures", "tiny_llama")
STEPS = 6


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest: XLA optimisations off


def make_config(workdir, corpus, variant=""):
  # tiny_llama has 4 layers: Middle-Cycle 1 + 1x2 + 1 with loops=2
  c = mor_uptrain_smollm2.get_config(
      f"loops=2,steps={STEPS},seq_len=32,batch=8,lr=1e-2,eval_batches=2"
      + (f",{variant}" if variant else ""))
  c.model = TINY
  c.workdir = str(workdir)
  c.data.source = corpus
  c.data.encode = "bytes"
  c.train.update(dict(log_every=1, eval_every=3, ckpt_every=2, keep=3,
                      peak_matmul_size=0))
  return c


def records(workdir, kind):
  return [r for r in M.read_metrics(os.path.join(workdir, M.METRICS_FILE))
          if r["kind"] == kind]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
  workdir = tmp_path_factory.mktemp("mor_reference")
  return str(workdir), train(make_config(workdir, corpus))


def test_end_to_end(reference):
  workdir, s = reference
  assert s["status"] == "completed" and s["final_step"] == STEPS
  rc = s["config"]["convert"]["router"]
  assert rc["kind"] == "expert" and rc["gating"] == "delta"
  # student: recursive params + router (2 loops x d_model 32 linear expert router)
  from recursive_lm.recursive.convert import unique_param_count
  from recursive_lm.export import load_model
  cfg, params, _ = load_model(s["final_dir"])
  assert cfg.router == RouterConfig(kind="expert", gate="sigmoid", alpha=2.0,
                                    gating="delta", kv="recursion", aux_loss=0.001)
  assert cfg.plan.prelude == cfg.plan.coda == 1 and cfg.plan.loops == 2
  from recursive_lm.recursive.convert import describe
  assert "sharing: middle_cycle" in describe(cfg) and "init: stepwise" in describe(cfg)
  assert set(params["router"]) == {"w"} and params["router"]["w"].shape == (2, 32)
  assert s["student"]["unique_params"] == unique_param_count(cfg) + 64
  # the loss decreases; KD against the teacher is on
  losses = [r["loss"] for r in records(workdir, "train")]
  assert len(losses) == STEPS and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3
  train_rec = records(workdir, "train")[-1]
  # router metrics in the JSONL, train and eval
  for k in ("router/occupancy_0", "router/occupancy_1", "router/sampling_acc",
            "router/dead_token_ratio", "router/aux_bce"):
    assert k in train_rec, (k, sorted(train_rec))
  assert abs(train_rec["router/occupancy_1"] - 0.5) < 0.05  # capacities 1, 1/2
  ev = records(workdir, "eval")
  assert [r["step"] for r in ev] == [0, 3, 6]
  for r in ev:
    assert np.isfinite(r["causal_ppl"]) and "router_eval/sampling_acc" in r
  assert s["student_ppl_final"] < s["student_ppl_init"]
  assert np.isfinite(s["causal_ppl_final"]) and np.isfinite(s["teacher_ppl"])


def test_router_params_are_fresh_and_converted_params_kept(reference, corpus):
  """At init the student is the converted recursive student + router params."""
  from recursive_lm.checkpoints import load_checkpoint
  from recursive_lm.mor.convert import add_router, router_config
  from recursive_lm.recursive.convert import convert
  c = make_config("/tmp/unused", corpus)
  ck = load_checkpoint(TINY)
  rcfg, rparams = convert(ck.config, ck.weights, 2, "middle_cycle", "stepwise", None,
                          "add", 0)
  mcfg, mparams = add_router(rcfg, rparams, router_config(c.convert.router.to_dict()),
                             0, 0.001)
  assert jax.tree.structure(mparams) == jax.tree.structure({**rparams, "router": {"w": 0}})
  for a, b in zip(jax.tree.leaves(rparams), jax.tree.leaves(
      {k: v for k, v in mparams.items() if k != "router"})):
    np.testing.assert_array_equal(a, b)
  w = np.asarray(mparams["router"]["w"])
  assert 0 < np.std(w) < 0.003  # init_std 0.001
  # gate ~ 1 at init: at full capacity the MoR student equals the recursive one
  from recursive_lm.nn.model import Transformer
  full = mcfg.replace(router=dataclasses.replace(mcfg.router, capacities=(1.0, 1.0)))
  x = jnp.asarray(np.random.RandomState(0).randint(2, 97, (2, 16)))
  lr = Transformer(rcfg).apply({"params": rparams}, x)["logits"]
  lm = Transformer(full).apply({"params": mparams}, x)["logits"]
  np.testing.assert_allclose(np.asarray(lm), np.asarray(lr), atol=0.05)


def test_sigterm_then_resume_matches_uninterrupted(reference, corpus, tmp_path):
  def hook(step, state, m):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  s = train(make_config(tmp_path, corpus), hooks=[hook])
  assert s["status"] == "preempted" and s["final_step"] == 3
  s = train(make_config(tmp_path, corpus))
  assert s["resumed_from_step"] == 3 and s["final_step"] == STEPS
  got = [(r["step"], r["loss"]) for r in records(tmp_path, "train")]
  want = [(r["step"], r["loss"]) for r in records(reference[0], "train")]
  assert [st for st, _ in got] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=0,
                             atol=1e-5)
  got_occ = [r["router/sampling_acc"] for r in records(tmp_path, "train")]
  want_occ = [r["router/sampling_acc"] for r in records(reference[0], "train")]
  np.testing.assert_allclose(got_occ, want_occ, atol=1e-5)
  assert abs(s["student_ppl_final"] - reference[1]["student_ppl_final"]) < 1e-3


def test_exported_model_decodes_with_mor_engine(reference):
  from recursive_lm.export import load_model
  from recursive_lm.mor.decode import MoREngine
  from recursive_lm.nn.model import Transformer
  cfg, params, _ = load_model(reference[1]["final_dir"])
  prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
  out = MoREngine(cfg, params).generate(prompts, max_new_tokens=4, stop_at_eos=False)
  model = Transformer(cfg)
  for p, new, dep in zip(prompts, out.tokens, out.depths):
    # The last token is emitted, never fed back: it has no recursion depth (0).
    assert len(new) == 4 and all(1 <= d <= cfg.plan.loops for d in dep[:-1]) and dep[-1] == 0
    full = model.apply({"params": params}, jnp.asarray([p + new]), routing="threshold")
    np.testing.assert_array_equal(
        np.asarray(jnp.argmax(full["logits"][0], -1))[len(p) - 1:-1], new)


@pytest.mark.parametrize("override, match", [
    ({"kind": "moe"}, r"router.kind='moe': choose from"),
    ({"capacities": (1.0, 0.5, 0.25)}, r"3 entries but config.convert.loops=2"),
    ({"capacities": (0.5, 1.0)}, r"non-increasing"),
    ({"init_std": -1.0}, r"init_std=-1.0: use a float >= 0"),
    ({"gate": "softmax"}, r"use gate sigmoid, tanh or identity"),
])
def test_bad_router_settings_are_explained(corpus, tmp_path, override, match):
  c = make_config(tmp_path, corpus)
  r = c.convert.router.to_dict()
  r.update(override)
  with c.unlocked():
    c.convert.router = r
  with pytest.raises(ConfigError, match=match):
    validate_config(c)


def test_unknown_router_key_is_explained(corpus, tmp_path):
  c = make_config(tmp_path, corpus)
  with c.unlocked():
    c.convert.router.depth = 3
  with pytest.raises(ConfigError, match=r"router.depth is not a router setting"):
    validate_config(c)

"""Uptraining loop: end to end, exact kill/resume, SIGTERM, corrupt checkpoints,
config errors. Tiny random Llama (tests/fixtures/tiny_llama, vocab 97) as the
teacher, a byte-level toy encoding and a small jsonl corpus."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from recursive_lm.config import ConfigError
from recursive_lm.training import metrics as M
from recursive_lm.training.checkpointing import (CheckpointCorruptError,
                                                 CheckpointIncompatibleError,
                                                 Checkpointer)
from recursive_lm.training.trainer import optim_config, train, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments", "configs"))
import uptrain_smollm2  # noqa: E402  pylint: disable=g-import-not-at-top

TINY = os.path.join(ROOT, "tests", "fixtures", "tiny_llama")
STEPS = 8

# The subprocess mirrors this module's numerics (conftest + its fast_compile fixture).
_DRIVER = textwrap.dedent("""
    import json, sys, time
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_disable_most_optimizations", True)
    import ml_collections
    from recursive_lm.training.trainer import train
    config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
    train(config, hooks=[lambda step, state, m: time.sleep(float(sys.argv[2]))])
""")


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest: XLA optimisations off


def make_config(workdir, corpus, variant="", **train_overrides):
  c = uptrain_smollm2.get_config(
      f"loops=2,steps={STEPS},seq_len=32,batch=8,lr=1e-2" + (f",{variant}" if variant else ""))
  c.model = TINY
  c.workdir = str(workdir)
  c.data.source = corpus
  c.data.encode = "bytes"
  c.data.eval_batches = 2
  c.train.update({**dict(log_every=1, eval_every=4, ckpt_every=2, keep=3,
                         peak_matmul_size=128), **train_overrides})
  return c


def train_losses(workdir):
  recs = M.read_metrics(os.path.join(workdir, M.METRICS_FILE))
  return [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
  """An uninterrupted run (also the end-to-end check)."""
  workdir = tmp_path_factory.mktemp("reference")
  summary = train(make_config(workdir, corpus))
  return str(workdir), summary


# ------------------------------------------------------------------ end to end
def test_end_to_end(reference):
  workdir, s = reference
  on_disk = json.load(open(os.path.join(workdir, "summary.json")))
  assert on_disk["status"] == s["status"] == "completed"
  assert s["final_step"] == STEPS and s["tokens_trained"] == STEPS * 8 * 32
  for k in ("teacher_ppl", "student_ppl_init", "student_ppl_final", "mfu",
            "tokens_per_s", "train_step_time_s_median", "matmul_peak_flops_per_device",
            "gap_closed_fraction_nll"):
    assert np.isfinite(on_disk[k]) and on_disk[k] > 0, k
  assert s["student"]["unique_params"] < s["teacher"]["unique_params"]
  assert s["student_ppl_final"] < s["student_ppl_init"]
  losses = [l for _, l in train_losses(workdir)]
  assert len(losses) == STEPS and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
  recs = M.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 4, 8]
  assert os.path.getsize(s["curves_png"]) > 1000
  from recursive_lm.export import load_model
  cfg, params, _ = load_model(s["final_dir"])
  assert cfg.plan.loops == 2 and cfg.plan.block == 2
  assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [4, 6, 8]
  assert os.listdir(os.path.join(workdir, "tb"))


def test_flops_formula():
  from recursive_lm.config import DepthPlan, tiny_config
  cfg = tiny_config(plan=DepthPlan(0, 2, 3, 0), lora_ranks=(("q", 4),))
  d, f, v = 32, 64, 97
  layer = d * 32 + 2 * d * 16 + 32 * d + 3 * d * f  # q, k, v (2 kv heads x 8), o, mlp
  assert M.layer_matmul_params(cfg) == layer
  n_eff = 6 * layer + 3 * 2 * 4 * (d + 32) + v * d  # 6 applied layers, LoRA per loop
  assert M.applied_params(cfg) == n_eff
  fl = M.train_flops_per_token(cfg, 16, teacher_cfg=tiny_config())
  assert fl["student"] == 6 * n_eff + 12 * 6 * 16 * 32
  assert fl["teacher"] == 2 * (4 * layer + v * d) + 4 * 4 * 16 * 32
  assert M.measure_matmul_peak(64, repeats=2) > 0


# -------------------------------------------------------- kill -> resume exact
def test_sigkill_then_resume_matches_uninterrupted(reference, corpus, tmp_path):
  workdir = tmp_path / "killed"
  cfg = make_config(workdir, corpus)
  ckdir = workdir / "checkpoints"
  proc = subprocess.Popen([sys.executable, "-c", _DRIVER, cfg.to_json(), "0.3"],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
      if ckdir.is_dir() and any(n.isdigit() and int(n) >= 2 for n in os.listdir(ckdir)):
        break
      time.sleep(0.02)
    assert proc.poll() is None, "run ended before it could be killed:\n" + \
        proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  steps = Checkpointer(ckdir).all_steps()
  assert steps and max(steps) < STEPS, steps
  s = train(make_config(workdir, corpus))
  assert s["resumed_from_step"] == max(steps) and s["final_step"] == STEPS
  got, want = train_losses(workdir), train_losses(reference[0])
  assert [st for st, _ in got] == list(range(1, STEPS + 1))  # no duplicates/gaps
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=0, atol=1e-6)
  assert abs(s["student_ppl_final"] - reference[1]["student_ppl_final"]) < 1e-4


def test_sigterm_saves_and_exits_cleanly(corpus, tmp_path):
  before = signal.getsignal(signal.SIGTERM)

  def hook(step, state, m):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  s = train(make_config(tmp_path, corpus, ckpt_every=0), hooks=[hook])
  assert s["status"] == "preempted" and s["final_step"] == 3
  assert Checkpointer(tmp_path / "checkpoints").all_steps() == [3]
  assert json.load(open(tmp_path / "summary.json"))["status"] == "preempted"
  assert not os.path.exists(tmp_path / "final")
  assert signal.getsignal(signal.SIGTERM) == before


# ---------------------------------------------------- corrupt / incompatible
def _target(config):
  from recursive_lm.checkpoints import load_checkpoint
  from recursive_lm.recursive.convert import convert
  from recursive_lm.training import init_train_state
  ck = load_checkpoint(config.model)
  cfg, params = convert(ck.config, ck.weights, config.convert.loops)
  return init_train_state(cfg, optim_config(config), params)


def test_corrupt_latest_checkpoint_clear_error_earlier_still_restores(reference, corpus,
                                                                      tmp_path):
  ckdir = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(reference[0], "checkpoints"), ckdir)
  for root, _, files in os.walk(os.path.join(ckdir, "8", "state")):
    for f in files:
      if f != "_METADATA" and "commit" not in f:
        with open(os.path.join(root, f), "r+b") as fh:  # truncate the data files
          fh.truncate(5)
  target = _target(make_config(tmp_path, corpus))
  ck = Checkpointer(ckdir)
  with pytest.raises(CheckpointCorruptError) as e:
    ck.restore(target)
  msg = str(e.value)
  assert os.path.join(ckdir, "8") in msg and "[4, 6]" in msg
  assert "restore(step=6)" in msg and "mv " in msg
  r = ck.restore(target, step=6)
  assert int(r.state.step) == 6
  ref = Checkpointer(os.path.join(reference[0], "checkpoints")).restore(target, step=6)
  for a, b in zip(jax.tree.leaves(r.state.params), jax.tree.leaves(ref.state.params)):
    np.testing.assert_array_equal(a, b)
  # Following the advice: move the broken step aside -> 6 is the latest again.
  os.rename(os.path.join(ckdir, "8"), os.path.join(ckdir, "8.broken"))
  assert Checkpointer(ckdir).latest_step() == 6
  # Garbage in the data-iterator state is caught too.
  with open(os.path.join(ckdir, "6", "data_shards", "shard_0-of-8.json"), "w") as fh:
    fh.write("{not json")
  from recursive_lm.data import make_sharded_lm_iterator
  it = make_sharded_lm_iterator(["some text"] * 16, lambda s: [2] * len(s), 1, 8, 8)
  with pytest.raises(CheckpointCorruptError, match=r"\[4\]"):
    Checkpointer(ckdir).restore(target, it)


def _truncate_state(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      if f != "_METADATA" and "commit" not in f:
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(5)


def test_corrupt_newest_checkpoint_is_moved_aside_and_run_resumes(reference, corpus,
                                                                  tmp_path, caplog):
  """One process: the newest step is unreadable -> warning, moved to 8.corrupt,
  resume from 6 with the uninterrupted run's losses; strict_restore errors."""
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  shutil.rmtree(workdir / "final")
  ckdir = workdir / "checkpoints"
  _truncate_state(str(ckdir / "8"))
  with pytest.raises(CheckpointCorruptError, match=r"strict_restore=True"):
    train(make_config(workdir, corpus, strict_restore=True))
  assert Checkpointer(ckdir).all_steps() == [4, 6, 8] and not (ckdir / "8.corrupt").exists()
  with caplog.at_level("WARNING"):
    s = train(make_config(workdir, corpus))
  assert any(f"checkpoint {ckdir / '8'} (step 8) is corrupt and was moved to "
             f"{ckdir / '8.corrupt'}" in r.getMessage() for r in caplog.records)
  assert (ckdir / "8.corrupt" / "state").is_dir()  # moved aside, not deleted
  assert s["resumed_from_step"] == 6 and s["final_step"] == STEPS
  np.testing.assert_allclose([l for _, l in train_losses(workdir)],
                             [l for _, l in train_losses(reference[0])], rtol=0, atol=1e-6)
  assert Checkpointer(ckdir).all_steps() == [4, 6, 8]


def test_unfinished_save_is_ignored_and_cleaned(reference, tmp_path):
  """A save killed before orbax's final rename leaves only <step>.orbax-checkpoint-tmp."""
  ckdir = tmp_path / "checkpoints"
  shutil.copytree(os.path.join(reference[0], "checkpoints"), ckdir)
  tmp = ckdir / "10.orbax-checkpoint-tmp"
  shutil.copytree(ckdir / "8", tmp)
  (tmp / "state" / "_METADATA").write_text("{partial")
  ck = Checkpointer(ckdir)
  assert ck.latest_step() == 8 and ck.all_steps() == [4, 6, 8]
  deadline = time.time() + 20  # cleanup_tmp_directories runs in the background
  while tmp.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert not tmp.exists()


def test_checkpoint_from_other_config_is_rejected(reference, corpus, tmp_path):
  shutil.copytree(os.path.join(reference[0], "checkpoints"), tmp_path / "checkpoints")
  other = make_config(tmp_path, corpus, variant="loops=4")  # block of 1 layer, not 2
  with pytest.raises(CheckpointIncompatibleError) as e:
    Checkpointer(tmp_path / "checkpoints").restore(_target(other))
  assert "params/" in str(e.value) and str(tmp_path / "checkpoints" / "8") in str(e.value)
  with pytest.raises(CheckpointIncompatibleError, match=r"model_config\.plan"):
    train(other)


# ------------------------------------------------------------- config errors
@pytest.mark.parametrize("arg, match", [
    ("bogus=1", r"unknown config variant key 'bogus'.*valid keys.*loops"),
    ("loops=0", r"loops=0.*loops>=1"),
    ("sharing=zigzag", r"sharing='zigzag'.*choose from.*cycle"),
    ("init=best", r"init='best'.*stepwise"),
    ("loops", r"not key=value"),
    ("steps=ten", r"steps='ten': expected int"),
])
def test_bad_variant_is_explained(arg, match):
  with pytest.raises(ValueError, match=match):
    uptrain_smollm2.get_config(arg)


def test_bad_overrides_are_explained(corpus, tmp_path):
  c = make_config(tmp_path, corpus)
  c.convert.loops = 0
  c.mesh.rules = "zero3"
  c.data.encode = "chars"
  with pytest.raises(ConfigError) as e:
    validate_config(c)
  msg = str(e.value)
  assert "convert.loops=0" in msg and "mesh.rules='zero3'" in msg and "'bytes'" in msg
  c = make_config(tmp_path, corpus)
  c.model = os.path.join(ROOT, "tests", "fixtures")  # not a model folder
  with pytest.raises(ConfigError, match="config.json"):
    train(c)


def test_cli_override_error(tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "uptrain.py"),
       "--config", os.path.join(ROOT, "experiments/configs/uptrain_smollm2.py:steps=2"),
       "--config.convert.sharing=zigzag", "--workdir", str(tmp_path)],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "convert.sharing='zigzag'" in out.stderr and "middle_cycle" in out.stderr

"""Several JAX processes on one machine, like a pod: the local launcher
(``python -m recursive_lm.distributed --local_processes=N``) runs the real
uptraining command (``experiments/uptrain.py``) on a tiny random Llama with a
byte-level corpus; 8 fake CPU devices in total, gloo collectives.

* 2 processes x 4 devices give the loss sequence of 1 process x 8 devices,
  on the data mesh and on an fsdp mesh that spans both processes;
* each process reads only its data shards (document ids), and together they
  read the same global batches as one process;
* metrics / summary / checkpoints are written once;
* SIGKILL of one process: the other stops by itself within a bound (JAX
  heartbeat timeout), a restart resumes with the identical loss sequence;
* restarts with 2 -> 1 and 1 -> 2 processes continue the same run;
* SIGTERM to all processes (a preemption) saves once and exits 0;
* a corrupt / half-written newest checkpoint is moved aside and the run goes
  on from the newest intact one (or fails with strict_restore=True).

Every subprocess has a timeout; the test asserts the failure bounds.
Prints the loss sequences side by side (``pytest -s``).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny_llama")
SLOW = os.path.join(ROOT, "tests", "fixtures", "slow_uptrain.py")
UPTRAIN = os.path.join(ROOT, "experiments", "uptrain.py")
STEPS = 8
RUN_TIMEOUT_S = 300      # one whole launch (start-up, compile, 8 steps, export)
HEARTBEAT_S = 5          # JAX coordination-service heartbeat timeout in the tests
FAIL_BOUND_S = 45        # a survivor must stop on its own within this (asserted)
ATOL = 2e-5              # float32 all-reduce order across processes / meshes


_CACHE = {}


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "SLURM_NTASKS", "SLURM_NPROCS",
                      "TPU_WORKER_HOSTNAMES")}
  env.update(JAX_DISABLE_MOST_OPTIMIZATIONS="1", JAX_DEFAULT_MATMUL_PRECISION="highest",
             PYTHONPATH=ROOT, **extra)
  if "dir" in _CACHE:  # compiled programs shared by the runs of this module
    env.update(JAX_COMPILATION_CACHE_DIR=_CACHE["dir"],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  _CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
  yield
  _CACHE.clear()


def command(procs, devices, workdir, corpus, *flags, script=UPTRAIN):
  """The local-launcher command line (the same flags a pod run gets)."""
  return [sys.executable, "-m", "recursive_lm.distributed",
          f"--local_processes={procs}", f"--local_devices={devices}",
          f"--heartbeat_timeout_s={HEARTBEAT_S}", "--failure_grace_s=120", script,
          "--config", os.path.join(
              ROOT, "experiments/configs/uptrain_smollm2.py:"
              f"loops=2,steps={STEPS},seq_len=32,batch=8,lr=1e-2"),
          f"--config.model={TINY}", f"--config.data.source={corpus}",
          "--config.data.encode=bytes", "--config.data.eval_batches=2",
          "--config.data.log_example_ids=True", "--config.train.log_every=1",
          "--config.train.eval_every=4", "--config.train.ckpt_every=2",
          "--config.train.keep=3", "--config.train.peak_matmul_size=0",
          "--config.mesh.rules=fsdp", f"--workdir={workdir}", *flags]


def run(procs, devices, workdir, corpus, *flags, timeout=RUN_TIMEOUT_S):
  t0 = time.time()
  r = subprocess.run(command(procs, devices, workdir, corpus, *flags), cwd=ROOT,
                     env=_env(), capture_output=True, text=True, timeout=timeout)
  r.wall_s = time.time() - t0
  return r


def start(procs, devices, workdir, corpus, log_path, *flags, sleep_s=0.5):
  log = open(log_path, "w")
  return subprocess.Popen(
      command(procs, devices, workdir, corpus, *flags, script=SLOW), cwd=ROOT,
      env=_env(RLM_TEST_STEP_SLEEP_S=str(sleep_s)), stdout=log,
      stderr=subprocess.STDOUT), log


def wait_for(pred, timeout, proc=None, what=""):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if pred():
      return
    if proc is not None and proc.poll() is not None:
      break
    time.sleep(0.05)
  raise AssertionError(f"timed out / run ended while waiting for {what}")


def ok(r):
  assert r.returncode == 0, (r.stdout[-6000:], r.stderr[-3000:])
  return r


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def losses(workdir):
  return [(r["step"], r["loss"]) for r in metrics(workdir) if r["kind"] == "train"]


def example_ids(workdir, procs):
  out = []
  for p in range(procs):
    with open(os.path.join(workdir, "example_ids", f"process_{p}-of-{procs}.jsonl")) as f:
      out.append({r["step"]: r["rows"] for r in map(json.loads, f)})
  return out


def ckpt_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def copy_run(src, dst, keep_steps):
  """A copy of run ``src`` whose checkpoints stop at ``keep_steps``."""
  shutil.copytree(src, dst)
  for s in ckpt_steps(dst):
    if s not in keep_steps:
      shutil.rmtree(os.path.join(dst, "checkpoints", str(s)))
  for name in ("final", "summary.json"):
    p = os.path.join(dst, name)
    if os.path.isdir(p):
      shutil.rmtree(p)
    elif os.path.exists(p):
      os.remove(p)


def assert_same_losses(got, want, atol=ATOL):
  assert [s for s, _ in got] == list(range(1, STEPS + 1)), got
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=0,
                             atol=atol)


TABLE: dict[str, list] = {}


@pytest.fixture(scope="module")
def ref(tmp_path_factory, corpus):
  """1 process x 8 devices, data mesh: the reference run."""
  w = str(tmp_path_factory.mktemp("p1x8"))
  ok(run(1, 8, w, corpus))
  TABLE["1x8 (data)"] = losses(w)
  return w


@pytest.fixture(scope="module")
def two(tmp_path_factory, corpus):
  """2 processes x 4 devices, data mesh."""
  w = str(tmp_path_factory.mktemp("p2x4"))
  r = ok(run(2, 4, w, corpus))
  TABLE["2x4 (data)"] = losses(w)
  return w, r


# --------------------------------------------------------------- equivalence
def test_two_processes_match_one(ref, two):
  w, r = two
  assert "[p0]" in r.stdout and "[p1]" in r.stdout
  assert re.search(r"\[p1\].*process 1 of 2: 4 local / 8 global cpu devices", r.stdout)
  assert_same_losses(losses(w), losses(ref))
  # Held-out evals agree as well (same global held-out set).
  ev = lambda d: [(x["step"], x["student_nll"]) for x in metrics(d) if x["kind"] == "eval"]
  np.testing.assert_allclose([v for _, v in ev(w)], [v for _, v in ev(ref)], atol=ATOL)
  # Each process read only its data shards (rows 0-3 / 4-7 of the global
  # batch = documents with id % 8 in 0-3 / 4-7), and together the same
  # documents per step as the single process.
  (p0, p1), (single,) = example_ids(w, 2), example_ids(ref, 1)
  assert sorted(p0) == sorted(p1) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert len(p0[step]) == len(p1[step]) == 4
    for p, rows in ((0, p0[step]), (1, p1[step])):
      for j, row in enumerate(rows):
        shard = 4 * p + j
        assert row and all(i % 8 == shard for i in row), (step, p, j, row)
    assert p0[step] + p1[step] == single[step]
  # Written once: one metrics record per (step, kind), one summary, one set of
  # checkpoint steps holding the state and the 8 data-shard files.
  recs = metrics(w)
  keys = [(x["step"], x["kind"]) for x in recs]
  assert len(keys) == len(set(keys)) and len([k for k in keys if k[1] == "train"]) == STEPS
  assert sorted(os.listdir(w)) == sorted(
      ["checkpoints", "curves.png", "example_ids", "final", "metrics.jsonl",
       "summary.json", "tb"])
  assert json.load(open(os.path.join(w, "summary.json")))["status"] == "completed"
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["4", "6", "8"]
  assert sorted(n for n in os.listdir(os.path.join(w, "checkpoints", "8", "data_shards"))
                if n.startswith("shard_")) == sorted(f"shard_{s}-of-8.json" for s in range(8))
  assert r.stdout.count("checkpoint: saving step 8") == 2  # both wrote their part


# ------------------------------------------------------ failure and restart
FSDP = ("--config.mesh.data=1", "--config.mesh.fsdp=8")  # params sharded over both


def test_sigkill_one_process_others_stop_then_resume(ref, corpus, tmp_path):
  """On the fsdp mesh (8 devices over both processes): SIGKILL of process 1
  after checkpoint 4; process 0 stops by itself; the restart resumes from the
  last checkpoint and the whole loss sequence is the 1 x 8 data-mesh one."""
  w = str(tmp_path / "killed")
  log_path = tmp_path / "killed.log"
  proc, log = start(2, 4, w, corpus, log_path, *FSDP)
  try:
    text = lambda: log_path.read_text()
    wait_for(lambda: os.path.isdir(os.path.join(w, "checkpoints", "4")), RUN_TIMEOUT_S,
             proc, "checkpoint 4")
    pid1 = int(re.search(r"process 1: pid (\d+)", text()).group(1))
    os.kill(pid1, signal.SIGKILL)
    t_kill = time.time()
    rc = proc.wait(timeout=FAIL_BOUND_S + 30)
    took = time.time() - t_kill
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    log.close()
  out = text()
  assert rc != 0 and "process 1 failed (signal SIGKILL)" in out, out[-4000:]
  assert "still running" not in out, "the launcher had to kill the survivor"
  assert took < FAIL_BOUND_S, f"survivor took {took:.1f}s to stop"
  assert re.search(r"\[p0\].*(another task died|unhealthy|Gloo|Connection)", out), \
      out[-4000:]
  last = max(ckpt_steps(w))
  assert 4 <= last < STEPS
  r = ok(run(2, 4, w, corpus, *FSDP))
  assert f"resumed from {os.path.join(w, 'checkpoints', str(last))}" in r.stdout
  TABLE[f"2x4 fsdp=8, SIGKILL, resumed at {last}"] = losses(w)
  assert_same_losses(losses(w), losses(ref))
  TABLE["_kill_s"] = took


_COLLECTIVE_LOOP = """
import time, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((jax.device_count(),), ("d",))
f = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
for i in range(600):
  x = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P("d")), np.full((jax.local_device_count(),), i, np.float32))
  print("step", i, float(f(x)), flush=True)
  time.sleep(0.1)
"""


@pytest.mark.parametrize("victim", [0, 1])
def test_sigkill_of_any_process_stops_the_other(tmp_path, victim):
  """Process 0 also hosts the coordinator: killing it stops process 1 at once;
  killing process 1 stops process 0 after the heartbeat timeout."""
  script = tmp_path / "loop.py"
  script.write_text(_COLLECTIVE_LOOP)
  log_path = tmp_path / "loop.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        [sys.executable, "-m", "recursive_lm.distributed", "--local_processes=2",
         "--local_devices=2", f"--heartbeat_timeout_s={HEARTBEAT_S}",
         "--failure_grace_s=120", str(script)],
        cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
      wait_for(lambda: "[p0] step 3 " in log_path.read_text() and
               "[p1] step 3 " in log_path.read_text(), 120, proc, "step 3")
      pid = int(re.search(rf"process {victim}: pid (\d+)", log_path.read_text()).group(1))
      os.kill(pid, signal.SIGKILL)
      t0 = time.time()
      rc = proc.wait(timeout=FAIL_BOUND_S + 30)
      took = time.time() - t0
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  out = log_path.read_text()
  assert rc != 0 and f"process {victim} failed (signal SIGKILL)" in out
  assert "still running" not in out and took < FAIL_BOUND_S, (took, out[-3000:])
  assert f"[p{1 - victim}] F" in out and "JAX distributed service detected fatal errors" \
      in out, out[-3000:]
  TABLE[f"_kill{victim}_s"] = took


def test_restart_two_processes_as_one(ref, two, corpus, tmp_path):
  """2 -> 1: the 2 x 4 run's checkpoint 4 continues on 1 x 8 (orbax reshards
  the state, the data shards' positions move to the single process)."""
  w = str(tmp_path / "2to1")
  copy_run(two[0], w, keep_steps=[4])
  r = ok(run(1, 8, w, corpus))
  assert f"resumed from {os.path.join(w, 'checkpoints', '4')}" in r.stdout
  TABLE["2x4 -> 1x8 restart at 4"] = losses(w)
  assert_same_losses(losses(w), losses(ref))
  (got,), single = example_ids(w, 1), example_ids(ref, 1)[0]
  for step in range(5, STEPS + 1):  # the same global batches after the restart
    assert got[step] == single[step]
  s = json.load(open(os.path.join(w, "summary.json")))
  assert s["resumed_from_step"] == 4 and s["final_step"] == STEPS


def test_sigterm_all_processes_saves_once_and_exits_zero(corpus, tmp_path):
  w = str(tmp_path / "preempted")
  log_path = tmp_path / "preempted.log"
  proc, log = start(2, 4, w, corpus, log_path, "--config.train.ckpt_every=0")
  try:
    wait_for(lambda: os.path.exists(os.path.join(w, "metrics.jsonl")) and
             any(r["kind"] == "train" and r["step"] >= 2 for r in metrics(w)),
             RUN_TIMEOUT_S, proc, "step 2")
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both processes
    rc = proc.wait(timeout=FAIL_BOUND_S + 30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    log.close()
  out = log_path.read_text()
  assert rc == 0, out[-4000:]
  assert "process 0: exit code 0" in out and "process 1: exit code 0" in out
  steps = ckpt_steps(w)
  assert len(steps) == 1 and 2 <= steps[0] < STEPS, steps
  assert out.count(f"preemption sync point reached at step {steps[0]}") == 2
  s = json.load(open(os.path.join(w, "summary.json")))
  assert s["status"] == "preempted" and s["final_step"] == steps[0]
  assert not os.path.exists(os.path.join(w, "final"))


# ------------------------------------------------------ corrupt checkpoints
def test_half_written_newest_checkpoint_two_processes(ref, corpus, tmp_path):
  """1 -> 2 with a half-written newest step: the single-process run's step 8
  lacks the data shards 4-7, which only process 1 reads. Both processes agree
  that it is corrupt; strict_restore=True stops with the error; otherwise
  step 8 is moved aside and the run resumes from step 6 on 2 processes
  (resharded from 1) with the reference loss sequence."""
  w = str(tmp_path / "half")
  copy_run(ref, w, keep_steps=[4, 6, 8])
  shard_dir = os.path.join(w, "checkpoints", "8", "data_shards")
  for s in range(4, 8):
    os.remove(os.path.join(shard_dir, f"shard_{s}-of-8.json"))
  strict = run(2, 4, w, corpus, "--config.train.strict_restore=True")
  assert strict.returncode != 0
  err = strict.stdout + strict.stderr
  assert "strict_restore=True" in err and os.path.join(w, "checkpoints", "8") in err
  assert ckpt_steps(w) == [4, 6, 8] and not os.path.exists(
      os.path.join(w, "checkpoints", "8.corrupt"))
  r = ok(run(2, 4, w, corpus))
  moved = os.path.join(w, "checkpoints", "8.corrupt")
  assert re.search(r"checkpoint .*checkpoints/8 \(step 8\) is corrupt and was moved to "
                   + re.escape(moved), r.stdout), r.stdout[-5000:]
  assert os.path.isdir(os.path.join(moved, "state"))  # moved, not deleted
  assert f"resumed from {os.path.join(w, 'checkpoints', '6')}" in r.stdout
  TABLE["1x8 -> 2x4 restart at 6 (8 corrupt)"] = losses(w)
  assert_same_losses(losses(w), losses(ref))
  got, single = example_ids(w, 2), example_ids(ref, 1)[0]
  for step in (7, 8):  # the same global batches after the restart
    assert got[0][step] + got[1][step] == single[step]
  assert ckpt_steps(w) == [4, 6, 8]  # step 8 written again by this run


def test_print_loss_table():
  """Loss sequences side by side (run with -s to see them)."""
  runs = {k: v for k, v in TABLE.items() if not k.startswith("_")}
  if not runs:
    pytest.skip("no runs in this session")
  names = list(runs)
  lines = ["| step | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
  for i in range(STEPS):
    lines.append(f"| {i + 1} | " + " | ".join(
        f"{dict(runs[n]).get(i + 1, float('nan')):.6f}" for n in names) + " |")
  text = "\n".join(lines)
  ref_losses = [l for _, l in runs[names[0]]]
  text += "\n\nmax |loss - " + names[0] + "|: " + ", ".join(
      f"{n}: {max(abs(a - b) for a, b in zip((l for _, l in runs[n]), ref_losses)):.1e}"
      for n in names[1:])
  for key, what in (("_kill_s", "uptraining on the fsdp mesh: SIGKILL of process 1"),
                    ("_kill0_s", "collective loop: SIGKILL of process 0 (coordinator)"),
                    ("_kill1_s", "collective loop: SIGKILL of process 1")):
    if key in TABLE:
      text += f"\n{what} -> the other process stopped by itself after {TABLE[key]:.1f}s"
  print("\n" + text)
  out = os.environ.get("RLM_LOSS_TABLE")  # e.g. results/multihost_loss_sequences.md
  if out:
    head = ("Train loss per step, tiny random Llama (tests/fixtures/tiny_llama), "
            "loops=2, global batch 8 x 32 tokens, 8 CPU devices in total; "
            "AxB = A processes x B devices.\n"
            f"Made by `RLM_LOSS_TABLE={out} pytest -s -m multiprocess "
            f"tests/test_multiprocess.py` on {time.strftime('%Y-%m-%d %H:%M')}.\n\n")
    with open(out, "w") as f:
      f.write(head + text + "\n")

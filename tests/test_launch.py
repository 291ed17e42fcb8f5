"""Launch scripts (syntax + dry runs, gcloud/srun never executed) and distributed."""
import os
import re
import subprocess
import sys
import time

import pytest

from recursive_lm import distributed as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu_vm.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")


@pytest.fixture
def trap_path(tmp_path):
  """A PATH whose gcloud/srun/sbatch only record that they were called."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  marker = tmp_path / "called"
  for tool in ("gcloud", "srun", "sbatch"):
    p = bindir / tool
    p.write_text(f"#!/bin/sh\necho {tool} >> {marker}\nexit 97\n")
    p.chmod(0o755)
  return f"{bindir}:{os.environ['PATH']}", marker


def _bash(args, env=None):
  return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60,
                        env=env, cwd=ROOT)


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_shell_syntax(script):
  r = _bash(["-n", script])
  assert r.returncode == 0, r.stderr
  with open(script) as f:
    text = f.read()
  assert "set -euo pipefail" in text


def test_tpu_dry_run_prints_all_steps(trap_path):
  path, marker = trap_path
  env = dict(os.environ, PATH=path, TPU_NAME="t1", ACCELERATOR_TYPE="v5litepod-16",
             MESH_DATA="16", CONFIG="experiments/configs/uptrain_smollm2.py:loops=3")
  r = _bash([TPU, "--dry-run", "all"], env)
  assert r.returncode == 0, r.stderr
  assert not marker.exists(), "dry run executed gcloud"
  cmds = [l for l in r.stdout.splitlines() if l.startswith("+ ")]
  assert [c.split()[5] if c.startswith("+ gcloud") else c.split()[1] for c in cmds] == [
      "create", "tar", "scp", "ssh", "ssh", "ssh", "mkdir", "scp", "delete"]
  assert "--accelerator-type=v5litepod-16" in cmds[0]
  run = cmds[5]
  assert "--worker=all" in run and "recursive_lm.distributed" in run
  assert "experiments/uptrain.py" in run and "--config.mesh.data=16" in run
  assert "uptrain_smollm2.py:loops=3" in run
  assert all("--worker=all" in c for c in cmds[2:6])
  assert "--worker=0" in cmds[7]
  assert "pip\\ install" in cmds[4]


def test_tpu_script_arguments(trap_path):
  path, marker = trap_path
  env = dict(os.environ, PATH=path)
  r = _bash([TPU, "--dry-run", "run"], env)
  assert r.returncode == 0 and r.stdout.count("+ gcloud") == 1
  assert _bash([TPU, "bogus"], env).returncode == 2
  assert _bash([TPU], env).returncode == 2
  assert "Steps:" in _bash([TPU, "--help"], env).stdout
  assert not marker.exists()


def test_slurm_dry_run(trap_path):
  path, marker = trap_path
  env = dict(os.environ, PATH=path, DRY_RUN="1", SLURM_NNODES="4",
             EXTRA_FLAGS="--config.train.steps=5")
  r = _bash([SLURM], env)
  assert r.returncode == 0, r.stderr
  assert not marker.exists()
  line = r.stdout.splitlines()[-1]
  assert line.startswith("+ srun --nodes=4 --ntasks-per-node=1")
  assert "-m recursive_lm.distributed experiments/uptrain.py" in line
  assert "--config.mesh.data=32" in line and line.endswith("--config.train.steps=5")
  with open(SLURM) as f:
    head = f.read()
  assert "#SBATCH --ntasks-per-node=1" in head and "#SBATCH --nodes=" in head


def test_detect_environment():
  assert D.detect_environment({}) is None
  assert D.detect_environment({"SLURM_NTASKS": "1"}) is None
  assert D.detect_environment({"SLURM_NTASKS": "4"}) == "slurm"
  assert D.detect_environment({"TPU_WORKER_HOSTNAMES": "h0"}) is None
  assert D.detect_environment({"TPU_WORKER_HOSTNAMES": "h0,h1"}) == "tpu_pod"
  assert D.detect_environment({"MEGASCALE_COORDINATOR_ADDRESS": "x:1"}) == "tpu_pod"
  assert D.detect_environment({"JAX_COORDINATOR_ADDRESS": "h:1234",
                               "JAX_NUM_PROCESSES": "2"}) == "explicit"


def test_maybe_initialize(monkeypatch):
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(D, "_initialized", False)
  assert D.maybe_initialize(env={}) is False and calls == []
  assert D.maybe_initialize(env={"SLURM_NTASKS": "2"}) is True
  assert calls == [{}]  # JAX's own SLURM detection fills in the rest
  assert D.maybe_initialize(env={"SLURM_NTASKS": "2"}) is True and len(calls) == 1
  monkeypatch.setattr(D, "_initialized", False)
  D.maybe_initialize(env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                          "JAX_PROCESS_ID": "1"})
  assert calls[-1] == {"coordinator_address": "h:1", "num_processes": 2,
                       "process_id": 1}
  info = D.log_topology()
  assert info["process_count"] == 1 and info["global_devices"] >= 1


def test_module_wrapper_runs_script(tmp_path):
  script = tmp_path / "hello.py"
  script.write_text("import sys\nif __name__ == '__main__':\n"
                    "  print('ARGS', sys.argv[1:])\n")
  env = {k: v for k, v in os.environ.items()
         if k not in ("SLURM_NTASKS", "SLURM_NPROCS", "TPU_WORKER_HOSTNAMES")}
  env["JAX_PLATFORMS"] = "cpu"
  r = subprocess.run([sys.executable, "-m", "recursive_lm.distributed", str(script),
                      "--flag=1", "x"], capture_output=True, text=True, env=env,
                     timeout=120, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  assert "ARGS ['--flag=1', 'x']" in r.stdout


# ----------------------------------------------------- local multi-process
def test_parse_local_launch_flags():
  launch, rest = D._parse_launch(["--local_processes=2", "--local_devices", "4",
                                  "--heartbeat_timeout_s=7", "script.py", "--x=1"])
  assert (launch.processes, launch.devices, launch.heartbeat_timeout_s) == (2, 4, 7)
  assert rest == ["script.py", "--x=1"]
  assert D._parse_launch(["script.py", "--local_processes=2"]) == (None,
                                                                   ["script.py", "--local_processes=2"])
  with pytest.raises(SystemExit, match="without --local_processes"):
    D._parse_launch(["--local_devices=4", "s.py"])
  with pytest.raises(SystemExit, match="expected a number"):
    D._parse_launch(["--local_processes=two", "s.py"])
  with pytest.raises(SystemExit, match="processes >= 1"):
    D._parse_launch(["--local_processes=0", "s.py"])


def test_local_env_is_a_loopback_pod():
  base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1",
          "SLURM_NTASKS": "4", "PATH": "/bin"}
  env = D.local_env(D.LocalLaunch(processes=2, devices=4), 1, 1234, base)
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
  assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
  assert env["JAX_COORDINATOR_BIND_ADDRESS"] == "127.0.0.1:1234"
  assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
  assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
  assert "SLURM_NTASKS" not in env and env["PATH"] == "/bin"
  assert D.detect_environment(env) == "explicit"
  assert D.local_env(D.LocalLaunch(processes=4), 0, 1, {})["XLA_FLAGS"].endswith("=2")


def _launch(args, tmp_path, timeout=120):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "recursive_lm.distributed", *args],
                        capture_output=True, text=True, env=env, timeout=timeout,
                        cwd=ROOT)


def test_local_launcher_starts_a_real_multi_process_jax(tmp_path):
  script = tmp_path / "topo.py"
  script.write_text(
      "import sys, jax, jax.numpy as jnp\n"
      "from jax.experimental import multihost_utils as mu\n"
      "x = mu.process_allgather(jnp.asarray(jax.process_index()))\n"
      # One write per line: the launcher merges each process's stderr into its
      # stdout and runs it unbuffered, so a multi-argument print (one write per
      # argument) can be split by a native log line written to fd 2 meanwhile.
      "line = ' '.join(map(str, ['TOPO', jax.process_index(), jax.process_count(),"
      " jax.local_device_count(), jax.device_count(), x.tolist(), sys.argv[1:]]))\n"
      "sys.stdout.write(line + '\\n'); sys.stdout.flush()\n")
  r = _launch(["--local_processes=2", "--local_devices=3", str(script), "--a=1"], tmp_path)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  lines = r.stdout.splitlines()
  for p in (0, 1):
    want = f"TOPO {p} 2 3 6 [0, 1] ['--a=1']"
    assert any(l.startswith(f"[p{p}] ") and want in l for l in lines), r.stdout[-3000:]
  assert "[launcher] process 1: exit code 0" in r.stdout


def test_local_launcher_reports_a_failed_process_and_its_exit_code(tmp_path):
  script = tmp_path / "fail.py"
  script.write_text(
      "import os, time, jax\n"
      "if jax.process_index() == 1:\n"
      "  os._exit(3)\n"
      "time.sleep(60)\n")
  t0 = time.time()
  r = _launch(["--local_processes=2", "--local_devices=1", "--heartbeat_timeout_s=3",
               "--failure_grace_s=5", str(script)], tmp_path)
  assert r.returncode == 3, r.stdout[-3000:]
  assert "process 1 failed (exit code 3)" in r.stdout
  assert time.time() - t0 < 60  # not the 60 s sleep: failed or killed after the grace


def test_every_launcher_runs_the_same_entry_point():
  """tpu_vm.sh, the SLURM script and the local launcher all start
  `python -m recursive_lm.distributed experiments/uptrain.py ...` per process."""
  for path in (TPU, SLURM):
    with open(path) as f:
      text = f.read()
    assert re.search(r"-m recursive_lm\.distributed experiments/uptrain\.py", text), path
  with open(os.path.join(ROOT, "recursive_lm", "distributed.py")) as f:
    assert '[sys.executable, "-m", "recursive_lm.distributed", *argv]' in f.read()

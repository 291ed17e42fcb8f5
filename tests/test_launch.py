"""Launch scripts (syntax + dry runs, gcloud/srun never executed) and distributed."""
import os
import subprocess
import sys

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

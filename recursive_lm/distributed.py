"""Multi-host start-up and a local multi-process launcher.

Call :func:`maybe_initialize` first thing in a launcher's ``main`` (before any
other JAX call). It initialises the distributed runtime when a multi-host
environment is detected and is a no-op on a single host:

* Cloud TPU pod slices: ``TPU_WORKER_HOSTNAMES`` lists more than one host
  (``MEGASCALE_COORDINATOR_ADDRESS`` for multislice); JAX reads the rest from
  the TPU metadata.
* SLURM: ``SLURM_NTASKS > 1`` (one task per node or per GPU); JAX's SLURM
  cluster detection picks coordinator, process count and id from the SLURM env.
* Explicit: ``coordinator_address`` / ``num_processes`` / ``process_id``
  arguments, or the ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID`` environment variables (e.g. plain ``ssh`` launches, and
  the local launcher below).

``RLM_HEARTBEAT_TIMEOUT_S`` (default: JAX's 100 s) sets how long the JAX
coordination service waits for a silent process before it fails the others
(a SIGKILLed host then stops every process within about that time, never a
hang). It then logs the process index and local / global device counts.

As a wrapper for scripts that do not call it themselves (the launchers use
this form; every host of a pod runs the same line)::

    python -m recursive_lm.distributed experiments/uptrain.py --config ... --workdir ...

initialises (when detected) and then runs the script as ``__main__``.

Local multi-process runs (a pod on one machine: N JAX processes on the CPU,
each with its own fake devices, a coordinator on 127.0.0.1 and gloo CPU
collectives)::

    python -m recursive_lm.distributed --local_processes=2 --local_devices=4 \
        experiments/uptrain.py --config ... --workdir ...

starts N copies of the line above with ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free
port>``, ``JAX_NUM_PROCESSES=N``, ``JAX_PROCESS_ID=i``, ``JAX_PLATFORMS=cpu``,
``XLA_FLAGS=--xla_force_host_platform_device_count=<local_devices>`` and
``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo``; prefixes each output line with
``[p<i>]``; forwards SIGTERM/SIGINT to every process (a local "preemption");
and when one process fails, gives the others ``--failure_grace_s`` to stop on
their own (the coordination service fails them after the heartbeat timeout)
before it SIGKILLs them. Its exit status is 0 when every process exited 0,
else the first failure's (128 + signal for a signal).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Mapping

from absl import logging

_initialized = False


def _int(env: Mapping[str, str], key: str, default: int = 0) -> int:
  try:
    return int(env.get(key, default))
  except (TypeError, ValueError):
    return default


def detect_environment(env: Mapping[str, str] | None = None) -> str | None:
  """``"tpu_pod"``, ``"slurm"``, ``"explicit"`` or None (single host)."""
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS") and _int(env, "JAX_NUM_PROCESSES", 1) > 1:
    return "explicit"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu_pod"
  if _int(env, "SLURM_NTASKS", 1) > 1 or _int(env, "SLURM_NPROCS", 1) > 1:
    return "slurm"
  return None


def _already_initialized() -> bool:
  """Whether ``jax.distributed.initialize`` already ran (by anyone)."""
  try:
    from jax._src import distributed as _d  # pylint: disable=g-import-not-at-top
    return _d.global_state.client is not None
  except (ImportError, AttributeError):
    return False


def maybe_initialize(coordinator_address: str | None = None,
                     num_processes: int | None = None,
                     process_id: int | None = None,
                     env: Mapping[str, str] | None = None,
                     force: bool = False) -> bool:
  """Initialises ``jax.distributed`` if a multi-host environment is detected.

  Args:
    coordinator_address, num_processes, process_id: explicit settings (these
      win over detection; pass all three for a manual multi-process launch).
    env: environment to inspect (default ``os.environ``; for tests).
    force: initialise even without detection (JAX then auto-detects).

  Returns:
    True when ``jax.distributed.initialize`` was called (now or before).
  """
  global _initialized
  import jax
  if _initialized or _already_initialized():
    _initialized = True
    return True
  env = os.environ if env is None else env
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  kind = "explicit" if explicit else detect_environment(env)
  if kind is None and not force:
    logging.info("single host: process 0 of 1, %d local devices (%s)",
                 jax.local_device_count(), jax.default_backend())
    return False
  kwargs = {}
  if kind == "explicit":
    kwargs = dict(
        coordinator_address=coordinator_address or env.get("JAX_COORDINATOR_ADDRESS"),
        num_processes=num_processes or _int(env, "JAX_NUM_PROCESSES", 1),
        process_id=process_id if process_id is not None
        else _int(env, "JAX_PROCESS_ID", 0))
  hb = _int(env, "RLM_HEARTBEAT_TIMEOUT_S", 0)
  if hb > 0:
    kwargs["heartbeat_timeout_seconds"] = hb
  logging.info("initialising jax.distributed (%s) %s", kind or "forced", kwargs)
  jax.distributed.initialize(**kwargs)
  _initialized = True
  log_topology()
  return True


def log_topology() -> dict:
  """Logs and returns process index/count and local/global device counts."""
  import jax
  info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(),
          "global_devices": jax.device_count(), "backend": jax.default_backend()}
  logging.info("process %(process_index)d of %(process_count)d: %(local_devices)d "
               "local / %(global_devices)d global %(backend)s devices", info)
  return info




# --------------------------------------------------------------------------- #
# Local multi-process launcher.
@dataclasses.dataclass
class LocalLaunch:
  """Options of ``python -m recursive_lm.distributed --local_processes=N``."""
  processes: int
  devices: int = 0               # fake CPU devices per process (0: 8 // processes)
  heartbeat_timeout_s: int = 10  # JAX coordination service heartbeat timeout
  failure_grace_s: float = 0.0   # 0: heartbeat_timeout_s + 20
  port: int = 0                  # coordinator port on 127.0.0.1 (0: a free one)


_LAUNCH_FLAGS = {"--local_processes": "processes", "--local_devices": "devices",
                 "--heartbeat_timeout_s": "heartbeat_timeout_s",
                 "--failure_grace_s": "failure_grace_s", "--coordinator_port": "port"}


def _parse_launch(argv: list[str]) -> tuple[LocalLaunch | None, list[str]]:
  """Splits ``[--local_processes=N ...] SCRIPT ARGS`` into options and the rest."""
  opts: dict[str, Any] = {}
  i = 0
  while i < len(argv) and argv[i].startswith("--") and argv[i].split("=")[0] in _LAUNCH_FLAGS:
    name, eq, value = argv[i].partition("=")
    if not eq:
      if i + 1 >= len(argv):
        raise SystemExit(f"{name} needs a value, e.g. {name}=2")
      value = argv[i + 1]
      i += 1
    field = _LAUNCH_FLAGS[name]
    try:
      opts[field] = (float if field == "failure_grace_s" else int)(value)
    except ValueError:
      raise SystemExit(f"{name}={value!r}: expected a number, e.g. {name}=2") from None
    i += 1
  rest = argv[i:]
  if not opts:
    return None, rest
  if "processes" not in opts:
    raise SystemExit(f"{' '.join(sorted(opts))} given without --local_processes=N; "
                     "add --local_processes=N (N >= 1)")
  launch = LocalLaunch(**opts)
  if launch.processes < 1 or launch.devices < 0:
    raise SystemExit(f"--local_processes={launch.processes} --local_devices="
                     f"{launch.devices}: use processes >= 1 and devices >= 1")
  return launch, rest


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def local_env(launch: LocalLaunch, index: int, port: int,
              base: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment of local process ``index`` (see the module docstring)."""
  env = dict(os.environ if base is None else base)
  for k in ("SLURM_NTASKS", "SLURM_NPROCS", "TPU_WORKER_HOSTNAMES",
            "MEGASCALE_COORDINATOR_ADDRESS"):
    env.pop(k, None)  # this is a local run, whatever the outer job is
  devices = launch.devices or max(1, 8 // launch.processes)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  env.update({
      "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu",
      "JAX_NUM_CPU_DEVICES": str(devices),
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",  # loopback only
      "JAX_NUM_PROCESSES": str(launch.processes), "JAX_PROCESS_ID": str(index),
      "RLM_HEARTBEAT_TIMEOUT_S": str(launch.heartbeat_timeout_s),
      "PYTHONUNBUFFERED": "1",
  })
  return env


def _describe_exit(rc: int) -> str:
  if rc < 0:
    try:
      return f"signal {signal.Signals(-rc).name}"
    except ValueError:
      return f"signal {-rc}"
  return f"exit code {rc}"


def _pump(prefix: str, stream, out) -> None:
  for line in iter(stream.readline, b""):
    out.write(prefix + line.decode("utf-8", "replace"))
    out.flush()
  stream.close()


def launch_local(launch: LocalLaunch, argv: list[str]) -> int:
  """Runs ``python -m recursive_lm.distributed SCRIPT ARGS`` N times locally.

  Returns the exit status (see the module docstring).
  """
  if not argv:
    raise SystemExit("--local_processes=N needs the script to run, e.g. "
                     "experiments/uptrain.py --config ...")
  port = launch.port or _free_port()
  grace = launch.failure_grace_s or launch.heartbeat_timeout_s + 20
  cmd = [sys.executable, "-m", "recursive_lm.distributed", *argv]
  out = sys.stdout
  out.write(f"[launcher] {launch.processes} processes x "
            f"{launch.devices or max(1, 8 // launch.processes)} CPU devices, "
            f"coordinator 127.0.0.1:{port}: {' '.join(argv)}\n")
  out.flush()
  procs, pumps = [], []
  t0 = time.time()
  for i in range(launch.processes):
    p = subprocess.Popen(cmd, env=local_env(launch, i, port), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    procs.append(p)
    out.write(f"[launcher] process {i}: pid {p.pid}\n")
    t = threading.Thread(target=_pump, args=(f"[p{i}] ", p.stdout, out), daemon=True)
    t.start()
    pumps.append(t)

  def forward(signum, frame):  # pylint: disable=unused-argument
    out.write(f"[launcher] {signal.Signals(signum).name}: forwarding to all processes\n")
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  first_failure, deadline = None, None
  try:
    while any(p.poll() is None for p in procs):
      if first_failure is None:
        for i, p in enumerate(procs):
          if p.poll() not in (None, 0):
            first_failure = (i, p.returncode)
            deadline = time.time() + grace
            out.write(f"[launcher] process {i} failed ({_describe_exit(p.returncode)}) "
                      f"after {time.time() - t0:.1f}s; the others have {grace:.0f}s to "
                      "stop on their own\n")
            out.flush()
            break
      elif time.time() > deadline:
        for i, p in enumerate(procs):
          if p.poll() is None:
            out.write(f"[launcher] process {i} still running {grace:.0f}s after "
                      f"process {first_failure[0]} failed: SIGKILL\n")
            p.kill()
      time.sleep(0.05)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for t in pumps:
      t.join(timeout=5)
  for i, p in enumerate(procs):
    out.write(f"[launcher] process {i}: {_describe_exit(p.returncode)}\n")
  out.flush()
  if first_failure is None:
    first_failure = next(((i, p.returncode) for i, p in enumerate(procs)
                          if p.returncode), None)
  if first_failure is None:
    return 0
  rc = first_failure[1]
  return 128 - rc if rc < 0 else rc


def _run_script(argv: list[str]) -> None:
  """``python -m recursive_lm.distributed [--local_processes=N ...] SCRIPT [ARGS]``."""
  import runpy
  if len(argv) < 2 or argv[1] in ("-h", "--help"):
    print(__doc__)
    raise SystemExit(0 if len(argv) >= 2 else 2)
  launch, rest = _parse_launch(argv[1:])
  if launch is not None:
    raise SystemExit(launch_local(launch, rest))
  if not rest:
    raise SystemExit("no script given: python -m recursive_lm.distributed SCRIPT ARGS")
  logging.set_verbosity(logging.INFO)
  maybe_initialize()
  script = rest[0]
  sys.argv = rest
  sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  _run_script(sys.argv)

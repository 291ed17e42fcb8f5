"""Multi-host start-up: ``jax.distributed.initialize()`` only when needed.

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
  ``JAX_PROCESS_ID`` environment variables (e.g. plain ``ssh`` launches).

It then logs the process index and local / global device counts.

As a wrapper for scripts that do not call it themselves (the launchers use
this form)::

    python -m recursive_lm.distributed experiments/uptrain.py --config ... --workdir ...

initialises (when detected) and then runs the script as ``__main__``.
"""
from __future__ import annotations

import os
from typing import Mapping

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


def _run_script(argv: list[str]) -> None:
  """``python -m recursive_lm.distributed SCRIPT [ARGS]``: init, then run SCRIPT."""
  import runpy
  import sys
  if len(argv) < 2 or argv[1] in ("-h", "--help"):
    print(__doc__)
    raise SystemExit(0 if len(argv) >= 2 else 2)
  logging.set_verbosity(logging.INFO)
  maybe_initialize()
  script = argv[1]
  sys.argv = argv[1:]
  sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  import sys
  _run_script(sys.argv)

"""JAX's persistent compilation cache, on by default, and counters for the log.

XLA compilation of the decode loop takes seconds; JAX can keep compiled
executables on disk so a second process on the same machine reads them back
instead of compiling. ``enable()`` turns that on under the user cache folder
(``$XDG_CACHE_HOME/recursive_lm/jax``, else ``~/.cache/recursive_lm/jax``).
``recursive_lm.load`` and the command line call it; opt out with the
environment variable ``RECURSIVE_LM_COMPILE_CACHE=0`` (or ``off``/``false``;
any other value is used as the folder) or the CLI flag ``--nocompile_cache``.

JAX decides once per process, at its first compilation, whether the cache is
used: ``enable()`` must run before anything is jitted, otherwise it reports
that the cache is inactive for this process.

Example::

    from recursive_lm import compile_cache
    compile_cache.enable()            # idempotent
    stats = compile_cache.CompileStats.start()
    ...                               # generate
    print(stats.summary())            # "compile cache: 2 hits, 0 misses; 0.4 s compiling"
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time

ENV = "RECURSIVE_LM_COMPILE_CACHE"
_OFF = ("0", "off", "false", "no", "none")


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "recursive_lm", "jax")


def configured_dir() -> str | None:
  """The folder ``enable()`` would use, or None when the environment opts out."""
  v = os.environ.get(ENV, "").strip()
  if v.lower() in _OFF:
    return None
  return os.path.expanduser(v) if v else default_dir()


def enable(path: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache; returns its folder (or None).

  ``path`` overrides the folder; without it the environment decides
  (``configured_dir``). A folder already set by the user through
  ``jax.config`` / ``JAX_COMPILATION_CACHE_DIR`` is kept. Entries of any
  size and compile time are cached (JAX's default skips compilations under
  1 s, which would miss the small prefill programs).
  """
  import jax  # pylint: disable=g-import-not-at-top
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = path or configured_dir()
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None  # read-only home: run without the cache
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def active_dir() -> str | None:
  """The cache folder JAX is configured with in this process (None: off)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.config.jax_compilation_cache_dir or None


# -- counters ---------------------------------------------------------------------
_LOCK = threading.Lock()
_COUNTS = {"hits": 0, "misses": 0, "compile_s": 0.0, "retrieval_s": 0.0}
_TIMELINE: list[tuple[float, float]] = []  # (perf_counter at the end, seconds) per event
_INSTALLED = False
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def _on_event(event: str, **_):
  with _LOCK:
    if event == "/jax/compilation_cache/cache_hits":
      _COUNTS["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
      _COUNTS["misses"] += 1


def _on_duration(event: str, duration: float, **_):
  with _LOCK:
    if event in _COMPILE_EVENTS:
      _COUNTS["compile_s"] += duration
    elif event == "/jax/compilation_cache/cache_retrieval_time_sec":
      _COUNTS["retrieval_s"] += duration
    else:
      return
    _TIMELINE.append((time.perf_counter(), float(duration)))
    del _TIMELINE[:-10000]


def _install():
  global _INSTALLED
  if _INSTALLED:
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.monitoring.register_event_listener(_on_event)
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  _INSTALLED = True


@dataclasses.dataclass
class CompileStats:
  """Persistent-cache hits/misses and seconds spent compiling since ``start()``.

  ``compile_s`` sums JAX's tracing, lowering and XLA compile events (a cache
  hit skips only the XLA compile); ``retrieval_s`` is reading hits from disk.
  """
  base: dict

  @classmethod
  def start(cls) -> "CompileStats":
    _install()
    with _LOCK:
      return cls(dict(_COUNTS))

  def now(self) -> dict:
    with _LOCK:
      return {k: _COUNTS[k] - self.base[k] for k in _COUNTS}

  def seconds_between(self, start: float, end: float) -> float:
    """Compile + cache-read seconds of events that ended within [start, end]
    (``time.perf_counter`` clock): the compiling inside a timed region."""
    with _LOCK:
      return float(sum(d for t, d in _TIMELINE if start <= t <= end))

  def summary(self) -> str:
    d = self.now()
    where = active_dir()
    state = f"compile cache {where}" if where else "compile cache off"
    return (f"{state}: {d['hits']} hits, {d['misses']} misses; "
            f"{d['compile_s']:.1f} s tracing/compiling, {d['retrieval_s']:.2f} s reading")

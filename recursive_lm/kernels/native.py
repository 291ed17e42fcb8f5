"""Builds and registers the native CPU kernels (XLA FFI custom calls).

The C++ source ships with the package and is compiled at first use with the
machine's C++ compiler (``$CXX``, else ``g++``) and ``-march=native``, into a
cache folder keyed by the source, the compiler flags, the jaxlib version and
the CPU's feature flags, so a shared home folder across different machines
never loads a library built for another CPU. The build writes to a temporary
name and renames it into place: a build killed halfway, or two processes
building at once, never leave a broken library behind.

Nothing here is required: with no compiler, a failed build, or
``RECURSIVE_LM_NATIVE=0``, ``load()`` returns False (once, with a warning
naming the cause) and callers use XLA's own dot instead.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_kernels.cc")
# XLA FFI target name -> exported handler symbol.
TARGETS = {"recursive_lm_panel_matmul": "RecursiveLmPanelMatmul",
           "recursive_lm_cache_attention": "RecursiveLmCacheAttention",
           "recursive_lm_panel_matmul_bf16": "RecursiveLmPanelMatmulBf16",
           "recursive_lm_panel_matmul_int8": "RecursiveLmPanelMatmulInt8"}
PANEL_MATMUL, CACHE_ATTENTION, PANEL_MATMUL_BF16, PANEL_MATMUL_INT8 = TARGETS
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
# Extra compiler flags, e.g. "-mno-avx512bf16" to build the bf16 kernel's
# widening path on a CPU with AVX-512 BF16 (tests); part of the cache key.
EXTRA_FLAGS_ENV = "RECURSIVE_LM_KERNEL_FLAGS"


def _flags() -> tuple[str, ...]:
  return FLAGS + tuple(os.environ.get(EXTRA_FLAGS_ENV, "").split())

_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> str:
  root = os.environ.get("RECURSIVE_LM_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "recursive_lm")
  return os.path.join(root, "kernels")


def _cpu_fingerprint() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((l for l in f if l.startswith(("flags", "Features"))), "")
  except OSError:
    flags = ""
  return platform.machine() + flags


def library_path(compiler: str) -> str:
  import jaxlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  with open(SOURCE, "rb") as f:
    h.update(f.read())
  for part in (compiler, " ".join(_flags()), jaxlib.__version__, _cpu_fingerprint()):
    h.update(part.encode())
  return os.path.join(cache_dir(), f"cpu_kernels-{h.hexdigest()[:16]}.so")


def build(compiler: str | None = None) -> str:
  """Compiles the kernel library if it is not cached; returns its path.

  Raises ``RuntimeError`` naming the compiler and its error output on failure.
  """
  compiler = compiler or os.environ.get("CXX") or "g++"
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (install g++ or set CXX)")
  path = library_path(compiler)
  if os.path.exists(path):
    return path
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  except OSError:  # read-only home: build into the temp folder instead
    path = os.path.join(tempfile.gettempdir(), "recursive_lm-kernels",
                        os.path.basename(path))
    if os.path.exists(path):
      return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  try:
    cmd = [compiler, *_flags(), "-I", jax.ffi.include_dir(), "-o", tmp, SOURCE]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"building {os.path.basename(SOURCE)} failed ({' '.join(cmd)}):\n"
                         + proc.stderr[-2000:])
    os.replace(tmp, path)  # atomic: readers see no library or a whole one
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def load() -> bool:
  """True when the native kernels are built and registered with XLA (cached)."""
  with _lock:
    if "ok" in _state:
      return _state["ok"]
    ok, why = False, None
    if os.environ.get("RECURSIVE_LM_NATIVE", "1") == "0":
      why = "disabled by RECURSIVE_LM_NATIVE=0"
    else:
      try:
        lib = ctypes.cdll.LoadLibrary(build())
        for target, symbol in TARGETS.items():
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                      platform="cpu")
        _state["bf16_dot"] = bool(lib.RecursiveLmBf16DotProducts())
        ok = True
      except (RuntimeError, OSError, AttributeError) as e:
        why = str(e)
        warnings.warn(f"recursive_lm native CPU kernels unavailable, using XLA dots "
                      f"(decoding is slower): {why}", RuntimeWarning, stacklevel=2)
    _state.update(ok=ok, why=why)
    return ok


def status() -> str:
  """One line saying whether the native kernels are in use, and why not."""
  if not load():
    return f"native CPU kernels: off ({_state['why']})"
  return "native CPU kernels: on (bf16 panels: " + (
      "AVX-512 BF16 dot products)" if _state.get("bf16_dot") else "widened to f32)")


def bf16_dot_products() -> bool:
  """True when the bf16 panel kernel was built with AVX-512 BF16 (vdpbf16ps)."""
  return load() and bool(_state.get("bf16_dot"))


def _reset_for_tests():
  with _lock:
    _state.clear()

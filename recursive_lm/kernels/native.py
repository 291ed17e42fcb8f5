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

AMX: on a CPU with AMX-TILE and AMX-BF16 (Sapphire Rapids and later) the
library has a tile-unit path for bf16 and int8 panels, used from
``AMX_MIN_ROWS`` rows on. It is chosen at run time: only when the library was
built with it, Linux grants the tile state (``arch_prctl``) and a test tile
multiply runs (in a forked child), and ``RLM_AMX`` is not ``"0"``.
``panel_path(weights, rows)`` says which path a call takes.
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

_HERE = os.path.dirname(__file__)
# The C++ translation units compiled into the one library, and the headers they
# include: the cache key hashes every one of them.
SOURCES = tuple(os.path.join(_HERE, f) for f in
                ("cpu_kernels.cc", "amx_panels.cc", "cache_attention.cc", "decode_ops.cc"))
HEADERS = (os.path.join(_HERE, "kernels_common.h"),)
# XLA FFI target name -> exported handler symbol.
TARGETS = {"recursive_lm_panel_matmul": "RecursiveLmPanelMatmul",
           "recursive_lm_cache_attention": "RecursiveLmCacheAttention",
           "recursive_lm_panel_matmul_bf16": "RecursiveLmPanelMatmulBf16",
           "recursive_lm_panel_matmul_int8": "RecursiveLmPanelMatmulInt8",
           "recursive_lm_argmax": "RecursiveLmArgmax",
           "recursive_lm_materialize": "RecursiveLmMaterialize",
           "recursive_lm_embed_rows_bf16": "RecursiveLmEmbedRowsBf16"}
(PANEL_MATMUL, CACHE_ATTENTION, PANEL_MATMUL_BF16, PANEL_MATMUL_INT8, ARGMAX,
 MATERIALIZE, EMBED_ROWS_BF16) = TARGETS
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
# Extra compiler flags, e.g. "-mno-avx512bf16" to build the bf16 kernel's
# widening path on a CPU with AVX-512 BF16 (tests); part of the cache key.
EXTRA_FLAGS_ENV = "RECURSIVE_LM_KERNEL_FLAGS"


# Row counts from which bf16 / int8 panels use AMX tiles (0: never). bf16:
# from 2 rows. Since the dot-product path prefetches its weight stream into L2
# too (2026-12-02), 1 row streams 4-6% faster with vdpbf16ps than on the tiles
# on an Emerald Rapids Xeon (a decode step's 121 bf16 matmuls chained: 10.47
# vs 10.91 ms; the engine at batch 1: 105.8 vs 99.7 tok/s), while 2 / 4 / 8
# rows are 5% / 16% / 33% faster on the tiles (docs/weight_formats.md).
# ``set_amx_min_rows`` changes it at run time.
# int8: off, its AMX path (each panel widened to bf16 in L1, activations
# rounded to bf16) measured no faster than the f32 FMAs (8 rows: 7.6 vs 7.9
# GB/s). RLM_AMX_MIN_ROWS=N sets both (int8 too), RLM_AMX=0 turns AMX off.
AMX_MIN_ROWS = {"bf16": 2, "int8": 0}
AMX_ENV = "RLM_AMX"
AMX_MIN_ROWS_ENV = "RLM_AMX_MIN_ROWS"


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
  for src in (*SOURCES, *HEADERS):
    with open(src, "rb") as f:
      h.update(os.path.basename(src).encode() + b"\0" + f.read())
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
    cmd = [compiler, *_flags(), "-I", jax.ffi.include_dir(), "-I", _HERE, "-o", tmp,
           *SOURCES]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      names = ", ".join(os.path.basename(s) for s in SOURCES)
      raise RuntimeError(f"building {names} failed ({' '.join(cmd)}):\n"
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
        _state["lib"] = lib
        _state["amx_compiled"] = bool(lib.RecursiveLmAmxCompiled())
        lib.RecursiveLmAmxInit.argtypes = [ctypes.c_int64, ctypes.c_int64]
        ok = True
      except (RuntimeError, OSError, AttributeError) as e:
        why = str(e)
        warnings.warn(f"recursive_lm native CPU kernels unavailable, using XLA dots "
                      f"(decoding is slower): {why}", RuntimeWarning, stacklevel=2)
    _state.update(ok=ok, why=why)
    if ok:
      rows = dict(AMX_MIN_ROWS)
      if os.environ.get(AMX_MIN_ROWS_ENV):
        rows = {k: int(os.environ[AMX_MIN_ROWS_ENV]) for k in rows}
      _state["amx_wanted"] = rows
      _set_amx_locked(os.environ.get(AMX_ENV, "1") != "0")
    return ok


def _set_amx_locked(enabled: bool) -> None:
  _state["amx_enabled"] = enabled
  rows = dict(_state["amx_wanted"])
  if not enabled:
    rows = {k: 0 for k in rows}
  on = bool(_state["lib"].RecursiveLmAmxInit(rows["bf16"], rows["int8"]))
  _state["amx_rows"] = rows if on else {k: 0 for k in rows}
  if enabled and not on and "amx_why" not in _state:
    _state["amx_why"] = ("not built (no AMX in -march=native)" if not _state["amx_compiled"]
                         else "the kernel or CPU refused the tile state")
  _state["amx_off_why"] = None if on else (
      _state.get("amx_why") if enabled else f"disabled ({AMX_ENV}=0 or set_amx(False))")


def set_amx(enabled: bool) -> bool:
  """Turns the AMX path on or off for later calls (it is read at each call, so
  compiled functions need no retrace); returns whether it is on."""
  if not load():
    return False
  with _lock:
    _set_amx_locked(enabled)
  return amx()


def _set_prefetch(symbol: str, nbytes: int) -> int:
  """Calls the library's int64 -> int64 prefetch-distance setter ``symbol``;
  -1 without the kernels."""
  if not load():
    return -1
  fn = getattr(_state["lib"], symbol)
  fn.argtypes = [ctypes.c_int64]
  fn.restype = ctypes.c_int64
  return int(fn(int(nbytes)))


def set_amx_min_rows(bf16: int | None = None, int8: int | None = None) -> dict:
  """Sets the row counts from which bf16 / int8 panels run on AMX tiles (0:
  never; None: unchanged) for later calls, like ``RLM_AMX_MIN_ROWS`` at start
  (compiled functions need no retrace). Returns the previous settings; without
  AMX they are kept and apply if AMX is turned on."""
  if not load():
    return {}
  with _lock:
    was = dict(_state["amx_wanted"])
    for k, v in (("bf16", bf16), ("int8", int8)):
      if v is not None:
        if v < 0:
          raise ValueError(f"AMX min rows must be >= 0 (0: never), got {k}={v}")
        _state["amx_wanted"][k] = int(v)
    _set_amx_locked(_state["amx_enabled"])
  return was


def set_amx_prefetch(nbytes: int) -> int:
  """Sets how far ahead (bytes) the AMX paths prefetch the weight stream into
  L2 (0: no software prefetch; the default is the library's, 8 KiB) for later
  calls; returns the previous distance (-1 without AMX code or kernels)."""
  return _set_prefetch("RecursiveLmAmxPrefetch", nbytes)


def set_amx_chunk_prefetch(enabled: bool) -> int:
  """bf16 AMX calls: each thread's weight prefetch runs on across its chunk
  boundary into the panel it reads next, and its first chunk's opening bytes
  are prefetched (True), or the prefetch runs on into whatever panel follows
  in memory (False, the default: the A/B was not conclusive), for later
  calls; bit-identical results.
  Returns the previous setting (1/0; -1 without AMX code or kernels)."""
  return _set_prefetch("RecursiveLmAmxChunkPrefetch", 1 if enabled else 0)


def set_int8_prefetch(nbytes: int) -> int:
  """Sets how far ahead (bytes) the int8 FMA path prefetches the weight stream
  into L2 (0: none; default 8 KiB) for later calls; returns the previous one
  (-1 without the kernels)."""
  return _set_prefetch("RecursiveLmInt8Prefetch", nbytes)


def set_f32_prefetch(min_rows: int) -> int:
  """Sets the row count from which f32 panel calls prefetch the next panel into
  L2 while they compute one (its rows spread over the call's row groups; 0:
  never; default 4) for later calls; bit-identical results. Returns the
  previous one (-1 without the kernels)."""
  return _set_prefetch("RecursiveLmF32Prefetch", min_rows)


def f32_prefetch_rows() -> int:
  """The row count from which f32 panel calls prefetch the next panel (0:
  never; -1 without the kernels)."""
  rows = set_f32_prefetch(0)
  if rows >= 0:
    set_f32_prefetch(rows)
  return rows


def set_bf16_prefetch(nbytes: int) -> int:
  """Sets how far ahead (bytes) the bf16 dot-product path (no AMX: AVX-512
  BF16 or widening) prefetches the weight stream into L2 (0: none; default
  8 KiB) for later calls; bit-identical results. Returns the previous one (-1
  without the kernels)."""
  return _set_prefetch("RecursiveLmBf16Prefetch", nbytes)


def set_grouped_attention(enabled: bool) -> bool:
  """Cache attention: all query heads of a group at once (each K/V row read
  once; the default) or one head at a time, for later calls; returns the
  previous setting (False without the kernels)."""
  if not load():
    return False
  return bool(_state["lib"].RecursiveLmAttentionGrouped(1 if enabled else 0))


def set_attention_prefetch(enabled: bool) -> bool:
  """Grouped cache attention: each thread prefetches the value rows it will
  sum and the next row's keys into L2 (the default), or no software prefetch,
  for later calls; bit-identical results. Returns the previous setting (False
  without the kernels)."""
  if not load():
    return False
  return bool(_state["lib"].RecursiveLmAttentionPrefetch(1 if enabled else 0))


def amx() -> bool:
  """True when bf16/int8 panels of enough rows run on AMX tiles."""
  return load() and any(_state["amx_rows"].values())


def amx_min_rows(weights: str) -> int | None:
  """Rows from which ``weights`` ("bf16" | "int8") panels use AMX; None when never."""
  if not amx():
    return None
  return _state["amx_rows"].get(weights) or None


def panel_path(weights: str, rows: int) -> str:
  """Which math a native panel matmul of ``rows`` rows in ``weights`` format runs."""
  if not load():
    return "XLA dot (native kernels off)"
  lo = amx_min_rows(weights) if weights in ("bf16", "int8") else None
  if lo is not None and rows >= lo:
    return ("AMX-BF16 tiles" if weights == "bf16"
            else "AMX-BF16 tiles (int8 widened to bf16)")
  if weights == "bf16":
    return "AVX-512 BF16 dot products" if _state.get("bf16_dot") else "widened to f32"
  if weights == "int8":
    return "int8 widened to f32, f32 FMAs"
  return "f32 FMAs"


def status() -> str:
  """One line saying whether the native kernels are in use, and why not."""
  if not load():
    return f"native CPU kernels: off ({_state['why']})"
  line = "native CPU kernels: on (bf16 panels: " + (
      "AVX-512 BF16 dot products" if _state.get("bf16_dot") else "widened to f32")
  if amx():
    r = _state["amx_rows"]
    line += (f"; AMX-BF16 tiles from {r['bf16']} row{'s' if r['bf16'] > 1 else ''}"
             if r["bf16"] else "; AMX on")
    line += (f", int8 on AMX from {r['int8']} rows (activations rounded to bf16)"
             if r["int8"] else ", int8 panels not on AMX")
  else:
    line += f"; AMX: off, {_state['amx_off_why']}"
  return line + ")"


def bf16_dot_products() -> bool:
  """True when the bf16 panel kernel was built with AVX-512 BF16 (vdpbf16ps)."""
  return load() and bool(_state.get("bf16_dot"))


def _reset_for_tests():
  with _lock:
    _state.clear()

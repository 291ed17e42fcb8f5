"""Roofline measurements of this machine: memory read bandwidth and the native
panel kernel's compute rate (used by ``experiments/bench_decode.py`` and
``experiments/bench_engines.py``).

* ``measure_bandwidth()``: the read rate of a large array, best of three readers;
* ``BandwidthProbe``: a quick read-rate probe to take right before a timed run
  (this machine's bandwidth drifts by 20-50% over minutes);
* ``kernel_compute_rate(weights, batch)``: weights multiplied per second (by
  ``batch`` rows each) on an L2-resident matrix: the compute limit; FLOP/s =
  ``2 * batch * rate``.
"""
from __future__ import annotations

import statistics
import time


def measure_bandwidth(n_bytes: int = 1 << 30, reps: int = 7) -> dict:
  """Read rate of a 1 GiB f32 array: the best of three readers (median of
  ``reps`` each): numpy's sum, XLA's sum, and the native streaming kernel
  (a 1-row panel matmul, which reads the array once, front to back, on all
  threads; recursive_lm/kernels). The best one is the roofline's bandwidth."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from recursive_lm.kernels import native, panel_matmul

  def rate(fn):
    fn()
    ts = []
    for _ in range(reps):
      t = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t)
    return n_bytes / statistics.median(ts) / 1e9

  a = np.ones(n_bytes // 4, np.float32)
  out = {"numpy_sum_GBps": rate(a.sum)}
  x = jnp.asarray(a)
  del a
  f = jax.jit(jnp.sum)
  out["xla_sum_GBps"] = rate(lambda: f(x).block_until_ready())
  if native.load():
    w = x.reshape(-1, 512, 32)
    row = jnp.ones((1, 512), jnp.float32)
    g = jax.jit(lambda r, w: panel_matmul(r, w, w.shape[0] * 32, use_native=True))
    out["native_stream_GBps"] = rate(lambda: g(row, w).block_until_ready())
  out["bandwidth_GBps"] = max(out.values())
  return out


class BandwidthProbe:
  """A quick read-rate measurement taken right before every timed run: this
  machine's memory bandwidth drifts by 20-50% over minutes (other tenants),
  so each run is set against the bandwidth of its own moment."""

  def __init__(self, n_bytes: int = 1 << 30):
    import jax
    import jax.numpy as jnp
    from recursive_lm.kernels import native, panel_matmul
    self.n_bytes = n_bytes
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    s = jax.jit(jnp.sum)
    self.readers = [lambda: s(x).block_until_ready()]
    if native.load():
      w, row = x.reshape(-1, 512, 32), jnp.ones((1, 512), jnp.float32)
      g = jax.jit(lambda r, w: panel_matmul(r, w, w.shape[0] * 32, use_native=True))
      self.readers.append(lambda: g(row, w).block_until_ready())
    self()

  def __call__(self, reps: int = 3) -> float:
    """Best read rate (GB/s) of ``reps`` reads by each reader."""
    best = 0.0
    for read in self.readers:
      for _ in range(reps):
        t = time.perf_counter()
        read()
        best = max(best, self.n_bytes / (time.perf_counter() - t) / 1e9)
    return best


def kernel_compute_rate(weights: str, batch: int, k: int = 576, n: int = 1024,
                        calls: int = 64, reps: int = 5) -> float | None:
  """The compute limit of the native panel kernel: weights multiplied per
  second (by ``batch`` rows each) on a [k, n] matrix that stays in the L2
  caches (1.2 MB in f32, split across the cores), so memory does not limit it;
  best of ``reps`` timings of ``calls`` chained calls, on every core. It runs
  the path the engine takes at this batch (``native.panel_path``: AMX tiles
  where they are on). None without the native kernels."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from recursive_lm.kernels import native
  from recursive_lm.kernels import panel as P
  if not native.load():
    return None
  w = jnp.asarray(np.random.default_rng(0).standard_normal((k, n), np.float32) * 0.02)
  scale = None
  if weights == "bf16":
    wp = P.to_bf16_panels(w)
  elif weights == "int8":
    wp, scale = P.to_int8_panels(w)
  else:
    wp = P.to_panels(w)

  @jax.jit
  def chain(x):
    def body(_, x):
      y = P.panel_matmul(x, wp, n, use_native=True, scale=scale)
      return x + 1e-30 * y[:, :k]
    return jax.lax.fori_loop(0, calls, body, x)

  x = jnp.ones((batch, k), jnp.float32)
  chain(x).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    chain(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return calls * k * n / best

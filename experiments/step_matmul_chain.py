"""A decode step's panel matmuls chained in one jit: which kernel path, which prefetch.

    python experiments/step_matmul_chain.py --weights=bf16 --rows=1,2,4     # AMX vs dot products
    python experiments/step_matmul_chain.py --weights=f32 --rows=1,8,32     # f32 L2 prefetch on/off

SmolLM2-135M's matmul shapes (fused qkv [576, 960], o [576, 576], fused
gate-up [576, 3072], down [1536, 576]) for ``--layers`` layers plus the tied
head [576, 49152], random weights in panel layout, each call's input
depending on the previous call's output so XLA keeps them in order. Per
variant: median over ``--rounds`` interleaved rounds of the fastest of
``--calls`` calls; results must be bitwise equal across the variants of one
path (prefetch only moves data). bf16 variants: AMX tiles at several L2
prefetch distances and the AVX-512 BF16 dot products (AMX off) with and
without theirs; f32: the next-panel prefetch off and from 1 row.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_enum("weights", "bf16", ["f32", "bf16"], "Panel weight format.")
flags.DEFINE_list("rows", ["1", "2", "4", "8"], "Row counts (activations per call).")
flags.DEFINE_integer("layers", 30, "Layers chained (plus the head).")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds (median).")
flags.DEFINE_integer("calls", 7, "Calls per variant per round (fastest kept).")


def main(_):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from recursive_lm.kernels import native, panel
  if not native.load():
    raise SystemExit(f"this probe times the native kernels: {native.status()}")
  print(native.status())
  rng = np.random.default_rng(0)
  shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)] * FLAGS.layers + [(576, 49152)]
  pack = panel.to_bf16_panels if FLAGS.weights == "bf16" else panel.to_panels
  ws = [pack(jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.02)) for s in shapes]
  nbytes = sum(int(w.size) * w.dtype.itemsize for w in ws)
  print(f"{len(shapes)} {FLAGS.weights} matmuls, {nbytes / 1e6:.0f} MB")

  @jax.jit
  def chain(x, ws):
    h, acc = x, 0.0
    for (k, n), w in zip(shapes, ws):
      xi = h[:, :k] if k <= h.shape[1] else jnp.tile(h, (1, 3))[:, :k]
      acc = acc + panel.panel_matmul(xi, w, n)[:, 0]
      h = h + 1e-9 * acc[:, None]
    return acc

  if FLAGS.weights == "bf16":
    variants = {f"AMX, L2 prefetch {d}": (True, d, None) for d in (0, 8192, 32768)}
    variants.update({f"dot products, L2 prefetch {d}": (False, None, d) for d in (0, 8192)})
  else:
    variants = {"no prefetch": 0, "next-panel prefetch": 1}

  def use(v):
    if FLAGS.weights == "bf16":
      amx, amx_pf, dot_pf = v
      native.set_amx(amx)
      native.set_amx_min_rows(bf16=1)
      if amx_pf is not None:
        native.set_amx_prefetch(amx_pf)
      if dot_pf is not None:
        native.set_bf16_prefetch(dot_pf)
    else:
      native.set_f32_prefetch(v)

  saved = (native.amx(), native.set_amx_min_rows(), native.set_amx_prefetch(8192),
           native.set_bf16_prefetch(8192), native.set_f32_prefetch(4))
  try:
    for r in map(int, FLAGS.rows):
      x = jnp.ones((r, 576), jnp.float32) + jnp.arange(r, dtype=jnp.float32)[:, None]
      ref = {}
      for name, v in variants.items():
        use(v)
        out = np.asarray(chain(x, ws))
        key = name.split(",")[0]
        if key in ref and not np.array_equal(ref[key], out):
          raise SystemExit(f"{name} changed the results at {r} rows")
        ref.setdefault(key, out)
      times = {n: [] for n in variants}
      for _ in range(FLAGS.rounds):
        for name, v in variants.items():
          use(v)
          best = float("inf")
          for _ in range(FLAGS.calls):
            t = time.perf_counter()
            chain(x, ws).block_until_ready()
            best = min(best, time.perf_counter() - t)
          times[name].append(best)
      for name, ts in times.items():
        s = statistics.median(ts)
        print(f"rows {r:3d}  {name:32s} {s * 1e3:8.2f} ms  {nbytes / s / 1e9:5.1f} GB/s  "
              f"runs {' '.join(f'{t * 1e3:.2f}' for t in ts)}", flush=True)
  finally:
    native.set_amx(saved[0])
    native.set_amx_min_rows(**saved[1])
    native.set_amx_prefetch(saved[2])
    native.set_bf16_prefetch(saved[3])
    native.set_f32_prefetch(saved[4])


if __name__ == "__main__":
  app.run(main)

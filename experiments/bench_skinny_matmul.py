"""Why batch-8 decoding runs below the memory roofline on CPU: skinny-matmul sweep.

    python experiments/bench_skinny_matmul.py            # writes results/skinny_matmul.{json,md}

Decoding at batch B multiplies a [B, d] activation by every weight matrix.
Weights dominate the bytes, so the ideal is to stream each weight once at
memory bandwidth whatever B is. This script times a chain of 40 distinct
SmolLM2-sized [576, 1536] f32 matrices (141 MB, beyond the caches) for
B = 1..32, in both XLA storage layouts (``in_out``: x @ W[in, out];
``out_in``: x @ W[out, in].T) under several XLA CPU options, each in its
own subprocess (XLA_FLAGS is read once per process), and in the ``panel``
layout read by recursive_lm's native kernel (recursive_lm/kernels), in f32,
bf16 and int8 (+ per-column scales). The figure of merit is effective weight
bandwidth = that layout's weight bytes / time (GFLOP/s in the JSON).

    python experiments/bench_skinny_matmul.py --panels_only   # native kernels only
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

BATCHES = (1, 2, 4, 8, 16, 32, 64)
OPTIONS = {
    "default": "",
    "single-thread Eigen": "--xla_cpu_multi_thread_eigen=false",
    "XNNPACK dots": "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "oneDNN": "--xla_cpu_use_onednn=true",
}

_CHILD = r"""
import json, statistics, sys, time
import numpy as np, jax, jax.numpy as jnp
K, N = 576, 1536
rng = np.random.default_rng(0)
io = [jnp.asarray(rng.standard_normal((K, N), dtype=np.float32)) for _ in range(40)]
oi = [w.T.copy() for w in io]
nbytes = sum(w.nbytes for w in io)
layouts = [("in_out", io), ("out_in", oi)]
if sys.argv[2] == "1":
  from recursive_lm.kernels import panel_matmul, to_panels
  from recursive_lm.kernels.panel import to_bf16_panels, to_int8_panels
  layouts.append(("panel", [to_panels(w) for w in io]))
  layouts.append(("panel-bf16", [to_bf16_panels(w) for w in io]))
  layouts.append(("panel-int8", [to_int8_panels(w) for w in io]))
def chain(layout):
  @jax.jit
  def f(x, ws):
    acc = 0.
    for w in ws:
      if layout == "in_out":
        y = x @ w
      elif layout == "out_in":
        y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))
      elif layout == "panel-int8":
        y = panel_matmul(x, w[0], N, use_native=True, scale=w[1])
      else:
        y = panel_matmul(x, w, N, use_native=True)
      acc = acc + y[:, :K]
    return acc
  return f
out = {}
for layout, ws in layouts:
  nbytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(ws))
  f = chain(layout)
  for b in json.loads(sys.argv[1]):
    x = jnp.ones((b, K), jnp.float32)
    f(x, ws).block_until_ready()
    ts = []
    for _ in range(7):
      t = time.perf_counter()
      for _ in range(5):
        r = f(x, ws)
      r.block_until_ready()
      ts.append((time.perf_counter() - t) / 5)
    s = statistics.median(ts)
    out[f"{layout}/{b}"] = {"GBps": nbytes / s / 1e9, "GFLOPs": 2 * b * K * N * 40 / s / 1e9}
print(json.dumps(out))
"""


def main():
  results = {}
  for name, flags in OPTIONS.items():
    if "--panels_only" in sys.argv and name != "default":
      continue
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    with_panel = "1" if name == "default" else "0"  # XLA options don't touch it
    p = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(BATCHES), with_panel],
                       env=env,
                       capture_output=True, text=True, timeout=900)
    if p.returncode:
      results[name] = {"error": p.stderr.strip().splitlines()[-1:]}
      continue
    results[name] = json.loads(p.stdout.strip().splitlines()[-1])
    print(name, {k: round(v["GBps"], 1) for k, v in results[name].items()}, flush=True)
  os.makedirs("results", exist_ok=True)
  meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
          "options": OPTIONS, "batches": BATCHES}
  with open("results/skinny_matmul.json", "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=1)
  lines = ["Effective weight bandwidth (GB/s: the layout's own bytes / time) of "
           "x[B,576] @ W for 40 distinct 576x1536 weights (141 MB in f32, 71 MB bf16, "
           "35 MB int8), median of 7.", f"Made by `{meta['command']}` on {meta['date']}.",
           "", "| XLA option | layout | " + " | ".join(f"B={b}" for b in BATCHES) + " |",
           "|---|---|" + "---|" * len(BATCHES)]
  for name, r in results.items():
    if "error" in r:
      lines.append(f"| {name} | failed: {r['error']} |")
      continue
    for layout in ("in_out", "out_in", "panel", "panel-bf16", "panel-int8"):
      if f"{layout}/1" not in r:
        continue
      label = f"{layout} (native kernel)" if layout.startswith("panel") else layout
      lines.append(f"| {name} | {label} | " + " | ".join(
          f"{r[f'{layout}/{b}']['GBps']:.1f}" for b in BATCHES) + " |")
  with open("results/skinny_matmul.md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()

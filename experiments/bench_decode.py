"""Decode throughput of the engine vs transformers, as a fraction of the memory roofline.

    python experiments/bench_decode.py                  # embedded SmolLM2-135M
    python experiments/bench_decode.py --batches=1,8 --runs=5

For each batch size: prompt of 32 tokens, 128 new tokens, greedy, float32,
median over ``--runs`` runs after a warm-up. Roofline: decoding one step
reads every weight once (f32), so ``steps/s <= bandwidth / weight_bytes``;
the bandwidth is the read rate of a 1 GiB array (best of 3 reads by XLA's sum
and by a native streaming read), probed right before every timed run because
this machine's bandwidth drifts by 20-50% over minutes; each run is set
against its own roofline and the median fraction is reported.
transformers (the ``peer`` extra)
runs on the same weights and thread count when installed. Writes
``results/bench_decode.json`` and ``results/bench_decode.md``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model to benchmark.")
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 128, "New tokens.")
flags.DEFINE_integer("runs", 5, "Timed runs per setting (median reported).")
flags.DEFINE_list("layouts", ["in_out", "out_in+fused", "panel", "panel+fused"],
                  "Engine kernel layouts to try (in_out, out_in: XLA dots; panel: the "
                  "native kernel of recursive_lm/kernels; +fused: concatenated q/k/v, "
                  "gate/up).")
flags.DEFINE_bool("peer", True, "Also time transformers if installed.")
flags.DEFINE_string("out", "results", "Output folder.")


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


def bench_engines(m, batch: int, layouts, probe: BandwidthProbe) -> list[dict]:
  """Times each layout; runs are interleaved so machine noise hits all alike."""
  from recursive_lm.decode.engine import Engine
  engines = {lay: Engine(m.cfg.replace(eos_id=None), m.params,
                        kernel_layout=lay.split("+")[0], fuse=lay.endswith("+fused"))
             for lay in layouts}
  prompts = [[(17 * i + 3 * j) % 1000 + 100 for j in range(FLAGS.prompt_len)]
             for i in range(batch)]
  for eng in engines.values():
    eng.generate(prompts, FLAGS.new_tokens, stop_at_eos=False)  # warm-up / compile
  step_s = {lay: [] for lay in layouts}
  total = {lay: [] for lay in layouts}
  bw = {lay: [] for lay in layouts}
  for _ in range(FLAGS.runs):
    for lay, eng in engines.items():
      bw[lay].append(probe())
      o = eng.generate(prompts, FLAGS.new_tokens, stop_at_eos=False)
      step_s[lay].append(o.decode_seconds / o.steps)
      total[lay].append(o.prefill_seconds + o.decode_seconds)
  out = []
  for lay in layouts:
    s = statistics.median(step_s[lay])
    out.append({"engine": f"recursive_lm ({lay})", "batch": batch,
                "tokens_per_s": batch / s, "step_ms": s * 1e3,
                "end_to_end_tokens_per_s":
                    batch * FLAGS.new_tokens / statistics.median(total[lay]),
                "runs": [batch / x for x in step_s[lay]], "run_bandwidth_GBps": bw[lay]})
  return out


def bench_transformers(m, batch: int, probe: BandwidthProbe) -> dict | None:
  try:
    import torch
    import transformers
  except ImportError:
    return None
  from recursive_lm.nn.weights import hf_from_params
  torch.set_num_threads(os.cpu_count() or 1)
  hf_cfg = transformers.LlamaConfig(**{k: v for k, v in m.cfg.to_hf_config().items()
                                       if k not in ("architectures", "model_type",
                                                    "torch_dtype")})
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  sd = {k: torch.from_numpy(v) for k, v in hf_from_params(m.cfg, m.params).items()}
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
  model.tie_weights()
  ids = torch.tensor([[(17 * i + 3 * j) % 1000 + 100 for j in range(FLAGS.prompt_len)]
                      for i in range(batch)])
  kw = dict(max_new_tokens=FLAGS.new_tokens, min_new_tokens=FLAGS.new_tokens,
            do_sample=False, use_cache=True, pad_token_id=0)
  with torch.inference_mode():
    model.generate(ids, **kw)
    ts, bws = [], []
    for _ in range(FLAGS.runs):
      bws.append(probe())
      t = time.perf_counter()
      model.generate(ids, **kw)
      ts.append(time.perf_counter() - t)
  s = statistics.median(ts)
  return {"engine": f"transformers {transformers.__version__} (torch "
                    f"{torch.__version__}, {torch.get_num_threads()} threads)",
          "batch": batch, "tokens_per_s": batch * FLAGS.new_tokens / s,
          "step_ms": s / FLAGS.new_tokens * 1e3,
          "end_to_end_tokens_per_s": batch * FLAGS.new_tokens / s,
          "runs": [batch * FLAGS.new_tokens / x for x in ts], "run_bandwidth_GBps": bws}


def main(_):
  import jax
  from recursive_lm import api
  from recursive_lm.kernels import status as native_status
  from recursive_lm.nn.model import param_count
  m = api.load(FLAGS.model)
  weight_bytes = param_count(m.params) * 4

  def bandwidth(when):
    bw = measure_bandwidth()
    print(f"memory read bandwidth ({when}): {bw['bandwidth_GBps']:.1f} GB/s "
          f"(numpy {bw['numpy_sum_GBps']:.1f}, XLA {bw['xla_sum_GBps']:.1f}, native "
          f"{bw.get('native_stream_GBps', float('nan')):.1f}); weights "
          f"{weight_bytes / 1e6:.0f} MB f32", flush=True)
    return bw

  # The full measurement (three readers) before and after, for the record; the
  # roofline of each run uses the probe taken right before it.
  bws = [bandwidth("before")]
  probe = BandwidthProbe()
  rows = []
  for b in map(int, FLAGS.batches):
    res = bench_engines(m, b, FLAGS.layouts, probe)
    if FLAGS.peer:
      peer = bench_transformers(m, b, probe)
      if peer:
        res.append(peer)
    for r in res:
      per_run = [tps * weight_bytes / (b * g * 1e9)
                 for tps, g in zip(r["runs"], r["run_bandwidth_GBps"])]
      r["fraction_of_roofline"] = statistics.median(per_run)
      r["roofline_tokens_per_s"] = (b * statistics.median(r["run_bandwidth_GBps"]) * 1e9
                                    / weight_bytes)
      print(f"batch {b:2d} {r['engine']:55s} {r['tokens_per_s']:7.1f} tok/s "
            f"({r['fraction_of_roofline']:.0%} of roofline, bandwidth "
            f"{min(r['run_bandwidth_GBps']):.1f}-{max(r['run_bandwidth_GBps']):.1f} GB/s)",
            flush=True)
      rows.append(r)
  bws.append(bandwidth("after"))
  run_bw = [g for r in rows for g in r["run_bandwidth_GBps"]]
  bw = {"before_after": bws, "runs_min_GBps": min(run_bw), "runs_max_GBps": max(run_bw),
        "runs_median_GBps": statistics.median(run_bw)}
  os.makedirs(FLAGS.out, exist_ok=True)
  meta = {"command": "python " + " ".join(sys.argv), "model": m.cfg.name,
          "weight_bytes": weight_bytes, "bandwidth": bw, "prompt_len": FLAGS.prompt_len,
          "new_tokens": FLAGS.new_tokens, "runs": FLAGS.runs, "jax": jax.__version__,
          "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
          "native_kernels": native_status(),
          "date": time.strftime("%Y-%m-%d %H:%M")}
  with open(os.path.join(FLAGS.out, "bench_decode.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  lines = [f"Decode throughput, {m.cfg.name}, f32, prompt {FLAGS.prompt_len}, "
           f"{FLAGS.new_tokens} new tokens, greedy, median of {FLAGS.runs} runs; weights "
           f"{weight_bytes / 1e6:.0f} MB. Memory bandwidth probed before every run: "
           f"{bw['runs_min_GBps']:.1f}-{bw['runs_max_GBps']:.1f} GB/s (median "
           f"{bw['runs_median_GBps']:.1f}); fraction = median over runs of tokens/s "
           "over that run's roofline; roofline column at the median bandwidth of the "
           "row's runs.",
           f"Made by `{meta['command']}` on {meta['date']}; {meta['native_kernels']}.", "",
           "| batch | engine | new tokens/s | roofline tokens/s | fraction | x transformers |",
           "|---|---|---|---|---|---|"]
  peer_tps = {r["batch"]: r["tokens_per_s"] for r in rows
              if r["engine"].startswith("transformers")}
  for r in rows:
    vs = (f"{r['tokens_per_s'] / peer_tps[r['batch']]:.2f}x" if r["batch"] in peer_tps
          else "-")
    lines.append(f"| {r['batch']} | {r['engine']} | {r['tokens_per_s']:.1f} | "
                 f"{r['roofline_tokens_per_s']:.1f} | {r['fraction_of_roofline']:.0%} | {vs} |")
  with open(os.path.join(FLAGS.out, "bench_decode.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)

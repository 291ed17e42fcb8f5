"""Train-step throughput: FLOP rate vs the measured f32 matmul peak, recursive vs vanilla.

    python experiments/bench_train.py                     # SmolLM2-135M, KD from itself
    python experiments/bench_train.py --batch=4 --seq_len=256 --steps=4

Students, all of the same effective depth as the teacher (30 layers):
  * vanilla: the teacher's own 30 layers (plan N = 1);
  * recursive: 15 shared layers looped twice (Cycle, Stepwise), no LoRA;
  * recursive + LoRA rank 64 on every matrix.
Each step is a full distillation step (student forward + backward, frozen
teacher forward, fused CE + forward-KL, AdamW). FLOPs per token follow
``recursive_lm.training.metrics.train_flops_per_token`` (6·N_applied for the
student incl. the LM head, 2·N for the teacher, attention 12·L·T·d / 4·L·T·d).
The matmul peak is measured in the same run (jitted 2048² f32 matmul, best of
the measurements taken before and after). Runs of the variants are
interleaved; the median step time is reported. Writes results/bench_train.{json,md}.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Teacher / source model.")
flags.DEFINE_integer("batch", 4, "Sequences per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_integer("steps", 4, "Timed steps per variant (after 1 warm-up).")
flags.DEFINE_list("variants", ["vanilla", "recursive", "recursive_lora64"], "Students.")
flags.DEFINE_string("remat", "none", "Remat policy for the student.")
flags.DEFINE_enum("xla_options", "train", ["train", "default"],
                  "train: the trainer's XLA options (training.train_compiler_options); "
                  "default: XLA's defaults.")
flags.DEFINE_string("out", "results", "Output folder.")


def main(_):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from recursive_lm.checkpoints import load_checkpoint
  from recursive_lm.nn.model import param_count
  from recursive_lm.nn.weights import params_from_hf
  from recursive_lm.recursive import convert
  from recursive_lm.training import (LossConfig, OptimConfig, init_train_state,
                                     make_train_step, train_compiler_options)
  from recursive_lm.training.metrics import measure_matmul_peak, train_flops_per_token

  ck = load_checkpoint(FLAGS.model)
  tcfg = ck.config
  teacher = jax.tree_util.tree_map(jnp.asarray, params_from_hf(tcfg, ck.weights))
  students = {}
  for v in FLAGS.variants:
    if v == "vanilla":
      cfg, p = tcfg, params_from_hf(tcfg, ck.weights)
    elif v.startswith("recursive"):
      rank = int(v.split("lora")[1]) if "lora" in v else None
      cfg, p = convert(tcfg, ck.weights, loops=2, sharing="cycle", init="stepwise",
                       lora_ranks=rank)
    else:
      raise app.UsageError(f"unknown variant {v!r}")
    students[v] = (cfg.replace(remat=FLAGS.remat), p)

  ocfg = OptimConfig(lr=1e-4, warmup_steps=1, total_steps=1000)
  rng = np.random.default_rng(0)
  b, t = FLAGS.batch, FLAGS.seq_len
  toks = rng.integers(0, tcfg.vocab_size, (b, t + 1)).astype(np.int32)
  batch = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
           "loss_mask": jnp.ones((b, t), jnp.int32),
           "segment_ids": jnp.ones((b, t), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}
  # --xla_options=default: XLA's defaults; otherwise the library's train-step
  # options (train_compiler_options(), as the trainer uses).
  opts = (train_compiler_options() if FLAGS.xla_options == "train" else {}) or None
  peaks = [measure_matmul_peak()]
  runs = {}
  for v, (cfg, p) in students.items():
    step = jax.jit(make_train_step(cfg, ocfg, LossConfig(), tcfg), donate_argnums=(0,),
                   compiler_options=opts)
    state = init_train_state(cfg, ocfg, jax.tree_util.tree_map(jnp.asarray, p))
    t0 = time.perf_counter()
    state, m = step(state, teacher, batch)
    jax.block_until_ready(m)
    print(f"{v}: compile + first step {time.perf_counter() - t0:.1f}s, "
          f"loss {float(m['loss']):.3f}", flush=True)
    runs[v] = {"step": step, "state": state, "times": [], "cfg": cfg}
  for _ in range(FLAGS.steps):
    for v, r in runs.items():
      t0 = time.perf_counter()
      r["state"], m = r["step"](r["state"], teacher, batch)
      jax.block_until_ready(m)
      r["times"].append(time.perf_counter() - t0)
  peaks.append(measure_matmul_peak())
  peak = max(peaks)
  rows = []
  for v, r in runs.items():
    s = statistics.median(r["times"])
    fl = train_flops_per_token(r["cfg"], t, tcfg)
    rate = fl["total"] * b * t / s
    rows.append({"variant": v, "plan": str(r["cfg"].plan), "lora": r["cfg"].lora,
                 "unique_params": param_count(r["state"].params), "step_s": s,
                 "tokens_per_s": b * t / s, "flops_per_token": fl, "flop_rate": rate,
                 "fraction_of_peak": rate / peak, "times": r["times"]})
  base = next((r for r in rows if r["variant"] == "vanilla"), None)
  for r in rows:
    r["step_vs_vanilla"] = r["step_s"] / base["step_s"] if base else None
  meta = {"command": "python " + " ".join(sys.argv), "batch": b, "seq_len": t,
          "compiler_options": opts or {},
          "matmul_peak_flops": peak, "peaks": peaks, "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%d %H:%M")}
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "bench_train.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
  lines = [f"Distillation train step, {FLAGS.model} teacher, batch {b} x {t} tokens, f32, "
           f"median of {FLAGS.steps} steps; measured f32 matmul peak "
           f"{peak / 1e9:.1f} GFLOP/s; XLA options: {opts or 'defaults'}.",
           f"Made by `{meta['command']}` on {meta['date']}.",
           "", "| student | plan | unique params | step (s) | tokens/s | GFLOP/s | "
           "fraction of peak | step vs vanilla |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['variant']} | {r['plan']} | {r['unique_params'] / 1e6:.1f}M | "
        f"{r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['flop_rate'] / 1e9:.1f} | "
        f"{r['fraction_of_peak']:.0%} | "
        f"{r['step_vs_vanilla']:.3f}x |" if r["step_vs_vanilla"] else "")
  with open(os.path.join(FLAGS.out, "bench_train.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)

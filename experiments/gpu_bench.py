"""GPU figures for a SmolLM2-135M-shaped model: decode vs roofline, train-step MFU.

    python experiments/gpu_bench.py --out results/gpu     # on a machine with a GPU
    python experiments/gpu_bench.py --tiny --out /tmp/g   # smoke test on CPU

Weights are random at SmolLM2-135M's shape (throughput does not depend on the
values; the embedded GGUF is not needed, so the script runs on a machine that
has only the package). Sections:

* ``roofline``: measured device-to-device copy bandwidth and matmul peak
  (f32 and bf16) — the ceilings the other figures are divided by;
* ``decode``: ``recursive_lm.decode.Engine`` greedy decoding, 128 new tokens
  after a 64-token prompt, batch 1/8/32/128, f32 and bf16 weights; tokens/s
  and the fraction of the weight-streaming roofline (weights read once per
  step); the transformers peer (plain ``generate``) on the same weights;
* ``train``: the distillation train step (student forward+backward, frozen
  teacher forward, CE + forward KL, AdamW), bf16 compute with f32 params,
  vanilla vs recursive (15 layers x 2 loops) vs recursive + LoRA 64; FLOP rate
  against the measured bf16 peak.

Writes ``<out>/gpu_bench.json`` and ``<out>/gpu_bench.md``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "results/gpu", "Output folder.")
flags.DEFINE_list("sections", ["roofline", "decode", "train", "engines"], "What to run.")
flags.DEFINE_bool("tiny", False, "Tiny shapes (CPU smoke test of the script).")
flags.DEFINE_list("batches", ["1", "8", "32", "128"], "Decode batch sizes.")
flags.DEFINE_integer("new_tokens", 128, "Decode: new tokens per row.")
flags.DEFINE_integer("train_batch", 16, "Train: sequences per step.")
flags.DEFINE_integer("train_seq", 1024, "Train: tokens per sequence.")
flags.DEFINE_bool("peer", True, "Also time transformers (needs torch).")


def _cfg():
  from recursive_lm.config import SMOLLM2_135M, DepthPlan, tiny_config
  if FLAGS.tiny:
    return tiny_config(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                       plan=DepthPlan.vanilla(4), max_seq_len=512, tie_embeddings=True)
  return SMOLLM2_135M


def _time(fn, repeats=5):
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def roofline():
  import jax
  import jax.numpy as jnp
  from recursive_lm.training.metrics import measure_matmul_peak
  n = (1 << 22) if FLAGS.tiny else (1 << 29)  # 2 GiB of f32
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001)
  f(x).block_until_ready()
  s = _time(lambda: f(x).block_until_ready())
  size = 512 if FLAGS.tiny else 8192
  return {"copy_bandwidth": 2 * x.nbytes / s,
          "peak_f32": measure_matmul_peak(size, dtype=jnp.float32),
          "peak_bf16": measure_matmul_peak(size, dtype=jnp.bfloat16),
          "device": str(jax.devices()[0]), "jax": jax.__version__}


def decode(bw, rows, save):
  import jax
  import numpy as np
  from recursive_lm.decode.engine import Engine
  from recursive_lm.nn.model import init_params, param_count
  for dt in ("float32", "bfloat16"):
    cfg = _cfg().replace(dtype=dt, param_dtype=dt)
    params = init_params(cfg, seed=0)
    wbytes = param_count(params) * np.dtype(jax.numpy.dtype(dt)).itemsize
    eng = Engine(cfg, params)
    rng = np.random.default_rng(0)
    for b in [int(x) for x in FLAGS.batches]:
      prompts = rng.integers(3, cfg.vocab_size, (b, 64)).tolist()
      run = lambda: eng.generate(prompts, max_new_tokens=FLAGS.new_tokens,
                                 stop_at_eos=False)
      run()
      outs = [run() for _ in range(3)]
      dec = statistics.median(o.decode_seconds for o in outs)
      steps = outs[0].steps
      tps = b * steps / dec
      roof = bw / wbytes  # steps/s when weights stream once per step
      row = {"dtype": dt, "batch": b, "tokens_per_s": tps, "step_ms": 1e3 * dec / steps,
             "roofline_steps_per_s": roof, "fraction_of_roofline": (steps / dec) / roof}
      if FLAGS.peer:
        row["transformers_tokens_per_s"] = _peer(cfg, params, prompts)
      rows.append(row)
      print(row, flush=True)
      save()


def _peer(cfg, params, prompts):
  try:
    import torch
    import transformers
  except ImportError:
    return None
  from recursive_lm.nn.weights import hf_from_params
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  tdt = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
  hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items()
                                     if k != "architectures"})
  model = transformers.LlamaForCausalLM(hcfg)
  sd = {k: torch.from_numpy(v.copy()) for k, v in hf_from_params(cfg, params).items()}
  model.load_state_dict(sd, strict=False)
  model = model.to(dev, tdt).eval()
  ids = torch.tensor(prompts, device=dev)
  gen = lambda: model.generate(ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=FLAGS.new_tokens,
                               min_new_tokens=FLAGS.new_tokens, do_sample=False)
  with torch.no_grad():
    gen()
    if dev == "cuda":
      torch.cuda.synchronize()
    def run():
      gen()
      if dev == "cuda":
        torch.cuda.synchronize()
    s = _time(run, 3)
  return len(prompts) * FLAGS.new_tokens / s


def train(peak):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from recursive_lm.config import DepthPlan
  from recursive_lm.nn.model import init_params, param_count
  from recursive_lm.training import (LossConfig, OptimConfig, init_train_state,
                                     make_train_step)
  from recursive_lm.training.metrics import train_flops_per_token
  base = _cfg()
  n = base.plan.effective_depth
  tcfg = base.replace(dtype="bfloat16")
  teacher = init_params(base, seed=1)
  variants = {
      "vanilla": base,
      "recursive": base.replace(plan=DepthPlan(block=n // 2, loops=2)),
      "recursive_rolled": base.replace(plan=DepthPlan(block=n // 2, loops=2),
                                       loop_unroll=1),
      "recursive_lora64": base.replace(plan=DepthPlan(block=n // 2, loops=2),
                                       lora_ranks=tuple((t, 64) for t in
                                                        ("q", "k", "v", "o", "gate", "up",
                                                         "down"))),
  }
  b, t = FLAGS.train_batch, FLAGS.train_seq
  if FLAGS.tiny:
    b, t = 2, 64
  rng = np.random.default_rng(0)
  toks = rng.integers(0, base.vocab_size, (b, t + 1)).astype(np.int32)
  batch = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
           "loss_mask": jnp.ones((b, t), jnp.int32),
           "segment_ids": jnp.ones((b, t), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}
  ocfg = OptimConfig(lr=1e-4, warmup_steps=1, total_steps=1000)
  runs = {}
  for v, cfg in variants.items():
    cfg = cfg.replace(dtype="bfloat16")
    step = jax.jit(make_train_step(cfg, ocfg, LossConfig(), tcfg), donate_argnums=(0,))
    state = init_train_state(cfg, ocfg, init_params(cfg, seed=2))
    state, m = step(state, teacher, batch)
    jax.block_until_ready(m)
    runs[v] = {"step": step, "state": state, "times": [], "cfg": cfg}
  for _ in range(5):  # interleaved
    for v, r in runs.items():
      t0 = time.perf_counter()
      r["state"], m = r["step"](r["state"], teacher, batch)
      jax.block_until_ready(m)
      r["times"].append(time.perf_counter() - t0)
  rows = []
  for v, r in runs.items():
    s = statistics.median(r["times"])
    fl = train_flops_per_token(r["cfg"], t, tcfg)["total"]
    rows.append({"variant": v, "plan": str(r["cfg"].plan),
                 "unique_params": param_count(r["state"].params), "step_s": s,
                 "tokens_per_s": b * t / s, "flop_rate": fl * b * t / s,
                 "fraction_of_bf16_peak": fl * b * t / s / peak})
  for r in rows:
    r["step_vs_vanilla"] = r["step_s"] / rows[0]["step_s"]
    print(r, flush=True)
  return {"batch": b, "seq_len": t, "rows": rows}


def engines(rows, save):
  """Early-exit engines on a 15 x 2-loop recursive model of the same shape.

  Random weights make confidences meaningless, so the two thresholds bound the
  engines: +inf (never exit: the engine's overhead over ``Engine``) and 0
  (every token exits at the first loop: the most an exit can save)."""
  import numpy as np
  from recursive_lm.config import DepthPlan
  from recursive_lm.decode.depthwise import DepthwiseBatcher, ExitPolicy
  from recursive_lm.decode.early_exit import EarlyExitEngine
  from recursive_lm.decode.engine import Engine
  from recursive_lm.decode.sequencewise import SequenceBatcher
  from recursive_lm.nn.model import init_params
  base = _cfg()
  n = base.plan.effective_depth
  cfg = base.replace(plan=DepthPlan(block=max(n // 2, 1), loops=2), dtype="bfloat16",
                     param_dtype="bfloat16")
  params = init_params(cfg, seed=0)
  b = 4 if FLAGS.tiny else 32
  new = FLAGS.new_tokens
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, (2 * b, 64)).tolist()

  def timed(fn):
    fn()
    outs = [fn() for _ in range(3)]
    secs = [o.seconds if hasattr(o, "seconds") else o.decode_seconds + o.prefill_seconds
            for o in outs]
    return outs[0], statistics.median(secs)

  def add(name, thr, o, s, ntok):
    row = {"engine": name, "batch": b, "threshold": thr, "tokens_per_s": ntok / s}
    rows.append(row)
    print(row, flush=True)
    save()

  full = Engine(cfg, params)
  o, s = timed(lambda: full.generate(prompts[:b], new, stop_at_eos=False))
  add("full depth (Engine)", None, o, s, b * new)
  for policy in ("free", "calm"):
    eng = EarlyExitEngine(cfg, params, policy=policy, confidence="softmax_max")
    for thr in (float("inf"), 0.0):
      o, s = timed(lambda: eng.generate(prompts[:b], new, stop_at_eos=False, threshold=thr))
      add(policy.upper(), thr, o, s, b * new)
  for name, cls in (("depth-wise", DepthwiseBatcher), ("sequence-wise", SequenceBatcher)):
    for thr in (float("inf"), 0.0):
      bat = cls(cfg, params, slots=b, exit=ExitPolicy("softmax_max", thr))
      o, s = timed(lambda: bat.generate(prompts, new, stop_at_eos=False))
      add(f"{name} serving {2 * b} requests", thr, o, s, o.new_tokens)


def _markdown(res) -> str:
  meta = res["meta"]
  lines = [f"GPU figures ({meta['device']}, jax {meta['jax']}), SmolLM2-135M shape, "
           "random weights.", f"Made by `{meta['command']}` on {meta['date']}.", ""]
  r = res.get("roofline")
  if r:
    lines += [f"Measured: copy bandwidth {r['copy_bandwidth'] / 1e12:.2f} TB/s, matmul "
              f"peak f32 {r['peak_f32'] / 1e12:.1f} TFLOP/s, bf16 "
              f"{r['peak_bf16'] / 1e12:.1f} TFLOP/s.", ""]
  if res.get("decode"):
    lines += [f"Greedy decoding, 64-token prompt + {FLAGS.new_tokens} new tokens (median of 3):", "",
              "| weights | batch | tokens/s | ms/step | fraction of roofline | "
              "transformers tokens/s | speedup |", "|---|---|---|---|---|---|---|"]
    for d in res["decode"]:
      peer = d.get("transformers_tokens_per_s")
      lines.append(f"| {d['dtype']} | {d['batch']} | {d['tokens_per_s']:.0f} | "
                   f"{d['step_ms']:.2f} | {d['fraction_of_roofline']:.1%} | "
                   f"{peer:.0f} | {d['tokens_per_s'] / peer:.2f}x |" if peer else
                   f"| {d['dtype']} | {d['batch']} | {d['tokens_per_s']:.0f} | "
                   f"{d['step_ms']:.2f} | {d['fraction_of_roofline']:.1%} | - | - |")
    lines.append("")
  t = res.get("train")
  if t:
    lines += [f"Distillation train step, batch {t['batch']} x {t['seq_len']}, bf16 compute "
              "(median of 5, interleaved):", "",
              "| student | plan | unique params | step (ms) | tokens/s | TFLOP/s | "
              "fraction of bf16 peak | step vs vanilla |", "|---|---|---|---|---|---|---|---|"]
    for x in t["rows"]:
      lines.append(f"| {x['variant']} | {x['plan']} | {x['unique_params'] / 1e6:.1f}M | "
                   f"{1e3 * x['step_s']:.1f} | {x['tokens_per_s']:.0f} | "
                   f"{x['flop_rate'] / 1e12:.1f} | {x['fraction_of_bf16_peak']:.0%} | "
                   f"{x['step_vs_vanilla']:.3f}x |")
    lines.append("")
  if res.get("engines"):
    lines += ["Early-exit engines, 15 x 2-loop recursive model of the same shape, bf16, "
              "random weights (threshold inf: never exit; 0: every token exits after "
              "loop 1):", "", "| engine | batch | threshold | tokens/s |", "|---|---|---|---|"]
    for x in res["engines"]:
      thr = "-" if x["threshold"] is None else f"{x['threshold']:g}"
      lines.append(f"| {x['engine']} | {x['batch']} | {thr} | {x['tokens_per_s']:.0f} |")
  return "\n".join(lines) + "\n"


def main(_):
  import jax
  res = {"meta": {"command": "python " + " ".join(sys.argv),
                  "date": time.strftime("%Y-%m-%d %H:%M"),
                  "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}}
  os.makedirs(FLAGS.out, exist_ok=True)

  def save():
    with open(os.path.join(FLAGS.out, "gpu_bench.json"), "w") as f:
      json.dump(res, f, indent=1, default=str)
    with open(os.path.join(FLAGS.out, "gpu_bench.md"), "w") as f:
      f.write(_markdown(res))

  r = roofline()
  res["roofline"] = r
  print(r, flush=True)
  save()
  if "decode" in FLAGS.sections:
    res["decode"] = []
    decode(r["copy_bandwidth"], res["decode"], save)  # copy rate (read+write) as stream rate
  if "train" in FLAGS.sections:
    res["train"] = train(r["peak_bf16"])
    save()
  if "engines" in FLAGS.sections:
    res["engines"] = []
    engines(res["engines"], save)
  print(_markdown(res))


if __name__ == "__main__":
  app.run(main)

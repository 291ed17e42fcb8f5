"""Where a loop-wise (and a lockstep) serving run's time goes, piece by piece.

Whole-run variants of ``decode.loopwise.LoopwiseServer`` on the same request
stream (the embedded SmolLM2-135M as a 2- or 3-loop Cycle model, depths forced
by ``ForcedDepth``, so the work per token does not depend on the tokens): as
served, and with one piece replaced by a no-op each (the skipped-loop K/V
fill, the LM head, the block loop, the prefill layers), and all four at once
(what is left: bookkeeping, admission, row copies, sampling). Each piece's
cost is the run's time minus the variant's, divided by the number of calls.
Variants share one set of weights; the compile runs take a shared lock on
``--lock`` and the timed runs (interleaved over the variants, median) an
exclusive one, so only the timed part holds the machine.

    python experiments/profile_serving.py --loops=2 --scenario=varied --requests=64
"""
from __future__ import annotations

import copy
import fcntl
import json
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_integer("loops", 2, "Loops of the conversion.")
flags.DEFINE_string("scenario", "varied", "none or varied depths.")
flags.DEFINE_integer("slots", 32, "Slot pool size P.")
flags.DEFINE_integer("requests", 64, "Requests in the stream.")
flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per request.")
flags.DEFINE_integer("new_tokens", 32, "New tokens per request.")
flags.DEFINE_integer("chunk", 16, "Prefill chunk.")
flags.DEFINE_integer("repeats", 2, "Interleaved timed repeats (median).")
flags.DEFINE_list("servers", ["loop-wise", "lockstep"], "Servers to profile.")
flags.DEFINE_list("variants", ["served", "no_fill", "no_head", "no_block", "no_prefill",
                               "none_of_them"], "Variants to run.")
flags.DEFINE_list("lockstep_variants", ["served", "none_of_them"],
                  "Variants of the lockstep server.")
flags.DEFINE_list("head_sweep", [], "Instead of the serving variants: time the LM head "
                  "alone (final norm, head, argmax; jitted) on these row counts, for f32 "
                  "and bf16 panel weights (median of 15 calls), e.g. 1,4,8,16,32.")
flags.DEFINE_string("lock", "/tmp/rlm_cpu.lock", "Lock file ('' : none).")
flags.DEFINE_string("weights", "f32", "Weight format of both servers' variants (f32, "
                    "bf16 or int8 panels; decode.engine's ``weights``).")
flags.DEFINE_string("out", "results", "Folder for profile_serving.json.")


def variant_class(base, name):
  import jax.numpy as jnp

  class Variant(base):
    pass

  off = {"no_fill": {"fill"}, "no_head": {"head"}, "no_block": {"block"},
         "no_prefill": {"prefill"}, "none_of_them": {"fill", "head", "block", "prefill"},
         "served": set()}[name]
  if "fill" in off:
    Variant._fill_served = lambda self, params, st, cache, need, order: (st, cache)
  if "head" in off:
    Variant._head_logits = lambda self, params, h: jnp.zeros(
        (h.shape[0], self.cfg.vocab_size), h.dtype) + h[:, :1] * 0
  if "block" in off:
    Variant._block_loop = lambda self, params, loop, h, pos, blk, go: (h, blk)
  if "prefill" in off:
    Variant._prefill_layers = lambda self, params, h, pos, sub, ws, first: (h, sub)
  Variant.__name__ = f"{base.__name__}_{name}"
  return Variant


def head_sweep(cfg0, params0, rows, lock):
  """ms per head call (median of 15) for each row count, f32 and bf16 panels."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from recursive_lm.decode import depth as D
  from recursive_lm.nn.model import decode_layout
  fns = {}
  for w in ("f32", "bf16"):
    cfg, params = decode_layout(cfg0, params0, "panel", True, weights=w)
    f = jax.jit(lambda p, h, cfg=cfg: jnp.argmax(D.head(cfg, p, h), -1))
    for r in rows:
      h = jnp.asarray(np.random.default_rng(r).standard_normal((r, cfg.d_model)), jnp.float32)
      f(params, h).block_until_ready()  # compile
      fns[(w, r)] = (f, params, h)
  if lock:
    fcntl.flock(lock, fcntl.LOCK_UN)
    fcntl.flock(lock, fcntl.LOCK_EX)
  out = {}
  for (w, r), (f, params, h) in fns.items():
    ts = []
    for _ in range(15):
      t0 = time.perf_counter()
      f(params, h).block_until_ready()
      ts.append(time.perf_counter() - t0)
    out[(w, r)] = 1e3 * statistics.median(ts)
  if lock:
    fcntl.flock(lock, fcntl.LOCK_UN)
  return out


def main(_):
  lock = open(FLAGS.lock, "a+") if FLAGS.lock else None
  if lock:
    fcntl.flock(lock, fcntl.LOCK_SH)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from recursive_lm.checkpoints import load_checkpoint
  from recursive_lm.decode.forced_depth import ForcedDepth
  from recursive_lm.decode.loopwise import LoopwiseServer
  from recursive_lm.recursive import convert
  ck = load_checkpoint(None)
  cfg, params = convert(ck.config, ck.weights, loops=FLAGS.loops)
  params = jax.tree_util.tree_map(jnp.asarray, dict(params))
  n = FLAGS.loops
  if FLAGS.head_sweep:
    rows = [int(r) for r in FLAGS.head_sweep]
    ms = head_sweep(cfg, params, rows, lock)
    md = [f"# LM head cost per call\n\n{time.strftime('%Y-%m-%d %H:%M')}: "
          f"`python {' '.join(sys.argv)}`\n",
          "SmolLM2-135M (49152 x 576 tied head), panel layout, jitted final norm + head + "
          "argmax, median of 15 calls, exclusive hold\n",
          "| rows | " + " | ".join(str(r) for r in rows) + " |",
          "|---|" + "---|" * len(rows)]
    for w in ("f32", "bf16"):
      md.append(f"| {w} ms | " + " | ".join(f"{ms[(w, r)]:.2f}" for r in rows) + " |")
    print("\n".join(md))
    os.makedirs(FLAGS.out, exist_ok=True)
    # appended to the serving profile (run it after the variants)
    with open(os.path.join(FLAGS.out, "profile_serving.md"), "a") as f:
      f.write("\n" + "\n".join(md).replace("# LM head", "## LM head") + "\n")
    path = os.path.join(FLAGS.out, "profile_serving.json")
    res = json.load(open(path)) if os.path.exists(path) else []
    res.append(dict(command="python " + " ".join(sys.argv),
                    date=time.strftime("%Y-%m-%d %H:%M"), head_ms={
                        f"{w} {r}": v for (w, r), v in ms.items()}))
    with open(path, "w") as f:
      json.dump(res, f, indent=1)
    return
  name = f"SmolLM2-135M cycle {cfg.plan.prelude}+{cfg.plan.block}x{n}+{cfg.plan.coda}"
  rule = (ForcedDepth.exit_after(n, n, 1.0) if FLAGS.scenario == "none" else
          ForcedDepth.exit_after(2, 1, 0.5) if n == 2 else ForcedDepth.uniform(n))
  prompts = np.random.default_rng(0).integers(
      2, cfg.vocab_size, (FLAGS.requests, FLAGS.prompt_len)).tolist()
  kw = dict(slots=FLAGS.slots, exit=rule, prefill_chunk=FLAGS.chunk,
            kernel_layout="panel", fuse=True, eos_id=None, weights=FLAGS.weights)
  bases = {"loop-wise": LoopwiseServer(cfg, params, lockstep=False, **kw),
           "lockstep": LoopwiseServer(cfg, params, lockstep=True, **kw)}
  runs, outs = {}, {}
  for sname in FLAGS.servers:
    for v in (FLAGS.lockstep_variants if sname == "lockstep" else FLAGS.variants):
      srv = copy.copy(bases[sname])
      srv.__class__ = variant_class(LoopwiseServer, v)
      runs[(sname, v)] = srv
  run = lambda s: s.generate(prompts, FLAGS.new_tokens, stop_at_eos=False)
  for k, s in runs.items():
    t0 = time.perf_counter()
    outs[k] = run(s)
    print(f"{k}: compiled + first run {time.perf_counter() - t0:.1f}s", flush=True)
  if lock:
    fcntl.flock(lock, fcntl.LOCK_UN)
    fcntl.flock(lock, fcntl.LOCK_EX)
  times = {k: [] for k in runs}
  t_hold = time.perf_counter()
  for _ in range(FLAGS.repeats):
    for k, s in runs.items():
      times[k].append(run(s).seconds)
  hold = time.perf_counter() - t_hold
  if lock:
    fcntl.flock(lock, fcntl.LOCK_UN)
  med = {k: statistics.median(v) for k, v in times.items()}
  rows, md = [], []
  say = lambda line="": (print(line), md.append(line))
  say(f"# Loop-wise serving profile\n\n{time.strftime('%Y-%m-%d %H:%M')}: "
      f"`python {' '.join(sys.argv)}`\n")
  say(f"{name}, {FLAGS.weights} weights, {FLAGS.scenario}, {FLAGS.slots} slots, {FLAGS.requests} requests, "
        f"{FLAGS.prompt_len} + {FLAGS.new_tokens} tokens; exclusive hold {hold:.0f}s; "
        f"{FLAGS.repeats} interleaved timed runs after a compile run\n")
  say("| server | variant | s (median) | runs | block steps | head calls | prefill passes |")
  say("|---|---|---|---|---|---|---|")
  for (sname, v), t in med.items():
    o = outs[(sname, v)]
    rows.append(dict(server=sname, variant=v, seconds=t, runs=times[(sname, v)],
                     steps=o.steps, head_calls=o.head_calls, prefill_passes=o.prefill_passes))
    say(f"| {sname} | {v} | {t:.2f} | {' '.join(f'{x:.2f}' for x in times[(sname, v)])} "
          f"| {o.steps} | {o.head_calls} | {o.prefill_passes} |")
  say("\nper call (ms): run minus the variant without the piece, over its calls")
  for sname in FLAGS.servers:
    o = outs.get((sname, "served")) or next(v for k, v in outs.items() if k[0] == sname)
    full = med.get((sname, "served"))
    calls = {"fill": o.head_calls, "head": o.head_calls, "block": o.steps,
             "prefill": o.prefill_passes}
    parts = {}
    for piece, n in calls.items():
      k = (sname, "no_" + piece)
      if full is not None and k in med:
        parts[piece] = (full - med[k], 1e3 * (full - med[k]) / max(n, 1))
    rest = med.get((sname, "none_of_them"))
    say(f"* {sname}: " + "; ".join(
        f"{p} {t:.2f} s = {ms:.1f} ms x {calls[p]}" for p, (t, ms) in parts.items())
        + (f"; rest {rest:.2f} s = {1e3 * rest / max(o.steps, 1):.1f} ms per block step"
           if rest is not None else ""))
  os.makedirs(FLAGS.out, exist_ok=True)
  path = os.path.join(FLAGS.out, "profile_serving.json")
  res = json.load(open(path)) if os.path.exists(path) else []
  res.append(dict(command="python " + " ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M"),
                  model=name, weights=FLAGS.weights, scenario=FLAGS.scenario, slots=FLAGS.slots,
                  requests=FLAGS.requests, prompt_len=FLAGS.prompt_len,
                  new_tokens=FLAGS.new_tokens, rows=rows))
  with open(path, "w") as f:
    json.dump(res, f, indent=1)
  with open(os.path.join(FLAGS.out, "profile_serving.md"), "w") as f:
    f.write("\n".join(md) + "\n")


if __name__ == "__main__":
  app.run(main)

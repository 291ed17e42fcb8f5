"""Loop-wise vs lockstep serving of the same recursive model and request stream.

The embedded SmolLM2-135M converted to a 2- and a 3-loop Cycle model
(``recursive_lm.recursive.convert``, no LoRA; untrained: this measures speed
only) is served end to end (queue, chunked prefill, decoding, head, KV fills)
by ``decode.loopwise.LoopwiseServer`` in loop-wise mode (each slot at its own
loop, refilled as soon as it frees) and in ``lockstep=True`` mode (the
sequence-wise baseline on the same code path). Token depths come from a seeded
per-token distribution (``decode.forced_depth.ForcedDepth``), so both servers
do the same work per token whatever the model's confidences:

* ``none``: every token runs all loops (the target: loop-wise >= 0.97x);
* ``half``  (2 loops): 50% of the tokens stop after loop 1;
* ``uniform`` (3 loops): depths uniform over 1..3.

``mor`` rows serve a token-choice MoR model (the conversion plus a fresh
router, ``mor.convert.add_router``) whose depths are forced the same way.

Each row: tokens/s of both servers (median of interleaved repeats), their
ratio, the ideal ratio E[max depth in the batch] / E[mean depth] (loops only),
the ideal counting the FLOPs each token needs (its loops, the LM head, the K/V
projections of skipped layers), and the fraction of each ideal realised.
Greedy; both servers must emit identical tokens (checked).

    python experiments/bench_serving.py --loops=2 --requests=128   # one hold, ~6 min
    python experiments/bench_serving.py --loops=3 --append
    python experiments/bench_serving.py --loops=2 --mor --scenarios=varied --append
"""
from __future__ import annotations

import fcntl
import json
import os
import statistics
import sys
import time

from absl import app, flags

# this checkout's package, not an installed copy
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "results", "Output folder.")
flags.DEFINE_list("loops", ["2", "3"], "Loop counts of the conversions.")
flags.DEFINE_list("scenarios", ["none", "varied"], "none and/or varied depths.")
flags.DEFINE_bool("mor", False, "Serve token-choice MoR conversions instead.")
flags.DEFINE_integer("slots", 32, "Slot pool size P.")
flags.DEFINE_integer("requests", 64, "Requests in the stream.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per request.")
flags.DEFINE_integer("new_tokens", 32, "New tokens per request.")
flags.DEFINE_integer("chunk", 32, "Prefill chunk.")
flags.DEFINE_integer("head_rows", 0, "Head rows of loop-wise serving (0: default).")
flags.DEFINE_integer("stage_rows", -1, "Stage rows of loop-wise serving (-1: default "
                     "P; 0: refills prefilled in place, no stage).")
flags.DEFINE_string("weights", "f32", "Weight format of both servers (f32, bf16 or "
                    "int8 panels; decode.engine's ``weights``).")
flags.DEFINE_bool("ab_block", False, "Also time loop-wise with the block on every slot "
                  "(block_buckets=(P,)) in the same interleaved runs: the A/B of the "
                  "block row buckets.")
flags.DEFINE_bool("ab_fill", False, "Also time loop-wise with the immediate skipped-loop "
                  "K/V fill (defer_fill=False) in the same interleaved runs: the A/B of "
                  "the deferred fill.")
flags.DEFINE_integer("repeats", 3, "Interleaved timed repeats (median).")
flags.DEFINE_integer("seed", 0, "Depth and prompt seed.")
flags.DEFINE_bool("append", False, "Add rows to an existing bench_serving.json (a row "
                  "of the same model, depths and stream replaces the earlier one).")
flags.DEFINE_bool("quick", False, "Tiny random models, tiny sizes (tests).")
flags.DEFINE_string("lock", "", "Lock file (e.g. /tmp/rlm_cpu.lock): the compile runs "
                    "hold it shared, the timed runs exclusive (so only timing holds "
                    "the machine); '' : no locking.")
flags.DEFINE_bool("markdown_only", False, "Rewrite bench_serving.md from the JSON "
                  "(after runs split over several processes with --append).")


def models(loops):
  """(name, cfg, params) of the recursive (or MoR) conversions."""
  import jax.numpy as jnp
  from recursive_lm.config import DepthPlan, RouterConfig, tiny_config
  from recursive_lm.mor.convert import add_router
  from recursive_lm.nn.model import init_params
  out = []
  if FLAGS.quick:
    for n in loops:
      cfg = tiny_config(plan=DepthPlan(0, 2, n, 0), eos_id=None, max_seq_len=256)
      out.append((f"tiny {n}-loop", cfg, init_params(cfg, seed=n)))
  else:
    from recursive_lm.checkpoints import load_checkpoint
    from recursive_lm.recursive import convert
    ck = load_checkpoint(None)
    for n in loops:
      cfg, params = convert(ck.config, ck.weights, loops=n)
      params = {k: v for k, v in params.items()}
      out.append((f"SmolLM2-135M cycle {cfg.plan.prelude}+{cfg.plan.block}x{n}"
                  f"+{cfg.plan.coda}", cfg, params))
  if FLAGS.mor:
    rc = RouterConfig(kind="token", gate="softmax", alpha=1.0, kv="recursion")
    out = [(name + " MoR token", *add_router(cfg, params, rc, seed=1))
           for name, cfg, params in out]
  import jax
  return [(n, c, jax.tree_util.tree_map(jnp.asarray, p)) for n, c, p in out]


def rule_for(scenario, n, seed):
  from recursive_lm.decode.forced_depth import ForcedDepth
  if scenario == "none":
    return ForcedDepth.exit_after(n, n, 1.0, seed)
  if n == 2:
    return ForcedDepth.exit_after(2, 1, 0.5, seed)
  return ForcedDepth.uniform(n, seed)


def flops_ideal(cfg, rule, batch, prompt_len=0, new_tokens=1):
  """Lockstep / loop-wise matmul FLOPs: per decoded token the loops run (E[max]
  in lockstep), the head and the K/V projections of the skipped layers (state
  copying); with ``prompt_len`` also each request's prefill (every prompt token
  at full depth, the head once) against its ``new_tokens - 1`` decoded tokens
  (the first token comes from the prefill)."""
  d, f, hq, hkv, dh = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  layer = d * (2 * hq * dh + 2 * hkv * dh) + 3 * d * f
  kv = d * 2 * hkv * dh
  head = d * cfg.vocab_size
  k, n = cfg.plan.block, cfg.plan.loops
  fixed = (cfg.plan.prelude + cfg.plan.coda) * layer + head
  fill = (n - rule.mean_depth) * k * kv
  prefill = prompt_len * cfg.plan.effective_depth * layer + head
  m = max(new_tokens - 1, 1)
  lock = rule.expected_max(batch) * k * layer + fixed + fill
  loopw = rule.mean_depth * k * layer + fixed + fill
  if not prompt_len:
    return lock / loopw
  return (prefill + m * lock) / (prefill + m * loopw)


def main(_):
  if FLAGS.markdown_only:
    with open(os.path.join(FLAGS.out, "bench_serving.json")) as f:
      res = json.load(f)
    with open(os.path.join(FLAGS.out, "bench_serving.md"), "w") as f:
      f.write(markdown(res))
    print(markdown(res))
    return
  # shared while loading and compiling, exclusive for the timed runs
  lock_file = open(FLAGS.lock, "a+") if FLAGS.lock else None
  lock = (lambda op: fcntl.flock(lock_file, op)) if lock_file else (lambda op: None)
  lock(fcntl.LOCK_SH)
  import jax
  import numpy as np
  from recursive_lm.decode.loopwise import LoopwiseServer
  from recursive_lm.mor.depthwise import MoRLoopwiseServer

  if FLAGS.quick:
    FLAGS.slots, FLAGS.requests, FLAGS.prompt_len, FLAGS.new_tokens = 4, 6, 8, 6
    FLAGS.chunk, FLAGS.repeats = 8, 1
  loops = [int(x) for x in FLAGS.loops]
  rng = np.random.default_rng(FLAGS.seed)
  os.makedirs(FLAGS.out, exist_ok=True)
  path = os.path.join(FLAGS.out, "bench_serving.json")
  res = {"meta": {}, "rows": []}
  if FLAGS.append and os.path.exists(path):
    with open(path) as f:
      res = json.load(f)
  res["meta"].setdefault("commands", []).append("python " + " ".join(sys.argv))
  res["meta"].update(date=time.strftime("%Y-%m-%d %H:%M"), jax=jax.__version__,
                     device=str(jax.devices()[0].device_kind))
  cls = MoRLoopwiseServer if FLAGS.mor else LoopwiseServer
  for name, cfg, params in models(loops):
    n = cfg.plan.loops
    prompts = rng.integers(2, cfg.vocab_size, (FLAGS.requests, FLAGS.prompt_len)).tolist()
    for scenario in FLAGS.scenarios:
      rule = rule_for(scenario, n, FLAGS.seed)
      kw = dict(slots=FLAGS.slots, exit=rule, prefill_chunk=FLAGS.chunk,
                kernel_layout="panel", fuse=True, eos_id=None, weights=FLAGS.weights)
      hr = {"head_rows": FLAGS.head_rows} if FLAGS.head_rows else {}
      if FLAGS.stage_rows >= 0:
        hr["stage_rows"] = FLAGS.stage_rows
      servers = {"loop-wise": cls(cfg, params, lockstep=False, **kw, **hr),
                 "lockstep": cls(cfg, params, lockstep=True, **kw)}
      if FLAGS.ab_block:
        servers["loop-wise, block on every slot"] = cls(
            cfg, params, lockstep=False, block_buckets=(FLAGS.slots,), **kw, **hr)
      if FLAGS.ab_fill:
        servers["loop-wise, immediate fill"] = cls(
            cfg, params, lockstep=False, defer_fill=False, **kw, **hr)
      run = lambda s: s.generate(prompts, FLAGS.new_tokens, stop_at_eos=False)
      outs = {}
      for k, s in servers.items():
        t0 = time.perf_counter()
        outs[k] = [run(s)]
        print(f"{name} {scenario} {k}: compiled + first run {time.perf_counter() - t0:.1f}s",
              flush=True)
      lock(fcntl.LOCK_UN)
      lock(fcntl.LOCK_EX)
      t0 = time.perf_counter()
      for _ in range(FLAGS.repeats):
        for k, s in servers.items():
          outs[k].append(run(s))
      lock(fcntl.LOCK_UN)
      lock(fcntl.LOCK_SH)
      print(f"timed runs (exclusive): {time.perf_counter() - t0:.0f}s", flush=True)
      tps = {k: statistics.median(o.tokens_per_second for o in v[1:] or v)
             for k, v in outs.items()}
      a, b = outs["loop-wise"][-1], outs["lockstep"][-1]
      ratio = tps["loop-wise"] / tps["lockstep"]
      ideal = rule.ideal_ratio(FLAGS.slots)
      ideal_f = flops_ideal(cfg, rule, FLAGS.slots)
      ideal_e = flops_ideal(cfg, rule, FLAGS.slots, FLAGS.prompt_len, FLAGS.new_tokens)
      row = {"model": name + ("" if FLAGS.weights == "f32" else f", {FLAGS.weights} weights"),
             "weights": FLAGS.weights, "scenario": scenario, "date": time.strftime("%Y-%m-%d %H:%M"), "depth_probs": rule.probs,
             "slots": FLAGS.slots, "requests": FLAGS.requests,
             "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens,
             "loopwise_tps": tps["loop-wise"], "lockstep_tps": tps["lockstep"],
             "ratio": ratio, "ideal_loops": ideal, "fraction_of_ideal": ratio / ideal,
             "ideal_flops": ideal_f, "fraction_of_flops_ideal": ratio / ideal_f,
             "ideal_flops_with_prefill": ideal_e,
             "fraction_of_flops_ideal_with_prefill": ratio / ideal_e,
             "loopwise_prefill_passes": a.prefill_passes,
             "lockstep_prefill_passes": b.prefill_passes,
             "mean_loops": a.mean_loops_per_token,
             "identical_tokens": a.tokens == b.tokens and a.loops == b.loops,
             "loopwise_steps": a.steps, "lockstep_steps": b.steps,
             "loopwise_head_calls": a.head_calls, "lockstep_head_calls": b.head_calls,
             "loopwise_utilization": a.utilization, "lockstep_utilization": b.utilization,
             "head_rows": servers["loop-wise"].head_rows,
             "stage_rows": servers["loop-wise"].stage_rows,
             "runs_s": {k: [o.seconds for o in v] for k, v in outs.items()}}
      if FLAGS.ab_block:
        c = outs["loop-wise, block on every slot"][-1]
        row.update(full_block_tps=tps["loop-wise, block on every slot"],
                   full_block_ratio=tps["loop-wise, block on every slot"] / tps["lockstep"],
                   full_block_identical_tokens=c.tokens == a.tokens and c.loops == a.loops,
                   block_buckets=list(servers["loop-wise"].block_buckets))
      if FLAGS.ab_fill:
        c = outs["loop-wise, immediate fill"][-1]
        row.update(immediate_fill_tps=tps["loop-wise, immediate fill"],
                   immediate_fill_ratio=tps["loop-wise, immediate fill"] / tps["lockstep"],
                   immediate_fill_identical_tokens=c.tokens == a.tokens and c.loops == a.loops)
      row.update(loopwise_fill_calls=getattr(servers["loop-wise"], "last_fill_calls", None),
                 lockstep_fill_calls=getattr(servers["lockstep"], "last_fill_calls", None))
      # A rerun of a (model, depths, stream) row replaces the earlier one; a
      # stream is its slots, requests, prompt and new tokens (and whether
      # loop-wise ran with the default stage).
      key = lambda r: (r["model"], r["scenario"], r["slots"], r["requests"],
                       r["prompt_len"], r["new_tokens"], default_stage(r))
      res["rows"] = [r for r in res["rows"] if key(r) != key(row)] + [row]
      print({k: v for k, v in row.items() if k != "runs_s"}, flush=True)
      with open(path, "w") as f:
        json.dump(res, f, indent=1)
  with open(os.path.join(FLAGS.out, "bench_serving.md"), "w") as f:
    f.write(markdown(res))
  print(markdown(res))


def default_stage(row) -> bool:
  """Whether loop-wise ran with its default stage (P rows; rows written before
  the flag existed did)."""
  return row.get("stage_rows") in (None, row["slots"])


def fastest_ratio(row):
  """Lockstep's fastest timed run over loop-wise's (same tokens): interference on
  a shared machine only adds time, so the fastest runs are a second estimate."""
  runs = row["runs_s"]
  best = {k: min(v[1:] or v) for k, v in runs.items()}
  return best["lockstep"] / best["loop-wise"]


def markdown(res):
  lines = ["# Loop-wise vs lockstep serving", "",
           f"{res['meta'].get('date')}, {res['meta'].get('device')}; commands:", ""]
  lines += [f"    {c}" for c in res["meta"].get("commands", [])]
  lines += ["", "End to end (queue, chunked prefill, decode, head, KV fills), greedy, "
            "median of interleaved repeats (ratio of fastest runs: the fastest timed run "
            "of each). Ideal (loops) = E[max depth in the batch] / "
            "E[mean depth]; ideal (FLOPs) also counts the head and the K/V fills each "
            "token needs; ideal (FLOPs + prefill) also each request's prefill (its prompt "
            "at full depth), which both servers pay alike.", "",
            "| model | depths | slots | requests | prompt + new | loop-wise tok/s | lockstep tok/s | ratio "
            "| ratio of fastest runs | ideal (loops) | of ideal | ideal (FLOPs) | of FLOPs ideal | ideal (FLOPs + prefill) "
            "| of it | block steps LW / LS | utilization LW / LS | mean loops | same tokens | run |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    probs = "/".join(f"{p:g}" for p in r["depth_probs"])
    if not default_stage(r):
      probs += f"; loop-wise stage_rows={r['stage_rows']}"
    lines.append(
        f"| {r['model']} | {r['scenario']} ({probs}) | {r['slots']} | "
        f"{r['requests']} | {r['prompt_len']} + {r['new_tokens']} | "
        f"{r['loopwise_tps']:.1f} | {r['lockstep_tps']:.1f} | {r['ratio']:.3f}x | "
        f"{fastest_ratio(r):.3f}x | "
        f"{r['ideal_loops']:.3f} | {r['fraction_of_ideal']:.2f} | {r['ideal_flops']:.3f} | "
        f"{r['fraction_of_flops_ideal']:.2f} | {r.get('ideal_flops_with_prefill', 0):.3f} | "
        f"{r.get('fraction_of_flops_ideal_with_prefill', 0):.2f} | "
        f"{r['loopwise_steps']} / {r['lockstep_steps']} | "
        f"{r['loopwise_utilization']:.2f} / {r['lockstep_utilization']:.2f} | "
        f"{r['mean_loops']:.2f} | {r['identical_tokens']} | {r.get('date', '')} |")
  ab = [r for r in res["rows"] if "immediate_fill_ratio" in r or "full_block_ratio" in r]
  if ab:
    lines += ["", "A/B variants of loop-wise timed in the same interleaved runs (ratio to "
              "the same lockstep runs):", ""]
    for r in ab:
      what = []
      if "immediate_fill_ratio" in r:
        what.append(f"immediate skipped-loop fill {r['immediate_fill_ratio']:.3f}x "
                    f"(same tokens: {r['immediate_fill_identical_tokens']}; fill calls "
                    f"deferred / lockstep: {r.get('loopwise_fill_calls')} / "
                    f"{r.get('lockstep_fill_calls')})")
      if "full_block_ratio" in r:
        what.append(f"block on every slot {r['full_block_ratio']:.3f}x")
      lines.append(f"* {r['model']}, {r['scenario']}, {r['slots']} slots, {r['requests']} "
                   f"requests, {r['prompt_len']} + {r['new_tokens']} ({r.get('date', '')}): "
                   f"loop-wise as served {r['ratio']:.3f}x; " + "; ".join(what))
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  app.run(main)

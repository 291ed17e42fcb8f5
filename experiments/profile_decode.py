"""Where a decode step's time goes on XLA:CPU: per-op wall time from a profiler trace.

    python experiments/profile_decode.py                       # batch 1, panel+fused
    python experiments/profile_decode.py --batch=8 --layout=in_out --top=25
    python experiments/profile_decode.py --batch=8 --weights=bf16

Runs the engine's compiled decode loop once under ``jax.profiler`` (a Perfetto
trace of XLA:CPU's thunks), merges each op's events across threads into wall
intervals, and prints per-step time grouped by op kind and output shape (shapes
from the compiled HLO). This is how the KV-cache copies (~300 per step before
the [B, Hkv, S, Dh] layout) and the slow vocabulary argmax were found. Tracing
adds ~10% overhead; use ``bench_decode.py`` for throughput figures.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model to profile.")
flags.DEFINE_integer("batch", 1, "Rows decoded together.")
flags.DEFINE_string("layout", "panel+fused", "Engine kernel layout (as bench_decode).")
flags.DEFINE_string("weights", "f32", "Weight format (f32 | bf16 | int8; panel layouts).")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 128, "New tokens (decode steps + 1).")
flags.DEFINE_integer("top", 20, "Rows of the per-shape table.")
flags.DEFINE_bool("tiny", False, "A tiny random model (smoke test) instead of --model.")
flags.DEFINE_string("out", None, "Also write the table as profile_decode.json here.")

_SKIP = ("$", "Thunk", "end", "Pjit", "PjRt", "Threadpool", "Slinky")


def op_table(trace_events, hlo_text: str, steps: int):
  """[(kind, shape, ms_per_step, calls_per_step)] sorted by time, and busy ms/step."""
  shapes = {m.group(1): m.group(2) for m in re.finditer(r"%(\S+) = (\S+) [\w-]+\(", hlo_text)}
  by_name = collections.defaultdict(list)
  for e in trace_events:
    if e.get("ph") == "X" and not any(s in e["name"] for s in _SKIP):
      by_name[e["name"]].append((e["ts"], e["ts"] + e["dur"]))
  agg = collections.defaultdict(lambda: [0.0, 0])
  spans = []
  for name, iv in by_name.items():
    iv.sort()
    merged = [list(iv[0])]
    for a, b in iv[1:]:  # one op's events on several threads -> one wall interval
      if a <= merged[-1][1]:
        merged[-1][1] = max(merged[-1][1], b)
      else:
        merged.append([a, b])
    key = (re.sub(r"\.\d+$", "", name), shapes.get(name, "?"))
    agg[key][0] += sum(b - a for a, b in merged)
    agg[key][1] += len(merged)
    spans += merged
  spans.sort()
  busy, cur = 0.0, None
  for a, b in spans:
    if cur and a <= cur[1]:
      cur[1] = max(cur[1], b)
    else:
      busy += (cur[1] - cur[0]) if cur else 0.0
      cur = [a, b]
  busy += (cur[1] - cur[0]) if cur else 0.0
  rows = sorted(((k, s, t / 1e3 / steps, c / steps) for (k, s), (t, c) in agg.items()),
                key=lambda r: -r[2])
  return rows, busy / 1e3 / steps


def main(_):
  import jax
  from recursive_lm.api import load
  from recursive_lm.decode.engine import Engine
  from recursive_lm.decode.sampling import SamplingConfig
  from recursive_lm.nn.model import init_cache

  if FLAGS.tiny:
    from recursive_lm.config import tiny_config
    from recursive_lm.nn.model import init_params
    cfg = tiny_config(max_seq_len=512)
    cfg_params = (cfg, init_params(cfg))
  else:
    m = load(FLAGS.model)
    cfg_params = (m.cfg, m.params)
  eng = Engine(cfg_params[0].replace(eos_id=None), cfg_params[1],
               kernel_layout=FLAGS.layout.split("+")[0],
               fuse=FLAGS.layout.endswith("+fused"), weights=FLAGS.weights)
  prompts = [[(17 * i + 3 * j) % 1000 + 100 for j in range(FLAGS.prompt_len)]
             for i in range(FLAGS.batch)]
  eng.generate(prompts, FLAGS.new_tokens, stop_at_eos=False)  # compile
  out = eng.generate(prompts, FLAGS.new_tokens, stop_at_eos=False)
  print(f"untraced: {1e3 * out.decode_seconds / out.steps:.2f} ms per decode step "
        f"({FLAGS.batch * out.steps / out.decode_seconds:.1f} new tokens/s)")
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    out = eng.generate(prompts, FLAGS.new_tokens, stop_at_eos=False)
    jax.profiler.stop_trace()
    trace = json.load(gzip.open(glob.glob(os.path.join(d, "**", "*.trace.json.gz"),
                                          recursive=True)[0]))
  s = out.prompt_lengths[0] + FLAGS.new_tokens
  s = -(-max(s, 1) // 64) * 64
  hlo = eng._generate.lower(  # pylint: disable=protected-access
      eng.params, init_cache(eng.cfg, FLAGS.batch, s), jax.numpy.zeros(
          (FLAGS.batch, eng.cfg.vocab_size)), jax.numpy.full((FLAGS.batch,), 1, "int32"),
      jax.random.key(0), max_new=FLAGS.new_tokens, sampling=SamplingConfig(),
      stop_at_eos=False).compile().as_text()
  rows, busy = op_table(trace["traceEvents"], hlo, out.steps)
  print(f"traced: {1e3 * out.decode_seconds / out.steps:.2f} ms per step, ops busy "
        f"{busy:.2f} ms per step")
  kinds = collections.defaultdict(lambda: [0.0, 0.0])
  for k, _, t, c in rows:
    kinds[k][0] += t
    kinds[k][1] += c
  print("\nby op kind:            ms/step  calls/step")
  for k, (t, c) in sorted(kinds.items(), key=lambda kv: -kv[1][0])[:12]:
    print(f"  {k:28s} {t:7.3f} {c:9.1f}")
  print("\nby op and output shape: ms/step  calls/step  us/call")
  for k, sh, t, c in rows[:FLAGS.top]:
    print(f"  {k:28s} {t:7.3f} {c:9.1f} {1e3 * t / max(c, 1e-9):8.1f}  {sh}")
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "profile_decode.json"), "w") as f:
      json.dump({"batch": FLAGS.batch, "layout": FLAGS.layout, "weights": FLAGS.weights,
                 "busy_ms_per_step": busy,
                 "ops": [{"kind": k, "shape": sh, "ms_per_step": t, "calls_per_step": c}
                         for k, sh, t, c in rows]}, f, indent=1)


if __name__ == "__main__":
  app.run(main)

"""Early-exit benchmark on a recursive SmolLM2: speed vs quality for FREE, CALM,
self-speculation and depth-wise batching.

    python experiments/bench_early_exit.py                 # ~25 min on 2 CPU cores
    python experiments/bench_early_exit.py --quick         # smoke test (random tiny model)

The model is a recursive student saved by the uptraining / exit post-training
runs (``--model_dir``; default: the first of ``runs/exit/*/final`` then
``runs/table/loops-2_rank-0/final`` that exists — make them with ``make run``
or ``experiments/uptrain.py``). Prompts are documents of the embedded pydoc
corpus's held-out split (first ``--prompt_len`` tokens).

Figures (all measured in this run):

* **quality**: held-out perplexity with exits applied (teacher-forced: each
  token's distribution comes from the first loop exit whose confidence clears
  the threshold), and agreement with full-depth greedy decoding (fraction of
  generated positions whose token equals the full model's greedy token);
* **speed**: new tokens/s of ``EarlyExitEngine`` (FREE, CALM) at batch 1, 8,
  32 across thresholds, against ``Engine`` (full depth) at the same batch;
  mean layers per token;
* **self-speculation**: ``SelfSpeculativeEngine`` (draft = first loop),
  acceptance rate, tokens per round, speedup over ``Engine`` (greedy: the
  tokens are identical, so quality is unchanged);
* **depth-wise vs sequence-wise batching**: ``DepthwiseBatcher`` vs
  ``SequenceBatcher`` serving the same request queue with the same exit rule;
* a speed-vs-quality Pareto plot ``early_exit_pareto.png``.

Writes ``<out>/bench_early_exit.{json,md}`` and the PNG. Timings on this CPU
vary +-10-15%; each figure is the median of ``--repeats`` runs.
"""
from __future__ import annotations

import glob
import json
import math
import os
import statistics
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "A saved recursive model (export.save_model).")
flags.DEFINE_string("out", "results", "Output folder.")
flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes for the engines.")
flags.DEFINE_list("thresholds", ["inf", "0.5", "0.4", "0.3", "0.2"],
                  "Exit thresholds (confidence >= threshold exits; inf never exits).")
flags.DEFINE_string("confidence", "softmax_max", "Confidence measure.")
flags.DEFINE_integer("new_tokens", 32, "New tokens per row.")
flags.DEFINE_integer("prompt_len", 48, "Prompt tokens per row.")
flags.DEFINE_integer("ppl_docs", 16, "Held-out documents for exit perplexity.")
flags.DEFINE_integer("ppl_len", 256, "Tokens per document for exit perplexity.")
flags.DEFINE_list("draft_lens", ["2", "4"], "Self-speculation draft lengths.")
flags.DEFINE_list("free_buckets", ["1", "2", "4", "9"],
                  "FREE deep-chunk widths compiled as lax.switch branches (last = "
                  "k_max + 1 = 9); empty: always the full width.")
flags.DEFINE_integer("requests", 48, "Requests served by the batching comparison.")
flags.DEFINE_integer("slots", 16, "Slots of the batching comparison.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per figure (median).")
flags.DEFINE_bool("quick", False, "Tiny random recursive model, tiny sizes (tests).")


def _default_model_dir():
  for pat in ("runs/exit/*/final", "runs/table/loops-2_rank-0/final",
              "runs/table/*/final", "runs/main/final"):
    hits = sorted(glob.glob(pat))
    if hits:
      return hits[0]
  raise app.UsageError(
      "no recursive model found: pass --model_dir (a folder written by "
      "experiments/uptrain.py, e.g. runs/main/final after `make run`)")


def load_model():
  import jax.numpy as jnp
  from recursive_lm.config import DepthPlan, tiny_config
  from recursive_lm.nn.model import init_params
  if FLAGS.quick:
    cfg = tiny_config(plan=DepthPlan(block=2, loops=2), max_seq_len=256,
                      tie_embeddings=True)
    return cfg, init_params(cfg, seed=0), None, "tiny random (quick)"
  from recursive_lm import export
  path = FLAGS.model_dir or _default_model_dir()
  cfg, params, tok = export.load_model(path)
  import jax
  return cfg, jax.tree_util.tree_map(jnp.asarray, params), tok, path


def held_out_token_docs(cfg, tok, n, length):
  import numpy as np
  if tok is None:
    rng = np.random.default_rng(0)
    return [rng.integers(2, cfg.vocab_size, length).tolist() for _ in range(n)]
  from recursive_lm.data import make_source
  src = make_source("pydoc", split="validation")
  # The held-out split as one stream (documents joined by EOS) cut into windows.
  stream, docs = [], []
  for i in range(len(src)):
    stream += tok.encode(src[i]) + [cfg.eos_id if cfg.eos_id is not None else 0]
    while len(stream) >= length and len(docs) < n:
      docs.append(stream[:length])
      stream = stream[length:]
    if len(docs) == n:
      return docs
  raise RuntimeError(f"the held-out split has only {len(docs)} windows of {length} "
                     f"tokens; lower --ppl_docs/--requests or --ppl_len")


def exit_perplexity(cfg, params, docs, thresholds, conf_name):
  """Teacher-forced NLL when each token uses the first exit whose confidence
  clears the threshold (the last exit always)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from recursive_lm.decode import depth as D
  from recursive_lm.early_exit import get_confidence_fn
  conf_fn = get_confidence_fn(conf_name)
  exits = D.loop_exits(cfg)

  @jax.jit
  def per_exit(tokens):
    states, h = D.hidden_states(cfg, params, tokens, exits)
    logits = D.head(cfg, params, states).astype(jnp.float32)   # [E, B, T, V]
    logp = jax.nn.log_softmax(logits[:, :, :-1], -1)
    nll = -jnp.take_along_axis(logp, tokens[None, :, 1:, None], -1)[..., 0]
    conf = jax.vmap(conf_fn)(logits[:, :, :-1])
    return nll, conf                                              # [E, B, T-1]

  nll, conf = [], []
  for i in range(0, len(docs), 4):
    a, c = per_exit(jnp.asarray(docs[i:i + 4], jnp.int32))
    nll.append(np.asarray(a))
    conf.append(np.asarray(c))
  nll, conf = np.concatenate(nll, 1), np.concatenate(conf, 1)
  out = {}
  for thr in thresholds:
    chosen = np.full(nll.shape[1:], len(exits) - 1)
    for e in reversed(range(len(exits) - 1)):
      chosen = np.where(conf[e] >= thr, e, chosen)
    picked = np.take_along_axis(nll, chosen[None], 0)[0]
    layers = np.asarray(exits)[chosen]
    out[thr] = {"ppl": float(np.exp(picked.mean())), "avg_layers": float(layers.mean()),
                "exit_fraction": float((chosen < len(exits) - 1).mean())}
  out["per_exit_ppl"] = [float(np.exp(nll[e].mean())) for e in range(len(exits))]
  return out


def _timed(fn, repeats):
  fn()  # compile / warm up
  outs = [fn() for _ in range(repeats)]
  return outs, statistics.median(_secs(o) for o in outs)


def _secs(o):
  if hasattr(o, "decode_seconds"):
    return o.decode_seconds + o.prefill_seconds
  return o.seconds


def agreement(tokens, ref):
  same = total = 0
  for a, b in zip(tokens, ref):
    n = min(len(a), len(b))
    same += sum(int(x == y) for x, y in zip(a[:n], b[:n]))
    total += n
  return same / max(total, 1)


def main(_):
  import jax
  import numpy as np
  from recursive_lm.decode.depthwise import DepthwiseBatcher, ExitPolicy
  from recursive_lm.decode.early_exit import EarlyExitEngine
  from recursive_lm.decode.engine import Engine
  from recursive_lm.decode.sequencewise import SequenceBatcher
  from recursive_lm.decode.speculative import SelfSpeculativeEngine

  if FLAGS.quick:
    FLAGS.batches, FLAGS.draft_lens, FLAGS.free_buckets = ["1", "4"], ["2"], ["1", "9"]
    FLAGS.thresholds = ["inf", "0.05"]
    FLAGS.new_tokens, FLAGS.prompt_len, FLAGS.ppl_docs, FLAGS.ppl_len = 8, 8, 4, 32
    FLAGS.requests, FLAGS.slots, FLAGS.repeats = 6, 4, 1
  cfg, params, tok, source = load_model()
  if cfg.plan.loops < 2:
    raise app.UsageError(f"{source} is not recursive (plan {cfg.plan}); early exits sit "
                         "at loop boundaries — pass a recursive model")
  thresholds = [float(t) for t in FLAGS.thresholds]
  batches = [int(b) for b in FLAGS.batches]
  nb = max(batches)
  docs = held_out_token_docs(cfg, tok, max(FLAGS.ppl_docs, nb, FLAGS.requests),
                             max(FLAGS.ppl_len, FLAGS.prompt_len))
  t_start = time.time()
  res = {"meta": {"command": "python " + " ".join(sys.argv), "model": source,
                  "plan": str(cfg.plan), "lora": cfg.lora, "confidence": FLAGS.confidence,
                  "new_tokens": FLAGS.new_tokens, "prompt_len": FLAGS.prompt_len,
                  "date": time.strftime("%Y-%m-%d %H:%M"), "jax": jax.__version__,
                  "device": str(jax.devices()[0].device_kind)}}
  os.makedirs(FLAGS.out, exist_ok=True)

  def save():
    with open(os.path.join(FLAGS.out, "bench_early_exit.json"), "w") as f:
      json.dump(res, f, indent=1, default=str)

  print("exit perplexity ...", flush=True)
  ppl = exit_perplexity(cfg, params, docs[:FLAGS.ppl_docs], thresholds, FLAGS.confidence)
  res["perplexity"] = {"per_exit": ppl.pop("per_exit_ppl"),
                       "by_threshold": {str(k): v for k, v in ppl.items()}}
  print(res["perplexity"], flush=True)
  save()

  prompts_all = [d[:FLAGS.prompt_len] for d in docs]
  res["engines"], res["speculative"] = [], []
  for b in batches:
    prompts = prompts_all[:b]
    base = Engine(cfg, params)
    outs, s = _timed(lambda: base.generate(prompts, FLAGS.new_tokens, stop_at_eos=False),
                     FLAGS.repeats)
    ref = outs[0].tokens
    base_tps = b * FLAGS.new_tokens / s
    res["engines"].append({"method": "full depth (Engine)", "batch": b, "threshold": None,
                           "tokens_per_s": base_tps, "agreement": 1.0,
                           "avg_layers": cfg.plan.effective_depth, "speedup": 1.0})
    print(res["engines"][-1], flush=True)
    for policy in ("free", "calm"):
      extra = {}
      if policy == "free" and FLAGS.free_buckets:
        extra["deep_buckets"] = [int(w) for w in FLAGS.free_buckets]
      eng = EarlyExitEngine(cfg, params, policy=policy, confidence=FLAGS.confidence,
                            threshold=thresholds[0], **extra)
      for thr in thresholds:
        eng_thr = lambda: eng.generate(prompts, FLAGS.new_tokens, stop_at_eos=False,
                                       threshold=thr)
        outs, s = _timed(eng_thr, FLAGS.repeats)
        o = outs[0]
        row = {"method": policy.upper(), "batch": b, "threshold": thr,
               "tokens_per_s": b * FLAGS.new_tokens / s,
               "agreement": agreement(o.tokens, ref), "avg_layers": o.avg_layers,
               "exit_fraction": o.exit_fraction,
               "deep_passes": getattr(o, "deep_passes", None),
               "kv_catchup_tokens": getattr(o, "kv_catchup_tokens", None)}
        row["speedup"] = row["tokens_per_s"] / base_tps
        res["engines"].append(row)
        print(row, flush=True)
        save()
    for d in [int(x) for x in FLAGS.draft_lens]:
      spec = SelfSpeculativeEngine(cfg, params, draft_loops=1, draft_len=d)
      outs, s = _timed(lambda: spec.generate(prompts, FLAGS.new_tokens,
                                             stop_at_eos=False), FLAGS.repeats)
      o = outs[0]
      row = {"batch": b, "draft_len": d, "tokens_per_s": b * FLAGS.new_tokens / s,
             "acceptance_rate": o.acceptance_rate, "tokens_per_round": o.tokens_per_round,
             "identical_to_greedy": o.tokens == ref}
      row["speedup"] = row["tokens_per_s"] / base_tps
      res["speculative"].append(row)
      print(row, flush=True)
      save()

  res["batching"] = []
  reqs = prompts_all[:FLAGS.requests]
  for thr in (thresholds[0], thresholds[len(thresholds) // 2]):
    pol = ExitPolicy(FLAGS.confidence if FLAGS.confidence in (
        "softmax_max", "softmax_diff", "entropy") else "softmax_max", thr)
    for name, cls in (("depth-wise", DepthwiseBatcher), ("sequence-wise", SequenceBatcher)):
      bat = cls(cfg, params, slots=FLAGS.slots, exit=pol)
      outs, s = _timed(lambda: bat.generate(reqs, FLAGS.new_tokens, stop_at_eos=False),
                       FLAGS.repeats)
      o = outs[0]
      row = {"batching": name, "threshold": thr, "slots": FLAGS.slots,
             "requests": len(reqs), "tokens_per_s": o.new_tokens / s,
             "mean_loops_per_token": o.mean_loops_per_token,
             "utilization": o.utilization}
      res["batching"].append(row)
      print(row, flush=True)
      save()
  res["meta"]["wall_s"] = time.time() - t_start
  save()
  plot(res, os.path.join(FLAGS.out, "early_exit_pareto.png"))
  with open(os.path.join(FLAGS.out, "bench_early_exit.md"), "w") as f:
    f.write(markdown(res))
  print(markdown(res))


def plot(res, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  batches = sorted({r["batch"] for r in res["engines"]})
  fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
  for ax, b in zip(axes[0], batches):
    for method, marker in (("FREE", "o"), ("CALM", "s")):
      rows = [r for r in res["engines"] if r["batch"] == b and r["method"] == method]
      ax.plot([r["speedup"] for r in rows], [r["agreement"] for r in rows], marker=marker,
              label=method)
      for r in rows:
        ax.annotate(f"{r['threshold']:g}", (r["speedup"], r["agreement"]), fontsize=7)
    sp = [r for r in res["speculative"] if r["batch"] == b]
    ax.scatter([r["speedup"] for r in sp], [1.0] * len(sp), marker="*", s=80, c="k",
               label="self-speculative (lossless)")
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("speed vs full depth (x)")
    ax.set_ylabel("agreement with full greedy")
    ax.set_title(f"batch {b}")
    ax.legend(fontsize=7)
  fig.suptitle(f"{res['meta']['model']} ({res['meta']['plan']})", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def markdown(res) -> str:
  m = res["meta"]
  p = res["perplexity"]
  lines = [f"Early exit on `{m['model']}` ({m['plan']}, LoRA {m['lora'] or 'none'}), "
           f"confidence `{m['confidence']}`, prompts of {m['prompt_len']} held-out pydoc "
           f"tokens, {m['new_tokens']} new tokens, {m['device']}.",
           f"Made by `{m['command']}` on {m['date']} ({m.get('wall_s', 0) / 60:.0f} min).", "",
           "Held-out perplexity per loop exit: " +
           ", ".join(f"exit {i + 1}: {x:.2f}" for i, x in enumerate(p["per_exit"])) + ".", "",
           "| threshold | ppl with exits | mean layers | tokens exited early |",
           "|---|---|---|---|"]
  for k, v in p["by_threshold"].items():
    lines.append(f"| {k} | {v['ppl']:.2f} | {v['avg_layers']:.1f} | {v['exit_fraction']:.0%} |")
  lines += ["", "| method | batch | threshold | tokens/s | speed vs full | agreement with "
            "full greedy | mean layers |", "|---|---|---|---|---|---|---|"]
  for r in res["engines"]:
    thr = "-" if r["threshold"] is None else f"{r['threshold']:g}"
    lines.append(f"| {r['method']} | {r['batch']} | {thr} | {r['tokens_per_s']:.1f} | "
                 f"{r['speedup']:.2f}x | {r['agreement']:.1%} | {r['avg_layers']:.1f} |")
  lines += ["", "Self-speculative decoding (draft = first loop, greedy):", "",
            "| batch | draft length | tokens/s | speed vs full | acceptance | tokens/round | "
            "identical to full greedy |", "|---|---|---|---|---|---|---|"]
  for r in res["speculative"]:
    lines.append(f"| {r['batch']} | {r['draft_len']} | {r['tokens_per_s']:.1f} | "
                 f"{r['speedup']:.2f}x | {r['acceptance_rate']:.1%} | "
                 f"{r['tokens_per_round']:.2f} | {r['identical_to_greedy']} |")
  lines += ["", "Serving a queue of requests (end to end, prefill included):", "",
            "| batching | threshold | slots | requests | tokens/s | mean loops/token | "
            "slot utilisation |", "|---|---|---|---|---|---|---|"]
  for r in res["batching"]:
    lines.append(f"| {r['batching']} | {r['threshold']:g} | {r['slots']} | {r['requests']} | "
                 f"{r['tokens_per_s']:.1f} | {r['mean_loops_per_token']:.2f} | "
                 f"{r['utilization']:.0%} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  app.run(main)

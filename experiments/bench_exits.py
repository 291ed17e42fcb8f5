r"""Benchmark: decoding through trained exit modules on the embedded SmolLM2.

Held-out prompts only: the 30 prompts of experiments/data/exit_prompts.txt
(written for this) and windows of the pydoc *validation* split (never trained
on). In one process, against plain full-depth ``Engine`` greedy decoding in
the same (panel, fused) layout, A/B interleaved, medians over repeats:

* lossless self-speculation (mode "verify") per exit layer, max draft length
  and confidence threshold tau: tokens/s and speed-up, acceptance rate,
  tokens per round, greedy output identical to plain (must be True);
* FREE-style exiting (mode "trust"): speed-up, share of emitted tokens equal
  to the full model's choice at that position (from the same deep pass), and
  teacher-forced held-out perplexity with exits (exit distribution = module
  through the full head where the shortlist confidence >= tau, else layer 30);
* teacher-forced top-1 agreement of each exit with layer 30 (held-out).

Writes results/bench_exits.{json,md} and results/bench_exits_pareto.png.

    python experiments/bench_exits.py                       # default grid
    python experiments/bench_exits.py --batches 1 --new_tokens 32 --n_prompts 4   # quick
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                            "exit_prompts.txt")


def ints(s):
  return [int(x) for x in s.split(",") if x]


def floats(s):
  return [float(x) for x in s.split(",") if x]


def heldout_prompts(tok, n, length=32):
  from recursive_lm.exits.features import corpus_stream  # pylint: disable=g-import-not-at-top
  s = corpus_stream(tok, "validation", n * 200 + 4096, seed=1)
  step = max((len(s) - length) // n, 1)
  return [s[i * step:i * step + length].tolist() for i in range(n)]


def timed(fn, reps):
  """Median tokens/s and the last output over ``reps`` calls."""
  tps, out = [], None
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    tps.append(out.new_tokens / dt)
  return float(np.median(tps)), out


def teacher_forced(cfg, params, es, layers, taus, seqs, meta_taus=()):
  """Per exit: top-1 agreement with layer 30 (shortlist head), and for each tau
  the FREE perplexity / exit rate / equal-to-full share (confidence: the
  shortlist max-probability, and for ``meta_taus`` the head-free meta
  classifier). seqs [n, T]."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from recursive_lm.decode import depth as D  # pylint: disable=g-import-not-at-top
  from recursive_lm.exits import modules as M  # pylint: disable=g-import-not-at-top
  small = {"final_norm": params["final_norm"]}
  emb = jnp.asarray(params["embed"]["embedding"])
  ws = jnp.asarray(es.shortlist_weights(params))
  sl_ids = jnp.asarray(es.shortlist)
  depth = cfg.plan.effective_depth

  @jax.jit
  def run(tokens):
    states, h = D.hidden_states(cfg, params, tokens, tuple(layers) + (depth,))
    full = jax.nn.log_softmax(D.head(cfg, params, h).astype(jnp.float32), -1)
    return states[:len(layers)], full

  from recursive_lm.exits.train import meta_logit  # pylint: disable=g-import-not-at-top
  res = {e: {"agree": [], "nll_exit": [], "conf": [], "meta": [], "eq": []} for e in layers}
  nll_full = []
  for row in seqs:
    tokens = jnp.asarray(row[None])
    states, full = run(tokens)
    nxt = tokens[0, 1:]
    full_arg = jnp.argmax(full[0, :-1], -1)
    nll_full.append(np.asarray(-jnp.take_along_axis(full[0, :-1], nxt[:, None], -1)[:, 0]))
    for i, e in enumerate(layers):
      y = M.final_norm(small, M.apply_exit({k: jnp.asarray(v) for k, v in es.exits[e].items()},
                                           states[i, 0, :-1]), cfg.norm_eps)
      sl = y @ ws.T
      conf = jnp.max(jax.nn.softmax(sl, -1), -1)
      arg = sl_ids[jnp.argmax(sl, -1)]
      lp = jax.nn.log_softmax(y @ emb.T, -1)
      res[e]["agree"].append(np.asarray(arg == full_arg))
      res[e]["nll_exit"].append(np.asarray(-jnp.take_along_axis(lp, nxt[:, None], -1)[:, 0]))
      res[e]["conf"].append(np.asarray(conf))
      if e in es.meta:
        mp = {k: jnp.asarray(v) for k, v in es.meta[e].items()}
        res[e]["meta"].append(np.asarray(jax.nn.sigmoid(meta_logit(mp, states[i, 0, :-1]))))
  nll_full = np.concatenate(nll_full)
  out = {"ppl_full": float(np.exp(nll_full.mean())), "n_tokens": int(nll_full.size),
         "exits": {}}
  for e in layers:
    agree = np.concatenate(res[e]["agree"])
    nll_e = np.concatenate(res[e]["nll_exit"])
    conf = np.concatenate(res[e]["conf"])
    rec = {"top1_agreement": float(agree.mean()), "free": {}, "free_meta": {}}
    for tau in taus:
      ex = conf >= tau
      nll = np.where(ex, nll_e, nll_full)
      rec["free"][str(tau)] = {"ppl": float(np.exp(nll.mean())), "exit_rate": float(ex.mean()),
                               "equal_to_full": float(np.mean(np.where(ex, agree, True)))}
    if res[e]["meta"]:
      meta = np.concatenate(res[e]["meta"])
      for tau in meta_taus:
        ex = meta >= tau
        nll = np.where(ex, nll_e, nll_full)
        rec["free_meta"][str(tau)] = {
            "ppl": float(np.exp(nll.mean())), "exit_rate": float(ex.mean()),
            "equal_to_full": float(np.mean(np.where(ex, agree, True)))}
    out["exits"][str(e)] = rec
  return out


def full_choice_share(cfg, params, length=256):
  """fn(prompts, emitted rows) -> share of emitted tokens (after the first, which
  the full-depth prefill makes) equal to the full model's greedy choice given
  the emitted prefix (one teacher-forced full forward per row; not timed)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from recursive_lm.nn.model import Transformer  # pylint: disable=g-import-not-at-top
  model = Transformer(cfg)
  fwd = jax.jit(lambda p, t: jnp.argmax(model.apply({"params": p}, t)["logits"], -1))

  def share(prompts, rows):
    hit = n = 0
    for p, r in zip(prompts, rows):
      seq = list(p) + list(r)
      tok = np.zeros((1, length), np.int32)
      tok[0, :len(seq)] = seq[:length]
      arg = np.asarray(fwd(params, jnp.asarray(tok)))[0]
      for j in range(1, len(r)):
        pos = len(p) + j - 1  # predicts seq[len(p) + j]
        if pos + 1 < length:
          hit += int(arg[pos] == r[j])
          n += 1
    return hit / max(n, 1)
  return share


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--exits", default=None, help="artifact folder (default: the shipped one)")
  ap.add_argument("--exit_layers", type=ints, default=None, help="default: all in the artifact")
  ap.add_argument("--max_drafts", type=ints, default=[2, 4])
  ap.add_argument("--taus", type=floats, default=[0.0, 0.5])
  ap.add_argument("--free_taus", type=floats, default=[0.6, 0.8, 0.9])
  ap.add_argument("--free_max_draft", type=int, default=6)
  ap.add_argument("--batches", type=ints, default=[1, 8])
  ap.add_argument("--new_tokens", type=int, default=48)
  ap.add_argument("--n_prompts", type=int, default=8, help="prompts per batch-1 timing")
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--tf_seqs", type=int, default=8, help="held-out sequences of 256 tokens")
  ap.add_argument("--out", default="results")
  ap.add_argument("--tag", default="", help="suffix of the output files")
  ap.add_argument("--skip_teacher_forced", action="store_true")
  ap.add_argument("--methods", default="spec,trust,free,calm",
                  help="decode rows: spec (lossless self-speculation), trust (FREE in the "
                  "speculative engine, shortlist confidence), free / calm (EarlyExitEngine "
                  "through the modules, head-free meta confidence)")
  ap.add_argument("--free_layers", type=ints, default=[6])
  ap.add_argument("--calm_layers", type=ints, default=[6, 8, 12])
  ap.add_argument("--module_taus", type=floats, default=[0.8, 0.9],
                  help="meta-confidence thresholds of the free / calm rows")
  ap.add_argument("--meta_taus", type=floats, default=[0.7, 0.8, 0.9, 0.95],
                  help="teacher-forced FREE with the meta confidence")
  ap.add_argument("--merge", default=None,
                  help="comma list of tags: combine results/bench_exits<tag>.json of split "
                  "runs into bench_exits.{json,md} + the Pareto PNG (no decoding)")
  args = ap.parse_args()
  if args.merge is not None:
    return merge_runs(args.out, args.merge.split(","))
  t_start = time.time()
  from recursive_lm import api  # pylint: disable=g-import-not-at-top
  from recursive_lm.decode.engine import Engine  # pylint: disable=g-import-not-at-top
  from recursive_lm.exits.artifact import default_artifact_path, load_exits  # pylint: disable=g-import-not-at-top
  from recursive_lm.exits.features import as_sequences, corpus_stream  # pylint: disable=g-import-not-at-top
  from recursive_lm.exits.speculative import ExitSpeculativeEngine  # pylint: disable=g-import-not-at-top
  from recursive_lm.exits.early_exit import module_exit_engine  # pylint: disable=g-import-not-at-top
  methods = set(args.methods.split(","))
  m = api.load()
  cfg, params, tok = m.cfg, m.params, m.tokenizer
  es = load_exits(args.exits or default_artifact_path(), cfg, params)
  layers = args.exit_layers or sorted(es.exits)
  with open(PROMPTS_FILE) as f:
    written = [tok.encode(line.strip()) for line in f if line.strip()]
  prompts = written + heldout_prompts(tok, 34)
  print(f"{len(written)} written + {len(prompts) - len(written)} held-out corpus prompts; "
        f"exits {layers}", flush=True)

  held = corpus_stream(tok, "validation", 8192 + 4096, seed=0)
  tf = None if args.skip_teacher_forced else teacher_forced(
      cfg, params, es, layers, args.free_taus, as_sequences(held, 256)[:args.tf_seqs],
      args.meta_taus)
  print("teacher-forced:", json.dumps(tf), flush=True)

  plain = Engine(cfg, params, kernel_layout="panel", fuse=True)
  os.makedirs(args.out, exist_ok=True)
  rows_path = os.path.join(args.out, f"bench_exits_rows{args.tag}.jsonl")
  open(rows_path, "w").close()

  def log_row(row):  # kept even when a time limit stops the run
    print(json.dumps(row), flush=True)
    with open(rows_path, "a") as f:
      f.write(json.dumps(row) + "\n")
  equal_to_full = full_choice_share(cfg, params)
  rows = []
  for b in args.batches:
    groups = ([[p] for p in prompts[:args.n_prompts]] if b == 1 else
              [prompts[i:i + b] for i in range(0, min(len(prompts), 4 * b), b)][:max(1, 32 // b)])
    groups = [g for g in groups if len(g) == b]

    def run_plain():
      outs = [plain.generate(g, args.new_tokens, stop_at_eos=False) for g in groups]
      return _merge(outs)

    ref = run_plain()  # compile; plain greedy tokens (deterministic)

    def ab(run_other):
      """Interleaved A/B medians (plain, other) in tokens/s, alternating order."""
      tp, ts = [], []
      for r in range(args.reps):
        order = (("p", run_plain), ("s", run_other)) if r % 2 == 0 else \
            (("s", run_other), ("p", run_plain))
        for name, fn in order:
          v, _ = timed(fn, 1)
          (tp if name == "p" else ts).append(v)
      return float(np.median(tp)), float(np.median(ts))

    configs = []
    for e in layers:
      if "spec" in methods:
        for k in args.max_drafts:
          configs.append(("verify", e, k, args.taus))
      if "trust" in methods:
        configs.append(("trust", e, args.free_max_draft, args.free_taus))
    for mode, e, k, taus in configs:
      eng = ExitSpeculativeEngine(cfg, params, es, e, max_draft=k, mode=mode)
      for tau in taus:
        def run_spec():
          return _merge([eng.generate(g, args.new_tokens, tau=tau, stop_at_eos=False)
                         for g in groups])
        spec = run_spec()  # compile / warm
        ptps, stps = ab(run_spec)
        emitted = spec.new_tokens - len(spec.tokens)
        eq_share = (emitted - spec.accepted + spec.agree) / max(emitted, 1)
        row = {"batch": b, "mode": mode, "exit_layer": e, "max_draft": k, "tau": tau,
               "plain_tps": ptps, "tps": stps, "speedup": stps / ptps,
               "acceptance": spec.acceptance_rate, "tokens_per_round": spec.tokens_per_round,
               "identical_to_plain": spec.tokens == ref.tokens,
               "emitted_equal_to_full": 1.0 if mode == "verify" else eq_share}
        rows.append(row)
        log_row(row)
    # FREE / CALM through the modules, head-free meta confidence (the one engine)
    ee = []
    if "free" in methods:
      ee += [("free", [e]) for e in args.free_layers]
    if "calm" in methods:
      ee.append(("calm", args.calm_layers))
    for policy, ls in ee:
      kw = dict(k_max=8, deep_buckets=(1, 2, 4, 9)) if policy == "free" else {}
      eng = module_exit_engine(cfg, params, es, policy, ls, threshold=1.0,
                               kernel_layout="panel", fuse=True, check_model=False, **kw)
      flat = [p for g in groups for p in g]
      for tau in args.module_taus:
        def run_ee():
          return _merge([eng.generate(g, args.new_tokens, threshold=tau, stop_at_eos=False)
                         for g in groups])
        out = run_ee()  # compile / warm
        ptps, stps = ab(run_ee)
        eq = equal_to_full(flat, out.tokens)
        row = {"batch": b, "mode": policy, "exit_layer": "/".join(str(x) for x in ls),
               "max_draft": 8 if policy == "free" else 1, "tau": tau,
               "plain_tps": ptps, "tps": stps, "speedup": stps / ptps,
               "acceptance": float("nan"), "tokens_per_round": 1.0,
               "exit_rate": float(np.mean([i < len(eng.exits) - 1 for r in out.exit_index
                                           for i in r[1:]])),
               "avg_layers": float(np.mean([eng.exits[i] for r in out.exit_index
                                            for i in r[1:]])),
               "identical_to_plain": out.tokens == ref.tokens,
               "emitted_equal_to_full": eq}
        rows.append(row)
        log_row(row)
  res = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(
      datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seconds": time.time() - t_start,
         "artifact": es.info.get("agreement"), "teacher_forced": tf, "rows": rows,
         "new_tokens": args.new_tokens, "n_prompts": args.n_prompts}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"bench_exits{args.tag}.json"), "w") as f:
    json.dump(res, f, indent=1)
  with open(os.path.join(args.out, f"bench_exits{args.tag}.md"), "w") as f:
    f.write(markdown(res))
  pareto(rows, os.path.join(args.out, f"bench_exits_pareto{args.tag}.png"))
  print(markdown(res))


def merge_runs(out_dir, tags):
  runs = []
  for t in tags:
    with open(os.path.join(out_dir, f"bench_exits{t}.json")) as f:
      runs.append(json.load(f))
  tf = next((r["teacher_forced"] for r in runs if r.get("teacher_forced")), None)
  res = {"command": " ; ".join(r["command"] for r in runs),
         "date": " / ".join(r["date"] for r in runs),
         "seconds": sum(r["seconds"] for r in runs), "artifact": runs[0].get("artifact"),
         "teacher_forced": tf, "rows": [x for r in runs for x in r["rows"]],
         "new_tokens": runs[0]["new_tokens"], "n_prompts": runs[0]["n_prompts"],
         "merged_from": [f"bench_exits{t}.json" for t in tags]}
  with open(os.path.join(out_dir, "bench_exits.json"), "w") as f:
    json.dump(res, f, indent=1)
  with open(os.path.join(out_dir, "bench_exits.md"), "w") as f:
    f.write(markdown(res))
  pareto(res["rows"], os.path.join(out_dir, "bench_exits_pareto.png"))
  print(markdown(res))


def _merge(outs):
  o = outs[0]
  for x in outs[1:]:
    o.tokens = o.tokens + x.tokens
    if hasattr(o, "exit_index"):
      o.exit_index = o.exit_index + x.exit_index
    for k in ("drafted", "accepted", "agree", "row_rounds"):
      if hasattr(o, k):
        setattr(o, k, getattr(o, k) + getattr(x, k))
  return o


def markdown(res):
  tf = res["teacher_forced"]
  lines = [f"Exit modules on the embedded SmolLM2-135M (held-out prompts), "
           f"{res['new_tokens']} new tokens, greedy, CPU.",
           f"Made by `{res['command']}` on {res['date']} ({res['seconds'] / 60:.0f} min).", ""]
  if tf:
    lines += [f"Teacher-forced on {tf['n_tokens']} held-out pydoc tokens: full-depth ppl "
           f"{tf['ppl_full']:.2f}.", "",
           "| exit | top-1 agreement | FREE tau | exit rate | ppl with exits | ppl vs full | emitted = full |",
           "|---|---|---|---|---|---|---|"]
  if tf:
    lines[-2] = lines[-2].replace("FREE tau", "confidence | tau")
    lines[-1] = "|---|---|---|---|---|---|---|---|"
  for e, rec in (tf["exits"].items() if tf else ()):
    for conf, key in (("shortlist max-prob", "free"), ("meta (head-free)", "free_meta")):
      for tau, r in rec.get(key, {}).items():
        lines.append(f"| {e} | {rec['top1_agreement']:.1%} | {conf} | {tau} | "
                     f"{r['exit_rate']:.1%} | {r['ppl']:.2f} | "
                     f"{r['ppl'] / tf['ppl_full'] - 1:+.1%} | {r['equal_to_full']:.1%} |")
  lines += ["", "| batch | method | exit | max draft | tau | tokens/s | plain tokens/s | "
            "speed-up | acceptance | tokens/round | exit rate | identical to plain | "
            "emitted = full |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  names = {"verify": "self-spec", "trust": "FREE (spec engine, max-prob)",
           "free": "FREE (meta)", "calm": "CALM (meta)"}
  for r in res["rows"]:
    acc = "-" if r["mode"] in ("free", "calm") else f"{r['acceptance']:.1%}"
    er = f"{r['exit_rate']:.1%}" if "exit_rate" in r else "-"
    lines.append(f"| {r['batch']} | {names[r['mode']]} | "
                 f"{r['exit_layer']} | {r['max_draft']} | {r['tau']} | {r['tps']:.1f} | "
                 f"{r['plain_tps']:.1f} | {r['speedup']:.2f}x | {acc} | "
                 f"{r['tokens_per_round']:.2f} | {er} | {r['identical_to_plain']} | "
                 f"{r['emitted_equal_to_full']:.1%} |")
  return "\n".join(lines) + "\n"


def pareto(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  names = {"verify": "self-spec", "trust": "FREE max-prob", "free": "FREE meta",
           "calm": "CALM meta"}
  colors = {1: "C0", 8: "C1", 32: "C2"}
  for b in sorted({r["batch"] for r in rows}):
    for mode, mk in (("verify", "o"), ("trust", "^"), ("free", "s"), ("calm", "D")):
      pts = [r for r in rows if r["batch"] == b and r["mode"] == mode]
      if pts:
        ax.scatter([r["speedup"] for r in pts], [100 * r["emitted_equal_to_full"] for r in pts],
                   marker=mk, color=colors.get(b), label=f"batch {b}, {names[mode]}")
  ax.axvline(1.0, color="gray", lw=0.8)
  ax.set_xlabel("speed-up vs plain full-depth decoding (same process)")
  ax.set_ylabel("emitted tokens equal to the full model's choice (%)")
  ax.set_title("Exit modules on SmolLM2-135M: speed vs quality")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()

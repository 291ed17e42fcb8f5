r"""Compile once: the second ``api.generate`` / ``api.score_text`` call on a
loaded model against a call on an engine the caller keeps (issue 13).

    python experiments/bench_api.py                      # embedded SmolLM2-135M
    python experiments/bench_api.py --reps 3 --max_new_tokens 16 --fresh 1

For each of ``generate`` (batch 1, greedy) and ``score_text``, the calls are
interleaved: A = the API call (its engine comes from the model's cache), B =
the same work on an engine built once by the caller (``Engine(...)`` in the
same layout, the README's fast path). Wall time per call includes
tokenisation and detokenisation. ``--fresh N`` also times N calls that build a
new engine each time (the old ``api.generate``), without the persistent
compilation cache (its cross-process effect is what ``recursive-lm generate``
logs; tests/test_cli.py checks it). Writes results/api_compile_once.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT = "The capital of Germany is"
TEXT = ("The Python standard library is very extensive, offering a wide range of "
        "facilities. It contains built-in modules that provide access to system "
        "functionality such as file I/O that would otherwise be inaccessible.")


def timed(fn):
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--max_new_tokens", type=int, default=32)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--fresh", type=int, default=2, help="calls with a new engine each")
  ap.add_argument("--out", default=os.path.join(ROOT, "results"))
  args = ap.parse_args()
  os.environ["RECURSIVE_LM_COMPILE_CACHE"] = "0"  # in-process reuse only, first
  from recursive_lm import api  # pylint: disable=g-import-not-at-top
  from recursive_lm.decode.engine import Engine  # pylint: disable=g-import-not-at-top
  m = api.load(args.model)
  tok = m.tokenizer
  n = args.max_new_tokens
  res = {"command": "python experiments/bench_api.py " + " ".join(sys.argv[1:]),
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": m.cfg.name,
         "max_new_tokens": n, "reps": args.reps}

  # -- generate ----------------------------------------------------------------------
  layout, fuse = m.decode_layout(1)
  first, (text_a, _) = timed(lambda: api.generate(m, PROMPT, n))
  eng_b = Engine(m.cfg, m.params, kernel_layout=layout, fuse=fuse)
  ids = tok.encode(PROMPT)
  first_b, _ = timed(lambda: eng_b.generate([ids], n))

  def call_b():
    out = eng_b.generate([ids], n)
    return tok.decode([t for t in out.tokens[0] if t != eng_b.eos_id])

  a, b = [], []
  for _ in range(args.reps):
    ta, (txt, _) = timed(lambda: api.generate(m, PROMPT, n))
    tb, txt_b = timed(call_b)
    assert txt == txt_b == text_a, (txt, txt_b, text_a)
    a.append(ta)
    b.append(tb)
  res["generate"] = {"layout": f"{layout}{'+fused' if fuse else ''}",
                     "first_api_call_s": first, "first_engine_call_s": first_b,
                     "api_call_s": a, "reused_engine_call_s": b,
                     "api_median_s": statistics.median(a),
                     "engine_median_s": statistics.median(b),
                     "ratio": statistics.median(a) / statistics.median(b),
                     "text": text_a}
  del eng_b

  # -- fresh engine per call (the old api.generate; no persistent cache) ---------------
  fresh = [timed(lambda: Engine(m.cfg, m.params, kernel_layout=layout,
                                fuse=fuse).generate([ids], n))[0] for _ in range(args.fresh)]
  res["fresh_engine_per_call_s"] = fresh

  # -- score_text --------------------------------------------------------------------
  m.clear_engines()
  first_s, ref = timed(lambda: api.score_text(m, TEXT))
  eng_s = Engine(m.cfg, m.params)
  sids = tok.encode(TEXT)
  timed(lambda: eng_s.token_nll(sids))
  sa, sb = [], []
  for _ in range(args.reps):
    ta, r = timed(lambda: api.score_text(m, TEXT))
    tb, nll = timed(lambda: eng_s.token_nll(tok.encode(TEXT)))
    assert abs(r["mean_nll"] - float(nll.mean())) < 1e-6
    sa.append(ta)
    sb.append(tb)
  res["score_text"] = {"first_api_call_s": first_s, "api_call_s": sa,
                       "reused_engine_call_s": sb, "api_median_s": statistics.median(sa),
                       "engine_median_s": statistics.median(sb),
                       "ratio": statistics.median(sa) / statistics.median(sb),
                       "n_tokens": ref["n_tokens"]}

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "api_compile_once.json"), "w") as f:
    json.dump(res, f, indent=2)
  g, s = res["generate"], res["score_text"]
  lines = [
      f"Compile once: second API call vs a reused engine, {m.cfg.name}, batch 1, greedy, "
      f"{n} new tokens, median of {args.reps} interleaved calls (wall time per call, "
      "tokenisation included).",
      f"Made by `{res['command']}` on {res['date']}.", "",
      "| call | first call (s) | API call, cached engine (s) | reused engine (s) | ratio |",
      "|---|---:|---:|---:|---:|",
      f"| `api.generate` ({g['layout']}) | {g['first_api_call_s']:.2f} | "
      f"{g['api_median_s']:.3f} | {g['engine_median_s']:.3f} | {g['ratio']:.3f}x |",
      f"| `api.score_text` ({s['n_tokens']} tokens) | {s['first_api_call_s']:.2f} | "
      f"{s['api_median_s']:.3f} | {s['engine_median_s']:.3f} | {s['ratio']:.3f}x |",
  ]
  if fresh:
    lines += ["", f"A new engine per call (what `api.generate` did before), no persistent "
              f"cache: {statistics.median(fresh):.2f} s per call (median of {len(fresh)}), "
              f"{statistics.median(fresh) / g['engine_median_s']:.0f}x the reused engine."]
  md = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "api_compile_once.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()

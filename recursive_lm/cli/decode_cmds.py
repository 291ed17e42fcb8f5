"""``generate``, ``score`` and ``bench``: decoding with the project's engines."""
from __future__ import annotations

import json
import os
import statistics
import time

from absl import flags

from recursive_lm.cli import common
from recursive_lm.cli.core import Command, UserError, log, validator


# -- generate -------------------------------------------------------------------------
def _define_generate(fv):
  common.define_model(fv)
  flags.DEFINE_multi_string("prompt", None, "Prompt; repeat the flag for a batch.",
                            flag_values=fv)
  flags.DEFINE_string("prompt_file", None, "File with one prompt per line.", flag_values=fv)
  flags.DEFINE_bool("chat", False, "Wrap prompts in the checkpoint's chat template.",
                    flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt (>= 1).", flag_values=fv)
  flags.DEFINE_bool("json", False, "Print one JSON object (texts and timings) on stdout.",
                    flag_values=fv)
  validator(fv, "max_new_tokens", lambda v: v >= 1,
            "--max_new_tokens must be >= 1, e.g. --max_new_tokens 64")
  common.define_sampling(fv)
  common.define_decoder(fv)


def _prompts(fv) -> list[str]:
  prompts = list(fv.prompt or [])
  if fv.prompt_file:
    text = common.read_text_file("prompt_file", fv.prompt_file)
    prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
      raise UserError(f"--prompt_file {fv.prompt_file!r} has no non-empty line; write one "
                      "prompt per line")
  if not prompts:
    raise UserError("generate needs a prompt: --prompt TEXT (repeatable) or "
                    "--prompt_file PATH")
  if any(not p.strip() for p in prompts):
    raise UserError("--prompt is empty; pass some text, e.g. --prompt \"Once upon a time\"")
  return prompts


def _run_generate(fv):
  from recursive_lm import api  # pylint: disable=g-import-not-at-top
  from recursive_lm import compile_cache  # pylint: disable=g-import-not-at-top
  prompts = _prompts(fv)
  sampling = common.sampling_config(fv)
  m = common.load_model(fv.model)
  stats = compile_cache.CompileStats.start()
  t0 = time.perf_counter()
  eng = common.decoder_engine(fv, m, len(prompts))
  log(f"decoding {len(prompts)} prompt(s) with {type(eng).__name__} ...")
  texts, out = api.generate(m, prompts, fv.max_new_tokens, sampling, fv.seed, fv.chat,
                            engine=eng)
  t_end = time.perf_counter()
  wall = t_end - t0
  cs = stats.now()
  # This run's throughput: the decode phase minus the compiling done inside it
  # (tracing/lowering always, XLA compile on a cache miss; measured by JAX's
  # monitoring events, compile_cache.CompileStats).
  decode_compile = stats.seconds_between(t_end - out.decode_seconds, t_end)
  decode_run = max(out.decode_seconds - decode_compile, 1e-9)
  tok_s = out.new_tokens / decode_run
  if fv.json:
    print(json.dumps({"model": m.cfg.name, "prompts": prompts, "texts": texts,
                      "new_tokens": out.new_tokens, "prefill_seconds": out.prefill_seconds,
                      "decode_seconds": out.decode_seconds,
                      "decode_compile_seconds": decode_compile,
                      "decode_tokens_per_s": tok_s, "compile": cs}))
  else:
    for p, t in zip(prompts, texts):
      print(f"### {p}\n{t}\n")
  extra = common.decoder_stats(out)
  log(f"{out.new_tokens} new tokens, batch {len(prompts)}: {tok_s:.1f} tokens/s decode "
      f"({decode_run:.2f} s decoding + {decode_compile:.2f} s compiling), prefill "
      f"{out.prefill_seconds * 1e3:.0f} ms, {wall:.1f} s in all"
      + (f"; {extra}" if extra else ""))
  log(stats.summary() + ("" if cs["misses"] == 0 else
                         " (a second run reads the compiled programs from the cache)"))


GENERATE = Command(
    "generate", "Generate text (greedy/sampling; --early_exit free|calm, --speculative).",
    _define_generate, _run_generate,
    description="""
    Examples:
      recursive-lm generate --prompt "The capital of Germany is"
      recursive-lm generate --chat --prompt "What is the capital of France?"
      recursive-lm generate --nogreedy --temperature 0.8 --top_p 0.9 --prompt Once
      recursive-lm generate --model runs/main --early_exit calm --threshold 0.8 --prompt Hi
      recursive-lm generate --model runs/main --speculative --draft_loops 1 --prompt Hi
    Text goes to stdout; timings, decode tokens/s and the compile-cache hits of this
    run go to stderr.""")


# -- score ----------------------------------------------------------------------------
def _define_score(fv):
  common.define_model(fv)
  flags.DEFINE_string("text_file", None, "UTF-8 text file to score.", flag_values=fv)
  flags.DEFINE_integer("window", None, "Context window in tokens (>= 1; default: the "
                       "model's max_seq_len); longer texts are scored in windows.",
                       flag_values=fv)
  flags.DEFINE_bool("json", False, "Print one JSON object.", flag_values=fv)
  validator(fv, "window", lambda v: v >= 1,
            "--window must be >= 1 token; omit it to use the model's max_seq_len")


def _run_score(fv):
  from recursive_lm import api  # pylint: disable=g-import-not-at-top
  if not fv.text_file:
    raise UserError("score needs --text_file PATH (a UTF-8 text file)")
  text = common.read_text_file("text_file", fv.text_file)
  if not text.strip():
    raise UserError(f"--text_file {fv.text_file!r} is empty; nothing to score: pass a "
                    "file with some text (at least 2 tokens)")
  m = common.load_model(fv.model)
  t = time.perf_counter()
  res = api.score_text(m, text, fv.window)
  res["seconds"] = round(time.perf_counter() - t, 3)
  res["model"] = m.cfg.name
  if fv.json:
    print(json.dumps(res))
  else:
    print(f"{res['n_tokens']} tokens: mean NLL {res['mean_nll']:.4f}, "
          f"perplexity {res['ppl']:.3f} ({res['seconds']}s)")


SCORE = Command("score", "Perplexity (mean NLL per token) of a text file.",
                _define_score, _run_score,
                description="""
    Example:
      recursive-lm score --text_file notes.txt --json   # {"mean_nll", "ppl", "n_tokens", ...}""")


# -- bench ----------------------------------------------------------------------------
def _define_bench(fv):
  common.define_model(fv)
  flags.DEFINE_integer("batch", 1, "Rows decoded together (>= 1).", flag_values=fv)
  flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row (>= 1).", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 64, "New tokens per row (>= 1).", flag_values=fv)
  flags.DEFINE_integer("runs", 3, "Timed runs after one warm-up run (>= 1).",
                       flag_values=fv)
  flags.DEFINE_string("output", None, "Also write the JSON result to this file.",
                      flag_values=fv)
  for name in ("batch", "prompt_len", "max_new_tokens", "runs"):
    validator(fv, name, lambda v: v >= 1, f"--{name} must be >= 1")
  common.define_decoder(fv)


def _run_bench(fv):
  import numpy as np  # pylint: disable=g-import-not-at-top
  m = common.load_model(fv.model)
  eng = common.decoder_engine(fv, m, fv.batch)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, m.cfg.vocab_size, fv.prompt_len).tolist()
             for _ in range(fv.batch)]
  t = time.perf_counter()
  eng.generate(prompts, fv.max_new_tokens, stop_at_eos=False)
  warm = time.perf_counter() - t
  runs = []
  for _ in range(fv.runs):
    out = eng.generate(prompts, fv.max_new_tokens, stop_at_eos=False)
    runs.append({"new_tokens": out.new_tokens, "prefill_s": out.prefill_seconds,
                 "decode_s": out.decode_seconds,
                 "decode_tokens_per_s": out.new_tokens / max(out.decode_seconds, 1e-9)})
  med = statistics.median(r["decode_tokens_per_s"] for r in runs)
  res = {"model": m.cfg.name, "engine": type(eng).__name__, "batch": fv.batch,
         "prompt_len": fv.prompt_len, "max_new_tokens": fv.max_new_tokens,
         "warmup_s": warm, "median_decode_tokens_per_s": med, "runs": runs,
         "date": time.strftime("%Y-%m-%d %H:%M")}
  print(json.dumps(res))
  log(f"{type(eng).__name__}, batch {fv.batch}: median {med:.1f} new tokens/s over "
      f"{fv.runs} runs (warm-up incl. compile {warm:.1f} s)")
  if fv.output:
    os.makedirs(os.path.dirname(os.path.abspath(fv.output)), exist_ok=True)
    with open(fv.output, "w") as f:
      json.dump(res, f, indent=2)


BENCH = Command("bench", "Decode throughput (median new tokens/s) of one engine and batch.",
                _define_bench, _run_bench,
                description="""
    Example:
      recursive-lm bench --batch 8 --max_new_tokens 128 --runs 5
    The full comparison against transformers and the memory roofline is
    experiments/bench_decode.py (in the repository).""")

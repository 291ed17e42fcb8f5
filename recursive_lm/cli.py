"""Command line: ``python -m recursive_lm {generate,score} [--flags]``.

    python -m recursive_lm generate --prompt "The capital of Germany is"
    python -m recursive_lm generate --chat --prompt "What is the capital of France?"
    python -m recursive_lm score --text_file notes.txt --json

Both default to the embedded SmolLM2-135M-Instruct (``--model`` takes a preset
name, a GGUF file, a Hugging Face folder or a folder saved by recursive_lm).
"""
from __future__ import annotations

import json
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Preset name, .gguf file, HF folder or "
                    "recursive_lm folder.")
flags.DEFINE_multi_string("prompt", None, "Prompt(s); repeat the flag for a batch.")
flags.DEFINE_string("prompt_file", None, "File with one prompt per line.")
flags.DEFINE_bool("chat", False, "Wrap prompts in the checkpoint's chat template.")
flags.DEFINE_bool("greedy", True, "Greedy decoding (--nogreedy to sample).")
flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("text_file", None, "score: text file to score.")
flags.DEFINE_integer("window", None, "score: context window (default: model max).")
flags.DEFINE_bool("json", False, "score: print one JSON object.")

COMMANDS = ("generate", "score")


def _log(msg: str):
  print(msg, file=sys.stderr, flush=True)


def _load():
  from recursive_lm import api
  t = time.perf_counter()
  m = api.load(FLAGS.model)
  _log(f"loaded {m.cfg.name} from {m.source} ({time.perf_counter() - t:.1f}s; "
       f"plan {m.cfg.plan})")
  return m


def cmd_generate():
  from recursive_lm import api
  from recursive_lm.decode.sampling import SamplingConfig
  prompts = list(FLAGS.prompt or [])
  if FLAGS.prompt_file:
    with open(FLAGS.prompt_file) as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise app.UsageError("generate needs --prompt TEXT (repeatable) or --prompt_file PATH")
  sampling = SamplingConfig(greedy=FLAGS.greedy, temperature=FLAGS.temperature,
                            top_k=FLAGS.top_k, top_p=FLAGS.top_p)
  m = _load()
  eng = m.engine(len(prompts))
  _log("compiling ...")
  texts, out = api.generate(m, prompts, FLAGS.max_new_tokens, sampling, FLAGS.seed,
                            FLAGS.chat, engine=eng)
  first = out.prefill_seconds + out.decode_seconds
  # second run is the compiled steady state; report it
  texts, out = api.generate(m, prompts, FLAGS.max_new_tokens, sampling, FLAGS.seed,
                            FLAGS.chat, engine=eng)
  for p, t in zip(prompts, texts):
    print(f"### {p}\n{t}\n")
  _log(f"{out.new_tokens} new tokens, batch {len(prompts)}: "
       f"{out.new_tokens / out.decode_seconds:.1f} tokens/s decode, prefill "
       f"{out.prefill_seconds * 1e3:.0f} ms (first call incl. compile {first:.1f}s)")


def cmd_score():
  from recursive_lm import api
  if not FLAGS.text_file:
    raise app.UsageError("score needs --text_file PATH")
  try:
    with open(FLAGS.text_file, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise app.UsageError(f"cannot read --text_file: {e}")
  m = _load()
  t = time.perf_counter()
  res = api.score_text(m, text, FLAGS.window)
  res["seconds"] = round(time.perf_counter() - t, 3)
  res["model"] = m.cfg.name
  if FLAGS.json:
    print(json.dumps(res))
  else:
    print(f"{res['n_tokens']} tokens: mean NLL {res['mean_nll']:.4f}, "
          f"perplexity {res['ppl']:.3f} ({res['seconds']}s)")


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # hide backend-probing INFO lines
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m recursive_lm {{{','.join(COMMANDS)}}} [--flags]"
                         f"; got {argv[1:] or 'no command'}")
  if len(argv) > 2:
    raise app.UsageError(f"unexpected arguments {argv[2:]}; quote multi-word prompts")
  {"generate": cmd_generate, "score": cmd_score}[argv[1]]()


def run():
  app.run(main)


if __name__ == "__main__":
  run()

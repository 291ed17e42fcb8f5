"""``convert``, ``export`` and ``eval``: model folders in and out, evaluation."""
from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

from recursive_lm.cli import common
from recursive_lm.cli.core import Command, UserError, log, validator


# -- convert --------------------------------------------------------------------------
def _define_convert(fv):
  from recursive_lm.recursive.convert import INITS, NONDIVISIBLE, SHARINGS  # pylint: disable=g-import-not-at-top
  common.define_model(fv, help_extra=" Must be a vanilla (pretrained) checkpoint.")
  flags.DEFINE_string("out", None, "Folder to write the converted model into.",
                      flag_values=fv)
  flags.DEFINE_integer("loops", 2, "Loops of the shared block (>= 1).", flag_values=fv)
  flags.DEFINE_enum("sharing", "cycle", list(SHARINGS), "Layer sharing scheme.",
                    flag_values=fv)
  flags.DEFINE_enum("init", "stepwise", list(INITS), "Init of the shared layers.",
                    flag_values=fv)
  flags.DEFINE_integer("rank", 0, "Per-loop LoRA rank (0: strictly recursive; > 0: "
                       "relaxed, SVD-initialised).", flag_values=fv)
  flags.DEFINE_enum("nondivisible", "select", list(NONDIVISIBLE),
                    "When the layers do not divide by --loops: drop or duplicate layers.",
                    flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed (random init).", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Write into a non-empty --out folder.",
                    flag_values=fv)
  validator(fv, "loops", lambda v: v >= 1, "--loops must be >= 1 (2-4 are the paper's)")
  validator(fv, "rank", lambda v: v >= 0, "--rank must be >= 0 (0 = no LoRA)")


def _run_convert(fv):
  from recursive_lm import export  # pylint: disable=g-import-not-at-top
  from recursive_lm.checkpoints import load_checkpoint  # pylint: disable=g-import-not-at-top
  from recursive_lm.recursive import convert, describe  # pylint: disable=g-import-not-at-top
  if not fv.out:
    raise UserError("convert needs --out FOLDER (where the recursive model is written)")
  out = common.check_out_folder("out", fv.out, fv.overwrite)
  path = common.check_model(fv.model)
  if path and os.path.isdir(path) and os.path.exists(
      os.path.join(path, export.CONFIG_FILE)):
    raise UserError(f"--model {path!r} is a recursive_lm model folder; convert takes a "
                    "pretrained checkpoint (preset, .gguf or Hugging Face folder)")
  t = time.perf_counter()
  ck = load_checkpoint(path)
  log(f"loaded {ck.config.name} ({time.perf_counter() - t:.1f}s); converting ...")
  cfg, params = convert(ck.config, ck.weights, loops=fv.loops, sharing=fv.sharing,
                        init=fv.init, lora_ranks=fv.rank or None,
                        nondivisible=fv.nondivisible, seed=fv.seed)
  export.save_model(out, cfg, params, ck.tokenizer)
  print(describe(cfg, params))
  print(f"wrote {out} (load it with recursive_lm.load({out!r}) or --model {out})")


CONVERT = Command(
    "convert", "Pretrained checkpoint -> recursive / relaxed recursive model folder.",
    _define_convert, _run_convert,
    description="""
    Example:
      recursive-lm convert --loops 2 --init average --rank 64 --out models/rrt2
    The folder (recursive_lm_config.json + params.safetensors + tokenizer) loads
    with --model models/rrt2; 'recursive-lm uptrain' trains such a model.""")


# -- export ---------------------------------------------------------------------------
def _define_export(fv):
  common.define_model(fv)
  flags.DEFINE_string("out", None, "Folder to write.", flag_values=fv)
  flags.DEFINE_enum("format", "hf", ["hf", "native"],
                    "hf: unrolled Hugging Face LlamaForCausalLM folder (loops unrolled, "
                    "LoRA merged); native: recursive_lm folder (sharing and LoRA kept).",
                    flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "hf: weight dtype of the safetensors files.", flag_values=fv)
  flags.DEFINE_float("max_shard_gb", 5.0, "hf: split the weights into shards of at most "
                     "this many GB (Hugging Face index layout).", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Write into a non-empty --out folder.",
                    flag_values=fv)
  validator(fv, "max_shard_gb", lambda v: v > 0, "--max_shard_gb must be > 0")
  flags.register_multi_flags_validator(
      ["format", "dtype"], lambda d: d["format"] == "hf" or d["dtype"] == "float32",
      message="--dtype applies to --format hf; the native format keeps the model's dtypes",
      flag_values=fv)


def _run_export(fv):
  from recursive_lm import export  # pylint: disable=g-import-not-at-top
  from recursive_lm.cli import hf_weights  # pylint: disable=g-import-not-at-top
  if not fv.out:
    raise UserError("export needs --out FOLDER")
  out = common.check_out_folder("out", fv.out, fv.overwrite)
  m = common.load_model(fv.model)
  if fv.format == "native":
    export.save_model(out, m.cfg, m.params, m.tokenizer)
    print(f"wrote {out} (recursive_lm format)")
    return
  export.export_unrolled_hf(out, m.cfg, m.params, m.tokenizer)
  files = hf_weights.rewrite(out, fv.dtype, int(fv.max_shard_gb * 1e9))
  print(f"wrote {out}: Hugging Face Llama, {m.cfg.plan.effective_depth} layers, "
        f"{fv.dtype}, {len(files)} weight file(s) (transformers: "
        f"AutoModelForCausalLM.from_pretrained({out!r}))")


EXPORT = Command("export", "Write a model as an unrolled Hugging Face folder or natively.",
                 _define_export, _run_export,
                 description="""
    Examples:
      recursive-lm export --model runs/main --out export/main_hf --dtype bfloat16
      recursive-lm export --model model.gguf --format native --out models/native""")


# -- eval -----------------------------------------------------------------------------
def _define_eval(fv):
  common.define_model(fv)
  flags.DEFINE_list("tasks", None, "Multiple-choice task jsonl files or globs "
                    "(comma-separated), e.g. 'experiments/tasks/*.jsonl'.", flag_values=fv)
  flags.DEFINE_integer("k_shot", 2, "Demonstrations per prompt (>= 0).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the demonstration draw.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 8, "Rows per scoring batch (>= 1).", flag_values=fv)
  flags.DEFINE_integer("limit", None, "Score only the first N examples of each task.",
                       flag_values=fv)
  flags.DEFINE_string("perplexity", None, "Held-out perplexity on a data source: 'pydoc' "
                      "(the embedded corpus' validation split) or a data spec of "
                      "recursive_lm.data.make_source.", flag_values=fv)
  flags.DEFINE_string("text_file", None, "Perplexity of this UTF-8 text file.",
                      flag_values=fv)
  flags.DEFINE_integer("seq_len", 256, "Perplexity: tokens per row.", flag_values=fv)
  flags.DEFINE_integer("eval_batches", 8, "Perplexity: held-out batches.", flag_values=fv)
  flags.DEFINE_bool("json", False, "Print one JSON object instead of tables.",
                    flag_values=fv)
  flags.DEFINE_string("output", None, "Also write the JSON results to this file.",
                      flag_values=fv)
  validator(fv, "k_shot", lambda v: v >= 0, "--k_shot must be >= 0")
  validator(fv, "limit", lambda v: v >= 1, "--limit must be >= 1 (omit it for all)")
  for name in ("batch_size", "seq_len", "eval_batches"):
    validator(fv, name, lambda v: v >= 1, f"--{name} must be >= 1")


def _run_eval(fv):
  from recursive_lm import api, evaluation  # pylint: disable=g-import-not-at-top
  try:
    tasks = evaluation.resolve_tasks(fv.tasks or [])
  except ValueError as e:
    raise UserError(str(e)) from None
  if not (tasks or fv.perplexity or fv.text_file):
    raise UserError("eval needs --tasks FILES, --perplexity pydoc or --text_file PATH")
  text = None
  if fv.text_file:
    text = common.read_text_file("text_file", fv.text_file)
    if not text.strip():
      raise UserError(f"--text_file {fv.text_file!r} is empty; nothing to score")
  m = common.load_model(fv.model)
  report = {"model": fv.model, "source": m.source, "k_shot": fv.k_shot, "seed": fv.seed}
  if fv.perplexity:
    from recursive_lm.data import eval_batches, make_source  # pylint: disable=g-import-not-at-top
    tok = m.tokenizer
    val = eval_batches(make_source(fv.perplexity, "validation"), tok.encode, tok.eos_id,
                       fv.seq_len, fv.batch_size, fv.eval_batches)
    report["perplexity"] = dict(evaluation.heldout_perplexity(m.cfg, m.params, val),
                                data=fv.perplexity)
  if text is not None:
    report["text_file"] = dict(api.score_text(m, text), path=fv.text_file)
  results = {}
  if tasks:
    results = evaluation.evaluate_model(
        m, tasks, k_shot=fv.k_shot, seed=fv.seed, batch_size=fv.batch_size,
        limit=fv.limit, on_task=lambda name, r: log(evaluation.task_line(name, r)))
  report["tasks"] = evaluation.without_predictions(results)
  if fv.output:
    evaluation.save_report(fv.output, report, results)
  if fv.json:
    print(json.dumps(report))
    return
  for key in ("perplexity", "text_file"):
    if key in report:
      r = report[key]
      print(f"{key}: perplexity {r['ppl']:.3f} (mean NLL {r['mean_nll']:.4f}, "
            f"{r['n_tokens']} tokens)")
  if results:
    print(evaluation.format_table(results))
  sys.stdout.flush()


EVAL = Command("eval", "Perplexity and few-shot multiple-choice accuracy.",
               _define_eval, _run_eval,
               description="""
    Examples:
      recursive-lm eval --tasks 'experiments/tasks/*.jsonl' --k_shot 2
      recursive-lm eval --model runs/main --perplexity pydoc --eval_batches 4
      recursive-lm eval --text_file notes.txt --json
    The task schema (jsonl, one multiple-choice example per line) is in
    recursive_lm.evaluation.""")

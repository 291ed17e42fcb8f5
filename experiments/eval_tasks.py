r"""Few-shot multiple-choice evaluation of a model on local jsonl task files.

    python experiments/eval_tasks.py                       # embedded SmolLM2, all tasks
    python experiments/eval_tasks.py --model runs/uptrain/export \
      --tasks 'experiments/tasks/*.jsonl' --k_shot 2 --json
    python experiments/eval_tasks.py --tasks experiments/tasks/capitals.jsonl \
      --limit 10 --output results/eval_capitals.json

``--model`` takes a preset name, a GGUF file, a Hugging Face folder or a folder
saved by recursive_lm (``recursive_lm.api.load``). ``--tasks`` takes
comma-separated paths or glob patterns (extra positional ``.jsonl`` arguments,
e.g. from an unquoted shell glob, are added too). The task schema is in
``recursive_lm.evaluation``. Prints a markdown table (or, with ``--json``, one
JSON object) on stdout; progress goes to stderr.
"""
from __future__ import annotations

import json
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Preset name, .gguf file, HF folder or "
                    "recursive_lm folder.")
flags.DEFINE_list("tasks", ["experiments/tasks/*.jsonl"],
                  "Task jsonl files or glob patterns (comma-separated).")
flags.DEFINE_integer("k_shot", 2, "Demonstrations per prompt.")
flags.DEFINE_integer("seed", 0, "Seed of the demonstration draw.")
flags.DEFINE_integer("batch_size", 8, "Rows per scoring batch.")
flags.DEFINE_integer("limit", None, "Score only the first N examples of each task.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
flags.DEFINE_string("output", None, "Also write the JSON results to this file.")


def resolve_tasks(patterns) -> list[str]:
  """``evaluation.resolve_tasks`` (globs expanded, de-duplicated); no task file
  at all is a usage error here."""
  from recursive_lm import evaluation  # pylint: disable=g-import-not-at-top
  try:
    out = evaluation.resolve_tasks(patterns)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if not out:
    raise app.UsageError("no task files; pass --tasks experiments/tasks/*.jsonl")
  return out


def main(argv):
  extra = [a for a in argv[1:] if a.endswith(".jsonl")]
  unknown = [a for a in argv[1:] if not a.endswith(".jsonl")]
  if unknown:
    raise app.UsageError(f"unexpected arguments {unknown}")
  from recursive_lm import api, evaluation
  tasks = resolve_tasks(list(FLAGS.tasks) + extra)
  t0 = time.perf_counter()
  model = api.load(FLAGS.model)
  print(f"loaded {model.cfg.name} from {model.source} "
        f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
  results = evaluation.evaluate_model(
      model, tasks, k_shot=FLAGS.k_shot, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
      limit=FLAGS.limit,
      on_task=lambda name, r: print(evaluation.task_line(name, r), file=sys.stderr,
                                    flush=True))
  report = {"model": FLAGS.model, "source": model.source, "k_shot": FLAGS.k_shot,
            "seed": FLAGS.seed, "tasks": evaluation.without_predictions(results)}
  if FLAGS.output:
    evaluation.save_report(FLAGS.output, report, results)
  if FLAGS.json:
    print(json.dumps(report))
  else:
    print(f"model: {FLAGS.model} ({model.source}), {FLAGS.k_shot}-shot, "
          f"seed {FLAGS.seed}\n")
    print(evaluation.format_table(results))


if __name__ == "__main__":
  app.run(main)

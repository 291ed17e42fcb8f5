"""Command line: ``recursive-lm COMMAND [--flags]`` (also ``python -m recursive_lm``).

    recursive-lm --help                              # the commands, one line each
    recursive-lm generate --prompt "The capital of Germany is"
    recursive-lm generate --help                     # generate's flags only
    recursive-lm score --text_file notes.txt --json
    recursive-lm convert --loops 2 --rank 64 --out models/rrt2
    recursive-lm uptrain --config uptrain_smollm2:steps=50 --workdir runs/main
    recursive-lm export --model runs/main --out export/hf --dtype bfloat16
    recursive-lm eval --tasks 'experiments/tasks/*.jsonl'
    recursive-lm bench --batch 8

``--model`` defaults to the embedded SmolLM2-135M-Instruct and takes a preset
name, a GGUF file, a Hugging Face folder, a folder saved by recursive_lm or a
training run folder (its ``final/``). A user error prints one line naming the
problem and the fix and exits with status 2 (``--debug``: with the traceback).
"""
from __future__ import annotations

import sys
from typing import Sequence

from recursive_lm.cli import core
from recursive_lm.cli.decode_cmds import BENCH, GENERATE, SCORE
from recursive_lm.cli.model_cmds import CONVERT, EVAL, EXPORT
from recursive_lm.cli.train_cmds import TRAIN_EXITS, TRAIN_MOR, UPTRAIN

COMMANDS = (GENERATE, SCORE, CONVERT, UPTRAIN, TRAIN_EXITS, TRAIN_MOR, EXPORT, EVAL, BENCH)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one command; returns the exit status (0 ok, 2 user error)."""
  return core.main(sys.argv if argv is None else list(argv), COMMANDS)


def run() -> None:
  """Console-script entry point (``recursive-lm``)."""
  sys.exit(main())

r"""Uptrain a recursive model with distillation (thin entry point; logic in
``recursive_lm.training.trainer``; the same as ``recursive-lm uptrain``).

  python experiments/uptrain.py \
    --config experiments/configs/uptrain_smollm2.py:loops=2,init=stepwise,rank=0,steps=200 \
    --config.train.eval_every=25 --workdir runs/r2_stepwise

Rerunning the same command resumes from the latest intact checkpoint in the
workdir (a corrupt newest one is moved to ``<step>.corrupt`` with a warning;
``--config.train.strict_restore=True`` makes that an error). SIGTERM saves a
checkpoint after the current step and exits with status 0.

Several processes (one machine here; every host of a pod runs the same line,
see launch/README.md)::

  python -m recursive_lm.distributed --local_processes=2 --local_devices=4 \
    experiments/uptrain.py --config experiments/configs/uptrain_smollm2.py:steps=200 \
    --workdir runs/local_2x4
"""
from __future__ import annotations

import os
import sys

# The checkout's package, not whichever recursive_lm is installed (the configs
# in experiments/configs re-export recursive_lm.configs).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402  pylint: disable=wrong-import-position
from ml_collections import config_flags  # noqa: E402  pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (optionally with :variant args).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (overrides config.workdir).")
flags.mark_flags_as_required(["config"])


# The table lives in the package (the `recursive-lm uptrain` command prints it too).
from recursive_lm.cli.train_cmds import summary_table  # noqa: E402,F401  pylint: disable=wrong-import-position


def main(argv):
  del argv
  from recursive_lm.training.trainer import train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if _WORKDIR.value:
    with config.unlocked():
      config.workdir = _WORKDIR.value
  logging.info("config:\n%s", config)
  summary = train(config)
  print(summary_table(summary))
  print(f"summary: {os.path.join(summary['workdir'], 'summary.json')}")
  return 0


if __name__ == "__main__":
  app.run(main)

r"""Uptrain a recursive model with distillation (thin entry point; logic in
``recursive_lm.training.trainer``).

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

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (optionally with :variant args).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (overrides config.workdir).")
flags.mark_flags_as_required(["config"])


def _fmt(v, unit=""):
  if v is None:
    return "n/a"
  if isinstance(v, float):
    return f"{v:,.4g}{unit}"
  if isinstance(v, int):
    return f"{v:,}{unit}"
  return f"{v}{unit}"


def summary_table(s: dict) -> str:
  mem = s.get("memory", {})
  rows = [
      ("status", s.get("status")),
      ("workdir", s.get("workdir")),
      ("student", f"{s['student']['name']} ({_fmt(s['student']['unique_params'])} "
                  f"unique params)"),
      ("teacher params", _fmt(s["teacher"]["unique_params"])),
      ("steps (this run)", f"{s.get('final_step')} ({s.get('steps_this_run')}; resumed "
                           f"from {s.get('resumed_from_step')})"),
      ("tokens trained", _fmt(s.get("tokens_trained"))),
      ("wall time", _fmt(s.get("wall_time_s"), " s")),
      ("compile time", _fmt(s.get("compile_time_s"), " s")),
      ("train step (median)", _fmt(s.get("train_step_time_s_median"), " s")),
      ("tokens/s", _fmt(s.get("tokens_per_s"))),
      ("matmul peak / device", _fmt((s.get("matmul_peak_flops_per_device") or 0) / 1e9,
                                    " GFLOP/s")),
      ("MFU", _fmt(100 * s["mfu"], " %") if s.get("mfu") is not None else "n/a"),
      ("peak host RSS", _fmt(mem.get("peak_host_rss_mb"), " MiB")),
      ("train-step temp memory", _fmt(mem.get("train_step_temp_size_mb"), " MiB")),
      ("teacher ppl", _fmt(s.get("teacher_ppl"))),
      ("student ppl init", _fmt(s.get("student_ppl_init"))),
      ("student ppl final", _fmt(s.get("student_ppl_final"))),
      ("gap closed (NLL)", _fmt(s.get("gap_closed_fraction_nll"))),
      ("curves", s.get("curves_png", "n/a")),
  ]
  w = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


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

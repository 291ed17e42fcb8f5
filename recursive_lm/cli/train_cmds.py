"""``uptrain``, ``train-exits``, ``train-mor``: the training entry points.

All three run ``recursive_lm.training.trainer.train(config)`` on an
ml_collections config: a packaged one by name (``recursive_lm/configs``) with
big_vision-style variants after ``:``, or a path to a config file, plus
``--config.x.y=value`` overrides.
"""
from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from recursive_lm import configs as packaged
from recursive_lm.cli.core import Command, UserError, log


def _fmt(v, unit=""):
  if v is None:
    return "n/a"
  if isinstance(v, float):
    return f"{v:,.4g}{unit}"
  if isinstance(v, int):
    return f"{v:,}{unit}"
  return f"{v}{unit}"


def summary_table(s: dict) -> str:
  """The run summary (``trainer.train``'s return value) as aligned text."""
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


def resolve_config_arg(value: str) -> str:
  """``NAME[:variant]`` of a packaged config -> ``path[:variant]``; paths pass."""
  path, sep, variant = value.partition(":")
  if os.path.exists(os.path.expanduser(path)):
    return value
  base = path[:-3] if path.endswith(".py") else path
  if base in packaged.NAMES:
    return packaged.path(base) + sep + variant
  raise UserError(f"--config {path!r} is neither a packaged config "
                  f"({', '.join(packaged.NAMES)}) nor a config file; e.g. "
                  "--config uptrain_smollm2:loops=2,steps=200")


def _prepare(default: str):
  def prepare(argv: list[str]) -> list[str]:
    out, seen, i = [], False, 0
    while i < len(argv):
      a = argv[i]
      if a == "--config" and i + 1 < len(argv):
        out += ["--config", resolve_config_arg(argv[i + 1])]
        seen, i = True, i + 2
        continue
      if a.startswith("--config="):
        out.append("--config=" + resolve_config_arg(a.split("=", 1)[1]))
        seen = True
      else:
        out.append(a)
      i += 1
    if not seen:
      out = ["--config=" + packaged.path(default)] + out
    return out
  return prepare


def _define(default: str):
  def define(fv):
    config_flags.DEFINE_config_file(
        "config", None, f"Packaged config name ({', '.join(packaged.NAMES)}; default "
        f"{default}) or config file, with variants after ':', e.g. "
        f"{default}:steps=200. Override fields with --config.x.y=value.",
        flag_values=fv, lock_config=True)
    flags.DEFINE_string("workdir", None, "Run folder (overrides config.workdir); rerunning "
                        "resumes from its last checkpoint.", flag_values=fv)
  return define


def _run(fv):
  from recursive_lm import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.enable()
  from recursive_lm.training.trainer import train  # pylint: disable=g-import-not-at-top
  config = fv.config
  if fv.workdir:
    with config.unlocked():
      config.workdir = fv.workdir
  log(f"training into {config.workdir} ...")
  summary = train(config)
  print(summary_table(summary))
  print(f"summary: {os.path.join(summary['workdir'], 'summary.json')}")
  if summary.get("final_dir"):
    print(f"final model: {summary['final_dir']} (recursive-lm generate --model "
          f"{summary['workdir']})")


def _command(name: str, default: str, summary: str, example: str) -> Command:
  return Command(name, summary, _define(default), _run, prepare_argv=_prepare(default),
                 description=f"""
    Example:
      {example}
    SIGTERM saves a checkpoint after the current step and exits with status 0;
    rerunning the same command resumes. The run folder gets summary.json,
    metrics.jsonl, TensorBoard logs, curves.png, checkpoints and final/.""")


UPTRAIN = _command(
    "uptrain", "uptrain_smollm2",
    "Convert + distil a pretrained model into a recursive one (configs: uptrain_smollm2).",
    "recursive-lm uptrain --config uptrain_smollm2:loops=2,init=average,rank=64,steps=50 "
    "--workdir runs/main")
TRAIN_EXITS = _command(
    "train-exits", "exit_smollm2",
    "Early-exit post-training of a recursive student (configs: exit_smollm2).",
    "recursive-lm train-exits --config exit_smollm2:loss=aggressive,c=0.1,steps=100")
TRAIN_MOR = _command(
    "train-mor", "mor_uptrain_smollm2",
    "Mixture-of-recursions uptraining (configs: mor_uptrain_smollm2).",
    "recursive-lm train-mor --config mor_uptrain_smollm2:router=expert,loops=3,steps=40")

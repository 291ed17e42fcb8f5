r"""Uptraining sweep: run a grid of config variants, then tabulate every run.

    python experiments/sweep.py --grid "loops=2,3;rank=0,64" --base "steps=200" \
      --workdir_root runs/sweep --name loops_rank
    python experiments/sweep.py --workdir_root runs/sweep --name loops_rank --collect_only

``--grid`` is ``key=v1,v2;key=v1,...`` over the variant keys of the config
(``experiments/configs/uptrain_smollm2.py``: loops, init, rank, steps, budget,
...); the sweep runs their Cartesian product, each merged over ``--base``
(grid values win). Run ``i`` lives in ``<workdir_root>/<run name>`` (the name
is the variant, e.g. ``loops-2_rank-64``) with a ``sweep.json`` recording its
variant and the command that started it.

Resume: a run whose ``summary.json`` says ``completed`` or ``time_budget`` is
skipped; any other (missing, ``preempted``) is (re)started, and the trainer
itself resumes from the run's latest checkpoint. Rerunning the same command
therefore continues an interrupted sweep.

Each run is one subprocess (``experiments/uptrain.py``) by default: every run
loads a teacher and a student and compiles its own train/eval steps, so in one
process the device buffers, compiled executables and jit caches of earlier
runs would pile up; a crash (OOM, non-finite loss) would take the whole sweep
down; and later runs would get warm caches, skewing the wall-time column. A
subprocess frees all of it on exit and a failed run is recorded and skipped.
``--inprocess`` calls ``trainer.train`` directly (handy for debugging).

Finally every ``<workdir_root>/*/summary.json`` is collected into
``results/<name>.json`` and the markdown table ``results/<name>.md`` (columns:
variant, loops, LoRA rank, unique params, tokens trained, wall time, teacher
ppl, student ppl at init and after uptraining, fraction of the NLL gap closed),
headed by the command that made it. ``--collect_only`` does just that.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
import time

from absl import app, flags, logging

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
flags.DEFINE_string("config", os.path.join(HERE, "configs", "uptrain_smollm2.py"),
                    "Config file with get_config(variant).")
flags.DEFINE_string("grid", "", "Axes 'key=v1,v2;key=v1,v2' (Cartesian product).")
flags.DEFINE_string("base", "", "Variant items shared by every run, e.g. 'steps=200'.")
flags.DEFINE_string("workdir_root", "runs/sweep", "One subfolder per run.")
flags.DEFINE_string("name", None, "Results name (default: basename of workdir_root).")
flags.DEFINE_string("results_dir", "results", "Where <name>.json / <name>.md go.")
flags.DEFINE_multi_string("override", [], "Extra '--config.x.y=value' flags for "
                          "every run, e.g. --override=--config.data.eval_batches=2.")
flags.DEFINE_bool("collect_only", False, "Only collect existing summaries.")
flags.DEFINE_bool("inprocess", False, "Run trainer.train in this process.")
flags.DEFINE_bool("dry_run", False, "Print the runs (and skips) without running.")

DONE_STATUSES = ("completed", "time_budget")
COLUMNS = ("variant", "loops", "LoRA rank", "unique params", "tokens trained",
           "wall time", "teacher ppl", "student ppl init", "student ppl after",
           "gap closed")


# --- grid ----------------------------------------------------------------------
def parse_items(text: str) -> dict[str, str]:
  """``"steps=200,lr=1e-4"`` -> ordered {key: value} (strings)."""
  out = {}
  for item in (text or "").split(","):
    item = item.strip()
    if not item:
      continue
    if "=" not in item:
      raise ValueError(f"variant item {item!r} is not key=value")
    k, v = (s.strip() for s in item.split("=", 1))
    if not k or not v:
      raise ValueError(f"variant item {item!r} needs a key and a value")
    out[k] = v
  return out


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
  """``"loops=2,3;rank=0,64"`` -> [("loops", ["2", "3"]), ("rank", ["0", "64"])]."""
  axes: list[tuple[str, list[str]]] = []
  for part in (text or "").split(";"):
    part = part.strip()
    if not part:
      continue
    if "=" not in part:
      raise ValueError(f"grid axis {part!r} is not key=v1,v2,...")
    key, vals = (s.strip() for s in part.split("=", 1))
    values = [v.strip() for v in vals.split(",") if v.strip()]
    if not key or not values:
      raise ValueError(f"grid axis {part!r} needs a key and at least one value")
    if key in dict(axes):
      raise ValueError(f"grid key {key!r} appears twice")
    if len(set(values)) != len(values):
      raise ValueError(f"grid axis {key!r} repeats a value: {values}")
    axes.append((key, values))
  return axes


def expand(grid: str, base: str = "") -> list[str]:
  """Variant strings of the product of ``grid`` over ``base`` (grid wins).

  Keys keep base order, then grid order; ``workdir`` is set by the sweep.
  """
  b, axes = parse_items(base), parse_grid(grid)
  if "workdir" in b or "workdir" in dict(axes):
    raise ValueError("'workdir' is set per run by the sweep (use --workdir_root)")
  out = []
  for combo in itertools.product(*[vals for _, vals in axes]):
    items = dict(b)
    items.update(zip([k for k, _ in axes], combo))
    out.append(",".join(f"{k}={v}" for k, v in items.items()))
  return out


def run_name(variant: str) -> str:
  """``"loops=2,rank=64"`` -> ``"loops-2_rank-64"`` (a safe folder name)."""
  name = "_".join(f"{k}-{v}" for k, v in parse_items(variant).items()) or "default"
  return "".join(c if c.isalnum() or c in "-_.+" else "~" for c in name)


def load_config_module(path: str):
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def read_summary(run_dir: str) -> dict | None:
  path = os.path.join(run_dir, "summary.json")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def is_done(run_dir: str) -> bool:
  s = read_summary(run_dir)
  return s is not None and s.get("status") in DONE_STATUSES


# --- running -------------------------------------------------------------------
def subprocess_runner(config_path: str, variant: str, run_dir: str,
                      overrides=()) -> int:
  """Runs ``experiments/uptrain.py`` for one variant; output to run_dir/sweep_log.txt."""
  cmd = [sys.executable, os.path.join(HERE, "uptrain.py"),
         f"--config={config_path}:{variant}", f"--workdir={run_dir}", *overrides]
  log = os.path.join(run_dir, "sweep_log.txt")
  logging.info("run: %s (log %s)", shlex.join(cmd), log)
  with open(log, "a", encoding="utf-8") as f:
    f.write(f"\n$ {shlex.join(cmd)}\n")
    f.flush()
    rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
  if rc:
    with open(log, encoding="utf-8", errors="replace") as f:
      tail = f.read()[-3000:]
    logging.error("run %s failed (exit %d); log tail:\n%s", run_dir, rc, tail)
  return rc


def inprocess_runner(config_path: str, variant: str, run_dir: str,
                     overrides=()) -> int:
  """``trainer.train(get_config(variant))`` in this process."""
  from recursive_lm.training.trainer import train  # pylint: disable=g-import-not-at-top
  cfg = load_config_module(config_path).get_config(variant)
  cfg.workdir = run_dir
  for o in overrides:
    key, _, value = o.lstrip("-").partition("=")
    if not key.startswith("config."):
      raise ValueError(f"override {o!r} is not --config.x.y=value")
    node, parts = cfg, key.split(".")[1:]
    for p in parts[:-1]:
      node = node[p]
    old = node[parts[-1]]
    if isinstance(old, str):
      node[parts[-1]] = value
    elif isinstance(old, bool):
      node[parts[-1]] = value.lower() in ("1", "true", "yes")
    else:  # numbers and placeholders (None): JSON literal, else the raw string
      try:
        node[parts[-1]] = json.loads(value)
      except json.JSONDecodeError:
        node[parts[-1]] = value
  train(cfg)
  return 0


def run_sweep(variants, root: str, runner, config_path: str, command: str,
              overrides=(), dry_run: bool = False) -> dict[str, str]:
  """Runs every variant not done yet; returns {variant: "skipped"|"ok"|"failed"}."""
  status = {}
  for i, variant in enumerate(variants):
    run_dir = os.path.join(root, run_name(variant))
    if is_done(run_dir):
      logging.info("[%d/%d] %s: done, skipped", i + 1, len(variants), variant)
      status[variant] = "skipped"
      continue
    logging.info("[%d/%d] %s -> %s", i + 1, len(variants), variant, run_dir)
    if dry_run:
      status[variant] = "dry_run"
      continue
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "sweep.json"), "w", encoding="utf-8") as f:
      json.dump({"variant": variant, "config": config_path, "command": command,
                 "overrides": list(overrides), "started": time.time()}, f, indent=2)
    try:
      rc = runner(config_path, variant, run_dir, overrides)
    except Exception:  # pylint: disable=broad-except
      logging.exception("run %s raised", variant)
      rc = 1
    status[variant] = "ok" if rc == 0 and read_summary(run_dir) else "failed"
  return status


# --- collecting ----------------------------------------------------------------
def _fmt_count(n) -> str:
  if n is None:
    return "–"
  for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if abs(n) >= div:
      return f"{n / div:.1f}{unit}"
  return str(int(n))


def _fmt_time(s) -> str:
  if s is None:
    return "–"
  s = int(round(s))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else \
      f"{s // 60}m{s % 60:02d}s"


def _fmt_num(x, digits=3) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def gap_closed(s: dict) -> float | None:
  """(nll_init - nll_final) / (nll_init - nll_teacher), from the summary."""
  if s.get("gap_closed_fraction_nll") is not None:
    return s["gap_closed_fraction_nll"]
  try:
    gap = s["student_nll_init"] - s["teacher_nll"]
    return (s["student_nll_init"] - s["student_nll_final"]) / gap if gap > 0 else None
  except (KeyError, TypeError):
    return None


def summarize_run(run_dir: str) -> dict | None:
  """One results row (plus the full summary) for a run folder, or None."""
  s = read_summary(run_dir)
  if s is None:
    return None
  meta = {}
  if os.path.isfile(os.path.join(run_dir, "sweep.json")):
    with open(os.path.join(run_dir, "sweep.json"), encoding="utf-8") as f:
      meta = json.load(f)
  conv = (s.get("config") or {}).get("convert", {})
  return {
      "variant": meta.get("variant", os.path.basename(run_dir.rstrip(os.sep))),
      "run_dir": run_dir, "status": s.get("status"),
      "loops": conv.get("loops", (s.get("student") or {}).get("plan", {}).get("loops")),
      "lora_rank": conv.get("lora_rank"),
      "unique_params": (s.get("student") or {}).get("unique_params"),
      "tokens_trained": s.get("tokens_trained"), "wall_time_s": s.get("wall_time_s"),
      "teacher_ppl": s.get("teacher_ppl"), "student_ppl_init": s.get("student_ppl_init"),
      "student_ppl_final": s.get("student_ppl_final"), "gap_closed": gap_closed(s),
      "command": meta.get("command"), "summary": s,
  }


def collect(root: str) -> list[dict]:
  """Rows for every ``<root>/*/summary.json``, sorted by loops, rank, variant."""
  rows = []
  if os.path.isdir(root):
    for d in sorted(os.listdir(root)):
      r = summarize_run(os.path.join(root, d))
      if r is not None:
        rows.append(r)
  key = lambda r: (r["loops"] if r["loops"] is not None else 1 << 30,
                   r["lora_rank"] if r["lora_rank"] is not None else 1 << 30,
                   r["variant"])
  return sorted(rows, key=key)


def markdown_table(rows: list[dict], command: str) -> str:
  """The results table, headed by ``command`` and the sweep commands of the runs."""
  lines = [f"Made by: `{command}`", ""]
  sweeps = sorted({r["command"] for r in rows if r.get("command")} - {command})
  if sweeps:
    lines += ["Runs launched by: " + "; ".join(f"`{c}`" for c in sweeps), ""]
  lines += ["| " + " | ".join(COLUMNS) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
  for r in rows:
    variant = r["variant"] + ("" if r["status"] in DONE_STATUSES
                              else f" ({r['status']})")
    cells = [f"`{variant}`", str(r["loops"] if r["loops"] is not None else "–"),
             str(r["lora_rank"] if r["lora_rank"] is not None else "–"),
             _fmt_count(r["unique_params"]), _fmt_count(r["tokens_trained"]),
             _fmt_time(r["wall_time_s"]), _fmt_num(r["teacher_ppl"]),
             _fmt_num(r["student_ppl_init"]), _fmt_num(r["student_ppl_final"]),
             _fmt_num(r["gap_closed"], 2)]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Perplexities are on the held-out split of the run's data; gap closed "
            "= (NLL_init - NLL_after) / (NLL_init - NLL_teacher)."]
  return "\n".join(lines) + "\n"


def write_results(rows, name: str, results_dir: str, command: str) -> tuple[str, str]:
  os.makedirs(results_dir, exist_ok=True)
  js, md = (os.path.join(results_dir, f"{name}.{e}") for e in ("json", "md"))
  with open(js, "w", encoding="utf-8") as f:
    json.dump({"command": command, "runs": rows}, f, indent=2, default=str)
  with open(md, "w", encoding="utf-8") as f:
    f.write(markdown_table(rows, command))
  return js, md


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  command = "python " + shlex.join(["experiments/sweep.py"] + sys.argv[1:])
  root = FLAGS.workdir_root
  name = FLAGS.name or os.path.basename(os.path.normpath(root))
  failed = []
  if not FLAGS.collect_only:
    if not FLAGS.grid and not FLAGS.base:
      raise app.UsageError("give --grid (and/or --base), or --collect_only")
    variants = expand(FLAGS.grid, FLAGS.base)
    mod = load_config_module(FLAGS.config)
    for v in variants:  # fail fast on a bad key or value, before any run starts
      mod.get_config(v)
    runner = inprocess_runner if FLAGS.inprocess else subprocess_runner
    status = run_sweep(variants, root, runner, os.path.abspath(FLAGS.config), command,
                       FLAGS.override, FLAGS.dry_run)
    failed = [v for v, s in status.items() if s == "failed"]
    print("\n".join(f"{s:8s} {v}" for v, s in status.items()))
    if FLAGS.dry_run:
      return 0
  rows = collect(root)
  js, md = write_results(rows, name, FLAGS.results_dir, command)
  with open(md, encoding="utf-8") as f:
    print(f.read())
  print(f"wrote {js} and {md} ({len(rows)} runs)")
  if failed:
    print(f"{len(failed)} run(s) failed: {failed}; see sweep_log.txt in their folders",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)

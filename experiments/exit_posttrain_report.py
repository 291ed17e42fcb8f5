r"""Writes results/exit_posttrain.{json,md} from an exit post-training run's
summary.json (experiments/configs/exit_smollm2.py).

  python experiments/exit_posttrain_report.py --workdir runs/exit/aggressive_c-0.1_self_kd-1.0 \
    --command "python experiments/uptrain.py --config ..." --out results/exit_posttrain
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re


def exit_rows(s: dict) -> list[dict]:
  layers = sorted({int(m.group(1)) for k in s for m in [re.match(r"exit(\d+)_ppl_init$", k)]
                   if m})
  rows = []
  for c in layers:
    row = {"exit_layers": c}
    for q in ("ppl", "nll", "acc", "agree"):
      for when in ("init", "final"):
        row[f"{q}_{when}"] = s.get(f"exit{c}_{q}_{when}")
    rows.append(row)
  return rows


def to_markdown(rep: dict) -> str:
  s = rep["summary"]
  lines = [
      "# Early-exit post-training (RRT §3.7) of the uptrained recursive SmolLM2",
      "",
      f"Date: {rep['date']}. Command:",
      "",
      f"    {rep['command']}",
      "",
      f"Student: `{rep['init_from']}` ({s['student']['name']}, plan "
      f"{s['student']['plan']}); objective `{rep['exit_config']}`; teacher KD on the "
      f"final exit weight {rep['teacher_kd']}.",
      f"Steps {s['final_step']} x {rep['tokens_per_step']} tokens "
      f"({s['tokens_trained']} tokens), wall {s['wall_time_s']:.0f} s "
      f"(train loop {s['train_loop_wall_s']:.0f} s, median step "
      f"{s['train_step_time_s_median']:.2f} s), status {s['status']}.",
      f"Held-out: {rep['eval_tokens']} target tokens of the pydoc validation split "
      f"(teacher SmolLM2-135M ppl {s['teacher_ppl']:.2f}).",
      "",
      "| exit (layers) | ppl before | ppl after | acc before | acc after | "
      "agree w/ final before | agree w/ final after |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rep["exits"]:
    lines.append(
        f"| {r['exit_layers']} | {r['ppl_init']:.2f} | {r['ppl_final']:.2f} | "
        f"{r['acc_init']:.3f} | {r['acc_final']:.3f} | {r['agree_init']:.3f} | "
        f"{r['agree_final']:.3f} |")
  lines += ["", "agree = fraction of held-out positions where the exit's greedy token "
            "equals the final exit's (the first row is the first-exit / final-exit "
            "agreement). acc = greedy token equals the target.", ""]
  if rep.get("notes"):
    lines += [rep["notes"], ""]
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--command", required=True)
  ap.add_argument("--out", default="results/exit_posttrain")
  ap.add_argument("--notes", default="")
  args = ap.parse_args()
  s = json.load(open(os.path.join(args.workdir, "summary.json")))
  cfg = s["config"]
  rep = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "command": args.command, "workdir": args.workdir,
      "init_from": cfg.get("init_from") or "fresh conversion",
      "exit_config": cfg["loss"]["exit"], "teacher_kd": cfg["loss"]["kd_weight"],
      "tokens_per_step": cfg["data"]["batch_size"] * cfg["data"]["seq_len"],
      "eval_tokens": f"{cfg['data']['eval_batches']} batches of "
                     f"{cfg['data']['batch_size']}x{cfg['data']['seq_len']}",
      "final_dir": s.get("final_dir"), "exits": exit_rows(s), "notes": args.notes,
      "summary": {k: v for k, v in s.items() if k != "config"},
  }
  with open(args.out + ".json", "w", encoding="utf-8") as f:
    json.dump(rep, f, indent=2, default=str)
    f.write("\n")
  with open(args.out + ".md", "w", encoding="utf-8") as f:
    f.write(to_markdown(rep))
  print(to_markdown(rep))


if __name__ == "__main__":
  main()

"""experiments/sweep.py: grid parsing, resume/skip logic, collecting the table."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "sweep.py")


@pytest.fixture(scope="module")
def sweep():
  spec = importlib.util.spec_from_file_location("sweep_under_test", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)  # defines absl flags once for this module
  return mod


def test_grid_parsing(sweep):
  assert sweep.parse_grid("loops=2,3;rank=0,64") == [("loops", ["2", "3"]),
                                                     ("rank", ["0", "64"])]
  assert sweep.parse_grid(" loops = 2 ; ") == [("loops", ["2"])]
  assert sweep.expand("loops=2,3;rank=0,64", "steps=200") == [
      "steps=200,loops=2,rank=0", "steps=200,loops=2,rank=64",
      "steps=200,loops=3,rank=0", "steps=200,loops=3,rank=64"]
  # Grid values win over base values; base alone is one run.
  assert sweep.expand("steps=5,10", "steps=200,loops=2") == [
      "steps=5,loops=2", "steps=10,loops=2"]
  assert sweep.expand("", "steps=3") == ["steps=3"]
  for bad, msg in [("loops", "not key=v1"), ("loops=", "at least one value"),
                   ("loops=2;loops=3", "appears twice"), ("rank=0,0", "repeats")]:
    with pytest.raises(ValueError, match=msg):
      sweep.parse_grid(bad)
  with pytest.raises(ValueError, match="workdir"):
    sweep.expand("workdir=a,b")
  with pytest.raises(ValueError, match="not key=value"):
    sweep.expand("loops=2", "steps")
  assert sweep.run_name("loops=2,rank=64,lr=1e-4") == "loops-2_rank-64_lr-1e-4"
  assert sweep.run_name("workdir=/x y") == "workdir-~x~y"


def test_grid_variants_are_valid_configs(sweep):
  mod = sweep.load_config_module(os.path.join(ROOT, "experiments", "configs",
                                               "uptrain_smollm2.py"))
  for v in sweep.expand("loops=2,3;rank=0,64", "steps=200,budget=900"):
    c = mod.get_config(v)
    assert c.train.steps == 200 and c.convert.loops in (2, 3)
  with pytest.raises(ValueError):
    mod.get_config(sweep.expand("nonsense=1")[0])


def _summary(loops, rank, status="completed", **kw):
  s = {"status": status, "config": {"convert": {"loops": loops, "lora_rank": rank}},
       "student": {"unique_params": 81_000_000 + rank * 1000, "plan": {"loops": loops}},
       "tokens_trained": 409_600, "wall_time_s": 754.2, "teacher_ppl": 9.5,
       "teacher_nll": 2.2513, "student_ppl_init": 60.0, "student_nll_init": 4.0943,
       "student_ppl_final": 20.0, "student_nll_final": 2.9957,
       "gap_closed_fraction_nll": 0.596}
  s.update(kw)
  return s


def test_run_sweep_skips_done_runs(sweep, tmp_path):
  calls = []

  def fake_runner(config_path, variant, run_dir, overrides):
    calls.append(variant)
    assert json.load(open(os.path.join(run_dir, "sweep.json")))["variant"] == variant
    if "rank=64" in variant and "loops=3" in variant:
      return 1  # a crashed run writes no summary
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
      json.dump(_summary(2, 0), f)
    return 0

  root = str(tmp_path / "sweep")
  variants = sweep.expand("loops=2,3;rank=0,64", "steps=2")
  st = sweep.run_sweep(variants, root, fake_runner, "cfg.py", "python sweep")
  assert calls == variants
  assert list(st.values()) == ["ok", "ok", "ok", "failed"]
  # Resume: only the failed run is retried; a preempted run is retried too.
  pre = os.path.join(root, sweep.run_name(variants[0]), "summary.json")
  with open(pre, "w") as f:
    json.dump(_summary(2, 0, status="preempted"), f)
  calls.clear()
  st = sweep.run_sweep(variants, root, fake_runner, "cfg.py", "python sweep")
  assert calls == [variants[0], variants[3]]
  assert st[variants[1]] == st[variants[2]] == "skipped"
  calls.clear()
  st = sweep.run_sweep(variants, root, fake_runner, "cfg.py", "x", dry_run=True)
  assert calls == [] and st[variants[3]] == "dry_run"


def test_collect_only_writes_table(tmp_path):
  root = tmp_path / "runs" / "sweep"
  specs = {"steps-2_loops-3_rank-64": _summary(3, 64),
           "steps-2_loops-2_rank-0": _summary(2, 0, wall_time_s=4000.0),
           # no gap field: computed from the NLLs
           "steps-2_loops-2_rank-64": _summary(2, 64, gap_closed_fraction_nll=None),
           "steps-2_loops-3_rank-0": _summary(3, 0, status="preempted",
                                              student_ppl_final=None,
                                              student_nll_final=None,
                                              gap_closed_fraction_nll=None)}
  for name, s in specs.items():
    os.makedirs(root / name)
    (root / name / "summary.json").write_text(json.dumps(s))
  (root / "steps-2_loops-2_rank-0" / "sweep.json").write_text(json.dumps(
      {"variant": "steps=2,loops=2,rank=0", "command": "python experiments/sweep.py "
       "--grid 'loops=2,3;rank=0,64' --base steps=2"}))
  os.makedirs(root / "not_a_run")  # ignored: no summary.json
  res = tmp_path / "results"
  out = subprocess.run(
      [sys.executable, SCRIPT, "--collect_only", f"--workdir_root={root}",
       f"--results_dir={res}", "--name=demo"],
      capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
  assert out.returncode == 0, out.stderr
  md = (res / "demo.md").read_text()
  lines = md.splitlines()
  assert lines[0].startswith("Made by: `python experiments/sweep.py --collect_only")
  assert "Runs launched by: `python experiments/sweep.py --grid 'loops=2,3;rank=0,64'" \
      in md
  header = next(l for l in lines if l.startswith("| variant"))
  assert header == ("| variant | loops | LoRA rank | unique params | tokens trained | "
                    "wall time | teacher ppl | student ppl init | student ppl after | "
                    "gap closed |")
  rows = [l for l in lines if l.startswith("| `")]
  assert len(rows) == 4
  assert rows[0] == ("| `steps=2,loops=2,rank=0` | 2 | 0 | 81.0M | 409.6k | 1h06m | "
                     "9.500 | 60.000 | 20.000 | 0.60 |")
  assert rows[1].startswith("| `steps-2_loops-2_rank-64` | 2 | 64 | 81.1M |")
  assert rows[1].endswith("| 12m34s | 9.500 | 60.000 | 20.000 | 0.60 |")
  assert "(preempted)" in rows[2] and rows[2].endswith("| – | – |")
  assert rows[3].startswith("| `steps-2_loops-3_rank-64` | 3 | 64 |")
  data = json.loads((res / "demo.json").read_text())
  assert data["command"] == lines[0][len("Made by: `"):-1]
  assert [r["loops"] for r in data["runs"]] == [2, 2, 3, 3]
  assert data["runs"][0]["summary"]["teacher_ppl"] == 9.5
  assert "wrote" in out.stdout and "(4 runs)" in out.stdout


def test_cli_requires_a_grid(tmp_path):
  out = subprocess.run([sys.executable, SCRIPT, f"--workdir_root={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "--grid" in out.stderr


def test_real_sweep_on_tiny_model(tmp_path):
  """End to end on tests/fixtures/tiny_llama: 2 subprocess runs, then a resumed
  sweep with one more grid value run in-process (the first two are skipped)."""
  root, res = tmp_path / "sw", tmp_path / "res"
  common = [f"--workdir_root={root}", f"--results_dir={res}", "--name=tiny",
            "--base=loops=2,steps=2,seq_len=32,batch=8",
            "--override=--config.model=" + os.path.join(ROOT, "tests", "fixtures",
                                                        "tiny_llama"),
            "--override=--config.data.encode=bytes",
            "--override=--config.data.eval_batches=1",
            "--override=--config.train.peak_matmul_size=0"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = lambda *a: subprocess.run([sys.executable, SCRIPT, *common, *a], env=env,
                                  capture_output=True, text=True, timeout=600,
                                  cwd=ROOT)
  r = run("--grid=rank=0,4")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  assert r.stdout.count("ok ") == 2
  r = run("--grid=rank=0,4,8", "--inprocess")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  assert r.stdout.count("skipped") == 2 and r.stdout.count("ok ") == 1
  data = json.loads((res / "tiny.json").read_text())
  assert [x["lora_rank"] for x in data["runs"]] == [0, 4, 8]
  for x in data["runs"]:
    assert x["status"] == "completed" and x["tokens_trained"] == 2 * 8 * 32
    assert x["summary"]["config"]["model"].endswith("tiny_llama")  # override applied
  md = (res / "tiny.md").read_text()
  assert md.startswith("Made by: `python experiments/sweep.py --workdir_root=")
  assert "Runs launched by: `python experiments/sweep.py" in md
  assert md.count("| `loops=2,steps=2,seq_len=32,batch=8,rank=") == 3

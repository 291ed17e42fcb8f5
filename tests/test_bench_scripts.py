"""Benchmark scripts stay runnable: each runs end to end in its smoke mode
(tiny random model) and writes its tables. No timing is asserted."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, tmp):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args,
                      f"--out={tmp}"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def test_bench_early_exit_quick(tmp_path):
  _run("bench_early_exit.py", "--quick", tmp=tmp_path)
  res = json.loads((tmp_path / "bench_early_exit.json").read_text())
  methods = {r["method"] for r in res["engines"]}
  assert {"FREE", "CALM", "full depth (Engine)"} <= methods
  # Never exiting reproduces full-depth greedy decoding.
  for r in res["engines"]:
    if r["threshold"] == float("inf"):
      assert r["agreement"] == 1.0
  assert all(r["identical_to_greedy"] for r in res["speculative"])
  assert {r["batching"] for r in res["batching"]} == {"depth-wise", "sequence-wise"}
  assert (tmp_path / "early_exit_pareto.png").stat().st_size > 0
  assert "| FREE |" in (tmp_path / "bench_early_exit.md").read_text()


def test_gpu_bench_tiny_on_cpu(tmp_path):
  _run("gpu_bench.py", "--tiny", "--batches=1", "--new_tokens=4", "--nopeer",
       tmp=tmp_path)
  res = json.loads((tmp_path / "gpu_bench.json").read_text())
  assert res["roofline"]["copy_bandwidth"] > 0
  assert len(res["decode"]) == 2 and len(res["train"]["rows"]) == 4
  assert res["engines"][0]["engine"] == "full depth (Engine)"


def test_profile_decode_tiny(tmp_path):
  r = _run("profile_decode.py", "--tiny", "--new_tokens=4", "--layout=in_out", tmp=tmp_path)
  assert "by op kind" in r.stdout
  res = json.loads((tmp_path / "profile_decode.json").read_text())
  assert res["ops"] and res["busy_ms_per_step"] > 0

"""The ``recursive-lm`` command line: help, per-command flags, one-line errors.

Bad inputs run through ``python -m recursive_lm`` in a subprocess and must
exit with status 2 and print exactly one line (naming the problem and the fix),
no traceback, before any model is loaded. Conversion/export/eval/uptrain run
in-process on the tiny fixture model.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from recursive_lm import cli
from recursive_lm.checkpoints import load_checkpoint
from recursive_lm.cli import core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny_llama")


def rlm(*args, env=None, timeout=120):
  e = dict(os.environ)
  e["RECURSIVE_LM_COMPILE_CACHE"] = "0"
  e.update(env or {})
  e.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "recursive_lm", *args], cwd=ROOT, env=e,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad")
  (d / "random.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
  (d / "empty.txt").write_text("")
  run = d / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "summary.json").write_text("{}")
  return d


BAD_INPUTS = {
    "missing model file": (["generate", "--model", "{d}/missing.gguf", "--prompt", "hi"],
                           "not found"),
    "random bytes as gguf": (["generate", "--model", "{d}/random.gguf", "--prompt", "hi"],
                             "not a GGUF file"),
    "empty text file": (["score", "--text_file", "{d}/empty.txt"], "is empty"),
    "max_new_tokens -5": (["generate", "--max_new_tokens=-5", "--prompt", "hi"],
                          "--max_new_tokens must be >= 1"),
    "top_p 2": (["generate", "--top_p", "2", "--nogreedy", "--prompt", "hi"],
                "--top_p must be in (0, 1]"),
    "window -1": (["score", "--window=-1", "--text_file", "{d}/empty.txt"],
                  "--window must be >= 1"),
    "run folder without final": (["generate", "--model", "{d}/run", "--prompt", "hi"],
                                 "training run folder without a final model"),
    "flag of another command": (["generate", "--text_file", "x.txt", "--prompt", "hi"],
                                "--text_file is a flag of 'recursive-lm score"),
    "flag of another command (score)": (["score", "--max_new_tokens", "3"],
                                        "--max_new_tokens is a flag of"),
    "unknown flag": (["generate", "--no_such_flag=1"], "has no flag --no_such_flag"),
    "positional argument": (["generate", "Once", "upon"], "unexpected argument"),
    "no prompt": (["generate"], "generate needs a prompt"),
    "unknown command": (["frobnicate"], "unknown command 'frobnicate'"),
    "bad config variant": (["uptrain", "--config", "uptrain_smollm2:loops=0"],
                           "loops=0: the shared block must run at least once"),
    "unknown config": (["uptrain", "--config", "nope:steps=2"],
                       "neither a packaged config"),
    "exclusive decoders": (["generate", "--speculative", "--early_exit", "calm",
                            "--prompt", "x"], "exclude each other"),
    "bad threshold": (["generate", "--early_exit", "free", "--threshold", "2",
                       "--prompt", "x"], "--threshold must be a number in (0, 1]"),
    "unknown weight format": (["generate", "--weights", "fp8", "--prompt", "x"],
                              "--weights"),
    "missing task file": (["eval", "--tasks", "{d}/nope.jsonl"], "not found"),
    "convert without out": (["convert"], "needs --out"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case, bad_files):
  args, expected = BAD_INPUTS[case]
  r = rlm(*[a.format(d=bad_files) for a in args])
  assert r.returncode == 2, (r.stdout, r.stderr)
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  assert "Traceback" not in r.stderr and r.stdout == ""
  assert expected in lines[0], lines[0]
  assert "error:" in lines[0]


def test_debug_shows_the_traceback(bad_files):
  r = rlm("generate", "--model", f"{bad_files}/random.gguf", "--prompt", "hi", "--debug")
  assert r.returncode == 2
  assert "Traceback" in r.stderr and "not a GGUF file" in r.stderr.strip().splitlines()[-1]


def test_main_help_lists_commands_one_line_each():
  r = rlm("--help")
  assert r.returncode == 0
  for c in cli.COMMANDS:
    line = [l for l in r.stdout.splitlines() if l.startswith(f"  {c.name} ")]
    assert len(line) == 1 and c.summary in line[0]
  assert rlm().returncode == 2  # no command: the list, status 2


def test_command_help_lists_only_its_flags():
  gen = rlm("generate", "--help")
  assert gen.returncode == 0 and gen.stdout.startswith("usage: recursive-lm generate")
  for flag in ("--prompt", "--max_new_tokens", "--top_p", "--early_exit", "--speculative",
               "--debug", "--compile_cache"):
    assert f"  {flag}" in gen.stdout
  for other in ("--text_file", "--window", "--loops", "--tasks", "--workdir"):
    assert f"  {other}" not in gen.stdout
  assert len(gen.stdout.splitlines()) < 90
  score = rlm("score", "--help")
  assert "  --window" in score.stdout and "  --prompt" not in score.stdout
  up = rlm("uptrain", "--help")
  assert "  --config" in up.stdout and "uptrain_smollm2" in up.stdout


def test_console_script_declared():
  with open(os.path.join(ROOT, "pyproject.toml")) as f:
    text = f.read()
  assert 'recursive-lm = "recursive_lm.cli:run"' in text


def test_every_command_has_separate_flags():
  names = [set(core.flag_values(c)) for c in cli.COMMANDS]
  common = {"debug", "compile_cache", "verbose"}
  for c, fl in zip(cli.COMMANDS, names):
    assert common <= fl, c.name
  gen = names[0]
  assert "text_file" not in gen and "prompt" in gen


# -- commands on the tiny model (in-process) ------------------------------------------
pytestmark = pytest.mark.usefixtures("fast_compile")


def main(*args):
  os.environ["RECURSIVE_LM_COMPILE_CACHE"] = "0"
  return cli.main(["recursive-lm", *args])


def test_convert_then_export(tmp_path, capsys):
  out = tmp_path / "rrt"
  assert main("convert", "--model", TINY, "--loops", "2", "--rank", "4", "--out",
              str(out)) == 0
  assert "wrote" in capsys.readouterr().out
  from recursive_lm import api  # pylint: disable=g-import-not-at-top
  m = api.load(str(out), compile_cache=False)
  assert m.cfg.plan.loops == 2 and m.cfg.plan.effective_depth == 4
  assert main("convert", "--model", TINY, "--out", str(out)) == 2  # not empty
  assert "--overwrite" in capsys.readouterr().err
  # Unrolled HF export in bf16, two shards; loads back with the same depth.
  hf = tmp_path / "hf"
  assert main("export", "--model", str(out), "--out", str(hf), "--dtype", "bfloat16",
              "--max_shard_gb", "0.00001") == 0
  files = sorted(os.listdir(hf))
  assert "model.safetensors.index.json" in files and "model.safetensors" not in files
  with open(hf / "config.json") as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  ck = load_checkpoint(str(hf))
  assert ck.config.plan.effective_depth == 4
  ref = tmp_path / "hf32"
  assert main("export", "--model", str(out), "--out", str(ref)) == 0
  ck32 = load_checkpoint(str(ref))
  for k, v in ck32.weights.items():  # bf16 = f32 rounded to 8 mantissa bits
    np.testing.assert_allclose(ck.weights[k], v, rtol=2 ** -8, atol=1e-30)
  nat = tmp_path / "native"
  assert main("export", "--model", str(out), "--format", "native", "--out", str(nat)) == 0
  assert api.load(str(nat), compile_cache=False).cfg.plan.loops == 2


def test_eval_perplexity_of_text_and_no_tokenizer_error(tmp_path, capsys):
  text = tmp_path / "t.txt"
  text.write_text("the cat sat on the mat")
  # The tiny HF fixture has no tokenizer: one line after loading, status 2.
  assert main("score", "--model", TINY, "--text_file", str(text)) == 2
  assert "has no tokenizer" in capsys.readouterr().err


def test_uptrain_from_packaged_config(tmp_path, capsys):
  rng = np.random.default_rng(0)
  words = "the cat sat on a mat while dogs ran in the park".split()
  corpus = tmp_path / "docs.jsonl"
  with open(corpus, "w") as f:
    for _ in range(100):
      f.write(json.dumps({"text": " ".join(rng.choice(words, 30))}) + "\n")
  run = tmp_path / "run"
  rc = main("uptrain", "--config", "uptrain_smollm2:loops=2,steps=2,seq_len=32,batch=8",
            f"--config.model={TINY}", f"--config.data.source={corpus}",
            "--config.data.encode=bytes", "--config.data.eval_batches=1",
            "--config.train.peak_matmul_size=128", "--workdir", str(run))
  assert rc == 0
  out = capsys.readouterr().out
  assert "student ppl final" in out and "final model" in out
  from recursive_lm import api  # pylint: disable=g-import-not-at-top
  assert api.resolve_model_path(str(run)) == str(run / "final")


@pytest.mark.slow
def test_generate_twice_second_process_hits_the_compile_cache(tmp_path):
  """The embedded model: the second process compiles nothing (cache hits)."""
  env = {"RECURSIVE_LM_COMPILE_CACHE": str(tmp_path / "jax")}
  logs = []
  for _ in range(2):
    r = rlm("generate", "--prompt", "The capital of Germany is", "--max_new_tokens", "8",
            "--json", env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert "Berlin" in res["texts"][0]
    logs.append((res, r.stderr))
  assert logs[0][0]["compile"]["misses"] > 0
  assert logs[1][0]["compile"]["misses"] == 0 and logs[1][0]["compile"]["hits"] >= 2
  assert "0 misses" in logs[1][1] and "tokens/s decode" in logs[1][1]


# -- generate / score / eval / bench on a tiny model with SmolLM2's tokenizer ---------
@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
  """A random 2-loop model (d 32) with the embedded checkpoint's real tokenizer."""
  from recursive_lm import export  # pylint: disable=g-import-not-at-top
  from recursive_lm.checkpoints.gguf_file import _open_reader, tokenizer_from_gguf  # pylint: disable=g-import-not-at-top
  from recursive_lm.checkpoints.presets import resolve_preset  # pylint: disable=g-import-not-at-top
  from recursive_lm.config import DepthPlan, tiny_config  # pylint: disable=g-import-not-at-top
  from recursive_lm.nn.model import init_params  # pylint: disable=g-import-not-at-top
  tok = tokenizer_from_gguf(_open_reader(resolve_preset("smollm2-135m")))
  cfg = tiny_config(vocab_size=49152, plan=DepthPlan(block=2, loops=2), max_seq_len=256,
                    bos_id=1, eos_id=2, pad_id=2)
  folder = tmp_path_factory.mktemp("tiny_tok") / "model"
  export.save_model(folder, cfg, init_params(cfg, seed=0), tok)
  return str(folder)


@pytest.mark.parametrize("decoder", [[], ["--early_exit", "calm", "--threshold", "0.5"],
                                     ["--early_exit", "free"],
                                     ["--speculative", "--draft_loops", "1"],
                                     ["--weights", "bf16"],
                                     ["--weights", "bf16", "--early_exit", "free"]])
def test_generate_json(tiny_with_tokenizer, capsys, decoder):
  assert main("generate", "--model", tiny_with_tokenizer, "--prompt", "Hello there",
              "--prompt", "Once", "--max_new_tokens", "5", "--json", *decoder) == 0
  cap = capsys.readouterr()
  res = json.loads(cap.out)
  assert len(res["texts"]) == 2 and res["new_tokens"] >= 2
  assert res["decode_tokens_per_s"] > 0 and res["decode_compile_seconds"] >= 0
  assert "tokens/s decode" in cap.err and "compile cache off" in cap.err


def test_generate_str_output_and_prompt_file(tiny_with_tokenizer, tmp_path, capsys):
  pf = tmp_path / "prompts.txt"
  pf.write_text("Hello\n\nWorld\n")
  assert main("generate", "--model", tiny_with_tokenizer, "--prompt_file", str(pf),
              "--max_new_tokens", "3", "--chat") == 0
  out = capsys.readouterr().out
  assert "### Hello" in out and "### World" in out
  # Past max_seq_len: one line after loading, naming the flag to lower.
  assert main("generate", "--model", tiny_with_tokenizer, "--prompt", "Hi",
              "--max_new_tokens", "400") == 2
  assert "--max_new_tokens" in capsys.readouterr().err


def test_score_eval_bench(tiny_with_tokenizer, tmp_path, capsys):
  text = tmp_path / "t.txt"
  text.write_text("The cat sat on the mat. " * 20)
  assert main("score", "--model", tiny_with_tokenizer, "--text_file", str(text),
              "--window", "32", "--json") == 0
  r = json.loads(capsys.readouterr().out)
  assert r["n_tokens"] > 32 and r["ppl"] > 1
  tasks = os.path.join(ROOT, "experiments", "tasks", "*.jsonl")
  assert main("eval", "--model", tiny_with_tokenizer, "--tasks", tasks, "--limit", "2",
              "--k_shot", "0", "--text_file", str(text), "--perplexity", "pydoc",
              "--seq_len", "32", "--eval_batches", "1", "--batch_size", "2", "--json") == 0
  r = json.loads(capsys.readouterr().out)
  assert set(r["tasks"]) == {"capitals", "python_facts"} and r["text_file"]["ppl"] > 1
  assert r["perplexity"]["n_tokens"] > 0 and r["perplexity"]["data"] == "pydoc"
  assert main("bench", "--model", tiny_with_tokenizer, "--batch", "2", "--prompt_len", "8",
              "--max_new_tokens", "4", "--runs", "2", "--output",
              str(tmp_path / "b.json")) == 0
  r = json.loads(capsys.readouterr().out)
  assert r["median_decode_tokens_per_s"] > 0 and len(r["runs"]) == 2
  assert json.loads((tmp_path / "b.json").read_text())["batch"] == 2


def test_speculative_with_a_mismatched_exit_artifact_is_one_line_error(tiny_with_tokenizer,
                                                                       capsys):
  """--speculative asked explicitly never falls back to plain decoding: the shipped
  artifact was made for SmolLM2-135M, not this tiny model."""
  assert main("generate", "--model", tiny_with_tokenizer, "--prompt", "Hi",
              "--speculative", "--max_new_tokens", "3") == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]   # after the "loaded ..." log line: the one error line
  assert "artifact" in last and "train_exits" in last
  assert main("generate", "--model", tiny_with_tokenizer, "--prompt", "Hi",
              "--speculative", "--nogreedy", "--max_new_tokens", "3") == 2
  assert "greedy only" in capsys.readouterr().err

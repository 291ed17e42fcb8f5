"""Evaluation: held-out perplexity, few-shot multiple-choice scoring, task files."""
import glob
import json
import math
import os

import jax
import numpy as np
import pytest

from recursive_lm import evaluation as E
from recursive_lm.config import tiny_config
from recursive_lm.data import TextSource, eval_batches
from recursive_lm.nn.model import Transformer, init_params
from toy_tokenizer import ToyTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest: XLA optimisations off



CFG = tiny_config(max_seq_len=128)
PARAMS = init_params(CFG, seed=3)
TOK = ToyTokenizer()


def _examples():
  return [
      E.MCExample("Q1:", ("ab", "cde", "f"), 0),
      E.MCExample("Q2:", ("gh", "i"), 1),
      E.MCExample("Q3: a much longer question text?", ("jkl", "m", "nop", "q"), 2),
      E.MCExample("Q4:", ("rs", "tu"), 0),
      E.MCExample("Q5:", ("vw", "xyz", "é"), 2),
  ]


@jax.jit
def _forward_logp(params, toks):
  logits = Transformer(CFG).apply({"params": params}, toks)["logits"]
  return jax.nn.log_softmax(logits.astype(np.float32), axis=-1)


def _direct_ll(ctx, cont):
  """Sum log p(cont | ctx) from one unpadded full forward pass."""
  toks = np.asarray([list(ctx) + list(cont)], np.int32)
  logp = np.asarray(_forward_logp(PARAMS, toks))[0]
  n = len(ctx)
  return float(sum(logp[n - 1 + j, t] for j, t in enumerate(cont)))


def test_scorer_matches_direct_forward():
  ex = _examples()
  reqs = E.build_requests(ex, TOK, k_shot=2, seed=0, max_len=CFG.max_seq_len)
  assert len(reqs) == sum(len(e.choices) for e in ex)
  # batch_size 4 -> several batches, padded rows and two length buckets.
  lls, greedy = E.score_requests(CFG, PARAMS, reqs, batch_size=4, pad_id=0,
                                 buckets=(16, 32, 64, 128))
  assert len({E._bucket(len(r.context) + len(r.continuation), (16, 32, 64, 128))
              for r in reqs}) >= 2
  for r, ll in zip(reqs, lls):
    assert r.continuation == tuple(TOK.encode(" " + ex[r.example].choices[r.choice]))
    np.testing.assert_allclose(ll, _direct_ll(r.context, r.continuation), rtol=1e-5,
                               atol=1e-4)
  assert greedy.dtype == bool and greedy.shape == lls.shape
  # A token cap shrinks the rows of long buckets; the scores do not change.
  lls2, _ = E.score_requests(CFG, PARAMS, reqs, batch_size=4, pad_id=0,
                             buckets=(16, 32, 64, 128), max_batch_tokens=64)
  np.testing.assert_allclose(lls2, lls, rtol=1e-5, atol=1e-5)
  # The compiled scorer is cached per config (one jit, reused across calls).
  assert E._jitted_scorer(CFG) is E._jitted_scorer(CFG)


def test_acc_and_acc_norm():
  ex = [E.MCExample("a", ("x", "yyyy"), 1),       # raw: x wins; per byte: yyyy
        E.MCExample("b", ("é", "zz", "w"), 0),     # é is 2 bytes
        E.MCExample("c", ("p", "q"), 0)]
  reqs = [E.Request(i, c, (1,), (2,)) for i, e in enumerate(ex)
          for c in range(len(e.choices))]
  lls = np.array([-2.0, -4.0,          # acc wrong, acc_norm right
                  -3.0, -3.5, -2.0,    # raw: w (wrong); norm: -1.5, -1.75, -2 -> é
                  -1.0, -5.0])         # both right
  m = E.mc_metrics(ex, reqs, lls)
  assert m["n"] == 3 and m["predictions"] == [0, 2, 0]
  assert m["acc"] == pytest.approx(1 / 3)
  assert m["acc_norm"] == pytest.approx(1.0)


def test_fewshot_never_includes_the_example():
  ex = [E.MCExample(f"Question {i}?", ("yes", "no"), i % 2) for i in range(7)]
  for i in range(7):
    idx = E.fewshot_indices(7, i, 4, seed=1)
    assert i not in idx and len(set(idx)) == 4
    assert idx == E.fewshot_indices(7, i, 4, seed=1)  # deterministic
    prompt = E.build_prompt(ex, i, 4, seed=1)
    assert prompt.count(ex[i].prompt) == 1 and prompt.endswith(ex[i].prompt)
    assert prompt.count("\n\n") == 4
  assert any(E.fewshot_indices(7, i, 3, 0) != E.fewshot_indices(7, i, 3, 5)
             for i in range(7))
  assert E.build_prompt(ex, 2, 0) == ex[2].prompt
  with pytest.raises(ValueError, match="k_shot=7 needs at least 8"):
    E.fewshot_indices(7, 0, 7)


def test_truncation_keeps_the_continuation():
  ex = [E.MCExample("x" * 50, ("abc", "d"), 0), E.MCExample("y" * 50, ("e", "f"), 1)]
  reqs = E.build_requests(ex, TOK, k_shot=1, max_len=20)
  for r in reqs:
    assert len(r.context) + len(r.continuation) <= 20
    assert r.continuation == tuple(TOK.encode(" " + ex[r.example].choices[r.choice]))
  assert E.build_requests(ex, TOK, k_shot=1, indices=[1])[0].example == 1


def _write(tmp_path, name, lines):
  p = tmp_path / name
  p.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(p)


def test_load_task_schema_and_errors(tmp_path):
  ok = _write(tmp_path, "ok.jsonl", [
      json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": 1}),
      "",
      json.dumps({"context": "The sky is", "choices": ["blue", "green"], "label": 0,
                  "id": 7})])
  ex = E.load_task(ok)
  assert ex[0] == E.MCExample("Question: 2+2?\nAnswer:", ("3", "4"), 1)
  assert ex[1] == E.MCExample("The sky is", ("blue", "green"), 0)
  good = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0})
  cases = {
      "{not json": r"bad\.jsonl:2: not valid JSON",
      json.dumps({"choices": ["a", "b"], "answer": 0}):
          r":2: missing key 'question' or 'context'",
      json.dumps({"question": "q", "answer": 0}): r":2: missing key 'choices'",
      json.dumps({"question": "q", "choices": ["a", "b"]}):
          r":2: missing key 'answer' or 'label'",
      json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}):
          r":2: 'answer' must be an int in \[0, 2\)",
      json.dumps({"question": "q", "choices": ["a"], "label": 0}):
          r":2: 'choices' must be a list of >= 2",
      json.dumps({"question": "q", "context": "c", "choices": ["a", "b"],
                  "answer": 0}): r":2: give only one of",
      json.dumps(["q"]): r":2: expected a JSON object",
  }
  for line, msg in cases.items():
    with pytest.raises(E.TaskFormatError, match=msg):
      E.load_task(_write(tmp_path, "bad.jsonl", [good, line]))
  with pytest.raises(FileNotFoundError):
    E.load_task(str(tmp_path / "missing.jsonl"))
  with pytest.raises(E.TaskFormatError, match="no examples"):
    E.load_task(_write(tmp_path, "empty.jsonl", [""]))


def test_shipped_task_files():
  files = sorted(glob.glob(os.path.join(ROOT, "experiments", "tasks", "*.jsonl")))
  assert len(files) >= 2
  for f in files:
    ex = E.load_task(f)
    assert 40 <= len(ex) <= 60, f
    assert len({e.prompt for e in ex}) == len(ex), f"{f}: duplicate prompts"
    for e in ex:
      assert len(set(e.choices)) == len(e.choices) == 4, (f, e)
    answers = {e.answer for e in ex}
    assert answers == {0, 1, 2, 3}, f"{f}: gold positions not varied"


def test_evaluate_task_and_model(tmp_path):
  lines = [json.dumps({"question": f"q{i}", "choices": ["a", "bb", "ccc"],
                       "answer": i % 3}) for i in range(6)]
  path = _write(tmp_path, "toy.jsonl", lines)
  r = E.evaluate_task(CFG, PARAMS, TOK, path, k_shot=2, batch_size=8)
  ex = E.load_task(path)
  reqs = E.build_requests(ex, TOK, 2, 0, CFG.max_seq_len)
  lls, _ = E.score_requests(CFG, PARAMS, reqs)  # checked against a direct forward above
  want = E.mc_metrics(ex, reqs, lls)
  assert r["predictions"] == want["predictions"]
  assert r["acc"] == want["acc"] and r["acc_norm"] == want["acc_norm"]
  assert r["n"] == 6 and r["k_shot"] == 2 and r["chance"] == pytest.approx(1 / 3)
  seen = []
  res = E.evaluate_model((CFG, PARAMS, TOK), [path], k_shot=1, limit=4,
                         on_task=lambda name, r: seen.append((name, r["n"])))
  assert list(res) == ["toy"] and res["toy"]["n"] == 4 and seen == [("toy", 4)]
  assert res["toy"]["path"] == path and res["toy"]["seconds"] >= 0
  assert E.task_line("toy", res["toy"]).startswith("toy: acc ")
  assert "predictions" not in E.without_predictions(res)["toy"]
  out = tmp_path / "out" / "report.json"
  E.save_report(out, {"model": "tiny"}, res)
  saved = json.loads(out.read_text())
  assert saved["model"] == "tiny" and saved["predictions"]["toy"] == res["toy"]["predictions"]
  assert "| toy | 4 | 1 |" in E.format_table(res)
  with pytest.raises(ValueError, match="no task files"):
    E.evaluate_model((CFG, PARAMS, TOK), [])
  # Two files with one task name: refused before any scoring, by both entry points.
  (tmp_path / "b").mkdir()
  other = _write(tmp_path / "b", "toy.jsonl", lines)
  for call in (lambda: E.resolve_tasks([path, other]),
               lambda: E.evaluate_model((CFG, PARAMS, TOK), [path, other],
                                        on_task=lambda *_: pytest.fail("scored"))):
    with pytest.raises(ValueError, match="two task files are named 'toy'.*rename one"):
      call()


def test_heldout_perplexity():
  docs = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota kappa"] * 3
  enc = lambda s: TOK.encode(s)
  batches = eval_batches(TextSource(docs, "toy"), enc, CFG.eos_id, 32, 2,
                         max_batches=None)
  r = E.heldout_perplexity(CFG, PARAMS, batches)
  model = Transformer(CFG)
  tot = cnt = 0.0
  for b in batches:
    logits = model.apply({"params": PARAMS}, b["inputs"], positions=b["positions"],
                         segment_ids=b["segment_ids"])["logits"]
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    nll = -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
    tot += float((nll * b["loss_mask"]).sum())
    cnt += float(b["loss_mask"].sum())
  assert r["n_tokens"] == int(cnt)
  assert r["mean_nll"] == pytest.approx(tot / cnt, rel=1e-5)
  assert r["ppl"] == pytest.approx(math.exp(tot / cnt), rel=1e-5)
  with pytest.raises(ValueError, match="no scored tokens"):
    E.heldout_perplexity(CFG, PARAMS, [])

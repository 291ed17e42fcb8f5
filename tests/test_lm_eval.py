"""lm-eval adapter (``recursive_lm.lm_eval_adapter``) against lm_eval's own ``hf`` backend.

Both backends score the same weights: the project's unrolled Hugging Face
export (``export_unrolled_hf``) written to a tmp folder, loaded by
transformers for ``hf`` and by ``recursive_lm.api.load`` for ours. Fast tests
use a tiny random model with a byte-level tokenizer; the slow one uses the
embedded SmolLM2-135M on the offline ``rlm_capitals`` task.
"""
import functools
import gc
import os
import pathlib

import numpy as np
import pytest



def _require(name):
  """Imports ``name``; a missing one skips, or fails under RLM_REQUIRE_PEER=1 (CI)."""
  if os.environ.get("RLM_REQUIRE_PEER") == "1":
    import importlib
    try:
      return importlib.import_module(name)
    except ImportError:
      pytest.fail(f"{name} is not installed but RLM_REQUIRE_PEER=1: install the peer "
                  "and eval extras (pip install -e '.[peer,eval]')", pytrace=False)
  return pytest.importorskip(name)


lm_eval = _require("lm_eval")
for _name in ("torch", "transformers", "accelerate"):
  _require(_name)

import tokenizers  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from recursive_lm import api  # noqa: E402
from recursive_lm import lm_eval_adapter  # noqa: E402
from recursive_lm.checkpoints import expected_shapes  # noqa: E402
from recursive_lm.config import DepthPlan, tiny_config  # noqa: E402
from recursive_lm.export import export_unrolled_hf  # noqa: E402
from recursive_lm.nn.weights import params_from_hf  # noqa: E402
from recursive_lm.tokenizer import Tokenizer  # noqa: E402

TASKS = pathlib.Path(__file__).parents[1] / "experiments" / "tasks" / "lm_eval"
SPECIAL = ["<|endoftext|>", "<s>", "</s>"]
LL_ATOL = 1e-4  # per log-likelihood, as the issue asks


def byte_tokenizer() -> Tokenizer:
  """Byte-level BPE without merges: every UTF-8 byte is one token."""
  vocab = {t: i for i, t in enumerate(SPECIAL + sorted(pre_tokenizers.ByteLevel.alphabet()))}
  tok = tokenizers.Tokenizer(models.BPE(vocab, []))
  tok.add_special_tokens(SPECIAL)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return Tokenizer(tok, bos_id=1, eos_id=2, pad_id=0)


@functools.lru_cache(maxsize=None)
def tiny_export(root: str) -> str:
  """A tiny random Llama (vocab = 259 byte tokens) exported to ``root``/hf."""
  cfg = tiny_config(vocab_size=259, max_seq_len=256, plan=DepthPlan.vanilla(2),
                    bos_id=1, eos_id=2, pad_id=0)
  rng = np.random.default_rng(0)
  w = {k: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1
           else 0.2 * rng.standard_normal(s)).astype(np.float32)
       for k, s in expected_shapes(cfg).items()}
  folder = os.path.join(root, "hf")
  export_unrolled_hf(folder, cfg, params_from_hf(cfg, w), tokenizer=byte_tokenizer())
  return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  return tiny_export(str(tmp_path_factory.mktemp("tiny")))


@functools.lru_cache(maxsize=None)
def hf_lm(folder, batch_size=4):
  from lm_eval.models.huggingface import HFLM
  return HFLM(pretrained=folder, dtype="float32", device="cpu", batch_size=batch_size)


def ours(folder, **kwargs):
  if not kwargs:
    return _ours_default(folder)
  return lm_eval_adapter.RecursiveLM(pretrained=folder, batch_size=4, **kwargs)


@functools.lru_cache(maxsize=None)
def _ours_default(folder):
  """One adapter per folder, so its jitted scorer and engine are reused."""
  return lm_eval_adapter.RecursiveLM(pretrained=folder, batch_size=4)


def _instances(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


LL_REQUESTS = [("The capital of France is", " Paris"), ("The capital of France is", " Lyon"),
               ("Question: 2 + 2 =", " 4"), ("", "hello world"), ("a b c ", "d e"),
               ("Café 日本", " 😀!")]
DOCS = ["A short document.", "x" * 300 + " a document longer than the 256-token window",
        "Line one.\nLine two."]


def test_registered_and_options(tiny_folder):
  from lm_eval.api.registry import get_model
  assert get_model("recursive_lm") is lm_eval_adapter.RecursiveLM
  lm = get_model("recursive_lm").create_from_arg_string(
      f"pretrained={tiny_folder},batch_size=2,max_gen_toks=5", {"device": "cpu"})
  assert (lm.batch_size, lm.max_gen_toks, lm.max_length) == (2, 5, 256)
  with pytest.raises(ValueError, match="unknown model_args"):
    ours(tiny_folder, bogus=1)
  with pytest.raises(ValueError, match="exclusive"):
    ours(tiny_folder, early_exit=0.9, speculative=1)
  with pytest.raises(ValueError, match="batch_size='x' is not an integer"):
    lm_eval_adapter.RecursiveLM(pretrained=tiny_folder, batch_size="x")


def test_loglikelihood_matches_hf(tiny_folder):
  reqs = _instances("loglikelihood", LL_REQUESTS)
  want = hf_lm(tiny_folder).loglikelihood(reqs)
  got = ours(tiny_folder).loglikelihood(reqs)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=LL_ATOL)
  assert [g[1] for g in got] == [w[1] for w in want]
  assert all(g[0] < 0 for g in got)


def test_loglikelihood_rolling_matches_hf(tiny_folder):
  reqs = _instances("loglikelihood_rolling", [(d,) for d in DOCS])
  want = hf_lm(tiny_folder).loglikelihood_rolling(reqs)
  got = ours(tiny_folder).loglikelihood_rolling(reqs)
  np.testing.assert_allclose(got, want, atol=LL_ATOL)


def test_generate_until_matches_hf(tiny_folder):
  gen = {"until": ["e"], "max_gen_toks": 6, "do_sample": False}
  args = [("The capital of France is", gen), ("Hello", gen), ("x", {**gen, "until": ["\n"]})]
  reqs = _instances("generate_until", args)
  want = hf_lm(tiny_folder, batch_size=1).generate_until(reqs)
  got = ours(tiny_folder).generate_until(reqs)
  assert got == want
  assert all("e" not in g for g in got[:2])
  # Greedy self-speculation and an early-exit engine that never exits are the
  # full model's greedy decoding.
  assert ours(tiny_folder, speculative=1, draft_len=2).generate_until(reqs) == want
  assert ours(tiny_folder, early_exit=float("inf"), exit_policy="calm",
              exits="1").generate_until(reqs) == want


def _evaluate(model, model_args, task, limit, num_fewshot=0):
  from lm_eval.tasks import TaskManager
  return lm_eval.simple_evaluate(
      model=model, model_args=model_args, tasks=[task], num_fewshot=num_fewshot,
      limit=limit, log_samples=True, task_manager=TaskManager(include_path=str(TASKS)),
      batch_size=4, device="cpu", random_seed=0, numpy_random_seed=0,
      torch_random_seed=0, fewshot_random_seed=0)


def _compare(a, b, task):
  """Same requests, log-likelihoods within LL_ATOL, same greedy flags, same
  generations and identical acc / acc_norm / exact_match."""
  sa, sb = a["samples"][task], b["samples"][task]
  assert len(sa) == len(sb) > 0
  worst = 0.0
  for x, y in zip(sa, sb):
    assert x["doc_id"] == y["doc_id"] and x["arguments"] == y["arguments"]
    if x["resps"] and isinstance(x["resps"][0][0], (list, tuple)):
      lx = [float(r[0][0]) for r in x["resps"]]
      ly = [float(r[0][0]) for r in y["resps"]]
      np.testing.assert_allclose(lx, ly, atol=LL_ATOL)
      worst = max(worst, float(np.max(np.abs(np.subtract(lx, ly)))))
      assert [r[0][1] for r in x["resps"]] == [r[0][1] for r in y["resps"]]
    else:
      assert x["resps"] == y["resps"]
  ra, rb = a["results"][task], b["results"][task]
  for k, v in ra.items():
    if k.split(",")[0] in ("acc", "acc_norm", "exact_match"):
      assert v == rb[k], k
  print(f"\n{task}: {len(sa)} docs, max |loglik diff| {worst:.2e}, "
        + ", ".join(f"{k} {v:.4f}" for k, v in ra.items() if isinstance(v, float)))
  return ra


@pytest.mark.parametrize("task", ["rlm_python_facts", "rlm_capitals_gen"])
def test_offline_task_matches_hf(tiny_folder, task):
  ra = _compare(_evaluate(ours(tiny_folder), None, task, 6),
                _evaluate(hf_lm(tiny_folder), None, task, 6), task)
  assert any(k.startswith(("acc,", "exact_match,")) for k in ra)


@pytest.mark.slow
def test_embedded_model_capitals_matches_hf(tmp_path):
  """SmolLM2-135M (f32 weights of the embedded GGUF) on rlm_capitals, 2-shot."""
  m = api.load()
  export_unrolled_hf(tmp_path / "hf", m.cfg, m.params, tokenizer=m.tokenizer)
  del m
  task = "rlm_capitals"
  a = _evaluate("recursive_lm", f"pretrained={tmp_path / 'hf'}", task, 16, num_fewshot=2)
  gc.collect()  # one model in memory at a time (JAX f32, then torch f32)
  b = _evaluate("hf", f"pretrained={tmp_path / 'hf'},dtype=float32", task, 16,
                num_fewshot=2)
  ra = _compare(a, b, task)
  assert ra["acc,none"] >= 0.5  # a 135M model knows most European capitals


def test_command_line(tiny_folder, capsys, monkeypatch):
  """``recursive-lm-eval`` = lm_eval's CLI with the model registered and the
  offline tasks on the include path."""
  monkeypatch.setattr("sys.argv", ["recursive-lm-eval"])
  lm_eval_adapter.main(["--model", "recursive_lm", "--model_args",
                        f"pretrained={tiny_folder}", "--batch_size", "2", "--tasks",
                        "rlm_python_facts", "--limit", "2"])
  out = capsys.readouterr().out
  assert "rlm_python_facts" in out and "acc" in out

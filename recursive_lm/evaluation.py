"""Evaluation: held-out perplexity and few-shot multiple-choice tasks.

Held-out perplexity over pipeline batches (``recursive_lm.data.eval_batches``)::

    heldout_perplexity(cfg, params, batches)  # {"mean_nll", "ppl", "n_tokens"}

Multiple-choice tasks are local JSON-lines files, one example per line::

    {"question": "Which module provides deque?",
     "choices": ["heapq", "collections", "queue", "array"], "answer": 1}

Schema (blank lines are skipped; other keys, e.g. ``"id"``, are ignored):

* ``"question"`` (str) *or* ``"context"`` (str): a question is rendered as
  ``"Question: {question}\\nAnswer:"``; a context is used verbatim (for
  cloze-style items such as ``"The capital of France is"``).
* ``"choices"``: a list of at least two non-empty strings.
* ``"answer"`` *or* ``"label"``: the 0-based index of the correct choice.

The prompt of an example is ``k`` demonstrations (other examples of the same
file, each rendered with its correct answer) joined by a blank line, then the
example itself. Demonstrations are drawn with ``numpy.random.default_rng([seed,
i])`` from all other examples, so they are deterministic and never include
example ``i``. Each choice is scored as the summed log-likelihood of the tokens
of ``" " + choice`` after the prompt (context and continuation are tokenized
separately and concatenated, like lm-eval-harness). Reported metrics:

* ``acc``: argmax of the log-likelihood is the gold choice;
* ``acc_norm``: argmax of log-likelihood / UTF-8 byte length of the choice
  (lm-eval-harness's length-normalised accuracy).

Scoring is batched with static shapes: every row is padded to a length bucket
and every batch to ``batch_size`` rows, so one jitted scorer per model config
compiles once per bucket and is reused across tasks and calls.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.nn.model import Transformer

#: Row lengths of the scorer (longer rows round up to a multiple of the last).
SCORE_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
FEWSHOT_SEPARATOR = "\n\n"
TARGET_DELIMITER = " "


class TaskFormatError(ValueError):
  """A task file does not follow the documented jsonl schema."""


# --- held-out perplexity ------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _jitted_eval_step(cfg: ModelConfig):
  from recursive_lm.training.train_step import make_eval_step
  return jax.jit(make_eval_step(cfg))


def heldout_perplexity(cfg: ModelConfig, params: Any,
                       batches: Iterable[Mapping[str, np.ndarray]]) -> dict:
  """Token-weighted NLL over ``batches`` (dicts from ``eval_batches``).

  Returns ``{"mean_nll", "ppl", "n_tokens"}`` (``ppl = exp(mean_nll)``). The
  eval step (``training.train_step.make_eval_step``) is jitted once per config.
  """
  step = _jitted_eval_step(cfg)
  total, count = 0.0, 0.0
  for batch in batches:
    nll, n = step(params, {k: jnp.asarray(v) for k, v in batch.items()})
    total += float(nll)
    count += float(n)
  if count == 0:
    raise ValueError("heldout_perplexity: the batches hold no scored tokens "
                     "(empty list or all loss_mask == 0)")
  mean = total / count
  return {"mean_nll": mean, "ppl": float(math.exp(mean)), "n_tokens": int(count)}


# --- task files ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MCExample:
  """One multiple-choice item: ``prompt`` is the rendered question/context."""
  prompt: str
  choices: tuple[str, ...]
  answer: int


def _pick(obj: Mapping, keys: Sequence[str], where: str):
  found = [k for k in keys if k in obj]
  if not found:
    raise TaskFormatError(f"{where}: missing key {' or '.join(map(repr, keys))} "
                          f"(found keys {sorted(obj)})")
  if len(found) > 1:
    raise TaskFormatError(f"{where}: give only one of {found}")
  return found[0], obj[found[0]]


def parse_example(obj: Any, where: str = "example") -> MCExample:
  """Validates one decoded jsonl object (see the module docstring)."""
  if not isinstance(obj, Mapping):
    raise TaskFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  key, text = _pick(obj, ("question", "context"), where)
  if not isinstance(text, str) or not text.strip():
    raise TaskFormatError(f"{where}: {key!r} must be a non-empty string")
  prompt = QUESTION_TEMPLATE.format(question=text.strip()) if key == "question" \
      else text
  if "choices" not in obj:
    raise TaskFormatError(f"{where}: missing key 'choices' (found keys {sorted(obj)})")
  choices = obj["choices"]
  if (not isinstance(choices, list) or len(choices) < 2
      or not all(isinstance(c, str) and c.strip() for c in choices)):
    raise TaskFormatError(f"{where}: 'choices' must be a list of >= 2 non-empty "
                          f"strings, got {choices!r}")
  akey, answer = _pick(obj, ("answer", "label"), where)
  if isinstance(answer, bool) or not isinstance(answer, int) \
      or not 0 <= answer < len(choices):
    raise TaskFormatError(f"{where}: {akey!r} must be an int in [0, {len(choices)}), "
                          f"got {answer!r}")
  return MCExample(prompt, tuple(choices), answer)


def load_task(path: str | os.PathLike) -> list[MCExample]:
  """Reads a task jsonl file; errors name the file and 1-based line number."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"task file {path} not found")
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskFormatError(f"{where}: not valid JSON ({e.msg} at column "
                              f"{e.colno})") from e
      out.append(parse_example(obj, where))
  if not out:
    raise TaskFormatError(f"{path}: no examples")
  return out


def resolve_tasks(patterns: Iterable[str]) -> list[str]:
  """Task file paths from paths and glob patterns (``~`` expanded; each glob's
  matches sorted; de-duplicated in order). A pattern that matches nothing or a
  path that is not a file raises ``ValueError`` naming it (an empty result does
  not: callers decide whether tasks are required)."""
  out = []
  for pat in patterns:
    pat = pat.strip()
    if not pat:
      continue
    hits = (sorted(glob.glob(os.path.expanduser(pat))) if glob.has_magic(pat)
            else [os.path.expanduser(pat)])
    if not hits:
      raise ValueError(f"--tasks pattern {pat!r} matches no file; pass jsonl task files, "
                       "e.g. --tasks 'experiments/tasks/*.jsonl'")
    for h in hits:
      if not os.path.isfile(h):
        raise ValueError(f"task file {h!r} not found; pass jsonl task files")
      if h not in out:
        out.append(h)
  check_task_names(out)
  return out


def check_task_names(paths: Sequence[str | os.PathLike]) -> None:
  """Raises ``ValueError`` when two task files have one name (their results would
  collide)."""
  seen = {}
  for p in paths:
    name = task_name(p)
    if name in seen:
      raise ValueError(f"two task files are named {name!r} ({seen[name]}, {os.fspath(p)}); "
                       "rename one")
    seen[name] = os.fspath(p)


def task_name(path: str | os.PathLike) -> str:
  """``experiments/tasks/capitals.jsonl`` -> ``capitals``."""
  return os.path.splitext(os.path.basename(os.fspath(path)))[0]


# --- prompts and requests -----------------------------------------------------
def fewshot_indices(n: int, i: int, k: int, seed: int = 0) -> list[int]:
  """``k`` distinct indices in ``range(n)`` other than ``i`` (deterministic)."""
  if k < 0:
    raise ValueError(f"k_shot must be >= 0, got {k}")
  if k > n - 1:
    raise ValueError(f"k_shot={k} needs at least {k + 1} examples in the task, "
                     f"it has {n}")
  pool = np.array([j for j in range(n) if j != i], np.int64)
  rng = np.random.default_rng([seed, i])
  return rng.choice(pool, size=k, replace=False).tolist()


def build_prompt(examples: Sequence[MCExample], i: int, k_shot: int,
                 seed: int = 0) -> str:
  """The k-shot prompt for example ``i`` (ends right before its answer)."""
  shots = [examples[j].prompt + TARGET_DELIMITER + examples[j].choices[examples[j].answer]
           for j in fewshot_indices(len(examples), i, k_shot, seed)]
  return FEWSHOT_SEPARATOR.join(shots + [examples[i].prompt])


def _encode(tokenizer: Any, text: str, add_bos: bool | None) -> list[int]:
  try:
    return list(tokenizer.encode(text, add_bos=add_bos))
  except TypeError:  # a plain ``encode(text)`` tokenizer
    return list(tokenizer.encode(text))


@dataclasses.dataclass(frozen=True)
class Request:
  """Score ``continuation`` (token ids) after ``context`` (token ids)."""
  example: int
  choice: int
  context: tuple[int, ...]
  continuation: tuple[int, ...]


def build_requests(examples: Sequence[MCExample], tokenizer: Any, k_shot: int = 0,
                   seed: int = 0, max_len: int | None = None,
                   start_id: int | None = None,
                   indices: Iterable[int] | None = None) -> list[Request]:
  """One request per (example, choice) of ``indices`` (default: all).

  Contexts are left-truncated to ``max_len`` total tokens; an empty context
  becomes ``[start_id]`` (BOS).
  """
  reqs = []
  for i in (range(len(examples)) if indices is None else indices):
    ex = examples[i]
    ctx = _encode(tokenizer, build_prompt(examples, i, k_shot, seed), None)
    if not ctx:
      if start_id is None:
        raise ValueError("an example has an empty prompt and no start token id")
      ctx = [start_id]
    for c, choice in enumerate(ex.choices):
      cont = _encode(tokenizer, TARGET_DELIMITER + choice, False)
      if not cont:
        raise ValueError(f"choice {choice!r} encodes to no tokens")
      ctx_c = ctx
      if max_len is not None and len(ctx) + len(cont) > max_len:
        keep = max_len - len(cont)
        if keep < 1:
          raise ValueError(f"choice {choice!r} ({len(cont)} tokens) does not fit "
                           f"max_len={max_len}")
        ctx_c = ctx[-keep:]
      reqs.append(Request(i, c, tuple(ctx_c), tuple(cont)))
  return reqs


# --- scoring --------------------------------------------------------------------
def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  return -(-n // buckets[-1]) * buckets[-1]


@functools.lru_cache(maxsize=8)
def _jitted_scorer(cfg: ModelConfig):
  """``(params, tokens [B,T], mask [B,T]) -> (sum logp [B], greedy [B])`` where
  ``mask[b, t]`` marks the continuation tokens (their logp is summed)."""
  model = Transformer(cfg)

  def score(params, tokens, mask):
    logits = model.apply({"params": params}, tokens)["logits"][:, :-1]
    logits = logits.astype(jnp.float32)
    tgt = tokens[:, 1:]
    m = mask[:, 1:]
    lse = jax.nn.logsumexp(logits, axis=-1)
    tok_lp = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0] - lse
    greedy = jnp.argmax(logits, axis=-1) == tgt
    return (jnp.sum(tok_lp * m, axis=-1),
            jnp.all(greedy | (m == 0), axis=-1))

  return jax.jit(score)


def score_requests(cfg: ModelConfig, params: Any, requests: Sequence[Request],
                   batch_size: int = 8, pad_id: int = 0,
                   buckets: Sequence[int] = SCORE_BUCKETS,
                   max_batch_tokens: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Sum log-likelihood and greedy-match flag of every request (in order).

  Requests are sorted by length, grouped by bucket and padded to
  ``[rows, bucket]`` (right padding; causal attention makes it inert) with
  ``rows = min(batch_size, max(1, max_batch_tokens // bucket))``, which caps the
  ``[rows, bucket, vocab]`` logits of long buckets.
  """
  lls = np.zeros(len(requests), np.float64)
  greedy = np.zeros(len(requests), bool)
  if not requests:
    return lls, greedy
  scorer = _jitted_scorer(cfg)
  lengths = [len(r.context) + len(r.continuation) for r in requests]
  too_long = max(lengths)
  if too_long > cfg.max_seq_len:
    raise ValueError(f"a request has {too_long} tokens > max_seq_len "
                     f"{cfg.max_seq_len}; pass max_len to build_requests")
  order = sorted(range(len(requests)), key=lambda j: lengths[j])
  groups: dict[int, list[int]] = {}
  for j in order:
    groups.setdefault(_bucket(lengths[j], buckets), []).append(j)
  for t, idx in groups.items():
    rows = min(batch_size, max(1, max_batch_tokens // t))
    for s in range(0, len(idx), rows):
      chunk = idx[s:s + rows]
      tokens = np.full((rows, t), pad_id, np.int32)
      mask = np.zeros((rows, t), np.float32)
      for row, j in enumerate(chunk):
        r = requests[j]
        seq = r.context + r.continuation
        tokens[row, :len(seq)] = seq
        mask[row, len(r.context):len(seq)] = 1.0
      ll, g = scorer(params, jnp.asarray(tokens), jnp.asarray(mask))
      ll, g = np.asarray(ll), np.asarray(g)
      for row, j in enumerate(chunk):
        lls[j], greedy[j] = ll[row], g[row]
  return lls, greedy


def mc_metrics(examples: Sequence[MCExample], requests: Sequence[Request],
               lls: np.ndarray) -> dict:
  """``acc`` / ``acc_norm`` (by UTF-8 bytes of the choice) and ``n``."""
  per = [np.full(len(ex.choices), -np.inf) for ex in examples]
  for r, ll in zip(requests, lls):
    per[r.example][r.choice] = ll
  acc = acc_norm = 0.0
  preds = []
  for ex, ll in zip(examples, per):
    nbytes = np.array([len(c.encode("utf-8")) for c in ex.choices], np.float64)
    pred = int(np.argmax(ll))
    acc += pred == ex.answer
    acc_norm += int(np.argmax(ll / nbytes)) == ex.answer
    preds.append(pred)
  n = len(examples)
  return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n, "predictions": preds}


def evaluate_task(cfg: ModelConfig, params: Any, tokenizer: Any,
                  task: str | os.PathLike | Sequence[MCExample], k_shot: int = 2,
                  seed: int = 0, batch_size: int = 8, limit: int | None = None,
                  max_len: int | None = None) -> dict:
  """Few-shot multiple-choice accuracy of one task (a path or examples).

  ``limit`` scores only the first ``limit`` examples (demonstrations still come
  from the whole file). Returns ``acc``, ``acc_norm``, ``n``, ``k_shot``,
  ``chance`` (mean of 1/#choices), ``n_tokens`` (scored rows' total length)
  and ``predictions``.
  """
  examples = load_task(task) if isinstance(task, (str, os.PathLike)) else list(task)
  if not examples:
    raise ValueError("evaluate_task: no examples")
  n = len(examples) if limit is None else min(limit, len(examples))
  max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
  start = cfg.bos_id if cfg.bos_id is not None else cfg.eos_id
  reqs = build_requests(examples, tokenizer, k_shot, seed, max_len, start, range(n))
  pad = cfg.pad_id if cfg.pad_id is not None else 0
  lls, _ = score_requests(cfg, params, reqs, batch_size, pad)
  out = mc_metrics(examples[:n], reqs, lls)
  out.update(k_shot=k_shot, chance=float(np.mean([1 / len(e.choices)
                                                   for e in examples[:n]])),
             n_tokens=int(sum(len(r.context) + len(r.continuation) for r in reqs)))
  return out


def _unpack_model(model: Any):
  if model is None or isinstance(model, (str, os.PathLike)):
    from recursive_lm import api
    model = api.load(None if model is None else os.fspath(model))
  if isinstance(model, tuple) and not hasattr(model, "cfg"):
    return model[0], model[1], model[2]
  return model.cfg, model.params, model.tokenizer


def evaluate_model(model: Any = None, tasks: Sequence[str | os.PathLike] = (),
                   k_shot: int = 2, seed: int = 0, batch_size: int = 8,
                   limit: int | None = None,
                   on_task: Callable[[str, dict], None] | None = None
                   ) -> dict[str, dict]:
  """Scores a model on task files: ``{task_name: evaluate_task(...)}``.

  ``model``: a spec for ``api.load`` (preset name / GGUF / HF folder /
  recursive_lm folder; None is the embedded default), a loaded model with
  ``cfg``, ``params``, ``tokenizer`` (``api.LoadedModel``,
  ``export.LoadedModel``) or a ``(cfg, params, tokenizer)`` tuple. Each result
  also holds ``seconds`` and ``path``; ``on_task(name, result)`` is called as
  each task finishes (progress lines). Two files with one task name are an
  error before anything is scored.
  """
  cfg, params, tok = _unpack_model(model)
  if tok is None:
    raise ValueError("evaluate_model needs a model with a tokenizer")
  if not tasks:
    raise ValueError("evaluate_model: no task files given")
  check_task_names(tasks)
  results = {}
  for path in tasks:
    name = task_name(path)
    t = time.perf_counter()
    r = evaluate_task(cfg, params, tok, path, k_shot, seed, batch_size, limit)
    r.update(seconds=round(time.perf_counter() - t, 2), path=os.fspath(path))
    results[name] = r
    if on_task is not None:
      on_task(name, r)
  return results


def task_line(name: str, r: Mapping[str, Any]) -> str:
  """One progress line for a finished task of ``evaluate_model``."""
  return (f"{name}: acc {r['acc']:.3f} acc_norm {r['acc_norm']:.3f} (n={r['n']}, "
          f"{r['seconds']:.1f}s)")


def without_predictions(results: Mapping[str, Mapping[str, Any]]) -> dict:
  """``evaluate_model`` results without the per-example predictions (for a report)."""
  return {k: {m: v for m, v in r.items() if m != "predictions"} for k, r in results.items()}


def save_report(path: str | os.PathLike, report: Mapping[str, Any],
                results: Mapping[str, Mapping[str, Any]]) -> None:
  """Writes ``report`` plus every task's predictions as JSON to ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(dict(report, predictions={k: r["predictions"] for k, r in results.items()}),
              f, indent=2)


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """A markdown table of ``evaluate_model`` results."""
  lines = ["| task | n | k-shot | acc | acc_norm | chance |",
           "|---|---:|---:|---:|---:|---:|"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['n']} | {r['k_shot']} | {r['acc']:.3f} | "
                 f"{r['acc_norm']:.3f} | {r['chance']:.3f} |")
  return "\n".join(lines)

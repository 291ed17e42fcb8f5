r"""lm-evaluation-harness adapter: recursive_lm models as the lm_eval model ``recursive_lm``.

Install with the ``eval`` extra (``pip install -e '.[eval]'``, lm_eval 0.4.13), then::

    recursive-lm-eval --model recursive_lm \
        --model_args pretrained=smollm2-135m --batch_size 8 \
        --tasks rlm_capitals,rlm_python_facts --num_fewshot 2

``recursive-lm-eval`` (also ``python -m recursive_lm.lm_eval_adapter``) is
lm_eval's own command line with this module imported first: lm_eval 0.4.13 has
no plugin entry points for models, so ``--model recursive_lm`` is only known
once this module has run ``register_model``. From Python::

    import lm_eval, recursive_lm.lm_eval_adapter  # registers "recursive_lm"
    lm_eval.simple_evaluate(model="recursive_lm", model_args="pretrained=...", ...)

It also adds ``--include_path experiments/tasks/lm_eval`` (the offline task
YAMLs over ``experiments/tasks/*.jsonl``; no download at run time) when that
folder exists and no ``--include_path`` is given.

``--model_args`` (comma-separated ``key=value``):

* ``pretrained``: anything ``recursive_lm.api.load`` takes: a preset name
  (default ``smollm2-135m``), a ``.gguf`` file, a Hugging Face folder or a
  folder saved by recursive_lm (recursive / relaxed models, LoRA included).
* ``batch_size`` (8; or lm_eval's ``--batch_size``), ``max_length`` (the model's ``max_seq_len``),
  ``max_batch_tokens`` (2048: caps the ``[rows, length, vocab]`` logits of one
  scoring call), ``max_gen_toks`` (256, lm_eval's default), ``seed`` (0).
* ``early_exit=<threshold>``: ``generate_until`` decodes with
  ``decode.early_exit.EarlyExitEngine`` at this confidence threshold, with
  ``exit_policy`` (``free`` | ``calm``), ``exits`` (unrolled layer counts
  joined by ``/``, e.g. ``exits=10/20``; default: after each loop of a
  recursive model) and ``confidence`` (``softmax_diff``, ...).
* ``speculative=<draft layers>``: ``generate_until`` decodes with
  ``decode.speculative.SelfSpeculativeEngine`` drafting with that many unrolled
  layers, ``draft_len`` tokens per round (4). Greedy self-speculation gives the
  full model's tokens.

``loglikelihood`` and ``loglikelihood_rolling`` always score at full depth
(early exit and speculation are decoding policies) in one jitted batched
scorer per length bucket (sum log-probability and greedy flag per request;
``max_batch_tokens`` caps rows x length), with lm_eval's own
context/continuation split (``TemplateLM``) and its rolling windows
(``get_rolling_token_windows``, ``context_len=1``), so the requests are the
ones lm_eval's ``hf`` backend scores. ``generate_until`` follows the ``hf``
backend too: contexts left-truncated to ``max_length - max_gen_toks``, the EOS
text added to the stop strings, the decoded continuation cut at the first stop
string. The engines stop at EOS only, so every row runs ``max_gen_toks`` steps
unless it ends.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from recursive_lm.decode.sampling import SamplingConfig, argmax
from recursive_lm.nn.model import Transformer

MODEL_NAME = "recursive_lm"
#: Scored row lengths (longer rows round up to a multiple of the last, capped at max_length).
SCORE_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
TASKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "experiments", "tasks", "lm_eval")


def _bucket(n: int, cap: int) -> int:
  for b in SCORE_BUCKETS:
    if n <= b:
      return min(b, cap)
  return min(-(-n // SCORE_BUCKETS[-1]) * SCORE_BUCKETS[-1], cap)


@functools.lru_cache(maxsize=8)
def _scorer(cfg):
  """``(params, inputs, targets, mask) [B, T] -> (sum logp [B], all greedy [B])``
  over the positions where ``mask`` is 1 (log-softmax in float32)."""
  model = Transformer(cfg)

  def score(params, inputs, targets, mask):
    logits = model.apply({"params": params}, inputs)["logits"].astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tok_lp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse
    greedy = argmax(logits) == targets
    return jnp.sum(tok_lp * mask, axis=-1), jnp.all(greedy | (mask == 0), axis=-1)

  return jax.jit(score)


def _int_arg(name: str, value: Any, default: int, minimum: int = 1) -> int:
  if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
    return default
  try:
    v = int(value)
  except (TypeError, ValueError):
    raise ValueError(f"model_args {name}={value!r} is not an integer; pass e.g. "
                     f"{name}={default}") from None
  if v < minimum:
    raise ValueError(f"model_args {name}={value!r} must be >= {minimum}")
  return v


def _exits_arg(value: Any) -> list[int] | None:
  if value is None or value == "":
    return None
  parts = str(value).replace(":", "/").split("/")
  try:
    return [int(p) for p in parts if p.strip()]
  except ValueError:
    raise ValueError(f"model_args exits={value!r} must be layer counts joined by '/', "
                     "e.g. exits=10/20") from None


@register_model(MODEL_NAME, "recursive-lm")
class RecursiveLM(TemplateLM):
  """lm_eval ``LM`` over a recursive_lm model (see the module docstring)."""

  backend = "causal"

  def __init__(self, pretrained: str | None = None, batch_size: Any = 8,
               max_length: Any = None, max_batch_tokens: Any = 2048,
               max_gen_toks: Any = 256, seed: Any = 0,
               early_exit: Any = None, exit_policy: str = "free", exits: Any = None,
               confidence: str = "softmax_diff", speculative: Any = None,
               draft_len: Any = 4, model: Any = None, **unused: Any):
    super().__init__()
    # lm_eval passes device / max_batch_size from its command line; a CPU/XLA
    # model places itself, so they are accepted and ignored.
    unknown = sorted(set(unused) - {"device", "max_batch_size", "dtype", "trust_remote_code"})
    if unknown:
      raise ValueError(f"unknown model_args {unknown} for --model {MODEL_NAME}; see "
                       "`python -c 'import recursive_lm.lm_eval_adapter as m; help(m)'`")
    if early_exit is not None and speculative is not None:
      raise ValueError("model_args early_exit and speculative are exclusive: choose one "
                       "decoding policy for generate_until")
    if model is None:
      from recursive_lm import api
      model = api.load(pretrained)
    if model.tokenizer is None:
      raise ValueError(f"{model.source} has no tokenizer; lm_eval needs one (use a GGUF "
                       "file or a folder with tokenizer.json)")
    self.cfg = model.cfg
    self.tokenizer = model.tokenizer
    # Host (numpy) params would be copied to the device on every scoring call;
    # the model keeps the device copy only (one copy of the weights in memory).
    self.params = jax.tree_util.tree_map(jnp.asarray, model.params)
    try:
      model.params = self.params
    except (AttributeError, TypeError):  # a frozen model object: keep both copies
      pass
    self.loaded = model
    self._batch_size = _int_arg("batch_size", batch_size, 8)
    self._max_length = _int_arg("max_length", max_length, self.cfg.max_seq_len)
    if self._max_length > self.cfg.max_seq_len:
      raise ValueError(f"model_args max_length={self._max_length} exceeds the model's "
                       f"max_seq_len {self.cfg.max_seq_len}; pass max_length<="
                       f"{self.cfg.max_seq_len}")
    self.max_batch_tokens = _int_arg("max_batch_tokens", max_batch_tokens, 2048)
    self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks, 256)
    self.seed = _int_arg("seed", seed, 0, minimum=0)
    self.early_exit = None if early_exit is None else float(early_exit)
    self.exit_policy, self.exits, self.confidence = exit_policy, _exits_arg(exits), confidence
    self.speculative = (None if speculative is None
                        else _int_arg("speculative", speculative, 1))
    self.draft_len = _int_arg("draft_len", draft_len, 4)
    self._engine = None
    self.engine()  # validates the decoding options now, not at the first request

  # --- properties lm_eval reads ---------------------------------------------
  @property
  def eot_token_id(self) -> int:
    eos = self.tokenizer.eos_id
    return self.cfg.eos_id if eos is None else eos

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_id
    return self.eot_token_id if bos is None else bos

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return f"{MODEL_NAME}:{self.loaded.source}"

  @property
  def pad_id(self) -> int:
    return self.cfg.pad_id if self.cfg.pad_id is not None else 0

  def engine(self):
    """The decode engine of ``generate_until`` (built once)."""
    if self._engine is None:
      cfg, params = self.cfg, self.params
      if self.early_exit is not None:
        from recursive_lm.decode.early_exit import EarlyExitEngine
        self._engine = EarlyExitEngine(cfg, params, exits=self.exits,
                                       policy=self.exit_policy,
                                       confidence=self.confidence,
                                       threshold=self.early_exit)
      elif self.speculative is not None:
        from recursive_lm.decode.speculative import SelfSpeculativeEngine
        self._engine = SelfSpeculativeEngine(cfg, params, draft_layers=self.speculative,
                                             draft_len=self.draft_len)
      else:
        self._engine = self.loaded.engine(self._batch_size)
    return self._engine

  # --- tokenization ----------------------------------------------------------
  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    ids = list(self.tokenizer.encode(string, add_bos=add_special_tokens))
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    if isinstance(tokens, int):
      tokens = [tokens]
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    return self.tokenizer.apply_chat_template(
        chat_history, add_generation_prompt=add_generation_prompt)

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    if chat_template is False or chat_template is None:
      return None
    return self.tokenizer.chat_template

  # --- scoring ---------------------------------------------------------------
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    """Sum log-probability and greedy flag of each (key, context, continuation).

    Like the ``hf`` backend: the row is ``(context + continuation)`` left-cut
    to ``max_length + 1`` tokens, the model reads all but its last token.
    Rows are sorted by length and padded to ``SCORE_BUCKETS`` and to a fixed
    row count per bucket, so each bucket compiles once.
    """
    rows = []
    for _, context, continuation in requests:
      if not continuation:
        raise ValueError("lm_eval sent a request with an empty continuation")
      if len(continuation) > self.max_length:
        raise ValueError(f"a continuation has {len(continuation)} tokens > max_length "
                         f"{self.max_length}; raise max_length or shorten the task")
      seq = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((seq, len(continuation)))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    scorer = _scorer(self.cfg)
    groups: dict[int, list[int]] = {}
    for j in sorted(range(len(rows)), key=lambda j: -len(rows[j][0])):
      groups.setdefault(_bucket(len(rows[j][0]) - 1, self.max_length), []).append(j)
    with tqdm(total=len(rows), disable=disable_tqdm,
              desc="recursive_lm loglikelihood") as bar:
      for t, idx in groups.items():
        n = min(self._batch_size, max(1, self.max_batch_tokens // t))
        for s in range(0, len(idx), n):
          chunk = idx[s:s + n]
          inputs = np.full((n, t), self.pad_id, np.int32)
          targets = np.zeros((n, t), np.int32)
          mask = np.zeros((n, t), np.float32)
          for r, j in enumerate(chunk):
            seq, n_cont = rows[j]
            inputs[r, :len(seq) - 1] = seq[:-1]
            targets[r, :len(seq) - 1] = seq[1:]
            mask[r, len(seq) - 1 - n_cont:len(seq) - 1] = 1.0
          ll, greedy = scorer(self.params, jnp.asarray(inputs), jnp.asarray(targets),
                              jnp.asarray(mask))
          ll, greedy = np.asarray(ll), np.asarray(greedy)
          for r, j in enumerate(chunk):
            out[j] = (float(ll[r]), bool(greedy[r]))
            key = requests[j][0]
            if key is not None and key[0] is not None:
              self.cache_hook.add_partial("loglikelihood", key, out[j])
          bar.update(len(chunk))
    return out  # type: ignore[return-value]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append(((None,), ctx, cont))
        owner.append(i)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, scores):
      totals[i] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # --- generation ------------------------------------------------------------
  def _sampling(self, kwargs: dict) -> SamplingConfig:
    temperature = float(kwargs.get("temperature", 0.0) or 0.0)
    if not kwargs.get("do_sample", False) or temperature == 0.0:
      return SamplingConfig()
    return SamplingConfig(greedy=False, temperature=temperature,
                          top_k=int(kwargs.get("top_k", 0) or 0),
                          top_p=float(kwargs.get("top_p", 1.0) or 1.0))

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    engine = self.engine()
    eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
    groups: dict[str, list[int]] = {}
    args = [req.args for req in requests]
    for i, (_, gen_kwargs) in enumerate(args):
      groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
    results: list[str | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), disable=disable_tqdm,
               desc="recursive_lm generate_until")
    for idx in groups.values():
      kwargs = normalize_gen_kwargs(args[idx[0]][1], self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
      max_gen = int(kwargs.pop("max_gen_toks"))
      max_ctx = self.max_length - max_gen
      if max_ctx < 1:
        raise ValueError(f"max_gen_toks={max_gen} leaves no room for context within "
                         f"max_length {self.max_length}")
      sampling = self._sampling(kwargs)
      prompts = [self.tok_encode(args[i][0], left_truncate_len=max_ctx) or
                 [self.prefix_token_id] for i in idx]
      # Longest first (like lm_eval's Collator); every call has batch_size rows
      # (the last call repeats a prompt) so the engine compiles once per bucket.
      order = sorted(range(len(idx)), key=lambda j: -len(prompts[j]))
      for s in range(0, len(order), self._batch_size):
        chunk = order[s:s + self._batch_size]
        rows = [prompts[j] for j in chunk]
        rows += [rows[-1]] * (self._batch_size - len(rows))
        out = engine.generate(rows, max_new_tokens=max_gen, sampling=sampling,
                              seed=self.seed)
        for j, toks in zip(chunk, out.tokens):
          text = postprocess_generated_text(self.tok_decode(toks), until, None)
          results[idx[j]] = text
          self.cache_hook.add_partial("generate_until", args[idx[j]], text)
        bar.update(len(chunk))
    bar.close()
    return results  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
  """``recursive-lm-eval``: lm_eval's command line with ``recursive_lm`` registered."""
  from lm_eval.__main__ import cli_evaluate
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--include_path" not in argv and os.path.isdir(TASKS_DIR):
    argv += ["--include_path", TASKS_DIR]
  sys.argv = ["lm-eval"] + argv
  cli_evaluate()


if __name__ == "__main__":
  main()

"""High-level entry points (also ``import recursive_lm``): load, generate, score.

Example::

    import recursive_lm as rlm
    m = rlm.load()                                    # embedded SmolLM2-135M
    text, out = rlm.generate(m, "The capital of Germany is", max_new_tokens=16)
    texts, out = rlm.generate(m, ["Once", "In Python,"])   # a batch of two
    rlm.score_text(m, "The cat sat on the mat.")      # {'mean_nll', 'ppl', 'n_tokens'}

Compile once: a ``LoadedModel`` keeps the decode engines it builds (one per
engine kind, kernel layout and options; the engine's jitted programs are
keyed by the prompt-length bucket and batch size), so the second ``generate``
on the same model reuses the compiled programs. ``load`` also turns on JAX's
persistent compilation cache (``recursive_lm.compile_cache``), so a new
process reads compiled programs from disk instead of compiling again.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable, Sequence

import numpy as np

from recursive_lm.checkpoints.hf_folder import CheckpointError
from recursive_lm.config import ModelConfig
from recursive_lm.decode.engine import Engine, GenerateOutput
from recursive_lm.decode.sampling import SamplingConfig

NATIVE_CONFIG = "recursive_lm_config.json"
MAX_CACHED_ENGINES = 3  # each holds a device copy of the weights in its layout


@dataclasses.dataclass
class LoadedModel:
  """A model ready to decode: config, params (host arrays), tokenizer, source."""
  cfg: ModelConfig
  params: Any
  tokenizer: Any
  source: str
  _engines: "collections.OrderedDict[tuple, Any]" = dataclasses.field(
      default_factory=collections.OrderedDict, repr=False, compare=False)

  # -- engines (cached) ---------------------------------------------------------
  def decode_layout(self, batch: int | None) -> tuple[str | None, bool]:
    """(kernel_layout, fuse) of the fastest measured layout for ``batch`` rows
    (results/bench_decode.md): fused panel kernels read by the native CPU
    matmul up to 64 rows when it is available, else fused [out, in] kernels at
    batch 1; the training layout otherwise (``None``: scoring)."""
    import jax  # pylint: disable=g-import-not-at-top
    from recursive_lm.kernels import native  # pylint: disable=g-import-not-at-top
    from recursive_lm.kernels.panel import MAX_NATIVE_ROWS  # pylint: disable=g-import-not-at-top
    if (batch is not None and batch <= MAX_NATIVE_ROWS and jax.default_backend() == "cpu"
        and native.load()):
      return "panel", True
    if batch == 1:
      return "out_in", True
    return None, False

  def cached_engine(self, key: tuple, build: Callable[[], Any]) -> Any:
    """The engine under ``key``, built once (least recently used dropped past
    ``MAX_CACHED_ENGINES``, since every engine holds its own weight copy)."""
    if key in self._engines:
      self._engines.move_to_end(key)
      return self._engines[key]
    eng = build()
    self._engines[key] = eng
    while len(self._engines) > MAX_CACHED_ENGINES:
      self._engines.popitem(last=False)
    return eng

  def clear_engines(self) -> None:
    """Drops the cached engines (and their device weight copies)."""
    self._engines.clear()

  def engine(self, batch: int | None = None, weights: str = "f32") -> Engine:
    """The (cached) ``Engine`` in the fastest layout for ``batch`` rows;
    ``weights``: "f32" | "bf16" | "int8" (int8 needs the native panel kernel),
    see ``nn.model.decode_layout``."""
    layout, fuse = self.decode_layout(batch)
    return self.cached_engine(
        ("engine", layout, fuse, weights),
        lambda: Engine(self.cfg, self.params, kernel_layout=layout, fuse=fuse,
                       weights=weights))

  def early_exit_engine(self, batch: int | None = None, **options):
    """A cached ``decode.early_exit.EarlyExitEngine`` (``options``: its keyword
    arguments, e.g. ``policy="calm", threshold=0.8``)."""
    from recursive_lm.decode.early_exit import EarlyExitEngine  # pylint: disable=g-import-not-at-top
    layout, fuse = self.decode_layout(batch)
    weights = options.pop("weights", "f32")
    key = ("early_exit", layout, fuse, weights, _options_key(options))
    return self.cached_engine(key, lambda: EarlyExitEngine(
        self.cfg, self.params, kernel_layout=layout, fuse=fuse, weights=weights, **options))

  def speculative_engine(self, batch: int | None = None, **options):
    """A cached ``decode.speculative.SelfSpeculativeEngine`` (``options``:
    ``draft_layers``/``draft_loops``/``draft_len``)."""
    from recursive_lm.decode.speculative import SelfSpeculativeEngine  # pylint: disable=g-import-not-at-top
    layout, fuse = self.decode_layout(batch)
    weights = options.pop("weights", "f32")
    key = ("speculative", layout, fuse, weights, _options_key(options))
    return self.cached_engine(key, lambda: SelfSpeculativeEngine(
        self.cfg, self.params, kernel_layout=layout, fuse=fuse, weights=weights, **options))


  def exit_speculative_engine(self, batch: int | None = None, weights: str = "f32",
                              artifact: str | None = None, **overrides):
    """A cached lossless ``exits.speculative.ExitSpeculativeEngine``: drafts with an
    early layer + a trained exit module (``artifact``: default, the one shipped
    for the embedded SmolLM2), verifies with the full model; greedy only.
    Raises ``ExitArtifactError`` (one line naming the fix) when the artifact is
    missing, truncated or made for another model."""
    from recursive_lm.exits.speculative import from_artifact  # pylint: disable=g-import-not-at-top
    layout, fuse = self.decode_layout(batch)
    if layout is None:
      layout, fuse = "in_out", False
    key = ("exit_speculative", layout, fuse, weights, artifact, _options_key(overrides))
    return self.cached_engine(key, lambda: from_artifact(
        self.cfg, self.params, artifact, kernel_layout=layout, fuse=fuse, weights=weights,
        **overrides))

  def exit_module_engine(self, batch: int | None = None, policy: str = "free",
                         weights: str = "f32", artifact: str | None = None, **options):
    """A cached FREE / CALM ``EarlyExitEngine`` that exits through the trained
    exit modules of ``artifact`` (default: the one shipped for the embedded
    SmolLM2) with the artifact's head-free meta classifier
    (``exits.early_exit.module_exit_engine``; ``options``: its keyword
    arguments, e.g. ``layers=[6]``, ``confidence="softmax_max"``, ``k_max``).
    The threshold is a per-call argument of ``generate`` (no recompilation).
    Raises ``ExitArtifactError`` when the artifact is missing, truncated or
    made for another model."""
    from recursive_lm.exits.early_exit import from_artifact  # pylint: disable=g-import-not-at-top
    layout, fuse = self.decode_layout(batch)
    options.setdefault("threshold", 0.8)
    key = ("exit_module", policy, layout, fuse, weights, artifact, _options_key(options))
    return self.cached_engine(key, lambda: from_artifact(
        self.cfg, self.params, policy, artifact, kernel_layout=layout, fuse=fuse,
        weights=weights, **options))


def _options_key(options: dict) -> tuple:
  def freeze(v):
    if isinstance(v, (list, tuple)):
      return tuple(freeze(x) for x in v)
    if isinstance(v, dict):
      return tuple(sorted((k, freeze(x)) for k, x in v.items()))
    try:
      hash(v)
    except TypeError:
      return ("id", id(v))
    return v
  return tuple(sorted((k, freeze(v)) for k, v in options.items()))


# -- resolving what to load -------------------------------------------------------
def resolve_model_path(spec: str | os.PathLike | None) -> str | None:
  """Checks a model spec without loading weights; returns what ``load`` opens.

  A training run folder (``summary.json`` / ``checkpoints`` / ``metrics.jsonl``)
  resolves to its ``final/`` model. Raises ``CheckpointError`` with the fix for
  a path that does not exist, a run without a final model, a folder that is no
  model, or a ``.gguf`` file that is not GGUF.
  """
  if spec is None or os.fspath(spec) == "":
    return None
  text = os.fspath(spec)
  path = os.path.expanduser(text)
  if not os.path.exists(path):
    from recursive_lm.checkpoints.presets import _canonical, preset_names  # pylint: disable=g-import-not-at-top
    if _canonical(text) is not None:
      return text
    raise CheckpointError(
        f"model {text!r} not found: pass an existing .gguf file, a Hugging Face folder, "
        f"a folder saved by recursive_lm, a run folder, or a preset ({', '.join(preset_names())})")
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, NATIVE_CONFIG)) or \
        os.path.exists(os.path.join(path, "config.json")):
      return path
    final = os.path.join(path, "final")
    is_run = any(os.path.exists(os.path.join(path, f))
                 for f in ("summary.json", "metrics.jsonl", "checkpoints"))
    if os.path.exists(os.path.join(final, NATIVE_CONFIG)):
      return final
    if is_run:
      raise CheckpointError(
          f"{path} is a training run folder without a final model ({final} is missing:"
          " the run has not finished); rerun the same uptrain command to finish it, or"
          " pass a saved model folder")
    raise CheckpointError(
        f"{path} is not a model folder (no {NATIVE_CONFIG}, config.json or final/); pass "
        "a folder saved by recursive_lm, a Hugging Face folder or a .gguf file")
  if path.endswith(".gguf"):
    with open(path, "rb") as f:
      magic = f.read(4)
    if magic != b"GGUF":
      raise CheckpointError(
          f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a "
          "file written by llama.cpp / gguf, or a Hugging Face folder")
  return path


def load(spec: str | os.PathLike | None = None, compile_cache: bool = True) -> LoadedModel:
  """Loads a model: a preset, a GGUF file, a HF folder, a saved model or a run.

  Args:
    spec: None / ``"smollm2-135m"`` (the embedded SmolLM2-135M-Instruct), a
      ``.gguf`` file, a Hugging Face folder (``config.json`` + safetensors), a
      folder written by ``recursive_lm.export.save_model``, or a training run
      folder (its ``final/`` model is loaded).
    compile_cache: turn on JAX's persistent compilation cache (see
      ``recursive_lm.compile_cache``; ``RECURSIVE_LM_COMPILE_CACHE=0`` opts out).

  Example::

      m = recursive_lm.load("runs/main")       # -> runs/main/final
      m.cfg.plan                                # DepthPlan(prelude=0, block=15, loops=2, ...)
  """
  if compile_cache:
    from recursive_lm import compile_cache as cc  # pylint: disable=g-import-not-at-top
    cc.enable()
  path = resolve_model_path(spec)
  if path and os.path.isdir(path) and os.path.exists(os.path.join(path, NATIVE_CONFIG)):
    from recursive_lm import export  # pylint: disable=g-import-not-at-top
    cfg, params, tok = export.load_model(path)
    return LoadedModel(cfg, params, tok, path)
  from recursive_lm.checkpoints import load_checkpoint  # pylint: disable=g-import-not-at-top
  from recursive_lm.nn.weights import params_from_hf  # pylint: disable=g-import-not-at-top
  ck = load_checkpoint(path)
  return LoadedModel(ck.config, params_from_hf(ck.config, ck.weights), ck.tokenizer,
                     ck.source)


# -- generate / score -------------------------------------------------------------
def generate(model: LoadedModel, prompts: str | Sequence[str], max_new_tokens: int = 64,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0, chat: bool = False,
             engine: Any = None, speculative: bool = False, early_exit: str | None = None,
             threshold: float | None = None, exit_artifact: str | None = None
             ) -> tuple[str | list[str], GenerateOutput]:
  """Generates text; returns ``(texts, output)``.

  Args:
    model: from ``load``.
    prompts: one prompt (``str``: ``texts`` is a ``str``) or a list of prompts
      (``texts`` is a list, one per prompt).
    max_new_tokens: new tokens per prompt (generation also stops at EOS).
    sampling: ``SamplingConfig`` (greedy by default).
    seed: sampling seed.
    chat: wrap each prompt in the checkpoint's chat template.
    engine: an engine to decode with (``Engine``, ``EarlyExitEngine``,
      ``SelfSpeculativeEngine``, e.g. ``model.early_exit_engine(...)``);
      default: the model's cached ``Engine`` for this batch size.
    speculative: decode with the model's exit-module self-speculation
      (``model.exit_speculative_engine``; lossless, greedy only). Raises
      ``ExitArtifactError`` when no valid exit artifact matches the model; it
      never falls back silently.
    early_exit: "free" or "calm": exit early through the trained exit modules
      of ``exit_artifact`` (default: the one shipped for the embedded SmolLM2;
      ``model.exit_module_engine``) with their head-free meta-classifier
      confidence; a recursive model without ``exit_artifact`` exits at its
      loop boundaries instead (``model.early_exit_engine``). Lossy: a token
      exits iff its confidence >= ``threshold`` (default 0.8). Raises
      ``ExitArtifactError`` when the artifact is missing, truncated or made
      for another model.
    threshold: the early-exit threshold for this call (also for an
      ``EarlyExitEngine`` passed as ``engine``; no recompilation).

  ``output`` has the new token ids per row and ``prefill_seconds`` /
  ``decode_seconds`` / ``tokens_per_second``.

  Example::

      text, out = recursive_lm.generate(m, "The capital of Germany is", 16)
      print(text, out.tokens_per_second)
  """
  tok = model.tokenizer
  if tok is None:
    raise ValueError(f"{model.source} has no tokenizer; pass token ids to Engine.generate")
  single = isinstance(prompts, str)
  prompts = [prompts] if single else list(prompts)
  if not prompts:
    raise ValueError("generate needs at least one prompt")
  if chat:
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
  ids = [tok.encode(p) for p in prompts]
  from recursive_lm.exits.speculative import ExitSpeculativeEngine  # pylint: disable=g-import-not-at-top
  from recursive_lm.decode.early_exit import EarlyExitEngine  # pylint: disable=g-import-not-at-top
  if speculative and early_exit:
    raise ValueError("speculative=True and early_exit exclude each other; pick one")
  if early_exit is not None and early_exit not in ("free", "calm"):
    raise ValueError(f"early_exit must be 'free' or 'calm', got {early_exit!r}")
  if speculative and engine is None:
    engine = model.exit_speculative_engine(len(ids))
  if early_exit and engine is None:
    if model.cfg.plan.loops >= 2 and exit_artifact is None:
      engine = model.early_exit_engine(len(ids), policy=early_exit)
    else:
      engine = model.exit_module_engine(len(ids), early_exit, artifact=exit_artifact)
  engine = engine or model.engine(len(ids))
  if isinstance(engine, ExitSpeculativeEngine):
    if not sampling.greedy:
      raise ValueError("exit-module self-speculation is greedy only; drop the sampling "
                       "options or use the plain engine")
    out = engine.generate(ids, max_new_tokens)
  elif isinstance(engine, EarlyExitEngine):
    if threshold is not None and engine.adaptive is not None:
      threshold = None  # the adaptive estimator sets it
    out = engine.generate(ids, max_new_tokens, sampling=sampling, seed=seed,
                          threshold=threshold)
  else:
    if threshold is not None:
      raise ValueError("threshold= is an early-exit option; pass early_exit='free' or "
                       "'calm' (or an EarlyExitEngine)")
    out = engine.generate(ids, max_new_tokens, sampling=sampling, seed=seed)
  texts = [tok.decode([t for t in row if t != engine.eos_id], skip_special_tokens=False)
           for row in out.tokens]
  return (texts[0] if single else texts), out


def score_text(model: LoadedModel, text: str, window: int | None = None,
               engine: Engine | None = None) -> dict:
  """Per-token negative log-likelihood of ``text`` under the model.

  ``window``: context length (default: the model's ``max_seq_len``); longer
  texts are scored in non-overlapping windows. Returns
  ``{"mean_nll", "ppl", "n_tokens"}``.

  Example::

      recursive_lm.score_text(m, open("notes.txt").read())["ppl"]
  """
  tok = model.tokenizer
  if tok is None:
    raise ValueError(f"{model.source} has no tokenizer")
  if window is not None and window < 1:
    raise ValueError(f"window must be >= 1 token, got {window}; omit it to use the "
                     f"model's max_seq_len ({model.cfg.max_seq_len})")
  if not isinstance(text, str):
    raise TypeError(f"score_text scores one str, got {type(text).__name__}")
  ids = tok.encode(text)
  if len(ids) < 2:
    raise ValueError("the text has fewer than 2 tokens; nothing to score")
  nll = (engine or model.engine()).token_nll(ids, window=window)
  return {"mean_nll": float(nll.mean()), "ppl": float(np.exp(nll.mean())),
          "n_tokens": int(nll.size)}

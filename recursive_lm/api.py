"""High-level entry points importable from Colab: load a model, generate, score."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.decode.engine import Engine, GenerateOutput
from recursive_lm.decode.sampling import SamplingConfig

NATIVE_CONFIG = "recursive_lm_config.json"


@dataclasses.dataclass
class LoadedModel:
  cfg: ModelConfig
  params: Any
  tokenizer: Any
  source: str

  def engine(self, batch: int | None = None, weights: str = "f32") -> Engine:
    """An engine in the fastest measured layout for ``batch`` rows of decoding
    (results/bench_decode.md): fused panel kernels read by the native CPU
    matmul up to 64 rows when it is available, else fused [out, in] kernels at
    batch 1; the training layout otherwise (``None``: scoring). ``weights``:
    "f32" | "bf16" | "int8" (int8 needs the native panel kernel), see
    nn.model.decode_layout."""
    import jax  # pylint: disable=g-import-not-at-top
    from recursive_lm.kernels import native  # pylint: disable=g-import-not-at-top
    from recursive_lm.kernels.panel import MAX_NATIVE_ROWS  # pylint: disable=g-import-not-at-top
    if (batch is not None and batch <= MAX_NATIVE_ROWS and jax.default_backend() == "cpu"
        and native.load()):
      return Engine(self.cfg, self.params, kernel_layout="panel", fuse=True,
                    weights=weights)
    if batch == 1:
      return Engine(self.cfg, self.params, kernel_layout="out_in", fuse=True,
                    weights=weights)
    return Engine(self.cfg, self.params, weights=weights)


def load(spec: str | None = None) -> LoadedModel:
  """Loads a preset name, a GGUF file, a HF folder, or a recursive_lm folder."""
  if spec and os.path.isdir(spec) and os.path.exists(os.path.join(spec, NATIVE_CONFIG)):
    from recursive_lm import export
    cfg, params, tok = export.load_model(spec)
    return LoadedModel(cfg, params, tok, spec)
  from recursive_lm.checkpoints import load_checkpoint
  from recursive_lm.nn.weights import params_from_hf
  ck = load_checkpoint(spec)
  return LoadedModel(ck.config, params_from_hf(ck.config, ck.weights), ck.tokenizer,
                     ck.source)


def generate(model: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 64,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0, chat: bool = False,
             engine: Engine | None = None) -> tuple[list[str], GenerateOutput]:
  tok = model.tokenizer
  if tok is None:
    raise ValueError(f"{model.source} has no tokenizer; pass token ids to Engine.generate")
  if chat:
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
  ids = [tok.encode(p) for p in prompts]
  engine = engine or model.engine(len(ids))
  out = engine.generate(ids, max_new_tokens, sampling=sampling, seed=seed)
  texts = [tok.decode([t for t in row if t != engine.eos_id], skip_special_tokens=False)
           for row in out.tokens]
  return texts, out


def score_text(model: LoadedModel, text: str, window: int | None = None,
               engine: Engine | None = None) -> dict:
  tok = model.tokenizer
  if tok is None:
    raise ValueError(f"{model.source} has no tokenizer")
  ids = tok.encode(text)
  if len(ids) < 2:
    raise ValueError("the text has fewer than 2 tokens; nothing to score")
  nll = (engine or model.engine()).token_nll(ids, window=window)
  return {"mean_nll": float(nll.mean()), "ppl": float(np.exp(nll.mean())),
          "n_tokens": int(nll.size)}

"""GGUF importer (llama.cpp files) into the canonical HF-layout checkpoint.

Every tensor is dequantized to float32 with ``gguf.quants.dequantize`` (all
quant types gguf-py supports), GGUF names are mapped to HF Llama names, and
llama.cpp's Q/K row permutation is undone so that the weights work with HF
"rotate-half" RoPE (see shared/specs/smollm2_gguf.md).
"""
from __future__ import annotations

import math
import os
import re
import sys
from typing import Any

import numpy as np

from recursive_lm.checkpoints.hf_folder import (
    CheckpointError, LoadedCheckpoint, _short_list, validate_weights)
from recursive_lm.config import ConfigError, DepthPlan, ModelConfig, RopeConfig
from recursive_lm.tokenizer import Tokenizer, TokenizerError

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
# Large metadata arrays only the tokenizer needs (decoded on demand).
_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre",
                   "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                   "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                   "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
                   "tokenizer.chat_template")


def gguf_to_hf_name(name: str) -> str | None:
  """HF name for a GGUF tensor name, or None if it has no HF counterpart."""
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  m = _BLOCK_RE.match(name)
  if m and m.group(2) in _BLOCK_NAMES:
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
  return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf permutation: per head, halves -> pairs.

  Rows of one head go from HF order [x0..x_{d/2-1}, y0..y_{d/2-1}] to
  interleaved [x0, y0, x1, y1, ...]: reshape (n_head, 2, d/2) -> (n_head, d/2, 2).
  """
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def reverse_permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of ``permute_qk``: interleaved pairs -> HF rotate-half halves.

  Use ``n_head = n_heads`` for Q and ``n_head = n_kv_heads`` for K.
  """
  return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


ROPE_FREQS = "rope_freqs.weight"


def llama3_freq_factors(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """llama.cpp's ``rope_freqs`` for ``rope``: base / scaled inverse frequency,
  per frequency (what convert_hf_to_gguf writes for ``rope_type: llama3``)."""
  from recursive_lm.nn.layers import rope_inv_freq
  base = rope_inv_freq(RopeConfig(theta=rope.theta), head_dim).astype(np.float64)
  return base / rope_inv_freq(rope, head_dim).astype(np.float64)


def rope_from_freq_factors(factors: np.ndarray, theta: float, head_dim: int,
                           original_ctx: int | None = None, path: str = "GGUF"
                           ) -> RopeConfig:
  """The ``RopeConfig`` whose per-frequency factors equal llama.cpp's ``rope_freqs``.

  Llama-3.x GGUF files carry the llama3 RoPE scaling only as this tensor
  (frequency i is divided by ``factors[i]``). The llama3 rule depends on
  ``low_freq_factor`` / ``high_freq_factor`` only through their ratios to
  ``original_max_position`` (``original_ctx``, default 8192), so those are
  recovered from the factors: ``factor`` is the low-frequency plateau and the
  smoothed band between gives ``(low, high) / original`` by least squares; a
  band of 0 or 1 frequencies puts the thresholds between the neighbouring
  frequencies (every choice there gives the same factors). All ones is plain
  RoPE and a constant is linear scaling. The result is checked by recomputing
  the factors.

  Raises:
    ConfigError: the tensor has the wrong length or does not follow the rule.
  """
  n = head_dim // 2
  f = np.asarray(factors, np.float64).reshape(-1)
  if f.size != n or not np.all(np.isfinite(f)) or np.any(f <= 0):
    raise ConfigError(f"{path}: rope_freqs.weight has {f.size} values (need {n} "
                      "positive ones, one per rotary frequency of head_dim "
                      f"{head_dim}); the file is not a llama.cpp Llama-3 export")
  if np.allclose(f, 1.0, rtol=1e-6, atol=0):
    return RopeConfig(theta=theta)
  if np.allclose(f, f[0], rtol=1e-6, atol=0):
    return RopeConfig(theta=theta, scaling="linear", factor=float(f[0]))
  big = float(f.max())
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  x = inv / (2 * math.pi)            # 1 / wavelength
  tol = 1e-5
  one = np.abs(f - 1) <= tol
  plateau = np.abs(f - big) <= tol * big
  mid = ~one & ~plateau
  s = (1 / f[mid] - 1 / big) / (1 - 1 / big)   # smooth factor of the band
  x1 = x[one].min() if one.any() else None      # slowest unscaled frequency
  xf = x[plateau].max() if plateau.any() else None  # fastest fully scaled one
  if mid.sum() >= 2:
    slope, a = np.polyfit(s, x[mid], 1)         # x = a + s * (b - a)
    b = a + slope
  else:
    lo = xf if xf is not None else 0.0
    hi = x1 if x1 is not None else 2 * x.max()
    if mid.sum() == 1:
      xm, sm = float(x[mid][0]), float(s[0])
      bounds = [(xm - lo) / sm if sm > 0 else np.inf,
                (hi - xm) / (1 - sm) if sm < 1 else np.inf]
      d = 0.5 * min(bounds)
      a, b = xm - sm * d, xm + (1 - sm) * d
    else:
      a, b = lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3
  orig = int(original_ctx or 8192)
  rope = None
  if b > a > 0:
    try:
      rope = RopeConfig(theta=theta, scaling="llama3", factor=big,
                        low_freq_factor=float(a * orig),
                        high_freq_factor=float(b * orig),
                        original_max_position=orig)
    except ConfigError:
      rope = None
  if rope is None or not np.allclose(llama3_freq_factors(rope, head_dim), f,
                                     rtol=1e-4, atol=0):
    raise ConfigError(f"{path}: rope_freqs.weight {np.round(f, 4).tolist()} does not "
                      "follow Llama-3's RoPE scaling rule (1 for fast frequencies, a "
                      "constant factor for slow ones, smoothed between); import the "
                      "HF folder instead")
  return rope


def _open_reader(path: str):
  import gguf
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # ValueError, IndexError, struct errors on truncation.
    raise CheckpointError(
        f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); the file is "
        "truncated or corrupt: re-download it") from e


def _value(reader, key: str, default: Any = None) -> Any:
  """Decoded metadata value; float32 scalars as their shortest decimal."""
  import gguf
  field = reader.fields.get(key)
  if field is None:
    return default
  val = field.contents()
  if field.types == [gguf.GGUFValueType.FLOAT32]:
    val = float(str(np.float32(val)))
  return val


def gguf_metadata(reader, include_tokenizer: bool = False) -> dict[str, Any]:
  """All metadata key -> value (the big tokenizer arrays only when asked)."""
  big = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
         "tokenizer.ggml.merges", "tokenizer.ggml.scores")
  return {k: _value(reader, k) for k in reader.fields
          if not k.startswith("GGUF.") and (include_tokenizer or k not in big)}


def config_from_gguf(reader, path: str = "GGUF") -> ModelConfig:
  """Builds a vanilla ``ModelConfig`` from GGUF metadata."""
  arch = _value(reader, "general.architecture")
  if arch != "llama":
    raise ConfigError(
        f"{path}: general.architecture={arch!r} is not supported; recursive_lm "
        "imports GGUF files of architecture 'llama' (SmolLM/SmolLM2, TinyLlama, "
        "Llama-2/3 style)")

  def need(key: str):
    v = _value(reader, f"llama.{key}")
    if v is None:
      raise CheckpointError(f"{path}: GGUF metadata lacks llama.{key}")
    return v

  def one(v, key):
    if isinstance(v, list):  # Per-layer arrays: only uniform ones are supported.
      if len(set(v)) != 1:
        raise ConfigError(f"{path}: per-layer llama.{key}={v} is not supported")
      v = v[0]
    return int(v)

  d_model = int(need("embedding_length"))
  n_heads = one(need("attention.head_count"), "attention.head_count")
  n_kv = one(_value(reader, "llama.attention.head_count_kv", n_heads),
             "attention.head_count_kv")
  head_dim = _value(reader, "llama.attention.key_length") or d_model // n_heads
  rot = _value(reader, "llama.rope.dimension_count")
  if rot is not None and int(rot) != int(head_dim):
    raise ConfigError(f"{path}: llama.rope.dimension_count={rot} != head_dim="
                      f"{head_dim}; partial rotary embeddings are not supported")
  theta = float(_value(reader, "llama.rope.freq_base", 10000.0))
  kind = _value(reader, "llama.rope.scaling.type", "none")
  ctx = int(_value(reader, "llama.context_length", 2048))
  if kind in (None, "none"):
    rope = RopeConfig(theta=theta)
  elif kind in ("linear", "yarn"):
    rope = RopeConfig(
        theta=theta, scaling=kind,
        factor=float(_value(reader, "llama.rope.scaling.factor", 1.0)),
        original_max_position=int(_value(
            reader, "llama.rope.scaling.original_context_length", ctx)),
        beta_fast=float(_value(reader, "llama.rope.scaling.yarn_beta_fast", 32.0)),
        beta_slow=float(_value(reader, "llama.rope.scaling.yarn_beta_slow", 1.0)))
  else:
    raise ConfigError(f"{path}: llama.rope.scaling.type={kind!r} is not supported "
                      "(supported: none, linear, yarn)")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  vocab = _value(reader, "llama.vocab_size")
  if vocab is None:
    vocab = len(tokens.data) if tokens is not None else next(
        int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
  names = {t.name for t in reader.tensors}

  def tid(key):
    v = _value(reader, f"tokenizer.ggml.{key}")
    return None if v is None else int(v)

  return ModelConfig(
      vocab_size=int(vocab), d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv,
      d_ff=one(need("feed_forward_length"), "feed_forward_length"),
      head_dim=int(head_dim), plan=DepthPlan.vanilla(int(need("block_count"))),
      norm_eps=float(_value(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
      rope=rope, tie_embeddings="output.weight" not in names, max_seq_len=ctx,
      bos_id=tid("bos_token_id"), eos_id=tid("eos_token_id"),
      pad_id=tid("padding_token_id"),
      name=str(_value(reader, "general.name") or _value(reader, "general.basename")
               or "llama"))


def tokenizer_from_gguf(reader) -> Tokenizer:
  """Builds the ``Tokenizer`` from a reader's ``tokenizer.*`` metadata."""
  return Tokenizer.from_gguf_metadata(
      {k: _value(reader, k) for k in _TOKENIZER_KEYS if k in reader.fields})


def _progress(total: int, desc: str, enabled: bool | None):
  try:
    from tqdm import tqdm
  except ImportError:  # pragma: no cover
    return None
  disable = (not sys.stderr.isatty()) if enabled is None else not enabled
  return tqdm(total=total, desc=desc, unit="tensor", leave=False, disable=disable)


def load_gguf(path: str | os.PathLike, *, validate: bool = True,
              with_tokenizer: bool = True, progress: bool | None = None
              ) -> LoadedCheckpoint:
  """Imports a llama-architecture GGUF file.

  Args:
    path: the ``.gguf`` file.
    validate: check names/shapes against the config (``validate_weights``).
    with_tokenizer: build the tokenizer; an unsupported tokenizer model only
      warns and gives ``tokenizer=None``.
    progress: tqdm bar for dequantization; None shows it when stderr is a TTY.

  Raises:
    CheckpointError: missing, truncated or corrupt file; unknown tensors.
    ConfigError: unsupported architecture or rope settings.
  """
  import gguf
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: GGUF file not found")
  reader = _open_reader(path)
  config = config_from_gguf(reader, path)

  tensors = [t for t in reader.tensors if t.name != ROPE_FREQS]
  rope_t = [t for t in reader.tensors if t.name == ROPE_FREQS]
  if rope_t:
    factors = gguf.quants.dequantize(rope_t[0].data, rope_t[0].tensor_type)
    config = config.replace(rope=rope_from_freq_factors(
        np.asarray(factors, np.float64).reshape(-1), config.rope.theta,
        config.head_dim, _value(reader, "llama.rope.scaling.original_context_length"),
        path))
  unknown = [t.name for t in tensors if gguf_to_hf_name(t.name) is None]
  if unknown:
    raise CheckpointError(f"{path}: tensors with no Llama counterpart: "
                          f"{_short_list(unknown)}")
  weights: dict[str, np.ndarray] = {}
  bar = _progress(len(tensors), f"dequantizing {os.path.basename(path)}",
                  progress)
  try:
    for t in tensors:
      shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ne is reversed.
      if t.data.nbytes != t.n_bytes:
        raise CheckpointError(
            f"{path}: tensor {t.name} has {t.data.nbytes} of {t.n_bytes} bytes; "
            "the file is truncated: re-download it")
      try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
      except NotImplementedError as e:
        raise CheckpointError(f"{path}: tensor {t.name}: {e}") from e
      arr = np.asarray(arr).reshape(shape)
      if arr.dtype != np.float32 or np.may_share_memory(arr, reader.data):
        arr = arr.astype(np.float32)  # Copies: detach from the memmap.
      hf = gguf_to_hf_name(t.name)
      if hf.endswith("q_proj.weight"):
        arr = reverse_permute_qk(arr, config.n_heads)
      elif hf.endswith("k_proj.weight"):
        arr = reverse_permute_qk(arr, config.n_kv_heads)
      weights[hf] = arr
      if bar is not None:
        bar.update()
  finally:
    if bar is not None:
      bar.close()
  if validate:
    validate_weights(config, weights, source=path)

  tokenizer = None
  if with_tokenizer and "tokenizer.ggml.model" in reader.fields:
    try:
      tokenizer = tokenizer_from_gguf(reader)
    except TokenizerError as e:
      import warnings
      warnings.warn(f"{path}: no tokenizer: {e}", stacklevel=2)
  return LoadedCheckpoint(config=config, weights=weights, tokenizer=tokenizer,
                          source=path)

"""Training data for exit modules and its cached per-layer features.

Token streams:
* the embedded pydoc corpus, split by document key (``data.sources.is_validation_key``):
  ``train`` documents feed training, ``validation`` documents are held out;
* continuations the frozen model writes itself with the project's ``Engine``
  (prompts = windows of the training stream; half greedy, half sampled at
  temperature 0.8; seeded; cached as .npy under the run folder), so that the
  modules see the model's own decoding distribution.

Features of a stream cut into [n, T] sequences (one sequence-mode forward
each, ``decode.depth.hidden_states``): the residual state after every exit
layer (float16 memmap [n*T, E, D]), the final state after the final norm
(float16 [n*T, D]) and the model's argmax over the full vocabulary (int32).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ModelConfig
from recursive_lm.decode import depth as D


def corpus_stream(tokenizer, split: str, max_tokens: int, seed: int = 0) -> np.ndarray:
  """Token ids of the pydoc corpus documents of ``split`` (train|validation),
  documents shuffled (seeded) and joined with EOS, cut at ``max_tokens``."""
  from recursive_lm.data.pydoc_corpus import corpus_documents  # pylint: disable=g-import-not-at-top
  from recursive_lm.data.sources import is_validation_key  # pylint: disable=g-import-not-at-top
  docs = [t for k, t in corpus_documents() if is_validation_key(k) == (split == "validation")]
  order = np.random.default_rng(seed).permutation(len(docs))
  eos = tokenizer.eos_id if getattr(tokenizer, "eos_id", None) is not None else 2
  out, n = [], 0
  for i in order:
    ids = tokenizer.encode(docs[i]) + [eos]
    out.append(np.asarray(ids, np.int32))
    n += len(ids)
    if n >= max_tokens:
      break
  return np.concatenate(out)[:max_tokens]


def self_generated(cfg: ModelConfig, params, stream: np.ndarray, n_prompts: int,
                   prompt_len: int, new_tokens: int, seed: int, cache_dir: str,
                   batch: int = 32) -> np.ndarray:
  """[n_prompts, prompt_len + new_tokens] prompts + the model's continuations
  (first half greedy, second half temperature 0.8), cached on disk."""
  key = hashlib.sha256(json.dumps([cfg.name, int(stream[:4096].sum()), len(stream), n_prompts,
                                   prompt_len, new_tokens, seed]).encode()).hexdigest()[:12]
  path = os.path.join(cache_dir, f"selfgen_{key}.npy")
  if os.path.exists(path):
    return np.load(path)
  from recursive_lm.decode.engine import Engine  # pylint: disable=g-import-not-at-top
  from recursive_lm.decode.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(stream) - prompt_len, n_prompts)
  prompts = [stream[s:s + prompt_len].tolist() for s in starts]
  eng = Engine(cfg, params, kernel_layout="panel", fuse=True)
  rows = []
  for i in range(0, n_prompts, batch):
    greedy = i < n_prompts // 2
    samp = SamplingConfig() if greedy else SamplingConfig(temperature=0.8)
    out = eng.generate(prompts[i:i + batch], new_tokens, sampling=samp, seed=seed + i,
                       stop_at_eos=False)
    for p, t in zip(prompts[i:i + batch], out.tokens):
      rows.append(np.asarray(p + t, np.int32))
    print(f"  self-generated {len(rows)}/{n_prompts} continuations", flush=True)
  arr = np.stack(rows)
  os.makedirs(cache_dir, exist_ok=True)
  np.save(path, arr)
  return arr


def as_sequences(stream: np.ndarray, seq_len: int) -> np.ndarray:
  n = len(stream) // seq_len
  return stream[:n * seq_len].reshape(n, seq_len)


def make_extractor(cfg: ModelConfig, exit_layers: Sequence[int]):
  """jitted (params, tokens [B, T]) -> (states [B, T, E, D] f16, final normed [B, T, D] f16,
  argmax [B, T] int32)."""
  layers = tuple(sorted(exit_layers))

  @jax.jit
  def run(params, tokens):
    states, h = D.hidden_states(cfg, params, tokens, layers + (cfg.plan.effective_depth,))
    states = states[:len(layers)]
    logits = D.head(cfg, params, h)
    scale = params["final_norm"]["scale"]
    hf = h.astype(jnp.float32)
    hn = hf * jax.lax.rsqrt(jnp.mean(hf * hf, -1, keepdims=True) + cfg.norm_eps) * scale
    return (jnp.moveaxis(states, 0, 2).astype(jnp.float16), hn.astype(jnp.float16),
            jnp.argmax(logits, -1).astype(jnp.int32))
  return run


def extract(cfg: ModelConfig, params, seqs: np.ndarray, exit_layers: Sequence[int],
            out_dir: str, batch: int = 4, progress: bool = True) -> dict:
  """Features of ``seqs`` [n, T] into ``out_dir`` (memmaps; reused when complete)."""
  layers = sorted(exit_layers)
  done_path = os.path.join(out_dir, "done.json")
  n, t = seqs.shape
  want = {"layers": layers, "shape": [n, t], "sum": int(seqs.sum())}
  if os.path.exists(done_path):
    with open(done_path) as f:
      if json.load(f) == want:
        return open_features(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  d = cfg.d_model
  mm = lambda name, shape, dt: np.lib.format.open_memmap(
      os.path.join(out_dir, name), mode="w+", dtype=dt, shape=shape)
  states = mm("states.npy", (n * t, len(layers), d), np.float16)
  final = mm("final.npy", (n * t, d), np.float16)
  teacher = mm("teacher.npy", (n * t,), np.int32)
  np.save(os.path.join(out_dir, "tokens.npy"), seqs.reshape(-1))
  run = make_extractor(cfg, layers)
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=n, desc=f"features {os.path.basename(out_dir)}", unit="seq",
               mininterval=2.0)
  for i in range(0, n, batch):
    chunk = seqs[i:i + batch]
    pad = batch - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    s, f, a = (np.asarray(x) for x in run(params, jnp.asarray(chunk)))
    m = (batch - pad) * t
    states[i * t:i * t + m] = s[:batch - pad].reshape(m, len(layers), d)
    final[i * t:i * t + m] = f[:batch - pad].reshape(m, d)
    teacher[i * t:i * t + m] = a[:batch - pad].reshape(m)
    if bar is not None:
      bar.update(batch - pad)
  if bar is not None:
    bar.close()
  for x in (states, final, teacher):
    x.flush()
  with open(done_path, "w") as f:
    json.dump(want, f)
  return open_features(out_dir)


def open_features(out_dir: str) -> dict:
  with open(os.path.join(out_dir, "done.json")) as f:
    info = json.load(f)
  load = lambda n: np.load(os.path.join(out_dir, n), mmap_mode="r")
  return {"layers": info["layers"], "seq_len": info["shape"][1], "states": load("states.npy"),
          "final": load("final.npy"), "teacher": load("teacher.npy"),
          "tokens": load("tokens.npy")}

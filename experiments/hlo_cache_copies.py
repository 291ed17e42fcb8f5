"""Counts copies of KV-cache buffers in the compiled decode loop of each policy.

    python experiments/hlo_cache_copies.py [--batch 8]

Builds a small random vanilla model (6 layers, panel layout), compiles each
engine's generate function, and counts ``copy`` instructions whose shape is a
cache layer's ([1, B, Hkv, S, Dh] or its flat [B*Hkv, S, Dh] view), split into
copies in the entry computation (once per call: the non-donated input) and
copies inside the decode loop (every step). A ``lax.cond`` / ``lax.switch``
that carries the cache shows up as copies in its branches; the policies keep
the cache out of conditionals (``decode/inplace.py``), so the in-loop count
should be 0 for every policy.
"""
from __future__ import annotations

import collections
import re

from absl import app, flags

flags.DEFINE_integer("batch", 8, "Batch size.")
FLAGS = flags.FLAGS


def cache_copies(hlo: str, s: int, dh: int) -> dict[str, int]:
  """{'entry': n, 'loop': n, 'loop_kb': kB}: copies of cache-shaped f32 buffers
  in the entry computation and elsewhere (loop bodies, branches), and the
  kilobytes of every copy outside the entry computation."""
  shape = re.compile(rf"= f32\[[0-9,]*,{s},{dh}\]\S* copy\(")
  any_copy = re.compile(r"= ([a-z]+)(\d*)\[([0-9,]*)\]\S* copy\(")
  out, comp = collections.Counter(), None
  for line in hlo.split("\n"):
    head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head:
      comp = "entry" if head.group(1) else "loop"
      continue
    if shape.search(line):
      out[comp] += 1
    m = any_copy.search(line)
    if m and comp == "loop":
      n = 1
      for d in filter(None, m.group(3).split(",")):
        n *= int(d)
      out["loop_kb"] += n * max(int(m.group(2) or 8), 8) / 8 / 1024
  return {"entry": out["entry"], "loop": out["loop"], "loop_kb": int(out["loop_kb"])}


def main(_):
  import jax
  import jax.numpy as jnp
  from recursive_lm.config import DepthPlan, tiny_config
  from recursive_lm.decode.early_exit import EarlyExitEngine
  from recursive_lm.decode.engine import Engine, prepare
  from recursive_lm.decode.free import free_init
  from recursive_lm.decode.sampling import SamplingConfig
  from recursive_lm.early_exit.confidence import MetaClassifier
  from recursive_lm.nn.model import init_params
  b, n_new = FLAGS.batch, 16
  cfg = tiny_config(plan=DepthPlan.vanilla(6), max_seq_len=256, eos_id=None, d_model=64,
                    n_heads=4, n_kv_heads=2, d_ff=128)
  params = init_params(cfg, seed=1)
  layout = dict(kernel_layout="panel", fuse=True)
  meta = MetaClassifier().init(jax.random.key(0), jnp.zeros((1, cfg.d_model)))
  prompts = [[(7 * i + j) % 90 + 2 for j in range(20)] for i in range(b)]

  def hlo(eng):
    _, tokens, lens, cache = prepare(eng.cfg, prompts, n_new, eng.pad_id)
    last, cache = eng._prefill(eng.params, cache, tokens, lens)
    args = (eng.params, cache, last, lens, jax.random.key(0))
    kw = dict(max_new=n_new, sampling=SamplingConfig(), stop_at_eos=False)
    if isinstance(eng, EarlyExitEngine):
      pst = free_init(eng.cfg, b, eng.spec, eng.bmm_state) if eng.policy == "free" else None
      args += (jnp.float32(1e9), pst, jnp.zeros((b, n_new), jnp.int32))
    return eng._generate.lower(*args, **kw).compile().as_text(), cache_len(cache)

  def cache_len(cache):
    return cache["block"][0][0].shape[3]

  engines = {"full depth": Engine(cfg, params, **layout)}
  for pol, conf, mp in [("free", "meta", meta), ("free", "softmax_max", None),
                        ("calm", "state", None), ("calm", "softmax_max", None)]:
    kw = (dict(exits=[3], k_max=8, deep_buckets=(1, 2, 4, 9)) if pol == "free"
          else dict(exits=[2, 3, 4]))
    engines[f"{pol} {conf}"] = EarlyExitEngine(cfg, params, policy=pol, confidence=conf,
                                               meta_params=mp, threshold=float("inf"),
                                               **kw, **layout)
  print(f"batch {b}: copies of cache-layer buffers in the compiled generate "
        f"({2 * cfg.plan.effective_depth} cache buffers)")
  for name, eng in engines.items():
    text, s = hlo(eng)
    c = cache_copies(text, s, cfg.head_dim)
    print(f"  {name:18s} entry {c['entry']:3d}   decode loop {c['loop']:3d}   "
          f"(all copies in the loop: {c['loop_kb']} kB)")


if __name__ == "__main__":
  app.run(main)

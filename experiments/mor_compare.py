r"""Vanilla vs recursive vs Mixture-of-Recursions at equal training FLOPs (CPU).

    python experiments/mor_compare.py            # ~15-20 min on 2 CPU cores
    python experiments/mor_compare.py --quick    # seconds (tests)

Tiny models trained from scratch on the embedded pydoc corpus (byte-level ids
by default; ``--encode=tokenizer`` uses the SmolLM2 tokenizer, whose 49k-row
LM head then dominates the FLOPs of such small models). Every model gets the
training FLOPs of the vanilla model's ``--vanilla_steps`` steps, counted with
the paper's accounting (``recursive_lm.mor.flops``); cheaper models take more
steps, like the paper's isoFLOP runs. Schedule: warmup-stable-decay (warmup
5 % of the vanilla run, linear decay over the last 20 %), AdamW lr 3e-3,
b = (0.9, 0.95), wd 0.1, clip 1.

Models (Middle-Cycle 1 + block + 1, N_r recursions):
  vanilla            L unique layers
  recursive          1 + (L-2)/N_r shared x N_r + 1
  mor_expert         + expert-choice router, capacities (N_r-r+1)/N_r, recursion-wise KV
  mor_expert_share   + expert-choice router, recursive KV sharing
  mor_token          + token-choice router (softmax, alpha 1, balancing 0.1), recursion-wise KV
  mor_token_share    + token-choice router, recursive KV sharing

Reports held-out NLL (expert-choice: top-k routing as in training and the
paper, and causal threshold routing as in decoding), unique parameters,
training FLOPs and tokens, wall time, router metrics, and greedy decode
throughput (``decode.engine.Engine``, cache mode, causal routing). Writes
``<out>.json`` and ``<out>.md`` with the command and date; per-model training
curves go to ``<workdir>/<model>/metrics.jsonl`` (MetricWriter).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shlex
import sys
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import DepthPlan, ModelConfig, RouterConfig
from recursive_lm.data import eval_batches, make_lm_iterator, make_source
from recursive_lm.decode.engine import Engine
from recursive_lm.decode.sampling import SamplingConfig
from recursive_lm.mor import flops as F
from recursive_lm.training.mor_step import make_mor_eval_step, make_mor_train_step
from recursive_lm.nn.model import init_params, param_count
from recursive_lm.training.metrics import MetricWriter
from recursive_lm.training.optim import OptimConfig
from recursive_lm.training.train_step import LossConfig, init_train_state
from recursive_lm.training.trainer import ByteEncoder

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "tiny smoke run (tests)")
flags.DEFINE_string("out", "results/mor_compare", "output prefix (.json/.md)")
flags.DEFINE_string("workdir", "runs/mor_compare", "per-model metrics.jsonl/TensorBoard")
flags.DEFINE_list("models", ["vanilla", "recursive", "mor_expert", "mor_expert_share",
                             "mor_token", "mor_token_share"], "models to run")
flags.DEFINE_enum("encode", "bytes", ["bytes", "tokenizer"], "token ids")
flags.DEFINE_integer("d_model", 128, "width")
flags.DEFINE_integer("layers", 8, "vanilla depth L (Middle-Cycle: (L-2) % N_r == 0)")
flags.DEFINE_integer("n_r", 3, "recursions")
flags.DEFINE_integer("seq_len", 256, "training sequence length")
flags.DEFINE_integer("batch", 8, "sequences per step")
flags.DEFINE_integer("vanilla_steps", 300, "steps of the vanilla model; sets the FLOP budget")
flags.DEFINE_float("lr", 3e-3, "peak learning rate")
flags.DEFINE_integer("eval_batches", 8, "held-out batches")
flags.DEFINE_integer("decode_batch", 4, "decode rows")
flags.DEFINE_integer("decode_new", 64, "decoded tokens per row")
flags.DEFINE_integer("seed", 0, "init and data seed")


def model_config(name: str, vocab: int) -> ModelConfig:
  d, L, n_r = FLAGS.d_model, FLAGS.layers, FLAGS.n_r
  base = ModelConfig(vocab_size=vocab, d_model=d, n_heads=max(d // 32, 1),
                     n_kv_heads=max(d // 64, 1), d_ff=3 * d, plan=DepthPlan.vanilla(L),
                     tie_embeddings=True, max_seq_len=max(FLAGS.seq_len, 512),
                     eos_id=1, pad_id=0, bos_id=0, name=name)
  if name == "vanilla":
    return base
  if (L - 2) % n_r:
    raise app.UsageError(f"--layers={L}: Middle-Cycle needs (L - 2) % n_r == 0")
  plan = DepthPlan(1, (L - 2) // n_r, n_r, 1)
  routers = {
      "recursive": None,
      "mor_expert": RouterConfig(kind="expert", kv="recursion"),
      "mor_expert_share": RouterConfig(kind="expert", kv="share_first"),
      "mor_token": RouterConfig(kind="token", gate="softmax", alpha=1.0, kv="recursion",
                                impl="dense", balance_loss=0.1, z_loss=1e-3),
      "mor_token_share": RouterConfig(kind="token", gate="softmax", alpha=1.0,
                                      kv="share_first", impl="dense", balance_loss=0.1,
                                      z_loss=1e-3),
  }
  if name not in routers:
    raise app.UsageError(f"unknown model {name!r}")
  return base.replace(plan=plan, router=routers[name])


def _encoder():
  if FLAGS.encode == "bytes":
    return ByteEncoder(258), 1, 258
  from recursive_lm.checkpoints import load_checkpoint  # pylint: disable=g-import-not-at-top
  tok = load_checkpoint("smollm2-135m").tokenizer
  return tok.encode, int(tok.eos_id), 49152


def _evaluate(cfg, params, val, routing):
  fn = jax.jit(make_mor_eval_step(cfg, routing))
  tot, n, mets = 0.0, 0.0, []
  for b in val:
    s, c, rm = fn(params, {k: jnp.asarray(v) for k, v in b.items()})
    tot, n = tot + float(s), n + float(c)
    mets.append({k: float(v) for k, v in rm.items()})
  avg = {k: float(np.mean([m[k] for m in mets])) for k in (mets[0] if mets else {})}
  return tot / max(n, 1.0), avg


def _decode_speed(cfg, params, prompts):
  eng = Engine(cfg, params)
  samp = SamplingConfig(greedy=True)
  eng.generate(prompts, max_new_tokens=FLAGS.decode_new, sampling=samp,
               stop_at_eos=False)  # compile
  best = None
  for _ in range(2):
    out = eng.generate(prompts, max_new_tokens=FLAGS.decode_new, sampling=samp,
                       stop_at_eos=False)
    tps = out.new_tokens / max(out.decode_seconds, 1e-9)
    best = tps if best is None else max(best, tps)
  return best


def _depthwise_speed(cfg, params, prompts):
  """End-to-end serving tokens/s through continuous depth-wise batching (4x as
  many requests as slots; prefill, refill and head included). None for a
  vanilla model (nothing to batch depth-wise)."""
  if cfg.plan.loops < 2:
    return None
  from recursive_lm.decode.depthwise import DepthwiseBatcher
  from recursive_lm.mor.depthwise import MoRDepthwiseBatcher
  cls = MoRDepthwiseBatcher if cfg.router is not None else DepthwiseBatcher
  bat = cls(cfg, params, slots=len(prompts))
  reqs = list(prompts) * 4
  bat.generate(reqs, max_new_tokens=FLAGS.decode_new, stop_at_eos=False)  # compile
  best = None
  for _ in range(2):
    out = bat.generate(reqs, max_new_tokens=FLAGS.decode_new, stop_at_eos=False)
    best = max(best or 0.0, out.tokens_per_second)
  return best


def run_model(name, encode, eos, vocab, val, prompts, budget):
  cfg = model_config(name, vocab)
  t, b = FLAGS.seq_len, FLAGS.batch
  fpt = F.train_flops_per_token(cfg, t)
  steps = max(1, int(round(budget / (fpt * b * t))))
  warm = max(1, int(0.05 * FLAGS.vanilla_steps))
  ocfg = OptimConfig(lr=FLAGS.lr, schedule="wsd", warmup_steps=min(warm, steps),
                     total_steps=steps, decay_fraction=0.2, min_lr_ratio=0.0,
                     weight_decay=0.1, clip_norm=1.0)
  params = init_params(cfg, seed=FLAGS.seed)
  n_params = param_count(params)
  n_emb = params["embed"]["embedding"].size
  state = init_train_state(cfg, ocfg, params)
  step_fn = jax.jit(make_mor_train_step(cfg, ocfg, LossConfig(kd_weight=0.0)),
                    donate_argnums=(0,))
  it = make_lm_iterator(make_source("pydoc", "train"), encode, eos, t, b,
                        seed=FLAGS.seed)
  writer = MetricWriter(os.path.join(FLAGS.workdir, name))
  t0 = time.time()
  first = None
  for i in range(steps):
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    state, m = step_fn(state, None, batch)
    if i == 0:
      jax.block_until_ready(m)
      first = time.time() - t0
    if i % 25 == 0 or i == steps - 1:
      rec = writer.write(i, "train", {k: float(v) for k, v in m.items()})
      logging.info("%s step %d/%d ce %.4f", name, i, steps, rec.get("ce", float("nan")))
  jax.block_until_ready(state.params)
  train_s = time.time() - t0
  res = {"model": name, "config": cfg.to_dict(), "steps": steps,
         "tokens": steps * b * t, "train_flops": fpt * steps * b * t,
         "flops_per_token": fpt, "params": n_params,
         "params_non_embedding": n_params - n_emb,
         "train_seconds": train_s, "compile_seconds": first,
         "kv_cache_fraction": F.kv_cache_fraction(cfg)}
  nll, rm = _evaluate(cfg, state.params, val, None)
  res["nll"] = nll
  res["router_eval"] = rm
  if cfg.router is not None and cfg.router.kind == "expert":
    res["nll_causal"], res["router_eval_causal"] = _evaluate(
        cfg, state.params, val, "threshold")
  else:
    res["nll_causal"] = nll
  res["decode_tokens_per_s"] = _decode_speed(cfg, state.params, prompts)
  res["depthwise_tokens_per_s"] = _depthwise_speed(cfg, state.params, prompts)
  writer.write(steps, "eval", {"nll": res["nll"], "nll_causal": res["nll_causal"],
                               **{k: v for k, v in rm.items()}})
  writer.close()
  logging.info("%s: %s", name, {k: v for k, v in res.items() if k != "config"})
  return res


def _table(results, cmd, date):
  lines = [f"Command: `{cmd}`  ", f"Date: {date}  ",
           f"Device: {jax.devices()[0].device_kind} ({jax.device_count()} device(s)); "
           f"encode={FLAGS.encode}, d_model={FLAGS.d_model}, L={FLAGS.layers}, "
           f"N_r={FLAGS.n_r}, seq {FLAGS.seq_len}, batch {FLAGS.batch}", "",
           "| model | unique params (non-emb) | train FLOPs | tokens | steps | "
           "train s | held-out NLL (top-k) | held-out NLL (causal) | decode tok/s | "
           "depth-wise serving tok/s | router |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    ro = r.get("router_eval", {})
    if "router/dead_token_ratio" in ro:
      rs = (f"occ {'/'.join(f'{ro[k]:.2f}' for k in sorted(ro) if 'occupancy' in k)}, "
            f"acc {ro['router/sampling_acc']:.3f}, dead {ro['router/dead_token_ratio']:.3f}")
    elif "router/max_vio" in ro:
      rs = (f"load {'/'.join(f'{ro[k]:.2f}' for k in sorted(ro) if 'load_' in k)}, "
            f"MaxVio {ro['router/max_vio']:.2f}")
    else:
      rs = "-"
    dw = (f"{r['depthwise_tokens_per_s']:.0f}"
          if r.get("depthwise_tokens_per_s") is not None else "-")
    lines.append(
        f"| {r['model']} | {r['params']:,} ({r['params_non_embedding']:,}) | "
        f"{r['train_flops']:.3g} | {r['tokens']:,} | {r['steps']} | "
        f"{r['train_seconds']:.0f} | {r['nll']:.4f} | {r['nll_causal']:.4f} | "
        f"{r['decode_tokens_per_s']:.0f} | {dw} | {rs} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if FLAGS.quick:
    FLAGS.d_model, FLAGS.layers, FLAGS.seq_len, FLAGS.batch = 32, 5, 32, 2
    FLAGS.vanilla_steps, FLAGS.eval_batches, FLAGS.decode_new = 3, 1, 4
    FLAGS.decode_batch = 2
  encode, eos, vocab = _encoder()
  val = eval_batches(make_source("pydoc", "validation"), encode, eos, FLAGS.seq_len,
                     FLAGS.batch, FLAGS.eval_batches)
  rng = np.random.default_rng(FLAGS.seed)
  prompts = []
  for b in val[:FLAGS.decode_batch]:
    row = b["inputs"][0]
    start = int(rng.integers(0, max(1, FLAGS.seq_len // 2)))
    prompts.append([int(x) for x in row[start:start + 16]] or [2])
  while len(prompts) < FLAGS.decode_batch:
    prompts.append(prompts[-1])
  budget = F.train_flops_per_token(model_config("vanilla", vocab), FLAGS.seq_len) * (
      FLAGS.vanilla_steps * FLAGS.batch * FLAGS.seq_len)
  results = []
  for name in FLAGS.models:
    results.append(run_model(name, encode, eos, vocab, val, prompts, budget))
  cmd = "python experiments/mor_compare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out + ".json", "w") as f:
    json.dump({"command": cmd, "date": date, "budget_flops": budget,
               "results": results}, f, indent=1)
  with open(FLAGS.out + ".md", "w") as f:
    f.write(_table(results, cmd, date))
  print(_table(results, cmd, date))


if __name__ == "__main__":
  app.run(main)

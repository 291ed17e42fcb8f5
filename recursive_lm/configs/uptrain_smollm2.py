r"""Uptrain SmolLM2-135M into a (relaxed) recursive model with KD (recursion.md §1.4).

The pretrained 30-layer model is converted (``recursive_lm.recursive.convert``)
into a shared block looped ``loops`` times (+ optional per-loop LoRA) and
uptrained with CE + ``kd_weight`` * forward-KL against the original model.

Commands (big_vision-style variants after ``:``; ``--config.x.y=`` overrides)::

  # CPU smoke run (3 steps, 2 eval batches)
  recursive-lm uptrain \
    --config experiments/configs/uptrain_smollm2.py:loops=2,steps=3 \
    --config.data.eval_batches=2 --workdir /tmp/smoke_uptrain

  # relaxed (LoRA rank 64), average init, 1 hour budget
  recursive-lm uptrain \
    --config experiments/configs/uptrain_smollm2.py:loops=3,init=average,rank=64,budget=3600

Variant keys: loops, sharing, init, rank, kd, kd_weight, steps, budget
(seconds), seq_len, batch, lr, workdir.

Learning rate: 3e-4 (peak; 10 warmup steps, cosine to 0.1x). The paper uses
2e-4 with ~2M-token batches over billions of tokens; our default run is 300
steps of 8 x 256 = 2k tokens, where a slightly higher peak recovers more of the
conversion loss. This is a judgement call, not a tuned value: sweep 1e-4..1e-3.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from recursive_lm.recursive.convert import INITS, SHARINGS
from recursive_lm.training.losses import KD_KINDS
from recursive_lm.config_variants import parse_variants

# Variant key -> (default, type). None default: parsed as float, stays optional.
VARIANTS = {
    "loops": (2, int), "sharing": ("cycle", str), "init": ("stepwise", str),
    "rank": (0, int), "kd": ("forward_kl", str), "kd_weight": (1.0, float),
    "steps": (300, int), "budget": (None, float), "seq_len": (256, int),
    "batch": (8, int), "lr": (3e-4, float), "workdir": ("runs/uptrain", str),
}


def parse_arg(arg: str | None) -> dict:
  """``"loops=2,init=stepwise"`` -> typed dict over ``VARIANTS`` defaults.

  Raises:
    ValueError: unknown key, malformed item, or a value of the wrong type.
  """
  return parse_variants(arg, VARIANTS, 'uptrain_smollm2.py:loops=2,steps=200')


def check_variants(a: dict) -> None:
  """Range/choice checks with the fix in the message."""
  def bad(msg):
    raise ValueError(f"invalid uptrain config: {msg}")
  if a["loops"] < 1:
    bad(f"loops={a['loops']}: the shared block must run at least once; use loops>=1 "
        "(loops=1 keeps the vanilla model, 2-4 are the paper's settings)")
  if a["sharing"] not in SHARINGS:
    bad(f"sharing={a['sharing']!r} is not supported; choose from {SHARINGS}")
  if a["init"] not in INITS:
    bad(f"init={a['init']!r} is not supported; choose from {INITS}")
  if a["kd"] not in KD_KINDS:
    bad(f"kd={a['kd']!r} is not supported; choose from {KD_KINDS} "
        "(use kd_weight=0 to disable distillation)")
  if a["rank"] < 0:
    bad(f"rank={a['rank']}: LoRA rank must be >= 0 (0 = no LoRA)")
  if a["kd_weight"] < 0:
    bad(f"kd_weight={a['kd_weight']} must be >= 0")
  if a["steps"] < 1:
    bad(f"steps={a['steps']} must be >= 1")
  if a["budget"] is not None and a["budget"] <= 0:
    bad(f"budget={a['budget']} (seconds) must be > 0, or omit it")
  if a["seq_len"] < 2:
    bad(f"seq_len={a['seq_len']} must be >= 2")
  if a["batch"] < 1:
    bad(f"batch={a['batch']} must be >= 1")
  if a["lr"] <= 0:
    bad(f"lr={a['lr']} must be > 0")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  check_variants(a)
  c = ml_collections.ConfigDict()
  c.model = "smollm2-135m"        # preset name, .gguf file or HF folder (teacher)
  c.workdir = a["workdir"]
  c.seed = 0
  c.model_dtype = "float32"       # compute dtype of student and teacher
  c.remat = "none"                # none | full | a jax.checkpoint_policies name

  c.convert = ml_collections.ConfigDict(dict(
      loops=a["loops"], sharing=a["sharing"], init=a["init"], lora_rank=a["rank"],
      nondivisible="select"))

  c.data = ml_collections.ConfigDict()
  c.data.source = "pydoc"         # see recursive_lm.data.make_source
  c.data.data_dir = config_dict.placeholder(str)
  c.data.seq_len = a["seq_len"]
  c.data.batch_size = a["batch"]  # global batch (rows of seq_len tokens)
  c.data.eval_batches = 8         # held-out batches (split "validation")
  c.data.encode = "tokenizer"     # "tokenizer" (the checkpoint's) | "bytes" (toy)
  c.data.shards = config_dict.placeholder(int)  # fixed data shards (None: one per row)
  c.data.log_example_ids = False  # example_ids/process_<i>-of-<n>.jsonl (tracing)

  c.optim = ml_collections.ConfigDict(dict(
      lr=a["lr"], schedule="cosine", warmup_steps=10, decay_fraction=0.2,
      min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
      clip_norm=1.0, grad_accum=1))
  c.optim.total_steps = config_dict.placeholder(int)  # None: train.steps

  c.loss = ml_collections.ConfigDict(dict(
      ce_weight=1.0, kd_weight=a["kd_weight"], kd=a["kd"], temperature=1.0,
      z_loss=0.0))

  c.train = ml_collections.ConfigDict(dict(
      steps=a["steps"], log_every=5, eval_every=50, ckpt_every=50, keep=3,
      export_hf=False, async_checkpointing=True, peak_matmul_size=2048,
      strict_restore=False))  # True: a corrupt newest checkpoint is an error
  c.train.time_budget_s = config_dict.placeholder(float)
  if a["budget"] is not None:
    c.train.time_budget_s = a["budget"]

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="fsdp"))
  return c

r"""Early-exit post-training of a recursive SmolLM2 student (recursion.md §1.5).

Starts from an uptrained student (``init_from``, a ``save_model`` folder such
as ``runs/table/loops-2_rank-0/final``) or, with ``init_from=none``, from a
fresh conversion (``loops``/``init``/``rank`` as in uptrain_smollm2.py), and
trains every exit through the shared final norm + LM head with one of the
objectives of ``recursive_lm.training.exit_losses``, on top of the teacher
KD on the final exit (``teacher_kd``; the uptraining setting). Held-out
per-exit perplexity, accuracy and agreement with the final exit are logged
to metrics.jsonl (``exit<layers>_*``) and the summary (``*_init``/``*_final``).

Commands (runnable by experiments/uptrain.py)::

  # RRT recipe: aggressive coefficient 0.1 + self-distillation (the default)
  python experiments/uptrain.py \
    --config experiments/configs/exit_smollm2.py:loss=aggressive,c=0.1,self_kd=1,steps=100

  # CALM weighted CE; FREE (exits after layer 15 only, dynamic alignment);
  # LayerSkip with gradual curriculum and layer dropout 0.1
  ...exit_smollm2.py:loss=calm_weighted,aggregation=linear
  ...exit_smollm2.py:loss=free,align=dyna,alpha=0.5
  ...exit_smollm2.py:loss=layerskip,curriculum=gradual,layer_dropout=0.1,scale=sum

Variant keys: loss, c, self_kd, teacher_kd, aggregation, align, alpha,
curriculum, scale, layer_dropout, exits ("8+16": vanilla / custom exits),
init_from (path | none), loops, init, rank, steps, budget, seq_len, batch, lr,
eval_batches, workdir (default runs/exit/<variant>).
"""
from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

from recursive_lm.configs import uptrain_smollm2

from recursive_lm.training.exit_losses import ExitLossConfig  # noqa: E402
from recursive_lm.config_variants import parse_variants

VARIANTS = {
    "loss": ("aggressive", str), "c": (0.1, float), "self_kd": (1.0, float),
    "teacher_kd": (1.0, float), "aggregation": ("linear", str), "align": ("dyna", str),
    "alpha": (0.5, float), "curriculum": ("none", str), "scale": ("uniform", str),
    "layer_dropout": (0.0, float), "exits": ("", str),
    "init_from": ("runs/table/loops-2_rank-0/final", str),
    "loops": (2, int), "init": ("stepwise", str), "rank": (0, int),
    "steps": (100, int), "budget": (None, float), "seq_len": (128, int),
    "batch": (4, int), "lr": (3e-4, float), "eval_batches": (4, int), "workdir": ("", str),
}
_NAME_KEYS = ("loss", "c", "self_kd", "aggregation", "align", "curriculum",
              "layer_dropout")


def parse_arg(arg: str | None) -> dict:
  """``"loss=aggressive,c=0.1"`` -> typed dict over ``VARIANTS`` defaults."""
  return parse_variants(arg, VARIANTS, 'exit_smollm2.py:loss=aggressive,c=0.1')


def variant_name(a: dict) -> str:
  parts = [a["loss"]]
  for k in _NAME_KEYS[1:]:
    if k in a["_set"]:
      parts.append(f"{k}-{a[k]}")
  return "_".join(parts)


def exit_config(a: dict) -> dict:
  """The ``ExitLossConfig`` fields for parsed variants (validated)."""
  exits = tuple(int(x) for x in a["exits"].split("+") if x) or None
  kw = dict(kind=a["loss"], exit_layers=exits, aggregation=a["aggregation"], c=a["c"],
            self_kd=a["self_kd"] if a["loss"] == "aggressive" else 0.0,
            alpha=a["alpha"], kd_align=a["align"], curriculum=a["curriculum"],
            scale=a["scale"], layer_dropout=a["layer_dropout"],
            curriculum_steps=a["steps"])
  if isinstance(kw["aggregation"], str) and kw["aggregation"].isdigit():
    kw["aggregation"] = int(kw["aggregation"])
  try:
    ExitLossConfig(**kw)
  except ValueError as e:
    raise ValueError(f"invalid exit config variant: {e}") from None
  return kw


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  ex = exit_config(a)
  up = (f"loops={a['loops']},init={a['init']},rank={a['rank']},steps={a['steps']},"
        f"seq_len={a['seq_len']},batch={a['batch']},lr={a['lr']},"
        f"kd_weight={a['teacher_kd']}" + (f",budget={a['budget']}" if a["budget"] else ""))
  c = uptrain_smollm2.get_config(up)
  c.workdir = a["workdir"] or os.path.join("runs", "exit", variant_name(a))
  init_from = a["init_from"]
  c.init_from = config_dict.placeholder(str)
  if init_from.lower() != "none":
    c.init_from = init_from
  c.data.eval_batches = a["eval_batches"]
  c.train.eval_every = 0          # held-out eval (incl. per exit) at start and end
  c.train.log_every = 1
  c.train.ckpt_every = 0
  c.optim.warmup_steps = min(10, a["steps"])
  exit_cfg = ml_collections.ConfigDict(ex)
  exit_cfg.exit_layers = config_dict.placeholder(tuple)
  if ex["exit_layers"] is not None:
    exit_cfg.exit_layers = ex["exit_layers"]
  c.loss.exit = exit_cfg
  return c

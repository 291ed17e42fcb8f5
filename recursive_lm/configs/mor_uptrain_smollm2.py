r"""Mixture-of-Recursions uptraining of SmolLM2-135M with distillation.

The pretrained 30-layer model is converted (``recursive_lm.recursive.convert``,
Middle-Cycle sharing by default, as in the MoR paper: 1 + K x N_r + 1 unique
first/last layers; with N_r = 3 the 28 middle layers are padded to 1+10x3+1 =
32 effective layers, the paper's 135M layout) and a freshly initialised router
is added to the shared block (``recursive_lm.mor.convert.add_router``). The
student is trained with CE + ``kd_weight`` * forward-KL against the original
model plus the router losses (``recursive_lm.training.mor_step.make_mor_train_step``).

Commands (runnable by experiments/uptrain.py)::

  python experiments/uptrain.py \
    --config experiments/configs/mor_uptrain_smollm2.py:router=expert,kv=recursion,loops=3,steps=40

  # token-choice (softmax, balancing loss 0.1), recursive KV sharing
  ...mor_uptrain_smollm2.py:router=token,kv=share_first

Variant keys: router (expert | token), kv (recursion | share_first | hybrid),
loops, sharing (middle_cycle | cycle | ...), nondivisible (add | select),
init, rank, gating (delta | residual | additive), alpha, init_std, capacities
("1+0.66+0.33"; default (N_r - r + 1)/N_r), aux_loss, kd_weight, steps, budget,
seq_len, batch, lr, eval_batches, workdir (default runs/mor/<variant>).

Router init (see recursive_lm/mor/convert.py): the default ``gating=delta``,
``alpha=2`` (expert; token: alpha = N_r with softmax) and ``init_std=0.001``
aim at a gate of ~1 at init, so routed tokens compute what the converted
recursive model computes (on SmolLM2, |h| ~ 1e3 makes RMS z ~ 1 at
init_std=0.001; see results/mor.md). The paper's from-scratch recipe is
``gating=residual,alpha=0.1,init_std=0.02``. In the one 23-step run so far the
router learned g ~ 0 at recursions 2-3 (results/mor.md, "Uptraining from
SmolLM2-135M").
"""
from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

from recursive_lm.configs import uptrain_smollm2
from recursive_lm.config_variants import parse_variants

VARIANTS = {
    "router": ("expert", str), "kv": ("recursion", str), "loops": (3, int),
    "sharing": ("middle_cycle", str), "nondivisible": ("add", str),
    "init": ("stepwise", str), "rank": (0, int), "gating": ("delta", str),
    "alpha": (None, float), "init_std": (0.001, float), "capacities": ("", str),
    "aux_loss": (0.001, float), "kd_weight": (1.0, float), "steps": (40, int),
    "budget": (None, float), "seq_len": (256, int), "batch": (8, int),
    "lr": (3e-4, float), "eval_batches": (8, int), "workdir": ("", str),
}
_NAME_KEYS = ("router", "kv", "loops", "sharing", "rank", "gating", "alpha",
              "init_std", "capacities")


def parse_arg(arg: str | None) -> dict:
  """``"router=expert,loops=3"`` -> typed dict over ``VARIANTS`` defaults."""
  return parse_variants(arg, VARIANTS, 'mor_uptrain_smollm2.py:router=expert,loops=3')


def variant_name(a: dict) -> str:
  parts = [f"{k}-{a[k]}" for k in _NAME_KEYS if k in a["_set"] or k == "router"]
  return "_".join(parts).replace("+", "p")


def router_node(a: dict) -> dict:
  """The ``config.convert.router`` fields (a ``RouterConfig`` + ``init_std``)."""
  caps = tuple(float(x) for x in a["capacities"].split("+") if x) or None
  if a["router"] == "token":
    alpha = float(a["loops"]) if a["alpha"] is None else a["alpha"]
    kw = dict(kind="token", gate="softmax", balance_loss=0.1, z_loss=1e-3)
  else:
    alpha = 2.0 if a["alpha"] is None else a["alpha"]
    kw = dict(kind=a["router"], gate="sigmoid", aux_loss=a["aux_loss"])
  return dict(kw, kv=a["kv"], gating=a["gating"], alpha=alpha, router_type="linear",
              impl="gather" if a["router"] != "token" else "dense",
              capacities=caps, init_std=a["init_std"])


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  up = (f"loops={a['loops']},sharing={a['sharing']},init={a['init']},rank={a['rank']},"
        f"steps={a['steps']},seq_len={a['seq_len']},batch={a['batch']},lr={a['lr']},"
        f"kd_weight={a['kd_weight']}" + (f",budget={a['budget']}" if a["budget"] else ""))
  c = uptrain_smollm2.get_config(up)
  c.workdir = a["workdir"] or os.path.join("runs", "mor", variant_name(a))
  c.convert.nondivisible = a["nondivisible"]
  r = ml_collections.ConfigDict(router_node(a))
  r.capacities = config_dict.placeholder(tuple)
  if router_node(a)["capacities"] is not None:
    r.capacities = router_node(a)["capacities"]
  c.convert.router = r
  c.data.eval_batches = a["eval_batches"]
  c.train.log_every = 1
  c.train.eval_every = 0          # held-out eval at start and end
  c.optim.warmup_steps = min(10, a["steps"])
  return c

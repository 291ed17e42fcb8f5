r"""Config of experiments/train_exits.py: exit modules for the frozen embedded SmolLM2.

    python experiments/train_exits.py                      # the shipped artifact
    python experiments/train_exits.py --config experiments/configs/train_exits.py:small
    python experiments/train_exits.py --config.steps=100 --config.out=runs/exits/try
    python experiments/train_exits.py --config experiments/configs/train_exits.py:layer
    python experiments/train_exits.py --config experiments/configs/train_exits.py:layer_small

Budget (the shipped artifact): ~41k corpus tokens + 128 self-generated
continuations of 96 tokens, features at 8 exit layers, raw + least squares at 8 layers, 2
module kinds x 5 layers trained for ``steps`` steps of ``batch`` tokens each; the
measured wall time is in the README section "Exit modules on the frozen SmolLM2".
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ""                          # api.load spec ("" = the embedded SmolLM2)
  c.seed = 0
  c.workdir = "runs/exits"              # features, self-generated data, metrics, plots
  c.out = "recursive_lm/artifacts/smollm2_exits"   # the shipped artifact
  # data
  c.corpus_tokens = 40960               # training corpus tokens (train split)
  c.heldout_tokens = 8192               # validation split, never trained on
  c.seq_len = 256
  c.selfgen_prompts = 128
  c.selfgen_prompt_len = 32
  c.selfgen_new_tokens = 96
  # exits and modules
  c.exit_layers = (4, 6, 8, 10, 12, 16, 20, 24)
  c.kinds = ("affine", "lowrank")
  c.train_layers = (4, 6, 8, 12, 16)    # trained kinds here; raw + least squares at every exit
  c.rank = 128
  c.shortlist = 4096                    # draft head vocabulary (most frequent targets)
  c.ridge = 1e-3                        # closed-form affine fit
  # training (per exit and kind)
  c.steps = 150
  c.batch = 512                         # tokens per step
  c.lr = 1e-3
  c.kd_weight = 1.0                     # KL(teacher || exit) over the shortlist
  c.ce_weight = 0.5                     # CE on the teacher's argmax
  # what goes into the artifact (<= 8 MB as float16)
  c.ship = ("lowrank:6", "lowrank:8", "lowrank:12")
  c.n_eval_full_head = 2048             # held-out tokens scored through the full head
  c.meta_hidden = 64
  c.meta_steps = 300
  # kind "layer" (one decoder layer, Kangaroo-style; trained on whole sequences)
  c.layer_init = "next"                 # copy the frozen model's layer e+1 ("next") or its last
  c.layer_affine = True                 # an affine map after the layer (least-squares start)
  c.layer_steps = 600                   # steps of `batch` tokens (whole sequences)
  c.layer_lr = 3e-4
  c.results_merge = ""                  # add this run's `layer` curve to that agreement json
  if variant in ("layer", "layer_small"):   # issue 12: the one-layer module vs affine
    c.exit_layers = c.train_layers = (6, 8, 12)
    c.kinds = ("affine", "layer")
    c.ship = ()                         # not shipped (3 x 3.9M params > 8 MB); measured only
    c.workdir, c.out = "runs/exits_layer", "runs/exits_layer/artifact"
    c.results_merge = "results/exits_agreement.json" if variant == "layer" else ""
  if variant == "layer_small":          # smoke run (~2 min: 106 s measured)
    c.corpus_tokens, c.heldout_tokens, c.selfgen_prompts = 8192, 4096, 16
    c.exit_layers = c.train_layers = (6,)
    c.steps, c.layer_steps = 30, 30
    c.workdir, c.out = "runs/exits_layer_small", "runs/exits_layer_small/artifact"
  elif variant in ("", "layer"):
    pass
  elif variant == "small":                # a quick smoke run (~2 min)
    c.corpus_tokens, c.heldout_tokens, c.selfgen_prompts = 8192, 4096, 16
    c.exit_layers, c.steps, c.meta_steps = (6, 12), 30, 30
    c.train_layers = (6,)
    c.ship = ("lowrank:6",)
    c.workdir, c.out = "runs/exits_small", "runs/exits_small/artifact"
  else:
    raise ValueError(f"unknown variant {variant!r}; use '', 'small', 'layer' or 'layer_small'")
  return c

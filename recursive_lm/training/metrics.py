"""Training metrics: process-0 JSONL + TensorBoard writer, progress bar, FLOPs/MFU.

* ``MetricWriter``: appends one JSON object per record to
  ``<workdir>/metrics.jsonl`` (``{"step", "kind", "time", **scalars}``; kind is
  ``train`` or ``eval``) and mirrors the scalars to TensorBoard
  (``<workdir>/tb``, tags ``<kind>/<name>``, via tensorboardX). Only process 0
  writes. On resume from step k it drops records with ``step > k`` (written by
  the interrupted run after its last checkpoint), so the file reads as one
  uninterrupted run; TensorBoard gets ``purge_step=k+1`` for the same effect.
* ``Progress``: a tqdm bar (step/total, ETA, loss, tokens/s, MFU).
* ``train_flops_per_token`` / ``measure_matmul_peak``: model FLOP utilisation.

FLOPs per *trained token* (the PaLM/Chinchilla convention; T = seq_len,
d_attn = n_heads * head_dim, forward = 1/3 of forward+backward)::

    N_eff(student) = L_eff * P_layer + LoRA_applied + V * d        (matmul params
        applied per token: the shared block counts once per loop, L_eff is the
        effective (unrolled) depth, LoRA_applied = loops * block * sum_t r_t
        (d_in,t + d_out,t) since x @ a @ b is applied in every loop, V * d is
        the LM head; the embedding lookup and norms are not matmuls)
    P_layer = d*d_attn + 2*d*d_kv + d_attn*d + 3*d*d_ff            (q, k, v, o, gate/up/down)
    student (fwd + bwd) = 6 * N_eff(student) + 12 * L_eff * T * d_attn
    teacher (fwd only, when KD is on) = 2 * N_eff(teacher) + 4 * L_teacher * T * d_attn

The attention term counts QK^T and AV over the full T x T square (no causal
halving, like PaLM's 12·L·H·Q·T), and rematerialisation is not counted (MFU,
not hardware FLOP utilisation). ``MFU = achieved FLOP/s / peak`` where the
peak is *measured* (``measure_matmul_peak``: a jitted f32 ``n x n`` matmul at
JAX's default matmul precision, median of a few runs; e.g. TF32 tensor cores
on recent NVIDIA GPUs) times the number of devices (on CPU the "devices" share
the host's cores, so the single measurement is the peak).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from recursive_lm.nn.model import LORA_SHAPES

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


# --------------------------------------------------------------------------- #
# FLOPs and MFU.
def layer_matmul_params(cfg) -> int:
  """Matmul weights of one decoder layer (q, k, v, o, gate, up, down)."""
  d, dh = cfg.d_model, cfg.head_dim
  d_attn, d_kv = cfg.n_heads * dh, cfg.n_kv_heads * dh
  return d * d_attn + 2 * d * d_kv + d_attn * d + 3 * d * cfg.d_ff


def applied_params(cfg) -> int:
  """N_eff: matmul params applied per token (shared block once per loop)."""
  lora = cfg.plan.loops * cfg.plan.block * sum(
      r * sum(LORA_SHAPES[t](cfg)) for t, r in cfg.lora.items())
  return cfg.plan.effective_depth * layer_matmul_params(cfg) + lora \
      + cfg.vocab_size * cfg.d_model


def train_flops_per_token(student_cfg, seq_len: int, teacher_cfg=None) -> dict:
  """FLOPs per trained token (see module docstring); keys student/teacher/total."""
  def attn(cfg, mult):
    return mult * cfg.plan.effective_depth * seq_len * cfg.n_heads * cfg.head_dim
  student = 6 * applied_params(student_cfg) + attn(student_cfg, 12)
  teacher = 0
  if teacher_cfg is not None:
    teacher = 2 * applied_params(teacher_cfg) + attn(teacher_cfg, 4)
  return {"student": float(student), "teacher": float(teacher),
          "total": float(student + teacher)}


def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32,
                        device: jax.Device | None = None) -> float:
  """Measured matmul FLOP/s of one device: median over ``repeats`` timed runs
  of a jitted ``[n, n] @ [n, n]`` (2 n^3 FLOPs) after one warm-up call."""
  device = device or jax.devices()[0]
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(k1, (n, n), dtype), device)
  b = jax.device_put(jax.random.normal(k2, (n, n), dtype), device)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  times = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2.0 * n ** 3 / statistics.median(times)


def peak_flops(per_device: float, n_devices: int | None = None) -> float:
  """Total peak: per-device peak x devices (CPU devices share the host)."""
  if jax.devices()[0].platform == "cpu":
    return per_device
  return per_device * (n_devices or jax.device_count())


# --------------------------------------------------------------------------- #
def _is_writer() -> bool:
  return jax.process_index() == 0


def _jsonable(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray, jax.Array)):
    v = np.asarray(v).item() if np.ndim(v) == 0 else np.asarray(v).tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf
  return v


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """Records of a metrics.jsonl (a trailing partial line is skipped)."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning("%s: skipping a malformed line (interrupted write?)", path)
  return out


class MetricWriter:
  """Process-0 JSONL + TensorBoard scalar writer (see module docstring).

  Args:
    workdir: run directory (``metrics.jsonl`` and ``tb/`` go there).
    resume_step: the checkpoint step this run resumes from, or None for a fresh
      run (then an existing metrics.jsonl is replaced).
    tensorboard: also write TensorBoard events (tensorboardX).
    enabled: override the process-0 rule.
  """

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None,
               tensorboard: bool = True, enabled: bool | None = None):
    self.enabled = _is_writer() if enabled is None else enabled
    self.path = os.path.join(os.fspath(workdir), METRICS_FILE)
    self._tb = None
    self._f = None
    if not self.enabled:
      return
    os.makedirs(os.fspath(workdir), exist_ok=True)
    keep = []
    if resume_step is not None:
      keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for r in keep:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, self.path)
    self._f = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(os.fspath(workdir), TB_DIR),
                                 purge_step=0 if resume_step is None else resume_step + 1)
      except ImportError:
        logging.warning("tensorboardX is not installed; writing metrics.jsonl only")

  def write(self, step: int, kind: str, scalars: Mapping[str, Any]) -> dict:
    """Appends one record and returns it (also on non-writer processes)."""
    rec = {"step": int(step), "kind": kind, "time": time.time()}
    rec.update({k: _jsonable(v) for k, v in scalars.items()})
    if self._f is not None:
      self._f.write(json.dumps(rec) + "\n")
      self._f.flush()
    if self._tb is not None:
      for k, v in rec.items():
        if k not in ("step", "kind", "time") and isinstance(v, (int, float)) \
            and not isinstance(v, bool):
          self._tb.add_scalar(f"{kind}/{k}", v, int(step))
    return rec

  def flush(self) -> None:
    if self._f is not None:
      self._f.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Progress:
  """tqdm bar on process 0: step/total, ETA, loss, tokens/s, MFU."""

  def __init__(self, total: int, initial: int = 0, enabled: bool | None = None,
               desc: str = "uptrain"):
    self.enabled = _is_writer() if enabled is None else enabled
    self._bar = None
    if self.enabled:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                       dynamic_ncols=True, mininterval=0.5, smoothing=0.1)

  def update(self, step: int, loss: float | None = None,
             tokens_per_s: float | None = None, mfu: float | None = None) -> None:
    if self._bar is None:
      return
    parts = []
    if loss is not None:
      parts.append(f"loss={loss:.4f}")
    if tokens_per_s is not None:
      parts.append(f"tok/s={tokens_per_s:,.0f}")
    if mfu is not None:
      parts.append(f"MFU={100 * mfu:.1f}%")
    self._bar.set_postfix_str(" ".join(parts), refresh=False)
    self._bar.update(max(step - self._bar.n, 0))

  def write(self, msg: str) -> None:
    if self._bar is not None:
      self._bar.write(msg)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


# --------------------------------------------------------------------------- #
def _series(records: Iterable[dict], kind: str, key: str) -> tuple[list, list]:
  last: dict[int, float] = {}
  for r in records:
    if r.get("kind") == kind and isinstance(r.get(key), (int, float)):
      last[int(r["step"])] = float(r[key])  # a later record for a step wins
  steps = sorted(last)
  return steps, [last[s] for s in steps]


def plot_curves(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike,
                title: str | None = None) -> str:
  """Training loss (total, CE, KD) and held-out perplexity vs step -> PNG.

  The teacher's held-out perplexity (``teacher_ppl`` of an eval record) is
  drawn as a horizontal line. Returns the PNG path.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  recs = read_metrics(metrics_jsonl)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for key in ("loss", "ce", "kd"):
    s, v = _series(recs, "train", key)
    if s:
      ax1.plot(s, v, label=key, lw=1.2 if key == "loss" else 0.8)
  ax1.set_xlabel("step")
  ax1.set_ylabel("training loss (nats/token)")
  ax1.set_title("train")
  ax1.legend()
  ax1.grid(alpha=0.3)
  s, v = _series(recs, "eval", "student_ppl")
  if s:
    ax2.plot(s, v, "o-", label="student (held-out)")
  _, t = _series(recs, "eval", "teacher_ppl")
  if t:
    ax2.axhline(t[-1], color="k", ls="--", lw=1, label=f"teacher {t[-1]:.2f}")
  ax2.set_xlabel("step")
  ax2.set_ylabel("held-out perplexity")
  if v and min(v + t) > 0:
    ax2.set_yscale("log")
  ax2.set_title("held-out perplexity")
  ax2.legend()
  ax2.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  out_png = os.fspath(out_png)
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png


__all__ = ["METRICS_FILE", "MetricWriter", "Progress", "applied_params",
           "layer_matmul_params", "measure_matmul_peak", "peak_flops",
           "plot_curves", "read_metrics", "train_flops_per_token"]

"""Distillation uptraining of a recursive model converted from a pretrained one.

``train(config) -> summary`` (config schema: experiments/configs/uptrain_smollm2.py):

  1. teacher = ``load_checkpoint(config.model)``; student = ``convert(...)`` of
     the same weights (``config.convert``);
  2. data: ``make_sharded_lm_iterator`` on split "train" of
     ``config.data.source`` (``config.data.batch_size`` is the global batch, cut
     into ``config.data.shards`` fixed data shards, default one per row; each
     process reads only its shards, so every global batch is the same for any
     process count); held-out ``sharded_eval_batches`` on split "validation";
  3. mesh (``config.mesh``) + param/state/batch shardings, jitted sharded
     ``train_step`` (AOT-compiled once; its memory analysis is logged);
  4. resume precedence (big_vision): the latest intact checkpoint in
     ``<workdir>/checkpoints`` if any (TrainState + data-shard positions, so
     the loss sequence equals an uninterrupted run's, also after a restart with
     another process count), else the fresh student. A corrupt newest step is
     moved aside to ``<step>.corrupt`` with a warning and the next older one is
     used; ``train.strict_restore=True`` makes that an error;
  5. held-out perplexity of the teacher (once; kept in checkpoint meta), the
     student at step 0, every ``eval_every`` steps and at the end;
  6. stops at ``train.steps``, when ``train.time_budget_s`` (wall clock since
     ``train`` started) is exceeded, or on SIGTERM (saves after the current
     step, exits cleanly with ``status="preempted"``; with several processes
     at the step JAX's preemption sync point picks for all of them);
  7. writes ``<workdir>/final`` (``export.save_model``; ``final_hf`` with
     ``train.export_hf``), ``metrics.jsonl``, ``tb/``, ``curves.png`` and
     ``summary.json`` (process 0 only). With ``data.log_example_ids`` every
     process also appends the document ids of its rows per step to
     ``example_ids/process_<i>-of-<n>.jsonl``.

Tokenization: ``config.data.encode="tokenizer"`` uses the checkpoint's
tokenizer (EOS from it or the config); ``"bytes"`` is a toy byte-level map for
checkpoints without one: ``id = 2 + byte % (vocab - 2)``, EOS = 1, 0 unused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging

from recursive_lm import export
from recursive_lm import sharding as S
from recursive_lm.checkpoints import load_checkpoint
from recursive_lm.config import ConfigError
from recursive_lm.data import (make_sharded_lm_iterator, make_source,
                               sharded_eval_batches)
from recursive_lm.mor import convert as mor_convert
from recursive_lm.nn.weights import params_from_hf
from recursive_lm.recursive.convert import (INITS, NONDIVISIBLE, SHARINGS, convert,
                                            describe, unique_param_count)
from recursive_lm.training import checkpointing as C
from recursive_lm.training import metrics as M
from recursive_lm.training import mor_step
from recursive_lm.training.exit_losses import resolve_exits
from recursive_lm.training.exit_objective import exit_metrics, make_exit_eval_step
from recursive_lm.training.losses import KD_KINDS
from recursive_lm.training.optim import OptimConfig
from recursive_lm.training.train_step import (LossConfig, init_train_state,
                                              jit_train_step, make_eval_step,
                                              make_train_step, train_state_shardings)

Hook = Callable[[int, Any, dict], None]
ENCODINGS = ("tokenizer", "bytes")
DTYPES = ("float32", "bfloat16", "float16")
_OPTIM_KEYS = ("lr", "schedule", "warmup_steps", "total_steps", "decay_fraction",
               "min_lr_ratio", "b1", "b2", "eps", "weight_decay", "clip_norm",
               "grad_accum")


class ByteEncoder:
  """Toy byte-level tokenizer: ``id = 2 + byte % (vocab - 2)``; EOS = 1."""
  eos_id = 1

  def __init__(self, vocab_size: int):
    if vocab_size < 3:
      raise ConfigError(f"byte encoding needs vocab_size >= 3, got {vocab_size}")
    self.mod = vocab_size - 2

  def __call__(self, text: str) -> list[int]:
    return [2 + b % self.mod for b in text.encode("utf-8")]


# --------------------------------------------------------------------------- #
def validate_config(config) -> None:
  """Raises ``ConfigError`` listing every problem with its fix."""
  p: list[str] = []

  def get(path):
    node = config
    for part in path.split("."):
      if part not in node:
        p.append(f"config.{path} is missing; start from "
                 "experiments/configs/uptrain_smollm2.py:get_config()")
        return None
      node = node[part]
    return node

  def need(path, ok, fix):
    v = get(path)
    if v is not None and not ok(v):
      p.append(f"config.{path}={v!r}: {fix}")

  def isint(v):
    return isinstance(v, int) and not isinstance(v, bool)

  need("convert.loops", lambda v: isint(v) and v >= 1,
       "loops must be an int >= 1 (loops=1 keeps the vanilla depth)")
  need("convert.sharing", lambda v: v in SHARINGS, f"choose from {SHARINGS}")
  need("convert.init", lambda v: v in INITS, f"choose from {INITS}")
  need("convert.nondivisible", lambda v: v in NONDIVISIBLE, f"choose from {NONDIVISIBLE}")
  need("convert.lora_rank", lambda v: isint(v) and v >= 0, "use an int >= 0 (0 = no LoRA)")
  need("data.seq_len", lambda v: isint(v) and v >= 2, "use an int >= 2")
  need("data.batch_size", lambda v: isint(v) and v >= 1, "use an int >= 1")
  need("data.eval_batches", lambda v: isint(v) and v >= 1, "use an int >= 1")
  need("data.encode", lambda v: v in ENCODINGS, f"choose from {ENCODINGS}")
  need("loss.kd", lambda v: v in KD_KINDS, f"choose from {KD_KINDS}")
  need("loss.kd_weight", lambda v: v >= 0, "use >= 0 (0 disables distillation)")
  need("train.steps", lambda v: isint(v) and v >= 1, "use an int >= 1")
  need("train.log_every", lambda v: isint(v) and v >= 1, "use an int >= 1")
  need("train.eval_every", lambda v: isint(v) and v >= 0, "use an int >= 0 (0: end only)")
  need("train.ckpt_every", lambda v: isint(v) and v >= 0, "use an int >= 0 (0: end only)")
  need("train.keep", lambda v: isint(v) and v >= 1, "keep at least 1 checkpoint")
  need("train.peak_matmul_size", lambda v: isint(v) and v >= 0, "use an int >= 0 (0: no MFU)")
  need("mesh.rules", lambda v: v in S.RULES, f"choose from {sorted(S.RULES)}")
  need("model_dtype", lambda v: v in DTYPES, f"choose from {DTYPES}")
  need("remat", lambda v: v in ("none", "full") or hasattr(jax.checkpoint_policies, v),
       "use 'none', 'full' or a jax.checkpoint_policies name")
  rnode = _router_node(config)
  if rnode is not None:
    p += mor_convert.router_problems(rnode, config.convert.get("loops"))
    if config.loss.get("exit") is not None:
      p.append("config.loss.exit with config.convert.router: exit losses need the "
               "per-loop states, which MoR routing does not expose; drop one of them")
  budget = config.train.get("time_budget_s") if "train" in config else None
  if budget is not None and budget <= 0:
    p.append(f"config.train.time_budget_s={budget!r}: use seconds > 0, or None")
  if p:
    raise ConfigError("invalid uptrain config:\n  " + "\n  ".join(p))
  try:
    optim_config(config, warn=False)
    loss_config(config)
  except ValueError as e:
    raise ConfigError(f"invalid uptrain config: {e}") from e


def _router_node(config):
  """``config.convert.router`` as a dict, or None (no MoR router)."""
  node = config.get("convert", {}).get("router") if "convert" in config else None
  if node is None:
    return None
  node = node.to_dict() if hasattr(node, "to_dict") else dict(node)
  return node or None


def optim_config(config, warn: bool = True) -> OptimConfig:
  """``OptimConfig`` from ``config.optim``; total_steps None -> train.steps,
  warmup clamped to total_steps (short smoke runs)."""
  kw = {k: config.optim[k] for k in _OPTIM_KEYS if k in config.optim}
  total = kw.get("total_steps") or config.train.steps
  kw["total_steps"] = total
  if kw.get("warmup_steps", 0) > total:
    if warn:
      logging.warning("optim.warmup_steps=%d > total_steps=%d: clamped to %d",
                      kw["warmup_steps"], total, total)
    kw["warmup_steps"] = total
  return OptimConfig(**kw)


def loss_config(config) -> LossConfig:
  return LossConfig(**config.loss.to_dict())


def _encoder(config, ckpt) -> tuple[Callable[[str], Sequence[int]], int]:
  if config.data.encode == "bytes":
    enc = ByteEncoder(ckpt.config.vocab_size)
    return enc, enc.eos_id
  tok = ckpt.tokenizer
  if tok is None:
    raise ConfigError(f"{ckpt.source} has no tokenizer; set config.data.encode='bytes' "
                      "(toy byte-level ids) or use a checkpoint with tokenizer.json")
  eos = tok.eos_id if tok.eos_id is not None else ckpt.config.eos_id
  if eos is None:
    raise ConfigError(f"{ckpt.source}: neither the tokenizer nor the config declares "
                      "an EOS id, which document packing needs")
  return tok.encode, int(eos)


def _to_device(batch: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items() if k != "doc_ids"}


class _ExampleIdLog:
  """``example_ids/process_<i>-of-<n>.jsonl``: per step, the document ids of
  each of this process's rows (``data.log_example_ids``; for tracing)."""

  def __init__(self, workdir: str, resume_step: int | None):
    d = os.path.join(workdir, "example_ids")
    os.makedirs(d, exist_ok=True)
    self.path = os.path.join(
        d, f"process_{jax.process_index()}-of-{jax.process_count()}.jsonl")
    keep = []
    if resume_step is not None and os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        keep = [l for l in f if l.strip() and json.loads(l)["step"] <= resume_step]
    with open(self.path, "w", encoding="utf-8") as f:
      f.writelines(keep)

  def write(self, step: int, doc_ids: np.ndarray) -> None:
    rows = [list(dict.fromkeys(int(i) for i in r if i >= 0)) for r in doc_ids]
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": int(step), "rows": rows}) + "\n")


def _evaluate(eval_fn, params, batches) -> tuple[float, float]:
  nll = n = 0.0
  for b in batches:
    s, c = eval_fn(params, b)
    nll += float(s)
    n += float(c)
  if n == 0:
    raise ConfigError("the held-out batches have no target tokens; use more "
                      "validation data or a larger config.data.eval_batches")
  mean = nll / n
  return mean, math.exp(mean)


def _student(config, ck):
  """(cfg, params) of the student: ``config.init_from`` (a ``save_model``
  folder, e.g. an uptrained ``runs/.../final``: exit post-training) or a fresh
  ``convert`` of the teacher checkpoint ``ck`` per ``config.convert``."""
  init_from = config.get("init_from")
  if init_from:
    cfg, params, _ = export.load_model(init_from)
    if cfg.vocab_size != ck.config.vocab_size or cfg.d_model != ck.config.d_model:
      raise ConfigError(
          f"config.init_from={init_from!r} (vocab {cfg.vocab_size}, d_model "
          f"{cfg.d_model}) does not fit the teacher {ck.source} (vocab "
          f"{ck.config.vocab_size}, d_model {ck.config.d_model}); point config.model "
          "at the checkpoint the student was converted from")
    return cfg, params
  cv = config.convert
  cfg, params = convert(ck.config, ck.weights, cv.loops, cv.sharing, cv.init,
                        cv.lora_rank or None, cv.nondivisible, config.seed)
  rnode = _router_node(config)
  if rnode is not None:  # Mixture-of-Recursions uptraining (recursive_lm.mor.convert)
    cfg, params = mor_convert.add_router(cfg, params, mor_convert.router_config(rnode),
                                         config.seed, rnode.get("init_std", 0.001))
  return cfg, params


def _exit_evaluator(cfg, lcfg, p_sh, b_sh, rep, val) -> Callable[[Any], dict]:
  """params -> held-out per-exit metrics (``exit_objective.exit_metrics``);
  returns {} when ``lcfg.exit`` is None."""
  if lcfg.exit is None:
    return lambda params: {}
  layers = resolve_exits(cfg, lcfg.exit)
  fn = jax.jit(make_exit_eval_step(cfg, layers), in_shardings=(p_sh, b_sh),
               out_shardings=rep)
  return lambda params: exit_metrics(fn, layers, params, val)


def _host_params(params):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def _memory_report(compiled) -> dict:
  out = {"peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  try:
    ma = compiled.memory_analysis()
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes"):
      if hasattr(ma, k):
        out["train_step_" + k.replace("_in_bytes", "_mb")] = getattr(ma, k) / 2**20
  except Exception:  # pylint: disable=broad-except
    pass
  stats = jax.local_devices()[0].memory_stats() or {}
  for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
    if k in stats:
      out["device0_" + k.replace("_bytes", "").replace("bytes_", "") + "_mb"] = \
          stats[k] / 2**20
  return out


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, default=str)
    f.write("\n")
  os.replace(tmp, path)


# --------------------------------------------------------------------------- #
def train(config, hooks: Sequence[Hook] = ()) -> dict:
  """Runs (or resumes) an uptraining run; returns the summary dict.

  Args:
    config: ConfigDict (see experiments/configs/uptrain_smollm2.py).
    hooks: ``hook(step, state, metrics)`` called after every train step on the
      host (metrics fetched); e.g. custom logging or tests.
  """
  t_start = time.time()
  validate_config(config)
  with C.PreemptionGuard() as guard:  # SIGTERM from here on -> clean save + exit
    return _train(config, hooks, guard, t_start)


def _train(config, hooks: Sequence[Hook], guard: C.PreemptionGuard, t_start: float
           ) -> dict:
  """The body of ``train`` (config validated, SIGTERM guarded)."""
  ocfg, lcfg = optim_config(config), loss_config(config)
  workdir = os.path.abspath(os.path.expanduser(config.workdir))
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  logging.info("uptrain: process %d/%d, %d local / %d global devices (%s), workdir %s",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform, workdir)

  # -- models ------------------------------------------------------------------
  ck = load_checkpoint(config.model)
  teacher_cfg = ck.config.replace(dtype=config.model_dtype)
  cfg, s_params = _student(config, ck)
  cfg = cfg.replace(dtype=config.model_dtype, remat=config.remat)
  t_params = params_from_hf(ck.config, ck.weights)
  mor = cfg.router is not None
  student_unique = unique_param_count(cfg) + (
      mor_convert.router_param_count(cfg) if mor else 0)
  teacher_unique = unique_param_count(teacher_cfg)
  logging.info("teacher %s: %s params\nstudent:\n%s", ck.source, f"{teacher_unique:,}",
               describe(cfg))
  encode, eos_id = _encoder(config, ck)
  tokenizer = ck.tokenizer
  del ck

  # -- mesh, data --------------------------------------------------------------
  m = config.mesh
  mesh = S.make_mesh(m.data, m.fsdp, m.tensor)
  rules = S.RULES[m.rules]
  d = config.data
  batch_div = mesh.shape["data"] * mesh.shape["fsdp"]
  if d.batch_size % batch_div or d.batch_size % jax.process_count():
    raise ConfigError(
        f"config.data.batch_size={d.batch_size} must be divisible by the batch "
        f"mesh axes data x fsdp = {batch_div} and by {jax.process_count()} processes; "
        f"use a multiple of {batch_div} or change config.mesh")
  n_shards, log_ids = d.get("shards") or None, bool(d.get("log_example_ids", False))
  train_src = make_source(d.source, "train", d.data_dir)

  def new_train_iter():
    try:
      return make_sharded_lm_iterator(train_src, encode, eos_id, d.seq_len,
                                      d.batch_size, seed=config.seed,
                                      num_shards=n_shards, with_doc_ids=log_ids)
    except ValueError as e:
      raise ConfigError(f"config.data: {e}") from e

  train_iter = new_train_iter()
  b_sh = S.batch_sharding(mesh, rules)
  val = sharded_eval_batches(make_source(d.source, "validation", d.data_dir), encode,
                             eos_id, d.seq_len, d.batch_size, d.eval_batches,
                             num_shards=n_shards)
  val = [_to_device(b, b_sh) for b in val]

  # -- sharded state -----------------------------------------------------------
  p_sh = S.param_shardings(S.abstract_params(cfg), mesh, rules)
  t_sh = S.param_shardings(S.abstract_params(teacher_cfg), mesh, rules)
  st_sh = train_state_shardings(cfg, ocfg, p_sh, mesh)
  t_params = S.shard_params(t_params, t_sh)
  state = jax.jit(lambda p: init_train_state(cfg, ocfg, p, seed=config.seed),
                  out_shardings=st_sh)(S.shard_params(s_params, p_sh))
  del s_params
  use_teacher = lcfg.kd_weight != 0
  rep = S.replicated(mesh)
  s_eval = jax.jit(mor_step.make_eval_fn(cfg) if mor else make_eval_step(cfg),
                   in_shardings=(p_sh, b_sh), out_shardings=(rep, rep))
  t_eval = jax.jit(make_eval_step(teacher_cfg), in_shardings=(t_sh, b_sh),
                   out_shardings=(rep, rep))
  x_eval = _exit_evaluator(cfg, lcfg, p_sh, b_sh, rep, val)  # {} without exits
  if mor:  # causal-routing NLL + router metrics (validate_config excludes exits)
    x_eval = mor_step.make_router_evaluator(cfg, p_sh, b_sh, rep, val)

  # -- resume --------------------------------------------------------------------
  tr = config.train
  ckpt = C.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tr.ckpt_every,
                        keep=tr.keep, async_save=tr.async_checkpointing)
  model_id = {k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "remat")}
  start_step, resumed_from, facts = 0, None, {}
  if ckpt.latest_step() is not None:
    r = ckpt.restore_latest_intact(state, train_iter,
                                   expect_meta={"model_config": model_id},
                                   strict=bool(tr.get("strict_restore", False)))
    if r is None:
      logging.warning("no intact checkpoint left in %s: starting from step 0",
                      ckpt.directory)
      train_iter = new_train_iter()
    else:
      state, train_iter = jax.device_put(r.state, st_sh), r.data_iterator
      start_step = resumed_from = r.step
      facts = r.meta.get("facts", {})
      logging.info("resumed from %s (step %d)", ckpt.step_dir(r.step), r.step)
  writer = M.MetricWriter(workdir, resume_step=resumed_from)
  id_log = _ExampleIdLog(workdir, resumed_from) if log_ids else None
  if "teacher_nll" not in facts:
    t_nll, t_ppl = _evaluate(t_eval, t_params, val)
    s_nll, s_ppl = _evaluate(s_eval, state.params, val)
    x0 = x_eval(state.params)
    facts = {"teacher_nll": t_nll, "teacher_ppl": t_ppl, "student_nll_init": s_nll,
             "student_ppl_init": s_ppl, **{f"{k}_init": v for k, v in x0.items()}}
    writer.write(start_step, "eval", {"teacher_nll": t_nll, "teacher_ppl": t_ppl,
                                      "student_nll": s_nll, "student_ppl": s_ppl, **x0})
  logging.info("held-out ppl: teacher %.3f, student at init %.3f",
               facts["teacher_ppl"], facts["student_ppl_init"])
  meta = {"model_config": model_id, "facts": facts, "config": config.to_dict()}

  # -- compile -------------------------------------------------------------------
  make_step = mor_step.make_mor_train_step if mor else make_train_step
  step_fn = jit_train_step(make_step(cfg, ocfg, lcfg, teacher_cfg), mesh, st_sh,
                           t_sh if use_teacher else None, b_sh)
  teacher_arg = t_params if use_teacher else None
  t0 = time.perf_counter()
  abstract_batch = {k: jax.ShapeDtypeStruct((d.batch_size, d.seq_len), np.int32,
                                            sharding=b_sh) for k in val[0]}
  compiled = step_fn.lower(state, teacher_arg, abstract_batch).compile()
  compile_s = time.perf_counter() - t0
  mem = _memory_report(compiled)
  logging.info("train step compiled in %.1fs; memory %s", compile_s, mem)
  tokens_per_step = d.batch_size * d.seq_len
  fpt = M.train_flops_per_token(cfg, d.seq_len, teacher_cfg if use_teacher else None)
  peak_dev = M.measure_matmul_peak(tr.peak_matmul_size) if tr.peak_matmul_size else None
  peak = M.peak_flops(peak_dev, mesh.size) if peak_dev else None

  # -- loop ----------------------------------------------------------------------
  total, budget = tr.steps, tr.get("time_budget_s")
  step, status, times, losses = start_step, "completed", [], []
  last_eval = (start_step, facts["student_nll_init"], facts["student_ppl_init"]) \
      if resumed_from is None else (-1, None, None)
  last_x = x0 if resumed_from is None else {}
  progress = M.Progress(total, initial=start_step)
  t_loop = time.time()
  while step < total:
    if guard.requested:  # signal during setup or an eval
      status = "preempted"
      break
    if budget is not None and not C.all_processes_ok(time.time() - t_start <= budget):
      status = "time_budget"
      logging.warning("time budget %.0fs exceeded after %d steps", budget, step)
      break
    host_batch = next(train_iter)
    if id_log is not None:
      id_log.write(step + 1, host_batch["doc_ids"])
    batch = _to_device(host_batch, b_sh)
    t0 = time.perf_counter()
    state, mets = compiled(state, teacher_arg, batch)
    mets = {k: float(v) for k, v in jax.device_get(mets).items()}
    dt = time.perf_counter() - t0
    step += 1
    times.append(dt)
    if not math.isfinite(mets["loss"]):
      raise FloatingPointError(f"non-finite loss {mets['loss']} at step {step}; "
                               f"last checkpoint: {ckpt.latest_step()}")
    losses.append(mets["loss"])
    tps = tokens_per_step / dt
    mfu = fpt["total"] * tps / peak if peak else None
    if step % tr.log_every == 0 or step == total:
      writer.write(step, "train", dict(mets, step_time_s=dt, tokens_per_s=tps,
                                       **({"mfu": mfu} if mfu is not None else {})))
    for h in hooks:
      h(step, state, mets)
    if tr.eval_every and step % tr.eval_every == 0:
      nll, ppl = _evaluate(s_eval, state.params, val)
      last_x = x_eval(state.params)
      writer.write(step, "eval", {"student_nll": nll, "student_ppl": ppl, **last_x})
      last_eval = (step, nll, ppl)
      progress.write(f"step {step}: held-out ppl {ppl:.3f} (teacher "
                     f"{facts['teacher_ppl']:.3f})")
    stop = guard.should_stop(step)
    ckpt.maybe_save(step, state, train_iter, meta, force=stop)
    progress.update(step, mets["loss"], tps, mfu)
    if stop:
      status = "preempted"
      logging.warning("SIGTERM: saved step %d to %s; exiting", step, ckpt.step_dir(step))
      break
  progress.close()
  loop_wall = time.time() - t_loop
  ckpt.maybe_save(step, state, train_iter, meta, force=True)  # no-op if saved
  ckpt.close()

  # -- final eval, export, summary ---------------------------------------------
  summary: dict[str, Any] = {"status": status, "workdir": workdir}
  if status != "preempted":
    if last_eval[0] != step:
      nll, ppl = _evaluate(s_eval, state.params, val)
      last_x = x_eval(state.params)
      writer.write(step, "eval", {"student_nll": nll, "student_ppl": ppl, **last_x})
    else:
      nll, ppl = last_eval[1:]
    facts_final = {"student_nll_final": nll, "student_ppl_final": ppl,
                   **{f"{k}_final": v for k, v in last_x.items()}}
  else:
    facts_final = {}
  writer.close()
  steady = times[1:] if len(times) > 1 else times
  med = statistics.median(steady) if steady else None
  gap = facts["student_nll_init"] - facts["teacher_nll"]
  closed = None
  if facts_final and gap > 0:
    closed = (facts["student_nll_init"] - facts_final["student_nll_final"]) / gap
  if peak_dev:
    # The start-of-run measurement can be depressed by other load on the host;
    # MFU uses the best of the measurements taken before and after the loop.
    peak_dev = max(peak_dev, M.measure_matmul_peak(tr.peak_matmul_size))
    peak = M.peak_flops(peak_dev, mesh.size)
  summary.update({
      "config": config.to_dict(),
      "student": {"unique_params": student_unique,
                  "applied_params_per_token": M.applied_params(cfg),
                  "plan": dataclasses.asdict(cfg.plan), "name": cfg.name},
      "teacher": {"unique_params": teacher_unique,
                  "applied_params_per_token": M.applied_params(teacher_cfg)},
      "resumed_from_step": resumed_from, "final_step": step,
      "steps_this_run": step - start_step,
      "tokens_trained": step * tokens_per_step,
      "tokens_this_run": (step - start_step) * tokens_per_step,
      "wall_time_s": time.time() - t_start, "train_loop_wall_s": loop_wall,
      "compile_time_s": compile_s,
      "train_step_time_s_median": med,
      "tokens_per_s": tokens_per_step / med if med else None,
      "flops_per_token": fpt,
      "matmul_peak_flops_per_device": peak_dev, "peak_flops_total": peak,
      "mfu": fpt["total"] * tokens_per_step / med / peak if med and peak else None,
      "memory": dict(mem, peak_host_rss_mb=resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 1024),  # whole run (at compile: in log)
      **facts, **facts_final,
      "gap_closed_fraction_nll": closed,
      "gap_closed_note": "fraction of the init->teacher gap closed in held-out NLL "
                         "(log-perplexity): (nll_init - nll_final) / (nll_init - "
                         "nll_teacher); None when the student starts at or below the "
                         "teacher or the run was preempted",
      "first_loss_this_run": losses[0] if losses else None,
      "last_loss": losses[-1] if losses else None,
      "metrics": writer.path,
  })
  if status != "preempted":
    params = _host_params(state.params)  # a collective: every process calls it
  if is_main and status != "preempted":
    summary["final_dir"] = export.save_model(os.path.join(workdir, "final"), cfg, params,
                                             tokenizer)
    if tr.export_hf:
      summary["final_hf_dir"] = export.export_unrolled_hf(
          os.path.join(workdir, "final_hf"), cfg, params, tokenizer)
    summary["curves_png"] = M.plot_curves(writer.path, os.path.join(workdir, "curves.png"),
                                          title=cfg.name)
  if is_main:
    _write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


__all__ = ["ByteEncoder", "loss_config", "optim_config", "train", "validate_config"]

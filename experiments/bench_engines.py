"""Forced-exit benchmark of the decode policies: speed only, independent of quality.

    python experiments/bench_engines.py                  # embedded model, batch 1 and 8
    python experiments/bench_engines.py --batches 1,8,32 --models vanilla,loops2,loops3
    python experiments/bench_engines.py --quick          # tiny random model (tests)

Exit decisions come from a seeded table instead of a confidence: each decode
token leaves at the target exit (layer 15 of 30 for the vanilla model and its
2-loop conversion, after loop 1 = layer 10 for the 3-loop one) with
probability ``rate`` (0/25/50/75/100%), else it runs the full depth. The
confidence measure is still computed at every checked exit (threshold +inf,
``ExitRule.decide(forced=...)``), so the rows show what a measure costs:
``softmax_max`` reads the 49k-vocabulary head at the exit, the head-free
measures (FREE: the meta classifier; CALM: hidden-state cosine) do not.
Self-speculation replays the table as draft acceptance (draft = the target
exit's layers, ``--draft_len`` tokens per round).

Policies (families; ``FAMILIES`` is the hook for more rows, e.g. serving):
full depth (``Engine``), FREE (``EarlyExitEngine(policy="free")``, k_max 8,
deep-chunk buckets 1/2/4/9), CALM (exits 10/15/20 or the loop exits),
self-speculation (``SelfSpeculativeEngine``).

Each row: decode tokens/s (prefill excluded; every row emits exactly
``--new_tokens``), the ratio to the full-depth policy of the same batch in the
same process (runs interleaved: each repeat times the full-depth engine before
every policy family; medians), and the **ideal** ratio from the bytes each
token really needs under that policy's algorithm and the realised exit
pattern: weights of the layers run (``--layer_mb`` measured from the params:
14.2 MB per SmolLM2 layer in f32), the tied head (113 MB) once per head
evaluation, the KV cache each layer reads, CALM's skipped-layer KV fills (the
K/V projections), FREE's deep catch-up passes (the deep layers once per pass)
and speculation's draft + verify passes. ``of_ideal`` = ratio / ideal;
``saving_realised`` = (ratio - 1) / (ideal - 1) where the ideal saves >= 2%.
An ideal from FLOPs (matmul rows, incl. FREE's and speculation's wider deep
chunks) is listed too, and the **roofline ideal**, which ``of_ideal`` uses:
each phase of the decode (a step's layers, a deep pass, a draft or verify
pass) takes ``max(bytes / BW, FLOPs / P(rows))``, with BW this machine's memory
read bandwidth (``kernels.roofline.measure_bandwidth``, measured before and
after each batch's timed runs, mean) and P(rows) the native kernel's compute
rate at that phase's matmul rows (``kernels.roofline.kernel_compute_rate``:
batch rows for a step, batch x chunk width for FREE's deep pass, batch x
(draft_len + 1) for verification); ideal = T(full depth) / T(policy). FREE's
deep passes use the mean chunk width of the run (exact at 0% and 100%).

Writes ``<out>/bench_engines.{json,md}``. Run under ``flock -x`` (nothing else
running): absolute figures mean nothing across machines, the ratios do.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable

from absl import app, flags

# This checkout's package, whichever recursive_lm is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "results", "Output folder.")
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
flags.DEFINE_list("models", ["vanilla"], "vanilla | loops2 | loops3 (untrained "
                  "conversions of the embedded model: speed only).")
flags.DEFINE_list("rates", ["0", "0.25", "0.5", "0.75", "1"], "Forced exit rates.")
flags.DEFINE_list("policies", ["free", "calm", "spec"], "Policy families besides full depth.")
flags.DEFINE_list("measures", ["softmax_max", "head_free"],
                  "softmax_max and/or head_free (FREE: meta classifier; CALM: state).")
flags.DEFINE_integer("new_tokens", 32, "New tokens per row.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per row (median).")
flags.DEFINE_integer("draft_len", 4, "Self-speculation draft length.")
flags.DEFINE_integer("k_max", 8, "FREE pending-buffer size.")
flags.DEFINE_integer("seed", 0, "Seed of the forced-exit tables.")
flags.DEFINE_string("tag", "", "Suffix of the output file names.")
flags.DEFINE_bool("quick", False, "Tiny random model, tiny sizes (tests).")
flags.DEFINE_string("compile_cache", "/tmp/rlm_bench_engines_jax_cache",
                    "JAX persistent compilation cache ('' = off): compile once with "
                    "--compile_only under a shared lock, then time under flock -x.")
flags.DEFINE_bool("compile_only", False, "Build and warm up every engine, time nothing.")
flags.DEFINE_bool("merge", False, "Merge into the existing <out>/bench_engines.json: rows "
                  "of the (model, batch, policy family) triples run now replace the stored "
                  "ones, the rest stay (split a long grid into runs of < 8 min each).")

F32 = 4


# ----------------------------------------------------------------------------
# Models and their byte / FLOP costs.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Model:
  name: str
  cfg: object
  params: object
  target: int                 # forced exit layer (FREE exit, speculation draft depth)
  calm_exits: tuple[int, ...]


@dataclasses.dataclass
class Costs:
  """Per-unit byte and FLOP costs of one model at one cache length."""
  layer_bytes: list[float]    # weights per unrolled layer (incl. its LoRA)
  layer_flops: list[float]    # matmul FLOPs per query row per unrolled layer
  kv_proj_bytes: list[float]  # K/V projection weights (CALM's propagation)
  head_bytes: float
  head_flops: float
  kv_read: float              # bytes of KV one row reads per layer
  attn_flops: float           # attention FLOPs per query row per layer

  def layers(self, a: int, b: int, rows: int, queries: int = 1) -> tuple[float, float]:
    """(bytes, flops) of layers [a, b) for ``rows`` rows of ``queries`` each."""
    by = sum(self.layer_bytes[a:b]) + (b - a) * rows * self.kv_read
    fl = (sum(self.layer_flops[a:b]) + (b - a) * self.attn_flops) * rows * queries
    return by, fl

  def head(self, rows: int, n: int = 1) -> tuple[float, float]:
    return self.head_bytes, self.head_flops * rows * n


def model_costs(cfg, params, cache_len: int) -> Costs:
  import numpy as np
  units = cfg.plan.unrolled()
  nbytes = lambda t: float(sum(np.asarray(x).size for x in _leaves(t))) * F32
  layer_bytes, kv_proj = [], []
  for group, idx, loop in units:
    p = params["block"][f"layer_{idx}"] if group == "block" else params[f"{group}_{idx}"]
    extra = 0.0
    if group == "block" and cfg.lora:
      extra = sum(float(np.asarray(v).size) / cfg.plan.loops * F32
                  for k, v in params["lora"].items() if k.startswith(f"layer_{idx}_"))
    layer_bytes.append(nbytes(p) + extra)
    kv_proj.append(2.0 * cfg.d_model * cfg.n_kv_heads * cfg.head_dim * F32)
  d, hq, hkv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  mm = d * (hq + 2 * hkv) * dh + hq * dh * d + 3 * d * cfg.d_ff
  return Costs(layer_bytes, [2.0 * mm] * len(units), kv_proj,
               float(cfg.vocab_size * d * F32), 2.0 * cfg.vocab_size * d,
               2.0 * hkv * cache_len * dh * F32, 4.0 * cache_len * hq * dh)


def _leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)


def load_models(names) -> list[Model]:
  from recursive_lm.config import DepthPlan, tiny_config
  from recursive_lm.nn.model import init_params
  if FLAGS.quick:
    out = []
    for name in names:
      loops = {"vanilla": 1, "loops2": 2, "loops3": 3}[name]
      plan = DepthPlan.vanilla(6) if loops == 1 else DepthPlan(block=6 // loops, loops=loops)
      cfg = tiny_config(plan=plan, max_seq_len=128, eos_id=None)
      out.append(Model(name, cfg, init_params(cfg, seed=1), 3 if loops < 3 else 2,
                       (2, 3, 4) if loops == 1 else tuple(
                           (6 // loops) * (i + 1) for i in range(loops - 1))))
    return out
  from recursive_lm import api
  from recursive_lm.checkpoints import load_checkpoint
  from recursive_lm.recursive.convert import convert
  out = []
  ck = None
  for name in names:
    if name == "vanilla":
      m = api.load()
      out.append(Model(name, m.cfg.replace(eos_id=None), m.params, 15, (10, 15, 20)))
      continue
    loops = {"loops2": 2, "loops3": 3}[name]
    ck = ck or load_checkpoint()
    cfg, params = convert(ck.config, ck.weights, loops=loops)
    exits = tuple(cfg.plan.prelude + cfg.plan.block * (i + 1) for i in range(loops - 1))
    out.append(Model(name, cfg.replace(eos_id=None), params, exits[0], exits))
  return out


def engine_layout():
  """The fastest measured decode layout (``LoadedModel.engine``)."""
  import jax
  from recursive_lm.kernels import native
  if jax.default_backend() == "cpu" and native.load():
    return dict(kernel_layout="panel", fuse=True)
  return dict(kernel_layout="out_in", fuse=True)


# ----------------------------------------------------------------------------
# Cases: one timed configuration each; families build them per batch.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
  family: str
  policy: str
  measure: str
  rate: float | None
  run: Callable[[], tuple[float, dict]]       # -> (decode seconds, counters)
  cost: Callable[[dict], list]  # counters -> phases [(bytes, flops, matmul rows)] of the decode
  times: list = dataclasses.field(default_factory=list)
  counters: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Ctx:
  model: Model
  batch: int
  prompts: list
  costs: Costs
  layout: dict
  n_new: int
  rates: list


def _decode_steps(ctx: Ctx) -> int:
  return ctx.n_new - 1  # the first token comes from prefill


def family_full(ctx: Ctx) -> list[Case]:
  from recursive_lm.decode.engine import Engine
  eng = Engine(ctx.model.cfg, ctx.model.params, **ctx.layout)
  L, c, b = ctx.model.cfg.plan.effective_depth, ctx.costs, ctx.batch

  def run():
    o = eng.generate(ctx.prompts, ctx.n_new, stop_at_eos=False)
    return o.decode_seconds, {"steps": o.steps}

  def cost(_):
    by, fl = c.layers(0, L, b)
    hb, hf = c.head(b)
    n = _decode_steps(ctx)
    return [(n * (by + hb), n * (fl + hf), b)]

  run()
  return [Case("full", "full depth", "-", None, run, cost)]


def _free_measure(name: str, cfg):
  if name == "softmax_max":
    return "softmax_max", None
  import jax
  import jax.numpy as jnp
  from recursive_lm.early_exit.confidence import MetaClassifier
  meta = MetaClassifier().init(jax.random.key(0), jnp.zeros((1, cfg.d_model)))
  return "meta", meta


def family_free(ctx: Ctx) -> list[Case]:
  from recursive_lm.decode.early_exit import EarlyExitEngine
  from recursive_lm.decode.exit_rule import forced_exit_table
  m, c, b = ctx.model, ctx.costs, ctx.batch
  L, e, k = m.cfg.plan.effective_depth, m.target, FLAGS.k_max
  buckets = tuple(w for w in (1, 2, 4) if w < k + 1) + (k + 1,)
  cases = []
  for meas in FLAGS.measures:
    conf, meta = _free_measure(meas, m.cfg)
    eng = EarlyExitEngine(m.cfg, m.params, exits=[e], policy="free", confidence=conf,
                          threshold=float("inf"), k_max=k, deep_buckets=buckets,
                          meta_params=meta, **ctx.layout)
    needs_logits = eng.rule.needs_logits
    for rate in ctx.rates:
      table = forced_exit_table(FLAGS.seed, b, ctx.n_new, rate, 0, 2)

      def run(eng=eng, table=table):
        o = eng.generate(ctx.prompts, ctx.n_new, stop_at_eos=False, forced=table)
        return o.decode_seconds, {"deep_passes": o.deep_passes,
                                  "deep_query_rows": o.deep_query_rows,
                                  "exit_fraction": o.exit_fraction,
                                  "forced_syncs": o.forced_syncs}

      def cost(cn, needs_logits=needs_logits):
        n = _decode_steps(ctx)
        by, fl = c.layers(0, e, b)
        hb, hf = c.head(b)
        shallow = (n * (by + hb), n * (fl + hf), b)   # shallow layers + one head per token
        deep = cn["deep_passes"]
        if not deep:
          return [shallow]
        db, _ = c.layers(e, L, b)
        _, dfl = c.layers(e, L, 1)
        rows = cn["deep_query_rows"]             # every chunk row computed
        dh = (hb, hf) if needs_logits else (0.0, 0.0)  # softmax: the deep head too
        return [shallow, (deep * (db + dh[0]), dfl * rows + deep * dh[1],
                          max(1, round(rows / deep)))]

      run()
      cases.append(Case("free", "FREE", conf, rate, run, cost))
  return cases


def family_calm(ctx: Ctx) -> list[Case]:
  import numpy as np
  from recursive_lm.decode.early_exit import EarlyExitEngine
  from recursive_lm.decode.exit_rule import forced_exit_table
  m, c, b = ctx.model, ctx.costs, ctx.batch
  L = m.cfg.plan.effective_depth
  exits = tuple(m.calm_exits) + (L,)
  target = exits.index(m.target)
  cases = []
  for meas in FLAGS.measures:
    conf = "softmax_max" if meas == "softmax_max" else "state"
    eng = EarlyExitEngine(m.cfg, m.params, exits=list(m.calm_exits), policy="calm",
                          confidence=conf, threshold=float("inf"), **ctx.layout)
    needs_logits = eng.rule.needs_logits
    for rate in ctx.rates:
      table = forced_exit_table(FLAGS.seed, b, ctx.n_new, rate, target, len(exits))

      def run(eng=eng, table=table):
        o = eng.generate(ctx.prompts, ctx.n_new, stop_at_eos=False, forced=table)
        idx = np.asarray([r[1:] for r in o.exit_index])            # [B, n-1]
        return o.decode_seconds, {"max_exit": idx.max(0).tolist(),
                                  "min_exit": idx.min(0).tolist(),
                                  "exit_fraction": o.exit_fraction}

      def cost(cn, needs_logits=needs_logits):
        phases = []  # one per step: layers up to the deepest row's exit, heads, KV fills
        for hi, lo in zip(cn["max_exit"], cn["min_exit"]):
          lb, lf = c.layers(0, exits[hi], b)
          hb, hf = c.head(b)
          heads = hi + 1 if needs_logits else 1
          fill = sum(c.kv_proj_bytes[exits[lo]:L]) if lo < len(exits) - 1 else 0.0
          phases.append((lb + heads * hb + fill, lf + heads * hf + fill / F32 * 2 * b, b))
        return phases

      run()
      cases.append(Case("calm", "CALM", conf, rate, run, cost))
  return cases


def family_spec(ctx: Ctx) -> list[Case]:
  import numpy as np
  from recursive_lm.decode.speculative import SelfSpeculativeEngine
  m, c, b, d = ctx.model, ctx.costs, ctx.batch, FLAGS.draft_len
  L, e = m.cfg.plan.effective_depth, m.target
  eng = SelfSpeculativeEngine(m.cfg, m.params, draft_layers=e, draft_len=d, **ctx.layout)
  cases = []
  for rate in ctx.rates:
    rs = np.random.default_rng(FLAGS.seed)
    table = rs.random((b, ctx.n_new, d)) < rate

    def run(table=table):
      o = eng.generate(ctx.prompts, ctx.n_new, stop_at_eos=False, forced=table)
      return o.decode_seconds, {"rounds": o.steps, "acceptance": o.acceptance_rate,
                                "tokens_per_round": o.tokens_per_round}

    def cost(cn):
      r = cn["rounds"]
      db, df = c.layers(0, e, b)
      hb, hf = c.head(b)
      vb, vf = c.layers(e, L, b, d + 1)
      draft = (r * (d * (db + hb) + db), r * (d * (df + hf) + df), b)
      verify = (r * (vb + hb), r * (vf + hf * (d + 1)), b * (d + 1))
      return [draft, verify]

    run()
    cases.append(Case("spec", f"self-spec d={d}", "greedy", rate, run, cost))
  return cases


# Hook: family name -> builder(ctx) -> cases. "full" must stay first.
FAMILIES: dict[str, Callable[[Ctx], list[Case]]] = {
    "full": family_full, "free": family_free, "calm": family_calm, "spec": family_spec}


def register_family(name: str, builder: Callable[[Ctx], list[Case]]) -> None:
  """Adds a policy family (e.g. loop-wise serving) to the benchmark."""
  FAMILIES[name] = builder


# ----------------------------------------------------------------------------
# Roofline.
# ----------------------------------------------------------------------------
class Roofline:
  """Time of a list of phases [(bytes, flops, matmul rows)]: the sum of
  ``max(bytes / BW, flops / P(rows))``; P(rows) = 2 * rows * the native f32
  kernel's rate at that many rows (``kernel_compute_rate``, measured once per
  row count). Without the native kernels only the bandwidth term counts."""

  def __init__(self, bandwidth_gbps: float):
    self.bw = bandwidth_gbps * 1e9
    self.rates: dict[int, float | None] = {}

  def flop_rate(self, rows: int) -> float | None:
    from recursive_lm.kernels.roofline import kernel_compute_rate
    rows = int(rows)
    if rows not in self.rates:
      r = None if FLAGS.quick else kernel_compute_rate("f32", rows)
      self.rates[rows] = None if r is None else 2.0 * rows * r
    return self.rates[rows]

  def time(self, phases) -> float:
    t = 0.0
    for by, fl, rows in phases:
      p = self.flop_rate(rows)
      t += max(by / self.bw, fl / p if p else 0.0)
    return t


def bandwidth_gbps() -> float:
  from recursive_lm.kernels.roofline import measure_bandwidth
  n = (1 << 24) if FLAGS.quick else (1 << 29)
  return measure_bandwidth(n_bytes=n, reps=3)["bandwidth_GBps"]


# ----------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------
def bench_batch(model: Model, batch: int, layout: dict, families) -> list[dict]:
  from recursive_lm.decode.engine import _round_up, bucket_length
  n_new = FLAGS.new_tokens
  prompts = [[(17 * i + 3 * j) % 1000 + 100 for j in range(FLAGS.prompt_len)]
             for i in range(batch)]
  if FLAGS.quick:
    prompts = [[(7 * i + j) % 90 + 2 for j in range(FLAGS.prompt_len)] for i in range(batch)]
  s = _round_up(bucket_length(FLAGS.prompt_len) + n_new, 64)
  ctx = Ctx(model, batch, prompts, model_costs(model.cfg, model.params, s), layout,
            n_new, [float(r) for r in FLAGS.rates])
  t0 = time.perf_counter()
  full = FAMILIES["full"](ctx)[0]
  groups = [(f, FAMILIES[f](ctx)) for f in families]
  print(f"  [{model.name} b{batch}] compiled in {time.perf_counter() - t0:.0f}s", flush=True)
  if FLAGS.compile_only:
    return []
  bws = [bandwidth_gbps()]
  for _ in range(FLAGS.repeats):
    for _, cases in groups:
      sec, cn = full.run()
      full.times.append(sec)
      full.counters = cn
      for case in cases:
        sec, cn = case.run()
        case.times.append(sec)
        case.counters = cn
  bws.append(bandwidth_gbps())
  roof = Roofline(statistics.mean(bws))
  tokens = batch * (n_new - 1)
  t_full = statistics.median(full.times)
  total = lambda ph: (sum(p[0] for p in ph), sum(p[1] for p in ph))
  full_ph = full.cost(full.counters)
  (fb, ff), fr = total(full_ph), roof.time(full_ph)
  rows = []
  for case in [full] + [c for _, cs in groups for c in cs]:
    t = statistics.median(case.times)
    ph = case.cost(case.counters)
    (by, fl), tr = total(ph), roof.time(ph)
    ratio = t_full / t
    ideal = fr / tr
    row = {"model": model.name, "batch": batch, "family": case.family,
           "policy": case.policy, "measure": case.measure, "rate": case.rate,
           "tokens_per_s": tokens / t, "ratio": ratio, "ideal_bytes": fb / by,
           "ideal_flops": ff / fl, "ideal_roofline": ideal, "of_ideal": ratio / ideal,
           "of_byte_ideal": ratio * by / fb,
           "saving_realised": ((ratio - 1) / (ideal - 1)) if ideal > 1.02 else None,
           "roofline_s": tr, "bandwidth_GBps": bws,
           "flop_rate_GFLOPs": {str(k): (v or 0) / 1e9 for k, v in roof.rates.items()},
           "runs_s": case.times, "counters": case.counters}
    rows.append(row)
    print(f"  {case.policy:14s} {case.measure:12s} rate={case.rate} "
          f"{row['tokens_per_s']:8.1f} tok/s  x{ratio:.2f}  ideal x{ideal:.2f} (bytes "
          f"x{fb / by:.2f}, FLOPs x{ff / fl:.2f})  of ideal {row['of_ideal']:.2f}", flush=True)
  print(f"  bandwidth {bws} GB/s; FLOP rate by rows "
        f"{ {k: round((v or 0) / 1e9) for k, v in roof.rates.items()} } GFLOP/s", flush=True)
  return rows


def to_markdown(rows, meta, runs=None) -> str:
  runs = runs or [meta]
  cmds = [f"* `{u['command']}` ({u['date']})" for u in runs]
  out = [f"# Forced-exit benchmark ({meta['date']})", "",
         "Commands (each run times its (model, batch, policy family) rows; `--merge` joins them"
         + ("; rows with no roofline ideal come from runs before it existed (their of "
            "ideal is of the byte ideal)" if any("ideal_roofline" not in r for r in rows)
            else "") + "):", "",
         *cmds, "",
         f"Machine: {meta['machine']}; layout {meta['layout']}; {meta['new_tokens']} new "
         f"tokens, {meta['prompt_len']}-token prompts, median of the interleaved runs "
         "(repeats per command). ratio = tokens/s over the full-depth policy of the "
         "same model and batch in the same process (the full-depth row shown is the "
         "newest run's); the ideals are the same ratio from what each token really "
         "needs (weights of the layers run, heads, KV reads and fills, deep catch-up "
         "passes, draft + verify passes): from the bytes alone, from the FLOPs alone, "
         "and the **roofline** (each phase max(bytes / bandwidth, FLOPs / the native "
         "kernel's compute rate at that phase's matmul rows), bandwidth and compute "
         "rate measured in the same run). **of ideal = ratio / roofline ideal**; of "
         "bytes = ratio / byte ideal; saving = (ratio - 1) / (roofline ideal - 1).", "",
         "| model | batch | policy | measure | exit rate | tok/s | ratio | ideal (bytes) "
         "| ideal (FLOPs) | ideal (roofline) | of ideal | of bytes | saving realised |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    sav = "-" if r["saving_realised"] is None else f"{r['saving_realised']:.2f}"
    rate = "-" if r["rate"] is None else f"{100 * r['rate']:.0f}%"
    roof = r.get("ideal_roofline")
    roof_s = "-" if roof is None else f"{roof:.2f}x"
    of_b = r.get("of_byte_ideal", r["ratio"] / r["ideal_bytes"])
    out.append(f"| {r['model']} | {r['batch']} | {r['policy']} | {r['measure']} | {rate} "
               f"| {r['tokens_per_s']:.1f} | {r['ratio']:.2f}x | {r['ideal_bytes']:.2f}x "
               f"| {r['ideal_flops']:.2f}x | {roof_s} | {r['of_ideal']:.2f} | {of_b:.2f} "
               f"| {sav} |")
  return "\n".join(out) + "\n"


def main(_):
  import jax
  if FLAGS.compile_cache:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if FLAGS.quick:
    FLAGS.new_tokens = min(FLAGS.new_tokens, 8)
    FLAGS.prompt_len = min(FLAGS.prompt_len, 5)
    FLAGS.repeats = 1
  families = [f for f in FLAGS.policies if f != "full"]
  for f in families:
    if f not in FAMILIES:
      raise app.UsageError(f"unknown policy family {f!r}; known: {sorted(FAMILIES)}")
  layout = engine_layout() if not FLAGS.quick else {}
  rows = []
  for model in load_models(FLAGS.models):
    for b in FLAGS.batches:
      print(f"{model.name} batch {b}", flush=True)
      rows += bench_batch(model, int(b), layout, families)
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "command": "python " + " ".join(sys.argv), "machine":
          f"{jax.default_backend()} x{os.cpu_count()}", "layout": layout or "training",
          "new_tokens": FLAGS.new_tokens, "prompt_len": FLAGS.prompt_len,
          "repeats": FLAGS.repeats}
  if FLAGS.compile_only:
    return
  for r in rows:
    r["run"] = meta["date"]
  os.makedirs(FLAGS.out, exist_ok=True)
  stem = os.path.join(FLAGS.out, "bench_engines" + (f"_{FLAGS.tag}" if FLAGS.tag else ""))
  runs = [dict(meta, models=list(FLAGS.models), batches=[int(b) for b in FLAGS.batches],
               policies=families)]
  if FLAGS.merge and os.path.exists(stem + ".json"):
    rows, runs = merge_rows(stem + ".json", rows, runs)
  with open(stem + ".json", "w") as f:
    json.dump({"meta": meta, "runs": runs, "rows": rows}, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(to_markdown(rows, meta, runs))
  print(f"wrote {stem}.json / .md ({len(rows)} rows)")


_MODEL_ORDER = {"vanilla": 0, "loops2": 1, "loops3": 2}
_FAMILY_ORDER = {"full": 0, "free": 1, "calm": 2, "spec": 3}


def merge_rows(path: str, new_rows: list, new_runs: list) -> tuple[list, list]:
  """Stored rows of other (model, batch, policy family) triples + the new rows,
  in table order (the full-depth row of a pair is the newest run's: each row's
  ratio is to the full depth of its own run); the runs that still contribute a
  row, then the new run."""
  with open(path) as f:
    old = json.load(f)
  done = {(r["model"], r["batch"], r["family"]) for r in new_rows}
  kept = [r for r in old.get("rows", []) if (r["model"], r["batch"], r["family"]) not in done]
  rows = kept + new_rows
  rows.sort(key=lambda r: (_MODEL_ORDER.get(r["model"], 9), r["model"], r["batch"],
                           _FAMILY_ORDER.get(r["family"], 9)))  # stable within a family
  left = {r.get("run") for r in kept}  # the date of the run that made each row
  runs = [u for u in old.get("runs", [old.get("meta", {})]) if u.get("date") in left]
  return rows, runs + new_runs


if __name__ == "__main__":
  app.run(main)

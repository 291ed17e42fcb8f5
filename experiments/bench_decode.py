"""Decode throughput of the engine vs llama.cpp and transformers, as a fraction
of each weight format's memory roofline, with held-out perplexity per format.

    python experiments/bench_decode.py                  # embedded SmolLM2-135M
    python experiments/bench_decode.py --batches=1,8 --runs=5 --weights=f32,bf16,int8
    python experiments/bench_decode.py --layouts=in_out,panel+fused --weights=f32

For each batch size: prompt of 32 tokens, 128 new tokens, greedy, median over
``--runs`` runs after a warm-up. Engines are ``layout:weights`` pairs (int8
only with panel layouts). Roofline: decoding one step reads every streamed
weight once in its own format (the embedding table, of which a step gathers
B rows, excluded when the head has its own copy), so
``steps/s <= bandwidth / streamed_bytes``;
the bandwidth is the read rate of a 1 GiB array (best of 3 reads by XLA's sum
and by a native streaming read), probed right before every timed run because
this machine's bandwidth drifts by 20-50% over minutes; each run is set
against its own roofline and the median fraction is reported.
llama.cpp (llama-cpp-python, the ``llamacpp`` extra) runs on the embedded
GGUF (Q4_1) with the same thread count, interleaved with the engines, when
installed; transformers (the ``peer`` extra) on the same f32 weights. The
held-out perplexity of each format is measured on the pydoc corpus
validation split (``--ppl_batches`` x ``--ppl_batch`` x ``--ppl_seq_len``
tokens). Writes
``results/bench_decode.json`` and ``results/bench_decode.md``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags

# This checkout's package, whichever recursive_lm is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from recursive_lm.kernels.roofline import (BandwidthProbe, kernel_compute_rate,  # noqa: E402,F401  pylint: disable=wrong-import-position
                                         measure_bandwidth)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model to benchmark.")
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 128, "New tokens.")
flags.DEFINE_integer("runs", 5, "Timed runs per setting (median reported).")
flags.DEFINE_list("layouts", ["panel+fused"],
                  "Engine kernel layouts to try (in_out, out_in: XLA dots; panel: the "
                  "native kernel of recursive_lm/kernels; +fused: concatenated q/k/v, "
                  "gate/up).")
flags.DEFINE_list("weights", ["f32", "bf16", "int8"],
                  "Weight formats (nn.model.decode_layout); int8 runs on panel layouts only.")
flags.DEFINE_bool("peer", False, "Also time transformers if installed.")
flags.DEFINE_bool("llamacpp", True, "Also time llama.cpp on the GGUF if llama-cpp-python "
                  "is installed.")
flags.DEFINE_integer("threads", 2, "llama.cpp threads (the machine's cores).")
flags.DEFINE_integer("ppl_batches", 4, "Held-out perplexity batches per format (0: skip).")
flags.DEFINE_integer("ppl_batch", 4, "Sequences per perplexity batch.")
flags.DEFINE_integer("ppl_seq_len", 256, "Tokens per perplexity sequence.")
flags.DEFINE_bool("ppl_only", False, "Only measure the perplexities (no timing; run it "
                  "under the shared lock) into <out>/bench_decode_ppl.json, which a timed "
                  "run with --ppl_batches=0 puts in its table.")
flags.DEFINE_string("compile_cache", os.path.join(os.path.expanduser("~"), ".cache",
                                                  "recursive_lm", "jax"),
                    "JAX persistent compilation cache ('' for none): a warm-up run fills "
                    "it so the timed run spends its exclusive time timing.")
flags.DEFINE_string("out", "results", "Output folder.")
flags.DEFINE_bool("amx_ab", True, "Where bf16/int8 panels run on AMX tiles, also time "
                  "them with AMX off (the AVX-512 path) in the same run, interleaved.")
flags.DEFINE_bool("prefetch_ab", True, "Also time the panel engines whose kernels prefetch "
                  "the weight stream into L2 (AMX tiles, bf16 dot products, int8 FMAs; f32 "
                  "from 4 rows) with that prefetch off (native.set_amx_prefetch(0), "
                  "set_bf16_prefetch(0), set_int8_prefetch(0), set_f32_prefetch(0)), "
                  "interleaved.")

NO_PREFETCH = "without L2 prefetch)"


def engine_names() -> list[str]:
  return [f"{lay}:{w}" for lay in FLAGS.layouts for w in FLAGS.weights
          if w != "int8" or lay.startswith("panel")]


def make_engines(m) -> dict:
  from recursive_lm.decode.engine import Engine
  return {name: Engine(m.cfg.replace(eos_id=None), m.params,
                       kernel_layout=name.split("+")[0].split(":")[0],
                       fuse="+fused" in name, weights=name.split(":")[1])
          for name in engine_names()}


def streamed_bytes(params) -> int:
  """Bytes one decode step reads: every weight, less the embedding table when
  the head has its own copy (the step gathers only B rows of the table)."""
  import jax
  total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
  if "lm_head" in params:
    total -= params["embed"]["embedding"].nbytes
  return int(total)


def streamed_weights(params) -> int:
  """Weights one decode step multiplies (every panel kernel, the LM head's included)."""
  import jax
  n = 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    if getattr(path[-1], "key", None) == "kernel":
      n += x.size
  return int(n)


def kv_cache_bytes_per_step(cfg, batch: int) -> int:
  """KV-cache bytes the native cache attention reads per counted decode step,
  from the slots each step sees: a generate call of N new tokens runs N - 1
  model steps (the first token comes from the prefill) and reports N steps;
  model step i feeds position P + i and reads slots [0, P + i] of every
  layer's K and V, for every row and KV head (the kernel reads up to the last
  visible slot; all prompts here have P = --prompt_len tokens). The cache
  dtype is the engine's (init_cache)."""
  import jax
  from recursive_lm.nn.model import init_cache
  one = init_cache(cfg, batch, 1)  # one slot of every layer's K and V (and loop)
  per_slot = sum(x.nbytes for part in (one.prelude, one.block, one.coda)
                 for x in jax.tree_util.tree_leaves(part))
  p, n = FLAGS.prompt_len, FLAGS.new_tokens
  slots = sum(p + i + 1 for i in range(n - 1))
  return int(per_slot * slots / n)


def prompts_for(batch: int) -> list[list[int]]:
  return [[(17 * i + 3 * j) % 1000 + 100 for j in range(FLAGS.prompt_len)]
          for i in range(batch)]


_LLAMACPP_PROBE = r"""
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=2, n_ctx=64, verbose=False)
llm("def f(x):", max_tokens=2, temperature=0)
"""


def llamacpp_extra_bufts_ok(gguf: str) -> bool:
  """Whether llama.cpp survives a short generation with its extra buffer types
  (weight repacking, and ggml's AMX matmuls where the build has them), tried in
  a child process: a build with ``-DGGML_NATIVE=ON`` on one Xeon with AMX-INT8
  here segfaulted in ``ggml_backend_amx_mul_mat`` on the Q4_1 GGUF."""
  import subprocess
  try:
    r = subprocess.run([sys.executable, "-c", _LLAMACPP_PROBE, gguf], capture_output=True,
                       timeout=300, check=False)
  except subprocess.TimeoutExpired:
    return False
  return r.returncode == 0


class LlamaCpp:
  """llama.cpp on a GGUF through llama-cpp-python's low-level API: greedy
  decoding of ``batch`` sequences at once (one llama_decode per step, one
  sequence id per row), on ``FLAGS.threads`` threads. ``extra_bufts=False``
  loads the weights without llama.cpp's extra buffer types (no repacking, no
  ggml AMX path); for Q4_1 the plain CPU path is the same kernels otherwise."""

  def __init__(self, gguf: str, batch: int, extra_bufts: bool = True):
    import llama_cpp
    import llama_cpp.llama as llama_py
    import numpy as np
    self.np, self.lc, self.batch = np, llama_cpp, batch
    n_ctx = batch * (FLAGS.prompt_len + FLAGS.new_tokens + 8)
    from llama_cpp import _internals
    n_batch = max(512, batch * FLAGS.prompt_len)
    defaults = llama_py.llama_cpp.llama_model_default_params

    def model_params():
      params = defaults()
      params.use_extra_bufts = extra_bufts
      return params
    llama_py.llama_cpp.llama_model_default_params = model_params
    try:
      self.llm = llama_cpp.Llama(model_path=gguf, n_threads=FLAGS.threads,
                                 n_threads_batch=FLAGS.threads, n_ctx=64, verbose=False)
    finally:
      llama_py.llama_cpp.llama_model_default_params = defaults
    # Llama() makes a one-sequence context; decoding `batch` sequences needs its own.
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, batch
    cp.n_threads = cp.n_threads_batch = FLAGS.threads
    cp.kv_unified = True
    self._context = _internals.LlamaContext(model=self.llm._model, params=cp,  # pylint: disable=protected-access
                                            verbose=False)
    self.ctx = self._context.ctx
    self.vocab = self.llm.n_vocab()
    self.version = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
    if not extra_bufts:
      self.version = self.version[:-1] + ", extra buffer types off)"
    self.cbatch = llama_cpp.llama_batch_init(batch * FLAGS.prompt_len, 0, batch)

  def _decode(self, rows):
    """rows: (token, position, sequence, want_logits) -> logits of the wanted rows."""
    b = self.cbatch
    for i, (tok, pos, seq, want) in enumerate(rows):
      b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
      b.seq_id[i][0], b.logits[i] = seq, want
    b.n_tokens = len(rows)
    if self.lc.llama_decode(self.ctx, b) != 0:
      raise RuntimeError("llama_decode failed")
    out = []
    for i, row in enumerate(rows):
      if row[3]:
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        out.append(self.np.ctypeslib.as_array(ptr, shape=(self.vocab,)))
    return out

  def generate(self):
    """(decode seconds per step, prefill + decode seconds)."""
    mem = self.lc.llama_get_memory(self.ctx)
    self.lc.llama_memory_clear(mem, True)
    t0 = time.perf_counter()
    rows = [(tok, j, i, j == FLAGS.prompt_len - 1)
            for i, p in enumerate(prompts_for(self.batch)) for j, tok in enumerate(p)]
    logits = self._decode(rows)
    t1 = time.perf_counter()
    for step in range(FLAGS.new_tokens):
      toks = [int(self.np.argmax(l)) for l in logits]
      logits = self._decode([(t, FLAGS.prompt_len + step, i, True)
                             for i, t in enumerate(toks)])
    t2 = time.perf_counter()
    return (t2 - t1) / FLAGS.new_tokens, t2 - t0


def amx_off_engines(engines: dict, batch: int) -> list[str]:
  """Engines whose panels run on AMX tiles at this batch (timed again with AMX off)."""
  from recursive_lm.kernels import native
  out = []
  for name in engines:
    fmt = name.split(":")[1]
    lo = native.amx_min_rows(fmt) if fmt in ("bf16", "int8") else None
    if FLAGS.amx_ab and name.startswith("panel") and lo is not None and batch >= lo:
      out.append(name)
  return out


def bench_engines(m, engines: dict, batch: int, probe: BandwidthProbe,
                  llamacpp: "LlamaCpp | None") -> list[dict]:
  """Times each engine (and llama.cpp); runs are interleaved so machine noise
  hits all alike. AMX engines are also timed with AMX off (`amx_off_engines`)."""
  from recursive_lm.kernels import native
  prompts = prompts_for(batch)
  runners = {}
  for name, eng in engines.items():
    def run(eng=eng):
      o = eng.generate(prompts, FLAGS.new_tokens, stop_at_eos=False)
      return o.decode_seconds / o.steps, o.prefill_seconds + o.decode_seconds
    runners[f"recursive_lm ({name})"] = run
  for name in amx_off_engines(engines, batch):
    def run_off(eng=engines[name]):
      native.set_amx(False)
      try:
        o = eng.generate(prompts, FLAGS.new_tokens, stop_at_eos=False)
      finally:
        native.set_amx(True)
      return o.decode_seconds / o.steps, o.prefill_seconds + o.decode_seconds
    runners[f"recursive_lm ({name}, AMX off)"] = run_off
  # Every low-bit path prefetches its weight stream into L2 (AMX tiles, bf16
  # dot products, int8 FMAs), the f32 path from native.f32_prefetch_rows() rows.
  f32_rows = native.f32_prefetch_rows()
  prefetching = [n for n in engines if n.startswith("panel") and (
      n.endswith(":bf16") or n.endswith(":int8")
      or (n.endswith(":f32") and 0 < f32_rows <= batch))]
  for name in prefetching if FLAGS.prefetch_ab else []:
    def run_nopf(eng=engines[name]):
      ahead = (native.set_amx_prefetch(0), native.set_int8_prefetch(0),
               native.set_bf16_prefetch(0), native.set_f32_prefetch(0))
      try:
        o = eng.generate(prompts, FLAGS.new_tokens, stop_at_eos=False)
      finally:
        native.set_amx_prefetch(max(ahead[0], 0))
        native.set_int8_prefetch(max(ahead[1], 0))
        native.set_bf16_prefetch(max(ahead[2], 0))
        native.set_f32_prefetch(max(ahead[3], 0))
      return o.decode_seconds / o.steps, o.prefill_seconds + o.decode_seconds
    runners[f"recursive_lm ({name}, {NO_PREFETCH}"] = run_nopf
  if llamacpp is not None:
    runners[llamacpp.version] = llamacpp.generate
  for run in runners.values():
    run()  # warm-up / compile
  step_s = {n: [] for n in runners}
  total = {n: [] for n in runners}
  bw = {n: [] for n in runners}
  for _ in range(FLAGS.runs):
    for n, run in runners.items():
      bw[n].append(probe())
      s, t = run()
      step_s[n].append(s)
      total[n].append(t)
  out = []
  for n in runners:
    s = statistics.median(step_s[n])
    eng_name = n[len("recursive_lm ("):-1].split(",")[0] if n.startswith("recursive_lm") else None
    fmt = eng_name.split(":")[1] if eng_name else None
    path = None
    if eng_name and eng_name.startswith("panel"):
      if n.endswith("AMX off)"):
        native.set_amx(False)
        path = native.panel_path(fmt, batch)
        native.set_amx(True)
      else:
        path = native.panel_path(fmt, batch)
        if n.endswith(NO_PREFETCH):
          path += " without L2 prefetch"
    out.append({"engine": n, "engine_name": eng_name, "weights": fmt, "kernel_path": path,
                "amx_off": n.endswith("AMX off)"), "batch": batch,
                "tokens_per_s": batch / s, "step_ms": s * 1e3,
                "end_to_end_tokens_per_s":
                    batch * FLAGS.new_tokens / statistics.median(total[n]),
                "runs": [batch / x for x in step_s[n]], "run_bandwidth_GBps": bw[n]})
  return out


def perplexities(m, engines: dict) -> dict:
  """Held-out perplexity of each engine's weights (pydoc validation split)."""
  if FLAGS.ppl_batches <= 0:
    return {}
  from recursive_lm import evaluation
  from recursive_lm.data.pipeline import eval_batches
  from recursive_lm.data.sources import make_source
  tok = m.tokenizer
  val = eval_batches(make_source("pydoc", "validation"), tok.encode, tok.eos_id,
                     FLAGS.ppl_seq_len, FLAGS.ppl_batch, FLAGS.ppl_batches)
  out = {}
  for name, eng in engines.items():
    r = evaluation.heldout_perplexity(eng.cfg, eng.params, val)
    out[name] = r
    print(f"perplexity {name:24s} {r['ppl']:.4f} ({r['n_tokens']} tokens)", flush=True)
  return out


def bench_transformers(m, batch: int, probe: BandwidthProbe) -> dict | None:
  try:
    import torch
    import transformers
  except ImportError:
    return None
  from recursive_lm.nn.weights import hf_from_params
  torch.set_num_threads(os.cpu_count() or 1)
  hf_cfg = transformers.LlamaConfig(**{k: v for k, v in m.cfg.to_hf_config().items()
                                       if k not in ("architectures", "model_type",
                                                    "torch_dtype")})
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  sd = {k: torch.from_numpy(v) for k, v in hf_from_params(m.cfg, m.params).items()}
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
  model.tie_weights()
  ids = torch.tensor([[(17 * i + 3 * j) % 1000 + 100 for j in range(FLAGS.prompt_len)]
                      for i in range(batch)])
  kw = dict(max_new_tokens=FLAGS.new_tokens, min_new_tokens=FLAGS.new_tokens,
            do_sample=False, use_cache=True, pad_token_id=0)
  with torch.inference_mode():
    model.generate(ids, **kw)
    ts, bws = [], []
    for _ in range(FLAGS.runs):
      bws.append(probe())
      t = time.perf_counter()
      model.generate(ids, **kw)
      ts.append(time.perf_counter() - t)
  s = statistics.median(ts)
  return {"engine": f"transformers {transformers.__version__} (torch "
                    f"{torch.__version__}, {torch.get_num_threads()} threads)",
          "batch": batch, "tokens_per_s": batch * FLAGS.new_tokens / s,
          "step_ms": s / FLAGS.new_tokens * 1e3,
          "end_to_end_tokens_per_s": batch * FLAGS.new_tokens / s,
          "runs": [batch * FLAGS.new_tokens / x for x in ts], "run_bandwidth_GBps": bws}


def main(_):
  import jax
  if FLAGS.compile_cache:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from recursive_lm import api
  from recursive_lm.checkpoints import resolve_preset
  from recursive_lm.kernels import status as native_status
  m = api.load(FLAGS.model)
  engines = make_engines(m)
  ppl_path = os.path.join(FLAGS.out, "bench_decode_ppl.json")
  if FLAGS.ppl_only:
    os.makedirs(FLAGS.out, exist_ok=True)
    ppl = perplexities(m, engines)
    with open(ppl_path, "w") as f:
      json.dump({"command": "python " + " ".join(sys.argv),
                 "date": time.strftime("%Y-%m-%d %H:%M"),
                 "tokens": FLAGS.ppl_batches * FLAGS.ppl_batch * FLAGS.ppl_seq_len,
                 "perplexity": ppl}, f, indent=1)
    return
  bytes_of = {f"recursive_lm ({n})": streamed_bytes(e.params) for n, e in engines.items()}
  weight_bytes = bytes_of.get("recursive_lm (panel+fused:f32)", max(bytes_of.values()))

  def bandwidth(when):
    bw = measure_bandwidth()
    print(f"memory read bandwidth ({when}): {bw['bandwidth_GBps']:.1f} GB/s "
          f"(numpy {bw['numpy_sum_GBps']:.1f}, XLA {bw['xla_sum_GBps']:.1f}, native "
          f"{bw.get('native_stream_GBps', float('nan')):.1f}); streamed bytes per step: "
          + ", ".join(f"{n} {b / 1e6:.0f} MB" for n, b in bytes_of.items()), flush=True)
    return bw

  gguf = None
  if FLAGS.llamacpp:
    try:
      import llama_cpp  # noqa: F401 pylint: disable=unused-import
      gguf = resolve_preset(FLAGS.model)
    except ImportError:
      print("llama-cpp-python not installed (pip install '.[llamacpp]'): no llama.cpp rows")
  extra_bufts = True
  if gguf:
    extra_bufts = llamacpp_extra_bufts_ok(gguf)
    if not extra_bufts:
      print("llama.cpp crashed in a short generation with its extra buffer types (ggml's "
            "AMX / repacked matmuls): its rows load the GGUF without them "
            "(use_extra_bufts=False)", flush=True)
    import gguf as gguf_lib
    reader = gguf_lib.GGUFReader(gguf)
    bytes_of["llama.cpp"] = int(sum(t.n_bytes for t in reader.tensors))  # streamed ~ all
    del reader

  # Compute limit of each format's kernel at each batch (L2-resident weights),
  # on the path the engine takes (and with AMX off where AMX rows are timed).
  from recursive_lm.kernels import native
  weights_of = {n: streamed_weights(e.params) for n, e in engines.items()}
  compute_rates = {}
  for name in engines:
    fmt = name.split(":")[1]
    for b in map(int, FLAGS.batches):
      if not name.startswith("panel"):
        continue
      variants = [False] + ([True] if name in amx_off_engines(engines, b) else [])
      for off in variants:
        if (fmt, b, off) in compute_rates:
          continue
        if off:
          native.set_amx(False)
        try:
          rate = kernel_compute_rate(fmt, b)
          path = native.panel_path(fmt, b)
        finally:
          if off:
            native.set_amx(True)
        if rate:
          compute_rates[(fmt, b, off)] = rate
          print(f"compute limit {fmt} batch {b} ({path}): {rate * b * 2 / 1e9:.0f} GFLOP/s "
                f"({rate / 1e9:.1f} G weights/s)", flush=True)

  # The full measurement (three readers) before and after, for the record; the
  # roofline of each run uses the probe taken right before it.
  bws = [bandwidth("before")]
  probe = BandwidthProbe()
  rows = []
  for b in map(int, FLAGS.batches):
    llamacpp = None
    if gguf:
      try:
        llamacpp = LlamaCpp(gguf, b, extra_bufts)
      except Exception as e:  # pylint: disable=broad-except
        print(f"llama.cpp at batch {b} unavailable: {e}")
    res = bench_engines(m, engines, b, probe, llamacpp)
    del llamacpp
    if FLAGS.peer:
      peer = bench_transformers(m, b, probe)
      if peer:
        res.append(peer)
    for r in res:
      nbytes = (bytes_of[f"recursive_lm ({r['engine_name']})"] if r.get("engine_name") else
                next((v for k, v in bytes_of.items() if r["engine"].startswith(k)),
                     weight_bytes))
      r["streamed_bytes"] = nbytes
      per_run = [tps * nbytes / (b * g * 1e9)
                 for tps, g in zip(r["runs"], r["run_bandwidth_GBps"])]
      r["fraction_of_roofline"] = statistics.median(per_run)
      if r.get("engine_name"):  # recursive_lm rows: weights + the KV cache they read
        kv = kv_cache_bytes_per_step(m.cfg, b)
        r["kv_cache_bytes_per_step"] = kv
        r["fraction_of_weights_kv_roofline"] = statistics.median(
            [tps * (nbytes + kv) / (b * g * 1e9)
             for tps, g in zip(r["runs"], r["run_bandwidth_GBps"])])
      r["roofline_tokens_per_s"] = (b * statistics.median(r["run_bandwidth_GBps"]) * 1e9
                                    / nbytes)
      key = (r.get("weights"), b, r.get("amx_off"))
      if r.get("engine_name") and key in compute_rates:
        rate = compute_rates[key]
        r["compute_limit_tokens_per_s"] = b * rate / weights_of[r["engine_name"]]
        r["limit_tokens_per_s"] = min(r["roofline_tokens_per_s"],
                                      r["compute_limit_tokens_per_s"])
        r["fraction_of_limit"] = r["tokens_per_s"] / r["limit_tokens_per_s"]
      print(f"batch {b:2d} {r['engine']:55s} {r['tokens_per_s']:7.1f} tok/s "
            f"({r['fraction_of_roofline']:.0%} of its roofline, bandwidth "
            f"{min(r['run_bandwidth_GBps']):.1f}-{max(r['run_bandwidth_GBps']):.1f} GB/s)",
            flush=True)
      rows.append(r)
  bws.append(bandwidth("after"))
  ppl = perplexities(m, engines)
  ppl_note = ""
  if not ppl and os.path.exists(ppl_path):
    with open(ppl_path) as f:
      saved = json.load(f)
    ppl = saved["perplexity"]
    ppl_note = f" (from `{saved['command']}` on {saved['date']}, {saved['tokens']} tokens)"
  run_bw = [g for r in rows for g in r["run_bandwidth_GBps"]]
  bw = {"before_after": bws, "runs_min_GBps": min(run_bw), "runs_max_GBps": max(run_bw),
        "runs_median_GBps": statistics.median(run_bw)}
  os.makedirs(FLAGS.out, exist_ok=True)
  meta = {"command": "python " + " ".join(sys.argv), "model": m.cfg.name,
          "streamed_bytes": bytes_of, "bandwidth": bw, "prompt_len": FLAGS.prompt_len,
          "new_tokens": FLAGS.new_tokens, "runs": FLAGS.runs, "jax": jax.__version__,
          "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
          "native_kernels": native_status(), "perplexity": ppl, "perplexity_source": ppl_note,
          "compute_limit_GFLOPs": {f"{f}:{b}" + (":amx_off" if off else ""): r * b * 2 / 1e9
                                   for (f, b, off), r in compute_rates.items()},
          "perplexity_tokens": (FLAGS.ppl_batches * FLAGS.ppl_batch * FLAGS.ppl_seq_len),
          "date": time.strftime("%Y-%m-%d %H:%M")}
  with open(os.path.join(FLAGS.out, "bench_decode.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  f32_ppl = next((v["ppl"] for k, v in ppl.items() if k.endswith(":f32")), None)
  lines = [f"Decode throughput, {m.cfg.name}, prompt {FLAGS.prompt_len}, "
           f"{FLAGS.new_tokens} new tokens, greedy, median of {FLAGS.runs} interleaved runs. "
           f"Memory bandwidth probed before every run: "
           f"{bw['runs_min_GBps']:.1f}-{bw['runs_max_GBps']:.1f} GB/s (median "
           f"{bw['runs_median_GBps']:.1f}); fraction = median over runs of tokens/s "
           "over that run's roofline for the row's own streamed bytes per step; roofline "
           "column at the median bandwidth of the row's runs. Perplexity: pydoc "
           f"validation split" + (ppl_note or f", {meta['perplexity_tokens']} tokens") + ".",
           f"Made by `{meta['command']}` on {meta['date']}; {meta['native_kernels']}.", "",
           "Compute limit: the native kernel's rate on L2-resident weights at the same "
           "batch (`kernel_compute_rate`), in tokens/s for the row's weights per step; "
           "'of limit' = tokens/s over the lower of the roofline and the compute limit. "
           "Kernel path: the math of the row's bf16/int8/f32 panel matmuls at that batch "
           "(`recursive_lm.kernels.native.panel_path`); 'AMX off' rows are the same engine "
           "with the AMX path switched off (`native.set_amx(False)`), timed interleaved; "
           "'without L2 prefetch' rows the same with the AMX, bf16 dot-product, int8 and "
           "f32 (from 4 rows) paths' software prefetch of the weight stream off "
           "(`native.set_amx_prefetch(0)`, `native.set_bf16_prefetch(0)`, `native.set_f32_prefetch(0)`, "
           "`native.set_int8_prefetch(0)`). 'of weights+KV': the fraction of a roofline "
           "that also counts the f32 KV-cache bytes the cache attention reads per step "
           "(`kv_cache_bytes_per_step`: every layer's K and V up to each step's position, "
           "averaged over the steps; 'KV MB' column); the weights-only 'fraction' is the "
           "headline.",
           "", "| batch | engine | kernel path | MB per step | new tokens/s | roofline tokens/s "
           "| fraction | KV MB per step | of weights+KV | compute limit tokens/s | of limit "
           "| x llama.cpp | held-out ppl |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  ref_tps = {r["batch"]: r["tokens_per_s"] for r in rows
             if r["engine"].startswith("llama.cpp")}
  for r in rows:
    vs = (f"{r['tokens_per_s'] / ref_tps[r['batch']]:.2f}x" if r["batch"] in ref_tps
          else "-")
    name = r.get("engine_name") or ""
    p = ppl.get(name)
    pp = "-" if p is None else (f"{p['ppl']:.3f}" + (
        f" ({p['ppl'] / f32_ppl - 1:+.2%})" if f32_ppl and not name.endswith(":f32") else ""))
    lines.append(f"| {r['batch']} | {r['engine']} | {r.get('kernel_path') or '-'} | "
                 f"{r['streamed_bytes'] / 1e6:.0f} | "
                 f"{r['tokens_per_s']:.1f} | {r['roofline_tokens_per_s']:.1f} | "
                 f"{r['fraction_of_roofline']:.0%} | "
                 + (f"{r['kv_cache_bytes_per_step'] / 1e6:.0f} | "
                    f"{r['fraction_of_weights_kv_roofline']:.0%} | "
                    if "kv_cache_bytes_per_step" in r else "- | - | ")
                 + (f"{r['compute_limit_tokens_per_s']:.0f} | {r['fraction_of_limit']:.0%}"
                    if "compute_limit_tokens_per_s" in r else "- | -")
                 + f" | {vs} | {pp} |")
  with open(os.path.join(FLAGS.out, "bench_decode.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)

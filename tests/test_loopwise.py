"""Loop-wise serving: forced depths, chunked prefill, head compaction, lockstep."""
import numpy as np
import pytest

from recursive_lm.config import DepthPlan, RouterConfig, tiny_config
from recursive_lm.decode.engine import Engine
from recursive_lm.decode.forced_depth import ForcedDepth
from recursive_lm.decode.loopwise import LoopwiseServer
from recursive_lm.mor.depthwise import MoRLoopwiseServer
from recursive_lm.nn.model import init_params

PROMPTS = [[5, 17, 33, 2, 9], [11], [20, 21, 22], [7, 8], [30] * 20, [44, 45, 46, 47],
           [3, 9]]
N_NEW = 7


def test_forced_depth_rule():
  rule = ForcedDepth((0.5, 0.5), seed=3)
  assert rule.mean_depth == 1.5
  assert rule.expected_max(1) == 1.5
  assert rule.expected_max(2) == pytest.approx(1.75)
  assert ForcedDepth.uniform(3).ideal_ratio(1) == pytest.approx(1.0)
  d = np.asarray(rule.depth(np.arange(4000) // 40, np.arange(4000) % 40))
  assert set(d.tolist()) == {1, 2} and abs(d.mean() - 1.5) < 0.05
  # counter-based: the same (request, token) gets the same depth in any batch
  assert int(rule.depth(17, 5)) == int(d[17 * 40 + 5])
  with pytest.raises(ValueError, match="distribution"):
    ForcedDepth((0.5, 0.6))


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config(plan=DepthPlan(1, 2, 3, 1), lora_ranks=(("q", 4),), eos_id=None)
  return cfg, init_params(cfg, seed=3)


def test_chunked_prefill_and_small_head_equal_engine(model):
  """Prompts longer than the chunk, one head row and one prefill row per step:
  every request's tokens still equal Engine's for that request alone."""
  cfg, params = model
  eng = Engine(cfg, params)
  ref = [eng.generate([p], max_new_tokens=N_NEW).tokens[0] for p in PROMPTS]
  srv = LoopwiseServer(cfg, params, slots=3, prefill_chunk=4, prefill_rows=(1,),
                       head_rows=1, stage_rows=0)
  out = srv.generate(PROMPTS, max_new_tokens=N_NEW)
  assert out.tokens == ref
  assert out.prefill_passes == sum(-(-len(p) // 4) for p in PROMPTS)
  # staged refills: stages of 2 requests, each prefilled in passes of 2 rows
  # per chunk (as many as its longest prompt needs), copied into free slots
  staged = LoopwiseServer(cfg, params, slots=3, prefill_chunk=4, stage_rows=2)
  out = staged.generate(PROMPTS, max_new_tokens=N_NEW)
  assert out.tokens == ref
  stages = [PROMPTS[i:i + 2] for i in range(0, len(PROMPTS), 2)]
  assert out.prefill_passes == sum(-(-max(map(len, g)) // 4) for g in stages)


def test_xla_depth_attention_equals_engine(model, monkeypatch):
  """Without the native all-depth read (bf16 or no compiler: XLA's gather of each
  row's own depth) the server still gives Engine's tokens."""
  from recursive_lm.decode import loopwise_block  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(loopwise_block, "native_depth_attention", lambda cfg: False)
  cfg, params = model
  eng = Engine(cfg, params)
  ref = [eng.generate([p], max_new_tokens=N_NEW).tokens[0] for p in PROMPTS[:4]]
  out = LoopwiseServer(cfg, params, slots=2, prefill_chunk=4).generate(PROMPTS[:4],
                                                                        max_new_tokens=N_NEW)
  assert out.tokens == ref


def test_forced_depths_loopwise_equals_lockstep(model):
  cfg, params = model
  rule = ForcedDepth.uniform(3, seed=1)
  a = LoopwiseServer(cfg, params, slots=3, exit=rule).generate(PROMPTS, N_NEW)
  b = LoopwiseServer(cfg, params, slots=3, exit=rule, lockstep=True).generate(
      PROMPTS, N_NEW)
  assert a.tokens == b.tokens and a.loops == b.loops
  for i, loops in enumerate(a.loops):
    assert loops == [3] + [int(rule.depth(i, j)) for j in range(1, N_NEW)]
  assert a.steps < b.steps and a.utilization > b.utilization
  assert b.head_calls < a.head_calls  # lockstep: one head call per batch token
  # the skipped-loop fill on the skipped rows only == masked over the head bucket
  c = LoopwiseServer(cfg, params, slots=3, exit=rule, compact_fill=False).generate(
      PROMPTS, N_NEW)
  assert c.tokens == a.tokens and c.loops == a.loops


def test_one_early_depth_still_fills_skipped_loops(model):
  """Every token stopping after loop 1 (one depth, but not the last loop) still
  gets its skipped loops' K/V; only all-loops streams drop the fill statically."""
  cfg, params = model
  rule = ForcedDepth((1.0, 0.0, 0.0), seed=2)
  srv = LoopwiseServer(cfg, params, slots=3, exit=rule)
  assert not srv._all_loops()
  assert LoopwiseServer(cfg, params, slots=3, exit=ForcedDepth((0.0, 0.0, 1.0)))._all_loops()
  a = srv.generate(PROMPTS, N_NEW)
  b = LoopwiseServer(cfg, params, slots=3, exit=rule, lockstep=True).generate(
      PROMPTS, N_NEW)
  c = LoopwiseServer(cfg, params, slots=3, exit=rule, compact_fill=False).generate(
      PROMPTS, N_NEW)
  assert a.tokens == b.tokens == c.tokens
  assert all(loops == [3] + [1] * (N_NEW - 1) for loops in a.loops)


def test_mor_forced_depths_loopwise_equals_lockstep():
  cfg = tiny_config(plan=DepthPlan(1, 1, 3, 1), router=RouterConfig(
      kind="token", gate="softmax", alpha=1.0, kv="recursion"))
  params = init_params(cfg, seed=2)
  rule = ForcedDepth((0.5, 0.25, 0.25), seed=4)
  kw = dict(slots=2, exit=rule)
  a = MoRLoopwiseServer(cfg, params, **kw).generate(PROMPTS[:5], 6, stop_at_eos=False)
  b = MoRLoopwiseServer(cfg, params, lockstep=True, **kw).generate(
      PROMPTS[:5], 6, stop_at_eos=False)
  assert a.tokens == b.tokens and a.loops == b.loops
  assert {d for x in a.loops for d in x} == {1, 2, 3}
  assert a.steps < b.steps
  with pytest.raises(ValueError, match="token-choice"):
    MoRLoopwiseServer(cfg.replace(router=RouterConfig(kind="expert")), params, exit=rule)


def test_bench_serving_quick(tmp_path):
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, os.path.join(root, "experiments", "bench_serving.py"),
                      "--quick", "--loops=2", f"--out={tmp_path}"], cwd=root, env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = json.loads((tmp_path / "bench_serving.json").read_text())["rows"]
  assert [r["scenario"] for r in rows] == ["none", "varied"]
  assert all(r["identical_tokens"] for r in rows)
  assert "| loop-wise tok/s |" in (tmp_path / "bench_serving.md").read_text()


def test_block_row_buckets_equal_every_slot(model):
  """The block on a small row bucket of the busy slots (the drain tail) gives
  the tokens and schedule of the block on every slot; with the XLA depth read too."""
  cfg, params = model
  rule = ForcedDepth.uniform(3, seed=5)
  full = LoopwiseServer(cfg, params, slots=4, exit=rule, block_buckets=(4,))
  small = LoopwiseServer(cfg, params, slots=4, exit=rule, block_buckets=(1, 2, 3))
  assert full.block_buckets == (4,) and small.block_buckets == (1, 2, 3, 4)
  assert LoopwiseServer(cfg, params, slots=4, lockstep=True).block_buckets == (4,)
  a, b = full.generate(PROMPTS, N_NEW), small.generate(PROMPTS, N_NEW)
  assert a.tokens == b.tokens and a.loops == b.loops
  assert (a.steps, a.active_slot_steps) == (b.steps, b.active_slot_steps)


def test_deferred_fill_equals_immediate_fill(model):
  """The skipped-loop fill one iteration late, two iterations per call (the
  loop-wise default) gives the tokens and schedule of the immediate fill in
  fewer fill calls; a server that never fills gives other tokens (so the
  comparison sees a missing or misplaced fill)."""
  cfg, params = model
  outs = []
  for rule in (ForcedDepth.uniform(3, seed=1), ForcedDepth((0.5, 0.0, 0.5), seed=6)):
    late = LoopwiseServer(cfg, params, slots=3, exit=rule)
    now = LoopwiseServer(cfg, params, slots=3, exit=rule, defer_fill=False)
    assert late.defer_fill and not now.defer_fill
    assert not LoopwiseServer(cfg, params, slots=3, exit=rule, lockstep=True).defer_fill
    a, b = late.generate(PROMPTS, N_NEW), now.generate(PROMPTS, N_NEW)
    assert a.tokens == b.tokens and a.loops == b.loops
    assert (a.steps, a.head_calls) == (b.steps, b.head_calls)
    assert 0 < late.last_fill_calls < now.last_fill_calls
    outs.append(a)

  class NoFill(LoopwiseServer):
    def _fill_served(self, params, st, cache, need, order):
      return st, cache
  rule = ForcedDepth.uniform(3, seed=1)
  c = NoFill(cfg, params, slots=3, exit=rule).generate(PROMPTS, N_NEW)
  assert c.loops == outs[0].loops and c.tokens != outs[0].tokens


def test_buckets_are_whole_row_groups(model):
  """From 16 slots on, head and fill buckets hold at least one 8-row group of
  the native matmul (a call of fewer rows sums in another order: tokens could
  differ from lockstep's full-pool calls by rounding; from 8 rows on every
  row sums as in a full group, tests/test_kernels.py); smaller pools keep P/8
  steps."""
  from recursive_lm.decode.loopwise import ROW_GROUP, _eighths
  cfg, params = model
  rule = ForcedDepth.uniform(3, seed=1)
  srv = LoopwiseServer(cfg, params, slots=32, exit=rule)
  assert ROW_GROUP == 8
  assert srv.head_buckets == srv.fill_buckets == (8, 12, 16, 20, 24, 28, 32)
  assert srv.defer_buckets == (8, 16, 24, 32, 40, 48, 56, 64)
  assert srv.block_buckets == (8, 16, 24, 32)
  assert _eighths(64, 64) == tuple(range(8, 72, 8))
  assert _eighths(16, 16) == (8, 10, 12, 14, 16)
  assert _eighths(8, 8) == tuple(range(1, 9)) and _eighths(4, 4) == (1, 2, 3, 4)


def test_low_bit_weights_run_the_block_on_every_slot(model):
  """bf16/int8 weights: no block row buckets by default (their last-bit
  differences become other tokens once activations are rounded)."""
  cfg, params = model
  rule = ForcedDepth.uniform(3, seed=1)
  assert LoopwiseServer(cfg, params, slots=8, exit=rule, kernel_layout="panel",
                        weights="bf16").block_buckets == (8,)
  assert LoopwiseServer(cfg, params, slots=8, exit=rule).block_buckets == (2, 4, 6, 8)

"""Which loop-wise setting gives lockstep's tokens with bf16 panels (2 loops, 50% after loop 1, the bench's stream of 64 requests of 16 + 128): default, block on every slot, block and head on every slot. Shared hold of /tmp/rlm_cpu.lock (no timing).

    python experiments/serving_bf16_tokens.py
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fcntl, sys, time
lock = open("/tmp/rlm_cpu.lock", "a+"); fcntl.flock(lock, fcntl.LOCK_SH)
import numpy as np, jax, jax.numpy as jnp
from recursive_lm.checkpoints import load_checkpoint
from recursive_lm.recursive import convert
from recursive_lm.decode.forced_depth import ForcedDepth
from recursive_lm.decode.loopwise import LoopwiseServer
ck = load_checkpoint(None)
cfg, params = convert(ck.config, ck.weights, loops=2)
params = jax.tree_util.tree_map(jnp.asarray, dict(params))
rng = np.random.default_rng(0)
prompts = rng.integers(2, cfg.vocab_size, (64, 16)).tolist()   # bench_serving's stream (seed 0)
rule = ForcedDepth.exit_after(2, 1, 0.5, 0)
kw = dict(slots=32, exit=rule, prefill_chunk=16, kernel_layout="panel", fuse=True, eos_id=None,
          weights="bf16")
ref = LoopwiseServer(cfg, params, lockstep=True, **kw).generate(prompts, 128, stop_at_eos=False)
for name, extra in (("default", {}), ("block on every slot", dict(block_buckets=(32,))),
                    ("block + head on every slot", dict(block_buckets=(32,), head_buckets=(32,)))):
  o = LoopwiseServer(cfg, params, **kw, **extra).generate(prompts, 128, stop_at_eos=False)
  bad = [i for i in range(64) if o.tokens[i] != ref.tokens[i]]
  first = [next(j for j, (a, b) in enumerate(zip(o.tokens[i], ref.tokens[i])) if a != b) for i in bad]
  print(time.strftime("%H:%M"), name, "requests differing:", len(bad), "of 64; first differing token index:", sorted(first)[:10], "loops equal:", o.loops == ref.loops, flush=True)

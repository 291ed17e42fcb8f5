"""One loop of the shared block, timed alone: loop-wise vs lockstep settings.

The serving profile (``profile_serving.py``) charges a loop-wise block step
more than a lockstep one on the same 32 busy rows. This probe times the block
step by itself, chained ``--steps`` times in one jitted loop over a filled KV
cache, for each combination of

* the server's block path: loop-wise (row buckets, ``block_buckets`` default)
  or lockstep (every slot, no buckets), and
* the rows' loop indices: all at one loop (lockstep's pattern) or spread over
  the loops (loop-wise's: slot i at loop i mod N),

with every slot busy, positions spread over the cache. Interleaved repeats,
median ms per block step; an exclusive hold of ``--lock`` for the timed part.

    python experiments/block_step_ab.py --loops=3 --pos=144
"""
from __future__ import annotations

import fcntl
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_integer("loops", 3, "Loops of the conversion.")
flags.DEFINE_integer("slots", 32, "Slot pool size P.")
flags.DEFINE_integer("pos", 144, "Largest position of a row (rows spread over pos/2..pos).")
flags.DEFINE_integer("steps", 20, "Block steps chained per timed call.")
flags.DEFINE_integer("repeats", 7, "Interleaved timed calls per variant (median).")
flags.DEFINE_string("lock", "/tmp/rlm_cpu.lock", "Lock file ('': none).")
flags.DEFINE_list("busy", [], "Instead of the four variants: time the loop-wise block "
                  "path with only this many busy slots (rows spread over the loops), "
                  "each in its own row bucket, e.g. 4,8,12,16,20,24,28,32: the block "
                  "step's cost against its rows.")


def main(_):
  lock = open(FLAGS.lock, "a+") if FLAGS.lock else None
  if lock:
    fcntl.flock(lock, fcntl.LOCK_SH)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from recursive_lm.checkpoints import load_checkpoint
  from recursive_lm.decode.loopwise import LoopwiseServer
  from recursive_lm.nn.model import init_cache
  from recursive_lm.recursive import convert
  ck = load_checkpoint(None)
  cfg, params = convert(ck.config, ck.weights, loops=FLAGS.loops)
  params = jax.tree_util.tree_map(jnp.asarray, dict(params))
  p, n = FLAGS.slots, FLAGS.loops
  kw = dict(slots=p, kernel_layout="panel", fuse=True, eos_id=None)
  busy = sorted({min(max(int(b), 1), p) for b in FLAGS.busy})
  if busy:  # one row bucket per busy count
    servers = {"loop-wise": LoopwiseServer(cfg, params, lockstep=False,
                                           block_buckets=busy, **kw)}
  else:
    servers = {"loop-wise": LoopwiseServer(cfg, params, lockstep=False, **kw),
               "lockstep": LoopwiseServer(cfg, params, lockstep=True, **kw)}
  s = ((FLAGS.pos + 1 + 63) // 64) * 64
  rng = np.random.default_rng(0)
  cache = init_cache(servers["loop-wise"].cfg, p, s)
  blk = tuple(tuple(jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * 0.1)
                    for x in kv) for kv in cache["block"])
  pos = jnp.asarray(rng.integers(FLAGS.pos // 2, FLAGS.pos, (p,)), jnp.int32)
  h = jnp.asarray(rng.standard_normal((p, cfg.d_model)).astype(np.float32))
  spread = jnp.arange(p, dtype=jnp.int32) % n
  if busy:
    loops = {f"spread, {b} busy": (spread, jnp.arange(p) < b) for b in busy}
  else:
    loops = {"one loop": (jnp.full((p,), 1, jnp.int32), jnp.ones((p,), bool)),
             "spread": (spread, jnp.ones((p,), bool))}

  def chain(srv):
    def f(params, loop, go, h, pos, blk):
      def body(_, c):
        h, blk = c
        h2, blk = srv._block_loop(params, loop, h, pos, blk, go)  # pylint: disable=protected-access
        return (h2 * 0.5 + h * 0.5).astype(h.dtype), tuple(tuple(kv) for kv in blk)
      return jax.lax.fori_loop(0, FLAGS.steps, body, (h, blk))
    return jax.jit(f, donate_argnums=(5,))

  fns = {}
  for sname, srv in servers.items():
    f = chain(srv)
    for lname, (loop, go) in loops.items():
      fns[(sname, lname)] = (f, srv.params, loop, go)
  state = {"blk": blk}

  def call(key):
    f, prm, loop, go = fns[key]
    t0 = time.perf_counter()
    out_h, state["blk"] = f(prm, loop, go, h, pos, state["blk"])
    out_h.block_until_ready()
    return time.perf_counter() - t0

  for k in fns:
    call(k)  # compile
  if lock:
    fcntl.flock(lock, fcntl.LOCK_UN)
    fcntl.flock(lock, fcntl.LOCK_EX)
  ts = {k: [] for k in fns}
  for _ in range(FLAGS.repeats):
    for k in fns:
      ts[k].append(call(k))
  if lock:
    fcntl.flock(lock, fcntl.LOCK_UN)
  print(f"{time.strftime('%Y-%m-%d %H:%M')}: python {' '.join(sys.argv)}")
  print(f"{n}-loop conversion, {p} slots, positions {FLAGS.pos // 2}-{FLAGS.pos}, "
        f"cache length {s}; ms per block step (median of {FLAGS.repeats} calls of "
        f"{FLAGS.steps} steps)")
  print("| block path | loops of the rows | ms per step | runs |")
  print("|---|---|---|---|")
  for (sname, lname), v in ts.items():
    ms = [1e3 * x / FLAGS.steps for x in v]
    print(f"| {sname} | {lname} | {statistics.median(ms):.2f} | "
          f"{' '.join(f'{x:.2f}' for x in ms)} |")


if __name__ == "__main__":
  app.run(main)

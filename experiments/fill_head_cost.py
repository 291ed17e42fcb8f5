"""ms per skipped-loop fill call (loopwise_block.fill_kv) and per LM head call (norm + head + argmax), by rows, f32 and bf16 panels; SmolLM2-135M Cycle conversion (argv[1]: loops, default 2), 32 slots x 192 positions; compile under a shared hold of /tmp/rlm_cpu.lock, the timing (median of 20 calls) exclusive.

    python experiments/fill_head_cost.py 2
"""
import fcntl, os, statistics, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
lock = open("/tmp/rlm_cpu.lock", "a+"); fcntl.flock(lock, fcntl.LOCK_SH)
import numpy as np, jax, jax.numpy as jnp
from recursive_lm.checkpoints import load_checkpoint
from recursive_lm.recursive import convert
from recursive_lm.nn.model import decode_layout, init_cache
from recursive_lm.decode import loopwise_block as B, depth as D
ck = load_checkpoint(None)
cfg0, p0 = convert(ck.config, ck.weights, loops=int(sys.argv[1]) if len(sys.argv) > 1 else 2)
p0 = jax.tree_util.tree_map(jnp.asarray, dict(p0))
P, S = 32, 192
fns = {}
for w in ("f32", "bf16"):
  cfg, params = decode_layout(cfg0, p0, "panel", True, weights=w)
  fill = jax.jit(lambda prm, c, rows, h, pos, dep, ok, cfg=cfg: B.fill_kv(cfg, prm, c, rows, h, pos, dep, ok), donate_argnums=(1,))
  head = jax.jit(lambda prm, h, cfg=cfg: jnp.argmax(D.head(cfg, prm, h), -1))
  for r in (8, 16, 24, 32, 48, 64):
    rng = np.random.default_rng(r)
    rows = jnp.asarray(np.arange(r) % P, jnp.int32)
    h = jnp.asarray(rng.standard_normal((r, cfg.d_model)), jnp.float32)
    pos = jnp.asarray(np.arange(r) // P + 20, jnp.int32)
    dep = jnp.ones((r,), jnp.int32); ok = jnp.ones((r,), bool)
    c = init_cache(cfg, P, S)
    c = fill(params, c, rows, h, pos, dep, ok); jax.block_until_ready(c)
    fns[(w, r)] = [fill, params, c, (rows, h, pos, dep, ok)]
    if r <= 32:
      head(params, h).block_until_ready(); fns[(w, "head", r)] = (head, params, h)
fcntl.flock(lock, fcntl.LOCK_UN); fcntl.flock(lock, fcntl.LOCK_EX)
out = {}
for k, v in fns.items():
  ts = []
  for _ in range(20):
    t0 = time.perf_counter()
    if k[1] == "head":
      v[0](v[1], v[2]).block_until_ready()
    else:
      v[2] = v[0](v[1], v[2], *v[3]); jax.block_until_ready(v[2])
    ts.append(time.perf_counter() - t0)
  out[k] = 1e3 * statistics.median(ts)
fcntl.flock(lock, fcntl.LOCK_UN)
print(time.strftime("%H:%M"), "loops", cfg0.plan.loops)
for w in ("f32", "bf16"):
  print(w, "fill ms", {r: round(out[(w, r)], 2) for r in (8, 16, 24, 32, 48, 64)})
  print(w, "head ms", {r: round(out[(w, "head", r)], 2) for r in (8, 16, 24, 32)})

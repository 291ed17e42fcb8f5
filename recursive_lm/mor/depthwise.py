"""Loop-wise (continuous depth-wise) serving for Mixture-of-Recursions models.

:class:`MoRLoopwiseServer` is ``decode.loopwise.LoopwiseServer`` (one jitted
loop on the device: a device-side request queue, chunked prefill in the same
step, a slot pool at per-slot recursion, a compacted LM head, per-request
output buffers; ``lockstep=True`` for the sequence-wise baseline) with each
slot following the causal MoR semantics of ``mor.decode.MoREngine`` for one
token:

1. a slot starting a token embeds it and runs the prelude (masked writes);
   token-choice routers decide the token's depth here, once, from the block
   input (``routers.token_route``); with ``exit=ForcedDepth(...)`` (token-choice
   only) the seeded depth replaces the router's argmax (gates still from the
   router), for speed measurements;
2. the routed recursion itself is the model's own ``MoRBlock.__call__`` (cache
   mode, ``routing="threshold"``), ``jax.vmap``-ed over the slots with a
   per-slot recursion index ``n``: the same router decision, gate/combine
   (residual / additive / delta), KV strategy (recursion / share_first /
   hybrid) and ``block_valid`` bookkeeping as the sequence-batched engine;
3. whether the token continues is decided right after recursion n (so no step
   is spent on a recursion the token will skip): expert-choice evaluates
   recursion n+1's causal threshold rule (``z > thr`` or capacity 1) on the new
   state, exactly the decision ``MoRBlock`` would take there; token-choice
   stops at its decided depth;
4. a stopping slot runs the coda and waits for the head, samples its next token
   and restarts at recursion 0 of the next position. Depths the token skipped
   get no KV and stay invalid in ``block_valid`` (as in ``MoREngine``); each
   slot's validity row is cleared when a new request is prefilled into it.

Like ``MoREngine``, every emitted token is fed back once (the last one too),
so ``BatchOutput.loops[i][j]`` is the number of recursions generated token j
of request i went through when fed back, i.e. ``MoREngine.generate(...).depths``.
Tokens and depths equal ``MoREngine``'s for each request served alone
(tests/test_mor_depthwise.py). ``MoRDepthwiseBatcher`` keeps today's arguments.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from recursive_lm.config import ModelConfig
from recursive_lm.decode import depth as D
from recursive_lm.decode.forced_depth import ForcedDepth
from recursive_lm.decode.loopwise import LoopwiseServer, _lists
from recursive_lm.decode.serving import BatchOutput  # noqa: F401  (re-export)
from recursive_lm.mor import routers as R
from recursive_lm.mor.block import MoRBlock
from recursive_lm.nn import layers as L

VALID = "block_valid"


class MoRLoopwiseServer(LoopwiseServer):
  """Loop-wise serving for MoR models (see module docstring).

  Args:
    cfg, params: a MoR model (``cfg.router`` set).
    slots: pool size P.
    exit: None (the routers decide) or ``ForcedDepth`` (token-choice routers).
    lockstep, eos_id, pad_id and the other options: as ``LoopwiseServer``.
  """
  _feedback_depths = True

  def __init__(self, cfg: ModelConfig, params, slots: int = 8, exit=None, **kw):
    if cfg.router is None:
      raise ValueError("MoRDepthwiseBatcher needs a Mixture-of-Recursions config "
                       "(cfg.router set); serve other recursive models with "
                       "decode.depthwise.DepthwiseBatcher")
    if exit is not None and not (isinstance(exit, ForcedDepth) and cfg.router.kind == "token"):
      raise ValueError("MoR serving takes exit=None (the routers decide) or a ForcedDepth "
                       "with a token-choice router (RouterConfig(kind='token')); got "
                       f"{exit!r} with kind={cfg.router.kind!r}")
    super().__init__(cfg, params, slots=slots, exit=exit, **kw)

  def _fixed_depth(self) -> bool:
    """The routers decide each token's depth: not fixed unless forced."""
    return self.exit is not None and super()._fixed_depth()

  def _init_state(self, *a, **k):
    st = super()._init_state(*a, **k)
    p = self.slots
    st.update(h1=jnp.zeros_like(st["h"]), tdepth=jnp.zeros((p,), jnp.int32),
              tw=jnp.zeros((p,), jnp.float32), cnt=jnp.zeros((p,), jnp.int32))
    return st

  def _prefill_layers(self, params, h, pos, sub, ws, first_chunk):
    sub = dict(sub)
    sub[VALID] = jnp.where(first_chunk[None, :, None], False, sub[VALID])
    h, cache, _, _ = self.model.apply(
        {"params": params}, h, pos, None, sub, ws,
        method=lambda m, *a: m._layers(*a, None, False, "threshold"))  # pylint: disable=protected-access
    return h, cache

  def _recursion(self, params, h, h1, n, pos, ws, td, tw, blk, valid):
    """``MoRBlock`` at per-slot recursion ``n`` [P] for one token per slot.
    Returns (h [P, D], block cache, validity, sel [P])."""
    cfg, rc = self.cfg, self.cfg.router
    s = valid.shape[-1]
    caps = rc.capacity_schedule(cfg.plan.loops)
    thr_all = jnp.asarray(rc.decode_thresholds or (0.0,) * cfg.plan.loops, jnp.float32)
    full_all = jnp.asarray([c >= 1.0 for c in caps])
    router = params["router"]
    block = MoRBlock(cfg)

    def one(h, h1, n, p, w, d, g, blk, valid):
      positions = p[None, None]
      cos, sin = L.rope_cos_sin(cfg.rope, cfg.head_dim, positions)
      mask = L.attention_mask(positions, None, s, True)
      lora = None
      if cfg.lora:
        lora = {f"layer_{k}": {t: (params["lora"][f"layer_{k}_{t}_a"][n],
                                   params["lora"][f"layer_{k}_{t}_b"][n])
                               for t in cfg.lora} for k in range(cfg.plan.block)}
      carry = dict(h=h[None, None], h1=h1[None, None], cand=jnp.ones((1, 1), bool),
                   n=n, kv=None, kv_ok=None,
                   cache=[(ck[:, None], cv[:, None]) for ck, cv in blk],
                   valid=valid[:, None])
      xs = dict(lora=lora, router=R.loop_slice(router, n) if rc.kind == "expert" else None,
                k=jnp.int32(0), thr=thr_all[n], full=full_all[n], forced=None)
      tc = (d[None, None], g[None, None]) if rc.kind == "token" else None
      new, ys = block.apply({"params": params["block"]}, carry, xs, cos, sin, mask,
                            w[None, None], tc, "threshold")
      return (new["h"][0, 0], [(ck[:, 0], cv[:, 0]) for ck, cv in new["cache"]],
              new["valid"][:, 0], ys["sel"][0, 0])

    return jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0, 0, 1, 1), out_axes=(0, 1, 1, 0))(
        h, h1, n, pos, ws, td, tw, blk, valid)

  def _decode_block(self, params, st, cache, go, threshold, max_new, sampling,
                    stop_at_eos):
    del threshold, max_new, sampling, stop_at_eos
    cfg, plan, rc = self.cfg, self.cfg.plan, self.cfg.router
    n_loops, total = plan.loops, plan.effective_depth
    valid = cache[VALID]
    core = {g: v for g, v in cache.items() if g != VALID}
    s = valid.shape[-1]
    n, pos = st["loop"], st["pos"]
    p1 = pos[:, None]
    # 1. embedding + prelude (and token-choice depth) for slots starting a token.
    fresh = go & (n == 0)
    h0 = D.embed(cfg, params, st["tok"][:, None])
    if plan.prelude:
      h0, core = D.run_layers(cfg, params, 0, plan.prelude, h0, p1, core,
                              jnp.where(fresh, pos, s)[:, None])
    h0 = h0[:, 0]
    h_in = jnp.where(fresh[:, None], h0, st["h"])
    h1 = jnp.where(fresh[:, None], h0, st["h1"])
    tdepth, tw = st["tdepth"], st["tw"]
    if rc.kind == "token":
      _, _, d, w = R.token_route(params["router"], h0[:, None], rc)
      d = d[:, 0] if self.exit is None else st["target"] - 1
      tdepth = jnp.where(fresh, d, tdepth)
      tw = jnp.where(fresh, w[:, 0], tw)
    cnt = jnp.where(fresh, 0, st["cnt"])
    # 2. the routed recursion at each slot's own n.
    h, blk, valid, sel = self._recursion(params, h_in, h1, n, pos,
                                         jnp.where(go, pos, s), tdepth, tw,
                                         core["block"], valid)
    core = dict(core, block=[tuple(c) for c in blk])
    sel = sel & go
    cnt = cnt + sel.astype(jnp.int32)
    # 3. does the token take recursion n + 1?
    if rc.kind == "expert":
      nxt_n = jnp.minimum(n + 1, n_loops - 1)
      caps = rc.capacity_schedule(n_loops)
      thr = jnp.asarray(rc.decode_thresholds or (0.0,) * n_loops, jnp.float32)
      full = jnp.asarray([c >= 1.0 for c in caps])
      rn = R.loop_slice(params["router"], nxt_n)  # per-slot leaves [P, ...]
      aux = rc.decode_with_aux_router
      zd = jax.vmap(lambda r, x: R.expert_logits(r, x[None], rc, aux=aux)[0])(rn, h)
      cont = sel & (n + 1 < n_loops) & (full[nxt_n] | (zd > thr[nxt_n]))
    else:
      cont = sel & (n < tdepth) & (n + 1 < n_loops)
    done = go & ~cont
    # 4. coda for finishing slots; they wait for the head.
    h_out = h
    if plan.coda:
      hc, core = D.run_layers(cfg, params, total - plan.coda, total, h[:, None], p1,
                              core, jnp.where(done, pos, s)[:, None])
      h_out = jnp.where(done[:, None], hc[:, 0], h)
    st = dict(st, h=jnp.where(go[:, None], h_out, st["h"]).astype(st["h"].dtype),
              h1=h1.astype(st["h1"].dtype), tdepth=tdepth, tw=tw, cnt=cnt,
              ready=st["ready"] | done, loop=jnp.where(go & cont, n + 1, n))
    return st, _lists(dict(core, block_valid=valid))


class MoRDepthwiseBatcher(MoRLoopwiseServer):
  """Depth-wise batching server for MoR models (today's arguments).

  ``generate(prompts, max_new_tokens, sampling, seed, stop_at_eos)`` returns a
  ``decode.serving.BatchOutput`` whose ``loops`` are the per-token MoR depths.
  """

  def __init__(self, cfg: ModelConfig, params, slots: int = 8,
               eos_id: int | None = None, pad_id: int | None = None, **serving):
    super().__init__(cfg, params, slots=slots, eos_id=eos_id, pad_id=pad_id, **serving)

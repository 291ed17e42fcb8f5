"""Pretrained vanilla Llama -> (relaxed) recursive model (RRT §2.2-2.3, MoR §2.1).

Pipeline (spec recursion.md §1.1-1.3, B2):

1. ``layer_sources``: the *effective* vanilla model. When the (middle) layer
   count is divisible by the number of loops N this is the pretrained model
   itself. Otherwise ``nondivisible`` decides:

   * ``"select"`` (official MoR/RRT code): keep ``(L'//N)·N`` layers chosen by
     ``round(linspace(lo, hi, (L'//N)·N))``; layers are dropped.
   * ``"add"`` (MoR paper, e.g. 135M: 30 layers -> 1+10+1 = 32 effective):
     ``ceil(L'/N)·N`` positions filled by the *same* rule
     ``round(linspace(lo, hi, ceil(L'/N)·N))``. The step is < 1, so every
     pretrained layer is used and the added positions are spread-out
     duplicates of their neighbours (the paper trains from scratch and does not
     say how to initialise added layers; this is the natural extension of the
     code's selection rule and keeps the layer order). Average init then
     averages over the effective positions, so a duplicated layer counts once
     per position it fills.

   ``lo, hi`` is ``0, L-1`` (``1, L-2`` for Middle variants, whose first and
   last pretrained layers stay unique). Rounding is half-to-even
   (``np.round``, like Python's ``round``).
2. ``init_indices`` / ``init_shared``: the K shared layers from the effective
   model by Stepwise / Average / Lower / Upper / Random, with the exact index
   rules of the reference code (on absolute indices of the effective model).
   Average averages every leaf (linear *and* norm weights).
3. Per-loop LoRA (``convert``): for loop n and shared layer k, the residual of
   every target matrix between the layer it stands for and the shared layer is
   factorised by truncated SVD (float32) and scale exactly 1.

SVD orientation. Our kernels are ``[in, out]`` (``y = x @ W``), the transpose
of the paper's ``W ∈ R^{out×in}``. For a kernel residual ``R = U S Vᵀ``
(``U [in, m]``, ``Vᵀ [m, out]``) we set ``a = U_r`` (``[in, r]``) and
``b = diag(S_r) V_rᵀ`` (``[r, out]``), so ``a @ b`` is the best rank-r
approximation of R. This is exactly the paper's ``A = V_rᵀ``,
``B = U_r Σ_r`` transposed (the SVD of ``Rᵀ`` swaps U and V).

Norm folding. All block parameters are tied, RMSNorm scales included, so with
Average init the shared norm ``g_s`` differs from the layer's own ``g_t``.
Since ``(x̂ ⊙ g) @ W = x̂ @ (diag(g) W)``, the residual of a matrix that reads a
normed input (q, k, v after ``attn_norm``; gate, up after ``mlp_norm``) is
``diag(g_t / g_s) W_t - W_s``; o and down use ``W_t - W_s``. With equal norms
(Stepwise, Lower, ...) this is the paper's ``W_t - W_s``; in every case a
full-rank LoRA reproduces the original layer exactly, which is what the paper
intends ("at full rank the original model is recovered").

Sharing schemes. A ``DepthPlan`` runs its block in CYCLE order (loop n applies
block layers 0..K-1), so Cycle and Middle-Cycle map directly. SEQUENCE order
(each shared layer applied N times in a row: 0,0,1,1,...) is a different
function and is *not* a loop of one block unless the block has a single layer
(K = 1), where both orders coincide. ``plan_for``/``convert`` therefore accept
Sequence and Middle-Sequence only when K = 1 and raise ``ConfigError``
otherwise; the index-level helpers (``layer_sources``, ``slot_positions``,
``init_indices``, ``init_shared``) support all four schemes.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from recursive_lm.checkpoints.hf_folder import validate_weights
from recursive_lm.config import LORA_TARGETS, ConfigError, DepthPlan, ModelConfig
from recursive_lm.nn.model import LORA_SHAPES
from recursive_lm.nn.weights import layer_from_hf

SHARINGS = ("cycle", "middle_cycle", "sequence", "middle_sequence")
INITS = ("stepwise", "average", "lower", "upper", "random")
NONDIVISIBLE = ("select", "add")
LORA_INITS = ("svd", "standard")
_GROUP = {"q": "attn", "k": "attn", "v": "attn", "o": "attn",
          "gate": "mlp", "up": "mlp", "down": "mlp"}
_NORM = {"q": "attn_norm", "k": "attn_norm", "v": "attn_norm",
         "gate": "mlp_norm", "up": "mlp_norm"}
_TAG = re.compile(r"\+rrt-(?P<sharing>[a-z_]+)-(?P<init>[a-z]+)(?:-(?P<nd>select|add))?(?:-mor-[a-z]+)?$")


class Step(NamedTuple):
  """One applied layer: stored ``group``/``index``, its ``loop`` and the
  pretrained ``source`` layer it stands for (whose function LoRA restores)."""
  group: str
  index: int
  loop: int
  source: int


def _choice(name: str, value: str, choices: Sequence[str]) -> str:
  if value not in choices:
    raise ConfigError(f"{name}={value!r} is not supported; choose from {tuple(choices)}")
  return value


def _edge(sharing: str) -> int:
  return 1 if _choice("sharing", sharing, SHARINGS).startswith("middle_") else 0


def _round(values) -> list[int]:
  """Half-to-even rounding (Python ``round`` / ``np.round``), as in the spec."""
  return [int(v) for v in np.round(np.asarray(values, np.float64))]


def layer_sources(n_layers: int, loops: int, sharing: str = "cycle",
                  nondivisible: str = "select") -> list[int]:
  """Pretrained layer index behind each position of the effective model.

  The result has ``prelude + K·loops + coda`` entries (see module docstring
  for ``"select"`` vs ``"add"`` when the layer count is not divisible).
  """
  edge = _edge(sharing)
  _choice("nondivisible", nondivisible, NONDIVISIBLE)
  if not isinstance(loops, int) or loops < 1:
    raise ConfigError(f"loops must be an int >= 1, got {loops!r}")
  inner = n_layers - 2 * edge
  if inner < 1:
    raise ConfigError(f"{sharing} sharing needs at least {2 * edge + 1} layers, "
                      f"the model has {n_layers}")
  if inner % loops == 0:
    mid = list(range(edge, n_layers - edge))
  else:
    k = inner // loops if nondivisible == "select" else -(-inner // loops)
    if k < 1:
      raise ConfigError(
          f"{inner} {'middle ' if edge else ''}layers cannot be shared over "
          f"{loops} loops with nondivisible='select' (0 layers per loop); use "
          "nondivisible='add' or fewer loops")
    mid = _round(np.linspace(edge, n_layers - 1 - edge, k * loops))
  return [0] * edge + mid + [n_layers - 1] * edge


def plan_for(n_layers: int, loops: int, sharing: str = "cycle",
             nondivisible: str = "select") -> tuple[DepthPlan, list[Step]]:
  """Depth plan and per-applied-layer schedule for a pretrained L-layer model.

  Cycle -> ``DepthPlan(0, K, N, 0)``; Middle-Cycle -> ``DepthPlan(1, K, N, 1)``.
  Sequence/Middle-Sequence are accepted only with K = 1 (see module docstring).

  Returns:
    ``(plan, steps)`` where ``steps[j]`` is the ``Step`` applied at unrolled
    position j (``plan.unrolled()`` order plus the pretrained source layer).
  Raises:
    ConfigError: unknown options, too few layers, or Sequence with K > 1.
  """
  sources = layer_sources(n_layers, loops, sharing, nondivisible)
  edge = _edge(sharing)
  k = (len(sources) - 2 * edge) // loops
  if sharing.endswith("sequence") and k > 1 and loops > 1:
    raise ConfigError(
        f"{sharing} sharing with {k} shared layers x {loops} loops is not "
        "expressible: a DepthPlan loops one block in CYCLE order (0..K-1, 0..K-1, "
        f"...), while SEQUENCE applies each shared layer {loops} times in a row. "
        "Only K = 1 is supported for sequence sharing (then both orders "
        f"coincide); use sharing='{sharing.replace('sequence', 'cycle')}' "
        "(RRT and MoR use cycle order; loop-level exits need it)")
  plan = DepthPlan(prelude=edge, block=k, loops=loops, coda=edge)
  steps = [Step(g, i, n, sources[j]) for j, (g, i, n) in enumerate(plan.unrolled())]
  return plan, steps


def slot_positions(n_layers: int, loops: int, sharing: str = "cycle"
                   ) -> list[tuple[int, ...]]:
  """Positions (absolute, in an n_layers effective model) each shared slot
  stands for: Cycle ``k, k+K, ...``; Sequence ``kN .. kN+N-1`` (+1 for Middle)."""
  edge = _edge(sharing)
  inner = n_layers - 2 * edge
  if inner < loops or inner % loops:
    raise ConfigError(
        f"{inner} shareable layers are not divisible by loops={loops}; build the "
        "effective model with layer_sources(..., nondivisible=...) first")
  k = inner // loops
  if sharing.endswith("cycle"):
    return [tuple(edge + s + b * k for b in range(loops)) for s in range(k)]
  return [tuple(edge + s * loops + b for b in range(loops)) for s in range(k)]


def init_indices(n_layers: int, loops: int, method: str = "stepwise",
                 sharing: str = "cycle", seed: int = 0) -> list[tuple[int, ...]]:
  """Layers of the effective model that initialise each shared slot.

  One index per slot, except Average (the slot's positions, averaged).
  Stepwise ``round(linspace(lo, hi, K))`` (half-to-even); Lower the first K
  shareable layers; Upper the last K; Random a sorted choice of K without
  replacement (``np.random.default_rng(seed)``). ``lo, hi`` = ``0, L-1``, or
  ``1, L-2`` for Middle variants.
  """
  _choice("init", method, INITS)
  positions = slot_positions(n_layers, loops, sharing)
  edge, k = _edge(sharing), len(positions)
  lo, hi = edge, n_layers - 1 - edge
  if method == "average":
    return positions
  if method == "stepwise":
    idx = _round(np.linspace(lo, hi, k))
  elif method == "lower":
    idx = list(range(lo, lo + k))
  elif method == "upper":
    idx = list(range(hi - k + 1, hi + 1))
  else:
    rng = np.random.default_rng(seed)
    idx = sorted(int(i) for i in rng.choice(np.arange(lo, hi + 1), k, replace=False))
  return [(i,) for i in idx]


def _mean_layers(layers: Sequence[Mapping]) -> dict:
  if len(layers) == 1:
    return jax.tree_util.tree_map(lambda x: np.array(x, np.float32), layers[0])
  return jax.tree_util.tree_map(
      lambda *xs: np.mean(np.stack([np.asarray(x, np.float64) for x in xs]), 0
                          ).astype(np.float32), *layers)


def init_shared(weights_per_layer: Sequence[Mapping], loops: int,
                method: str = "stepwise", sharing: str = "cycle", seed: int = 0
                ) -> list[dict]:
  """The K shared layer dicts from the effective model's layers.

  Args:
    weights_per_layer: every layer of the effective model (first/last
      included for Middle variants), each a layer dict as in ``layer_from_hf``.
    loops, method, sharing, seed: see ``init_indices``.
  Returns:
    K layer dicts (float32 copies; Average averages every leaf, norms too).
  """
  groups = init_indices(len(weights_per_layer), loops, method, sharing, seed)
  return [_mean_layers([weights_per_layer[i] for i in g]) for g in groups]


def svd_lora(residual: np.ndarray, rank: int, *, atol: float = 0.0,
             rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
  """LoRA factors ``(a [in, r], b [r, out])`` with ``a @ b ≈ residual [in, out]``.

  Truncated SVD in float32: ``a = U_r``, ``b = diag(S_r) V_rᵀ`` (scale 1).
  When every ``|residual| <= atol`` (the tied weight *is* the layer), the
  standard LoRA init is used instead: Gaussian ``a`` (std ``1/sqrt(in)``) and
  zero ``b``. ``rank`` is clipped to ``min(in, out)``.
  """
  r = np.asarray(residual, np.float32)
  d_in, d_out = r.shape
  rank = max(0, min(int(rank), d_in, d_out))
  if not np.any(np.abs(r) > atol):
    rng = rng if rng is not None else np.random.default_rng(0)
    a = rng.standard_normal((d_in, rank)) / np.sqrt(d_in)
    return a.astype(np.float32), np.zeros((rank, d_out), np.float32)
  u, s, vt = np.linalg.svd(r, full_matrices=False)
  a = u[:, :rank]
  b = s[:rank, None] * vt[:rank]
  return np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)


def lora_residual(target: str, layer: Mapping, shared: Mapping) -> np.ndarray:
  """Kernel residual ``[in, out]`` of ``target`` between the pretrained
  ``layer`` and the ``shared`` layer, with the norm scales folded in."""
  grp = _GROUP[target]
  w_t = np.asarray(layer[grp][target]["kernel"], np.float32)
  w_s = np.asarray(shared[grp][target]["kernel"], np.float32)
  norm = _NORM.get(target)
  if norm is not None:
    g_t = np.asarray(layer[norm]["scale"], np.float32)
    g_s = np.asarray(shared[norm]["scale"], np.float32)
    ratio = np.divide(g_t, g_s, out=np.zeros_like(g_t), where=g_s != 0)
    w_t = ratio[:, None] * w_t
  return w_t - w_s


def normalize_lora_ranks(cfg: ModelConfig, lora_ranks: Any
                         ) -> tuple[tuple[str, int], ...]:
  """``None`` | int (all targets) | {target: rank} | ((target, rank), ...) ->
  ``((target, rank), ...)`` in ``LORA_TARGETS`` order, ranks clipped to
  ``min(d_in, d_out)``, zero ranks dropped."""
  if lora_ranks is None:
    return ()
  if isinstance(lora_ranks, (int, np.integer)) and not isinstance(lora_ranks, bool):
    req = {t: int(lora_ranks) for t in LORA_TARGETS}
  else:
    try:
      req = dict(lora_ranks)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"lora_ranks must be None, an int or a mapping target->"
                        f"rank, got {lora_ranks!r}") from e
  out = []
  for t, r in req.items():
    if t not in LORA_TARGETS:
      raise ConfigError(f"unknown LoRA target {t!r}; choose from {LORA_TARGETS}")
    if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 0:
      raise ConfigError(f"LoRA rank for {t!r} must be an int >= 0, got {r!r}")
  for t in LORA_TARGETS:
    r = min(int(req.get(t, 0)), *LORA_SHAPES[t](cfg))
    if r > 0:
      out.append((t, r))
  return tuple(out)


def convert(ckpt_config: ModelConfig, hf_weights: Mapping[str, np.ndarray],
            loops: int, sharing: str = "cycle", init: str = "stepwise",
            lora_ranks: Any = None, nondivisible: str = "select", seed: int = 0,
            *, lora_init: str = "svd") -> tuple[ModelConfig, dict]:
  """Converts a vanilla checkpoint into a recursive model with per-loop LoRA.

  Args:
    ckpt_config: vanilla config of the checkpoint (e.g. ``LoadedCheckpoint.config``).
    hf_weights: canonical HF-named float weights (``LoadedCheckpoint.weights``).
    loops: number of loops N of the shared block.
    sharing: "cycle" | "middle_cycle" | "sequence" | "middle_sequence" (the
      last two only with one shared layer, see module docstring).
    init: "stepwise" | "average" | "lower" | "upper" | "random".
    lora_ranks: None/0 (plain recursive model), an int for every target, or
      {target: rank} with targets q, k, v, o, gate, up, down; clipped to
      ``min(d_in, d_out)`` (that rank reproduces the layer exactly).
    nondivisible: "select" (drop layers) | "add" (duplicate layers).
    seed: for Random init and the standard LoRA init of zero residuals.
    lora_init: "svd" (truncated SVD of residuals; scale exactly 1) or
      "standard" (Gaussian a, zero b everywhere).
  Returns:
    ``(cfg, params)``: the recursive ``ModelConfig`` (``lora_scale == 1.0``;
    its ``name`` gets a ``+rrt-<sharing>-<init>`` tag read by ``describe``)
    and a numpy param tree for ``recursive_lm.nn.model.Transformer``.
  """
  if not ckpt_config.plan.is_vanilla or ckpt_config.plan.prelude or \
      ckpt_config.plan.coda or ckpt_config.lora:
    raise ConfigError(f"convert expects a vanilla checkpoint config (DepthPlan."
                      f"vanilla(L), no LoRA), got {ckpt_config.plan} "
                      f"lora={ckpt_config.lora}")
  _choice("init", init, INITS)
  _choice("lora_init", lora_init, LORA_INITS)
  validate_weights(ckpt_config, hf_weights, source="convert(hf_weights)")
  plan, steps = plan_for(ckpt_config.plan.effective_depth, loops, sharing,
                         nondivisible)
  tag = f"+rrt-{sharing}-{init}"
  n_inner = ckpt_config.plan.effective_depth - 2 * plan.prelude
  if n_inner % loops:
    tag += f"-{nondivisible}"
  cfg = ckpt_config.replace(plan=plan, lora_scale=1.0, name=ckpt_config.name + tag)
  cfg = cfg.replace(lora_ranks=normalize_lora_ranks(cfg, lora_ranks))

  cache: dict[int, dict] = {}

  def layer(i: int) -> dict:
    if i not in cache:
      cache[i] = layer_from_hf(hf_weights, i)
    return cache[i]

  virtual = [layer(s.source) for s in steps]
  shared = init_shared(virtual, loops, init, sharing, seed)
  copy = lambda t: jax.tree_util.tree_map(lambda x: np.array(x, np.float32), t)
  params: dict[str, Any] = {
      "embed": {"embedding": np.array(hf_weights["model.embed_tokens.weight"],
                                      np.float32)},
      "final_norm": {"scale": np.array(hf_weights["model.norm.weight"], np.float32)},
      "block": {f"layer_{k}": shared[k] for k in range(plan.block)}}
  for j, s in enumerate(steps):
    if s.group != "block":
      params[f"{s.group}_{s.index}"] = copy(virtual[j])
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": np.ascontiguousarray(
        np.asarray(hf_weights["lm_head.weight"], np.float32).T)}
  if cfg.lora:
    if lora_init == "svd" and cfg.lora_scale != 1.0:  # Spec §1.3: must be exactly 1.
      raise AssertionError(f"SVD-initialised LoRA needs lora_scale == 1, got "
                           f"{cfg.lora_scale}")
    params["lora"] = _lora_params(cfg, steps, virtual, shared, lora_init, seed)
  if np.dtype(cfg.param_dtype) != np.float32:
    params = jax.tree_util.tree_map(
        lambda x: np.asarray(x).astype(np.dtype(cfg.param_dtype)), params)
  return cfg, params


def _lora_params(cfg: ModelConfig, steps: Sequence[Step], virtual: Sequence[dict],
                 shared: Sequence[dict], lora_init: str, seed: int) -> dict:
  """``lora/layer_{k}_{t}_{a,b}`` stacked over loops, per ``convert``."""
  n = cfg.plan.loops
  out = {}
  for k in range(cfg.plan.block):
    for ti, (t, r) in enumerate(cfg.lora.items()):
      d_in, d_out = LORA_SHAPES[t](cfg)
      a = np.zeros((n, d_in, r), np.float32)
      b = np.zeros((n, r, d_out), np.float32)
      out[f"layer_{k}_{t}_a"], out[f"layer_{k}_{t}_b"] = a, b
      for j, s in enumerate(steps):
        if s.group != "block" or s.index != k:
          continue
        rng = np.random.default_rng([seed, k, LORA_TARGETS.index(t), s.loop])
        if lora_init == "standard":
          res = np.zeros((d_in, d_out), np.float32)
        else:
          res = lora_residual(t, virtual[j], shared[k])
        w_t = virtual[j][_GROUP[t]][t]["kernel"]
        atol = 1e-6 * float(np.max(np.abs(w_t))) if np.size(w_t) else 0.0
        a[s.loop], b[s.loop] = svd_lora(res, r, atol=atol, rng=rng)
  return out


# --- accounting ----------------------------------------------------------------
def _layer_params(cfg: ModelConfig) -> int:
  return sum(i * o for i, o in (LORA_SHAPES[t](cfg) for t in LORA_TARGETS)) \
      + 2 * cfg.d_model


def _lora_param_count(cfg: ModelConfig) -> int:
  return cfg.plan.block * cfg.plan.loops * sum(
      r * sum(LORA_SHAPES[t](cfg)) for t, r in cfg.lora.items())


def unique_param_count(cfg: ModelConfig, params: Mapping | None = None, *,
                       non_embedding: bool = False) -> int:
  """Stored (unique) parameters: unique layers + LoRA + embeddings/head/norm.

  Computed from ``cfg``; when ``params`` is given it is counted too and must
  agree (``ConfigError`` otherwise). ``non_embedding`` drops the embedding
  table and the untied LM head (the convention of the papers' tables).
  """
  emb = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  total = (cfg.plan.unique_layers * _layer_params(cfg) + _lora_param_count(cfg)
           + cfg.d_model + emb)
  if params is not None:
    counted = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    if counted != total:
      raise ConfigError(f"params hold {counted} values but the config describes "
                        f"{total}; they do not belong together")
  return total - emb if non_embedding else total


def _infer_sharing(cfg: ModelConfig) -> tuple[str, str | None, str | None]:
  m = _TAG.search(cfg.name or "")
  if m and m["sharing"] in SHARINGS and m["init"] in INITS:
    return m["sharing"], m["init"], m["nd"]
  p = cfg.plan
  if p.is_vanilla:
    return "none (vanilla)", None, None
  if p.prelude == p.coda == 0:
    return "cycle", None, None
  if p.prelude == p.coda == 1:
    return "middle_cycle", None, None
  return f"cycle with {p.prelude} prelude / {p.coda} coda layers", None, None


def describe(cfg: ModelConfig, params: Mapping | None = None, *,
             sharing: str | None = None, init: str | None = None) -> str:
  """Human-readable summary: plan, sharing, init, depth, LoRA, parameters.

  Sharing/init come from the name tag ``convert`` writes (or are inferred from
  the plan; init is then "unknown") unless given explicitly.
  """
  p = cfg.plan
  tag_sharing, tag_init, nd = _infer_sharing(cfg)
  sharing, init = sharing or tag_sharing, init or tag_init or "unknown"
  uniq = unique_param_count(cfg, params)
  uniq_ne = unique_param_count(cfg, non_embedding=True)
  full_ne = p.effective_depth * _layer_params(cfg) + cfg.d_model
  lora = (", ".join(f"{t}={r}" for t, r in cfg.lora.items()) or "none")
  lines = [
      f"model: {cfg.name}",
      f"plan: prelude {p.prelude} + block {p.block} x {p.loops} loops + coda "
      f"{p.coda} ({p.prelude}+{p.block}+{p.coda} unique layers)",
      f"effective depth: {p.effective_depth} layers",
      f"sharing: {sharing}" + (f" (non-divisible: {nd})" if nd else ""),
      f"init: {init}",
      f"LoRA per loop x block layer: {lora} (scale {cfg.lora_scale:g}, "
      f"{_lora_param_count(cfg):,} params)",
      f"unique params: {uniq:,} ({uniq_ne:,} non-embedding; the unrolled "
      f"model has {full_ne:,} non-embedding)",
      f"shape: d_model {cfg.d_model}, heads {cfg.n_heads}/{cfg.n_kv_heads} kv, "
      f"d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, "
      f"{'tied' if cfg.tie_embeddings else 'untied'} embeddings",
  ]
  return "\n".join(lines)

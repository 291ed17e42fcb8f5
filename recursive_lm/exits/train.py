"""Training exit modules on cached features of a frozen model.

Per exit layer e and module kind:
1. closed-form ridge least squares from ``x = h_e / rms(h_e)`` to the final
   state's direction ``hn / final_norm.scale`` (``fit_affine``);
2. KD + CE training with Adam: KL(teacher || exit) over the vocabulary
   shortlist (teacher logits = the frozen final state through the same rows of
   the LM head) plus CE on the teacher's full-vocabulary argmax (rows whose
   argmax is outside the shortlist carry KD only);
3. held-out top-1 agreement with the final layer: through the full head and
   through the shortlist head (what drafting uses).

The ``layer`` kind (one decoder layer, ``modules.init_layer_exit``) trains on
whole sequences of the cached features (``sequence_sets``: each feature set's
[n*T] rows viewed as [n, T]) with the same KD + CE loss; its affine part
starts from the least-squares fit on the copied layer's outputs.

A meta classifier (``x -> P(exit argmax == final argmax)``, MLP d->h->1,
logit-adjusted BCE, CALM/FREE style) gives a head-free confidence.
"""
from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recursive_lm.exits import modules as M
from recursive_lm.exits.artifact import ExitSet, model_identity, save_exits


# ------------------------------------------------------------------ data views
def layer_view(feats: list[dict], e: int) -> np.ndarray:
  return np.concatenate([np.asarray(f["states"][:, f["layers"].index(e)]) for f in feats])


def concat(feats: list[dict], key: str) -> np.ndarray:
  return np.concatenate([np.asarray(f[key]) for f in feats])


def make_shortlist(teacher: np.ndarray, tokens: np.ndarray, size: int) -> np.ndarray:
  """The ``size`` most frequent ids among the teacher's argmax predictions
  (ties and the remainder filled by input-token frequency)."""
  counts = np.bincount(teacher, minlength=1).astype(np.float64)
  tin = np.bincount(tokens, minlength=len(counts)).astype(np.float64)
  n = max(len(counts), len(tin))
  score = np.pad(counts, (0, n - len(counts))) + 1e-3 * np.pad(tin, (0, n - len(tin)))
  return np.argsort(-score, kind="stable")[:size].astype(np.int32)


# ------------------------------------------------------------------ closed form
def fit_affine(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3):
  """(W [D, D], b [D]) minimising ||[x 1] [W; b] - y||^2 + ridge*n*||W||^2."""
  x = x.astype(np.float64)
  y = y.astype(np.float64)
  n, d = x.shape
  xa = np.concatenate([x, np.ones((n, 1))], 1)
  g = xa.T @ xa
  g[:d, :d] += ridge * n * np.eye(d)
  sol = np.linalg.solve(g, xa.T @ y)
  return sol[:d].astype(np.float32), sol[d].astype(np.float32)


# ------------------------------------------------------------------ losses
def kd_ce_loss(p, x, hn, target_idx, has_target, model_params, ws, eps, kd_w, ce_w):
  return kd_ce_from_state(M.apply_exit(p, x), hn, target_idx, has_target, model_params, ws,
                          eps, kd_w, ce_w)


def kd_ce_from_state(y, hn, target_idx, has_target, model_params, ws, eps, kd_w, ce_w):
  """KL(teacher || exit) over the shortlist + ce_w * CE on the teacher's argmax,
  for module outputs y [N, D] and the final normed states hn [N, D]."""
  s = M.shortlist_logits(model_params, ws, y, eps)
  t = hn.astype(jnp.float32) @ ws.T
  logq = jax.nn.log_softmax(s, -1)
  pt = jax.nn.softmax(t, -1)
  kd = jnp.mean(jnp.sum(pt * (jax.nn.log_softmax(t, -1) - logq), -1))
  ce = -jnp.take_along_axis(logq, target_idx[:, None], -1)[:, 0]
  ce = jnp.sum(ce * has_target) / jnp.maximum(jnp.sum(has_target), 1.0)
  return kd_w * kd + ce_w * ce, (kd, ce)


def train_module(p0, x, hn, tidx, has, model_params, ws, eps, steps, batch, lr,
                 kd_w, ce_w, seed, log=None, tag=""):
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.1))
  state = opt.init(p0)

  @jax.jit
  def step(p, state, xb, hb, tb, mb):
    (loss, aux), g = jax.value_and_grad(kd_ce_loss, has_aux=True)(
        p, xb, hb, tb, mb, model_params, ws, eps, kd_w, ce_w)
    upd, state = opt.update(g, state, p)
    return optax.apply_updates(p, upd), state, loss, aux

  rng = np.random.default_rng(seed)
  p = p0
  for i in range(steps):
    idx = rng.integers(0, len(x), batch)
    p, state, loss, (kd, ce) = step(p, state, jnp.asarray(x[idx], jnp.float32),
                                    jnp.asarray(hn[idx]), jnp.asarray(tidx[idx]),
                                    jnp.asarray(has[idx], jnp.float32))
    if log is not None and (i % 50 == 0 or i == steps - 1):
      log(i, {f"{tag}/loss": float(loss), f"{tag}/kd": float(kd), f"{tag}/ce": float(ce)})
  return p


# ------------------------------------------------------------------ layer kind
def sequence_sets(feats: list[dict], e: int, pos: np.ndarray) -> list[dict]:
  """Per feature set, its rows as [n, T] sequences: layer-e states "h" and final
  normed states "hn" (float16 [n, T, D]), shortlist index of the teacher's
  argmax "tidx" and whether it is in the shortlist "has" ([n, T])."""
  out = []
  for f in feats:
    t = int(f["seq_len"])
    n = len(f["teacher"]) // t
    teacher = np.asarray(f["teacher"]).reshape(n, t)
    d = f["final"].shape[-1]
    out.append({"h": np.asarray(f["states"][:, f["layers"].index(e)]).reshape(n, t, d),
                "hn": np.asarray(f["final"]).reshape(n, t, d),
                "tidx": np.maximum(pos[teacher], 0).astype(np.int32),
                "has": pos[teacher] >= 0})
  return out


def map_sequences(fn, h: np.ndarray, chunk: int = 4) -> np.ndarray:
  """fn (jitted, [chunk, T, D] -> [chunk, T, D]) over h [n, T, D] in fixed-size
  chunks (the last one padded, so nothing retraces); float32 [n*T, D]."""
  n, t, d = h.shape
  outs = []
  for i in range(0, n, chunk):
    hb = np.asarray(h[i:i + chunk], np.float32)
    m = len(hb)
    if m < chunk:
      hb = np.concatenate([hb, np.repeat(hb[-1:], chunk - m, 0)])
    outs.append(np.asarray(fn(jnp.asarray(hb)))[:m].reshape(m * t, d))
  return np.concatenate(outs)


def init_layer_module(cfg, model_params, e, sets, y_target, init, affine, ridge):
  """A ``layer`` exit copied from the model, its affine part (if any) fitted by
  least squares from rms(layer(h_e)) to the final state's direction."""
  p = M.init_layer_exit(cfg, model_params, e, init, affine=False)
  if not affine:
    return p
  run = jax.jit(lambda h: M.layer_states(cfg, p, h))
  z = np.concatenate([map_sequences(run, s["h"]) for s in sets])
  x = np.asarray(M.rms_normalize(jnp.asarray(z)))
  w, b = fit_affine(x, y_target, ridge)
  return dict(p, w=jnp.asarray(w), b=jnp.asarray(b))


def train_layer_module(cfg, p0, sets, model_params, ws, eps, steps, batch, lr, kd_w, ce_w,
                       seed, log=None, tag=""):
  """Adam (cosine decay, clip 1.0) on whole sequences: each step takes
  ``batch // T`` sequences of one feature set (sets drawn by token count; one
  compiled step per sequence length)."""
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adam(optax.cosine_decay_schedule(lr, steps, 0.1)))
  state = opt.init(p0)

  def loss_fn(p, hb, hnb, tb, mb):
    y = M.apply_layer_exit(cfg, p, hb)
    d = y.shape[-1]
    return kd_ce_from_state(y.reshape(-1, d), hnb.reshape(-1, d), tb.reshape(-1),
                            mb.reshape(-1), model_params, ws, eps, kd_w, ce_w)

  @jax.jit
  def step(p, state, hb, hnb, tb, mb):
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, hb, hnb, tb, mb)
    upd, state = opt.update(g, state, p)
    return optax.apply_updates(p, upd), state, loss, aux

  rng = np.random.default_rng(seed)
  sizes = np.array([s["h"].shape[0] * s["h"].shape[1] for s in sets], np.float64)
  p = p0
  for i in range(steps):
    s = sets[rng.choice(len(sets), p=sizes / sizes.sum())]
    n, t = s["h"].shape[:2]
    idx = rng.integers(0, n, max(1, batch // t))
    p, state, loss, (kd, ce) = step(p, state, jnp.asarray(s["h"][idx], jnp.float32),
                                    jnp.asarray(s["hn"][idx]), jnp.asarray(s["tidx"][idx]),
                                    jnp.asarray(s["has"][idx], jnp.float32))
    if log is not None and (i % 50 == 0 or i == steps - 1):
      log(i, {f"{tag}/loss": float(loss), f"{tag}/kd": float(kd), f"{tag}/ce": float(ce)})
  return p


def layer_outputs(cfg, p, h_seq: np.ndarray) -> np.ndarray:
  """Module outputs [n*T, D] of a ``layer`` exit over held-out sequences [n, T, D]."""
  return map_sequences(jax.jit(lambda h: M.apply_layer_exit(cfg, p, h)), h_seq)


# ------------------------------------------------------------------ evaluation
@functools.partial(jax.jit, static_argnames=("eps",))
def _state_argmax(y, model_params, ws, emb, eps):
  yn = M.final_norm(model_params, y, eps)
  sl = yn @ ws.T
  conf = jnp.max(jax.nn.softmax(sl, -1), -1)
  full = None if emb is None else jnp.argmax(yn @ emb.T, -1)
  return jnp.argmax(sl, -1), conf, full


@functools.partial(jax.jit, static_argnames=("eps",))
def _exit_argmax(p, x, model_params, ws, emb, eps):
  return _state_argmax(M.apply_exit(p, x), model_params, ws, emb, eps)


def _chunked(run, n, shortlist, chunk, with_full):
  outs = [[], [], []]
  for i in range(0, n, chunk):
    a, c, f = run(slice(i, i + chunk))
    outs[0].append(shortlist[np.asarray(a)])
    outs[1].append(np.asarray(c))
    if f is not None:
      outs[2].append(np.asarray(f))
  return (np.concatenate(outs[0]), np.concatenate(outs[1]),
          np.concatenate(outs[2]) if with_full else None)


def exit_predictions(p, x, model_params, ws, shortlist, eps, emb=None, chunk=2048):
  """(shortlist argmax as token ids, shortlist max prob, full-head argmax or None)."""
  run = lambda sl: _exit_argmax(p, jnp.asarray(x[sl], jnp.float32), model_params, ws, emb, eps)
  return _chunked(run, len(x), shortlist, chunk, emb is not None)


def state_predictions(y, model_params, ws, shortlist, eps, emb=None, chunk=2048):
  """``exit_predictions`` for precomputed module outputs y [N, D] (``layer`` exits)."""
  run = lambda sl: _state_argmax(jnp.asarray(y[sl], jnp.float32), model_params, ws, emb, eps)
  return _chunked(run, len(y), shortlist, chunk, emb is not None)


def identity_params(d):
  return M.init_exit("affine", d)


# ------------------------------------------------------------------ meta classifier
def train_meta(x, label, hidden, steps, batch, lr, seed):
  """MLP d->hidden->1 on x predicting label (bool), logit-adjusted BCE."""
  d = x.shape[1]
  k1, k2 = jax.random.split(jax.random.key(seed))
  p = {"w1": jax.random.normal(k1, (d, hidden)) / np.sqrt(d), "b1": jnp.zeros(hidden),
       "w2": jax.random.normal(k2, (hidden, 1)) / np.sqrt(hidden), "b2": jnp.zeros(1)}
  prior = float(np.clip(label.mean(), 1e-3, 1 - 1e-3))
  adj = np.log(prior / (1 - prior))
  opt = optax.adam(lr)
  st = opt.init(p)

  def loss(p, xb, yb):
    z = meta_logit(p, xb) + adj
    return jnp.mean(optax.sigmoid_binary_cross_entropy(z, yb))

  @jax.jit
  def step(p, st, xb, yb):
    l, g = jax.value_and_grad(loss)(p, xb, yb)
    u, st = opt.update(g, st, p)
    return optax.apply_updates(p, u), st, l

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(x), batch)
    p, st, _ = step(p, st, jnp.asarray(x[idx], jnp.float32),
                    jnp.asarray(label[idx], jnp.float32))
  return p


def meta_logit(p, x):
  """Head-free confidence logit from normalised exit states x [..., D]."""
  h = jax.nn.relu(M.rms_normalize(x) @ p["w1"] + p["b1"])
  return (h @ p["w2"] + p["b2"])[..., 0]


def auc(score: np.ndarray, label: np.ndarray) -> float:
  order = np.argsort(score)
  ranks = np.empty(len(score))
  ranks[order] = np.arange(1, len(score) + 1)
  pos = label.astype(bool)
  n1, n0 = pos.sum(), (~pos).sum()
  if n1 == 0 or n0 == 0:
    return float("nan")
  return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# ------------------------------------------------------------------ driver
def train_all(c, cfg, params, train_feats, held) -> dict:
  """Fits and trains every (exit layer, kind); returns modules and agreement."""
  from recursive_lm.training.metrics import MetricWriter  # pylint: disable=g-import-not-at-top
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  eps = cfg.norm_eps
  small = {"final_norm": params["final_norm"]}
  emb_np = np.asarray(params["embed"]["embedding"])
  teacher = concat(train_feats, "teacher")
  hn = concat(train_feats, "final")
  shortlist = make_shortlist(teacher, concat(train_feats, "tokens"), c.shortlist)
  ws = jnp.asarray(emb_np[shortlist])
  pos = np.full(cfg.vocab_size, -1, np.int64)
  pos[shortlist] = np.arange(len(shortlist))
  tidx = np.maximum(pos[teacher], 0).astype(np.int32)
  has = pos[teacher] >= 0
  h_teacher = np.asarray(held["teacher"])
  n_eval = min(len(h_teacher), 8192)
  h_teacher = h_teacher[:n_eval]
  coverage = float(np.mean(pos[h_teacher] >= 0))
  n_full = min(n_eval, int(c.get("n_eval_full_head", 2048)))  # the 49k-row head is costly
  print(f"shortlist {len(shortlist)}: covers {has.mean():.1%} of train targets, "
        f"{coverage:.1%} of held-out targets", flush=True)
  scale = np.asarray(params["final_norm"]["scale"], np.float32)
  y_target = (hn.astype(np.float32) / scale)
  emb = jnp.asarray(emb_np)
  writer = MetricWriter(c.workdir, tensorboard=True, enabled=True)
  agreement = {"shortlist_size": int(len(shortlist)), "shortlist_coverage": coverage,
               "n_heldout_tokens": int(n_eval),
               "n_heldout_tokens_full_head": int(n_full), "layers": list(c.exit_layers), "curves": {}}
  modules, preds = {}, {}
  agreement["module_seconds"] = {}
  t0 = time.time()
  train_layers = tuple(c.get("train_layers", c.exit_layers))
  jobs = [(e, k) for e in c.exit_layers
          for k in ("raw", "affine_ls") + (tuple(c.kinds) if e in train_layers else ())]
  bar = tqdm(total=len(jobs), desc="exit modules", unit="module")
  for e in c.exit_layers:
    x = M.rms_normalize(jnp.asarray(layer_view(train_feats, e), jnp.float32))
    x = np.asarray(x)
    hx = np.asarray(held["states"][:n_eval, held["layers"].index(e)], np.float32)
    w, b = fit_affine(x, y_target, c.ridge)
    cands = {"raw": identity_params(cfg.d_model),
             "affine_ls": M.init_exit("affine", cfg.d_model, w=w, b=b)}
    log = lambda i, s: writer.write(i, "train", s)
    for kind in (c.kinds if e in train_layers else ()):
      tk = time.time()
      if kind == "layer":
        sets = sequence_sets(train_feats, e, pos)
        p0 = init_layer_module(cfg, params, e, sets, y_target, c.layer_init, c.layer_affine,
                               c.ridge)
        cands[kind] = train_layer_module(cfg, p0, sets, small, ws, eps, c.layer_steps,
                                         c.batch, c.layer_lr, c.kd_weight, c.ce_weight,
                                         c.seed + e, log=log, tag=f"{kind}_e{e}")
        del sets
      else:
        p0 = M.init_exit(kind, cfg.d_model, c.rank, c.seed, w=w, b=b)
        cands[kind] = train_module(p0, x, hn, tidx, has, small, ws, eps, c.steps, c.batch,
                                   c.lr, c.kd_weight, c.ce_weight, c.seed + e,
                                   log=log, tag=f"{kind}_e{e}")
      agreement["module_seconds"][f"{kind}:{e}"] = time.time() - tk
    for name, p in cands.items():
      if name == "layer":
        t_held = int(held["seq_len"])
        if n_eval % t_held:
          raise ValueError(f"held-out tokens {n_eval} must be whole sequences of {t_held} "
                           "for a 'layer' exit; set heldout_tokens to a multiple of seq_len")
        yh = layer_outputs(cfg, p, hx.reshape(n_eval // t_held, t_held, -1))
        sl, conf, _ = state_predictions(yh, small, ws, shortlist, eps)
        _, _, full = state_predictions(yh[:n_full], small, ws, shortlist, eps, emb)
      else:
        sl, conf, _ = exit_predictions(p, hx, small, ws, shortlist, eps)
        _, _, full = exit_predictions(p, hx[:n_full], small, ws, shortlist, eps, emb)
      rec = {"top1_full_head": float(np.mean(full == h_teacher[:n_full])),
             "top1_shortlist": float(np.mean(sl == h_teacher))}
      agreement["curves"].setdefault(name, {})[str(e)] = rec
      writer.write(e, "heldout", {f"{name}/{k}": v for k, v in rec.items()})
      bar.update(1)
      bar.set_postfix_str(f"e={e} {name}: {rec['top1_shortlist']:.1%}")
      modules[(name, e)] = p
      preds[(name, e)] = (sl, conf)
  bar.close()
  train_seconds = time.time() - t0
  # meta classifiers for the shipped exits (labels: shortlist argmax == teacher)
  metas, meta_rec = {}, {}
  for spec in c.ship:
    kind, e = spec.split(":")
    e = int(e)
    p = modules[(kind, e)]
    x = np.asarray(M.rms_normalize(jnp.asarray(layer_view(train_feats, e), jnp.float32)))
    sl, _, _ = exit_predictions(p, x, small, ws, shortlist, eps)
    mp = train_meta(x, sl == teacher, c.meta_hidden, c.meta_steps, c.batch, 1e-3, c.seed)
    hx = np.asarray(held["states"][:n_eval, held["layers"].index(e)], np.float32)
    score = np.asarray(meta_logit(mp, jnp.asarray(hx)))
    hsl, hconf = preds[(kind, e)]
    lab = hsl == h_teacher
    meta_rec[str(e)] = {"auc_meta": auc(score, lab), "auc_shortlist_maxprob": auc(hconf, lab)}
    metas[e] = jax.tree_util.tree_map(np.asarray, mp)
  agreement["meta"] = meta_rec
  agreement["train_seconds"] = train_seconds
  writer.close()
  return {"agreement": agreement, "modules": modules, "shortlist": shortlist,
          "metas": metas, "train_seconds": train_seconds}


def write_artifact(c, cfg, params, result) -> str:
  exits = {}
  for spec in c.ship:
    kind, e = spec.split(":")
    exits[int(e)] = {k: np.asarray(v) for k, v in result["modules"][(kind, int(e))].items()}
  info = {"config": c.to_dict(), "agreement": {
      spec: result["agreement"]["curves"][spec.split(":")[0]][spec.split(":")[1]]
      for spec in c.ship}, "meta": result["agreement"].get("meta", {}),
      "train_seconds": result["train_seconds"],
      "wall_seconds": result.get("wall_seconds"),
      "command": "python experiments/train_exits.py"}
  info["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in info["config"].items()}
  es = ExitSet(exits, result["shortlist"], model_identity(cfg, params),
               {int(k): v for k, v in result["metas"].items()}, info)
  return save_exits(es, c.out)


def merge_layer_curve(path: str, run: dict, c, wall_seconds: float, command: str) -> dict:
  """Adds this run's ``layer`` curve to the agreement json at ``path`` (the
  table of docs/exit_modules.md) and keeps the whole run under "layer_run"
  (its own raw / least-squares / affine figures at the same exits show whether
  the data and held-out tokens are the same as the table's)."""
  with open(path) as f:
    base = json.load(f)
  if (base["n_heldout_tokens"], base["shortlist_size"]) != (run["n_heldout_tokens"],
                                                            run["shortlist_size"]):
    raise ValueError(f"{path} was made on {base['n_heldout_tokens']} held-out tokens / "
                     f"shortlist {base['shortlist_size']}, this run on "
                     f"{run['n_heldout_tokens']} / {run['shortlist_size']}: not comparable")
  same = all(base["curves"][k][e] == v for k in ("raw", "affine_ls")
             for e, v in run["curves"][k].items() if e in base["curves"].get(k, {}))
  base["curves"]["layer"] = run["curves"]["layer"]
  base["layer_run"] = {
      "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "same_raw_and_least_squares_as_table": bool(same),
      "layer_init": c.layer_init, "layer_affine": bool(c.layer_affine),
      "layer_steps": int(c.layer_steps), "layer_lr": float(c.layer_lr),
      "batch_tokens": int(c.batch), "curves": run["curves"],
      "module_seconds": run.get("module_seconds", {}),
      "train_seconds": run.get("train_seconds"), "wall_seconds": wall_seconds}
  with open(path, "w") as f:
    json.dump(base, f, indent=1)
  return base


def plot_agreement(agreement: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name, curve in agreement["curves"].items():
    ls = sorted(int(k) for k in curve)
    ax.plot(ls, [100 * curve[str(e)]["top1_shortlist"] for e in ls], marker="o", label=name)
  ax.set_xlabel("exit layer e (of 30)")
  ax.set_ylabel("held-out top-1 agreement with layer 30 (%)")
  ax.set_title(f"SmolLM2-135M exits, shortlist {agreement['shortlist_size']} head")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)

"""The one-decoder-layer exit module (``layer`` kind, issue 12): it is the
model's own layer, causal, trainable on whole sequences of cached features, and
it round-trips through the exit artifact."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import DepthPlan, tiny_config
from recursive_lm.decode import depth as D
from recursive_lm.exits import modules as M
from recursive_lm.exits import train as T
from recursive_lm.exits.artifact import ExitSet, load_exits, model_identity, save_exits
from recursive_lm.nn.model import init_params

CFG = tiny_config(plan=DepthPlan.vanilla(4), tie_embeddings=True)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, seed=3)


def _tokens(seed, b=2, t=12):
  return jnp.asarray(np.random.default_rng(seed).integers(2, CFG.vocab_size, (b, t)), jnp.int32)


@pytest.mark.parametrize("e", [1, 2, 3])
def test_next_layer_copy_reproduces_the_model(params, e):
  """Without the affine part, the exit at e initialised from layer e+1 maps the
  model's h_e to exactly its h_{e+1} (it runs the model's own layer code)."""
  states, _ = D.hidden_states(CFG, params, _tokens(e), (e, e + 1))
  p = M.init_layer_exit(CFG, params, e, "next", affine=False)
  z = M.apply_layer_exit(CFG, p, states[0])
  np.testing.assert_allclose(np.asarray(z), np.asarray(states[1]), rtol=1e-5, atol=1e-5)
  assert M.exit_kind(p) == "layer"


def test_last_layer_copy_and_bad_choices(params):
  p = M.init_layer_exit(CFG, params, 1, "last")
  src = params["block"]["layer_3"]
  np.testing.assert_array_equal(np.asarray(p["layer"]["mlp"]["down"]["kernel"]),
                                np.asarray(src["mlp"]["down"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(p["w"]), np.eye(CFG.d_model, dtype=np.float32))
  with pytest.raises(ValueError, match="layer_init"):
    M.init_layer_exit(CFG, params, 1, "first")
  with pytest.raises(ValueError, match="exit layer 4"):
    M.init_layer_exit(CFG, params, 4)
  with pytest.raises(ValueError, match="apply_layer_exit"):
    M.apply_exit(p, jnp.zeros((3, CFG.d_model)))
  with pytest.raises(ValueError, match="init_layer_exit"):
    M.init_exit("layer", CFG.d_model)


def test_layer_exit_is_causal_and_relative_in_position(params):
  p = M.init_layer_exit(CFG, params, 2, "next")
  h = jax.random.normal(jax.random.key(0), (1, 10, CFG.d_model))
  y = M.apply_layer_exit(CFG, p, h)
  h2 = h.at[:, 6:].set(jax.random.normal(jax.random.key(1), (1, 4, CFG.d_model)))
  y2 = M.apply_layer_exit(CFG, p, h2)
  np.testing.assert_allclose(np.asarray(y[:, :6]), np.asarray(y2[:, :6]), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(y[:, 6:]), np.asarray(y2[:, 6:]))
  # RoPE is relative: shifting every position leaves the output as it is
  shifted = M.apply_layer_exit(CFG, p, h, jnp.arange(10)[None] + 5)
  np.testing.assert_allclose(np.asarray(shifted), np.asarray(y), rtol=1e-4, atol=1e-4)


def _features(params, e, n, t, seed):
  """Feature-set dict like features.open_features, for sequences of length t."""
  toks = np.asarray(_tokens(seed, n, t))
  states, hfin = D.hidden_states(CFG, params, jnp.asarray(toks), (e, CFG.plan.effective_depth))
  scale = params["final_norm"]["scale"]
  hf = np.asarray(hfin, np.float32)
  hn = hf / np.sqrt(np.mean(hf * hf, -1, keepdims=True) + CFG.norm_eps) * np.asarray(scale)
  teacher = np.asarray(jnp.argmax(D.head(CFG, params, hfin), -1)).reshape(-1)
  d = CFG.d_model
  return {"layers": [e], "seq_len": t,
          "states": np.asarray(states[0]).reshape(n * t, 1, d).astype(np.float16),
          "final": hn.reshape(n * t, d).astype(np.float16),
          "teacher": teacher.astype(np.int32), "tokens": toks.reshape(-1)}


def test_training_on_sequences_lowers_the_loss_and_beats_the_start(params):
  """Two feature sets of different sequence lengths (like corpus + self-generated);
  the trained layer exit's KD + CE loss falls and its agreement does not drop."""
  e = 1
  feats = [_features(params, e, 6, 16, 0), _features(params, e, 8, 8, 1)]
  shortlist = np.arange(CFG.vocab_size, dtype=np.int32)
  pos = np.arange(CFG.vocab_size)
  sets = T.sequence_sets(feats, e, pos)
  assert [s["h"].shape for s in sets] == [(6, 16, CFG.d_model), (8, 8, CFG.d_model)]
  np.testing.assert_array_equal(sets[1]["tidx"].reshape(-1), feats[1]["teacher"])
  hn = np.concatenate([f["final"] for f in feats]).astype(np.float32)
  y_target = hn / np.asarray(params["final_norm"]["scale"])
  p0 = T.init_layer_module(CFG, params, e, sets, y_target, "next", True, 1e-3)
  small = {"final_norm": params["final_norm"]}
  ws = jnp.asarray(params["embed"]["embedding"])
  losses = []
  p = T.train_layer_module(CFG, p0, sets, small, ws, CFG.norm_eps, 40, 32, 3e-3, 1.0, 0.5, 0,
                           log=lambda i, s: losses.append(s["t/loss"]), tag="t")
  assert losses[-1] < losses[0]

  def agree(p, f):
    t = f["seq_len"]
    y = T.layer_outputs(CFG, p, np.asarray(f["states"][:, 0]).reshape(-1, t, CFG.d_model))
    sl, conf, full = T.state_predictions(y, small, ws, shortlist, CFG.norm_eps, ws)
    np.testing.assert_array_equal(sl, full)   # shortlist = the whole vocabulary here
    assert conf.shape == sl.shape
    return np.mean(sl == f["teacher"])
  assert agree(p, feats[0]) >= agree(p0, feats[0])


def test_map_sequences_pads_the_last_chunk():
  calls = []

  def fn(h):
    calls.append(h.shape)
    return h * 2
  h = np.random.default_rng(0).standard_normal((5, 3, 4)).astype(np.float32)
  out = T.map_sequences(fn, h, chunk=4)
  np.testing.assert_allclose(out, (h * 2).reshape(15, 4))
  assert calls == [(4, 3, 4), (4, 3, 4)]


def test_artifact_round_trip_with_a_layer_exit(params, tmp_path):
  rng = np.random.default_rng(0)
  d = CFG.d_model
  lay = {k: np.asarray(v) for k, v in M.init_layer_exit(CFG, params, 2, "next").items()
         if k != "layer"}
  lay["layer"] = jax.tree_util.tree_map(np.asarray, M.init_layer_exit(CFG, params, 2)["layer"])
  aff = {"w": rng.standard_normal((d, d)).astype(np.float32), "b": np.zeros(d, np.float32)}
  es = ExitSet({1: aff, 2: lay}, np.arange(10, dtype=np.int32), model_identity(CFG, params))
  save_exits(es, str(tmp_path))
  back = load_exits(str(tmp_path), CFG, params)
  assert M.exit_kind(back.exits[2]) == "layer" and M.exit_kind(back.exits[1]) == "affine"
  h = jax.random.normal(jax.random.key(2), (1, 5, d))
  np.testing.assert_allclose(np.asarray(M.apply_layer_exit(CFG, back.exits[2], h)),
                             np.asarray(M.apply_layer_exit(CFG, lay, h)), rtol=2e-2, atol=2e-2)


def test_state_predictions_match_exit_predictions(params):
  """The layer path's scoring (precomputed module outputs) equals the per-token path's."""
  rng = np.random.default_rng(4)
  d = CFG.d_model
  p = M.init_exit("lowrank", d, rank=4, seed=1,
                  w=np.eye(d, dtype=np.float32) + 0.2 * rng.standard_normal((d, d)).astype(np.float32))
  x = rng.standard_normal((37, d)).astype(np.float32)
  small = {"final_norm": params["final_norm"]}
  emb = jnp.asarray(params["embed"]["embedding"])
  shortlist = np.arange(10, 60, dtype=np.int32)
  ws = emb[shortlist]
  a = T.exit_predictions(p, x, small, ws, shortlist, CFG.norm_eps, emb, chunk=16)
  b = T.state_predictions(np.asarray(M.apply_exit(p, jnp.asarray(x))), small, ws, shortlist,
                          CFG.norm_eps, emb, chunk=16)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_allclose(a[1], b[1], rtol=1e-5)
  np.testing.assert_array_equal(a[2], b[2])
  assert set(a[0]) <= set(shortlist) and len(a[0]) == 37

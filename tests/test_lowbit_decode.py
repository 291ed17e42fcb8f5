"""bf16 and int8 weights for decoding: panel formats, kernels, layouts, engines."""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import ConfigError, DepthPlan, tiny_config
from recursive_lm.decode.engine import Engine
from recursive_lm.kernels import native
from recursive_lm.kernels import panel as P
from recursive_lm.nn.model import Transformer, decode_layout, init_params

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="no C++ compiler")
FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def _bf16_round(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def _plain(w, n, scale=None):
  """The [in, n] float64 matrix that any-format panels hold."""
  return np.asarray(P.from_panels(P.dequantized_panels(w, scale), n), np.float64)


@pytest.mark.parametrize("k", [5, 6, 101])
def test_bf16_panels_hold_the_rounded_weights(k):
  rng = np.random.default_rng(k)
  w = rng.standard_normal((k, 70)).astype(np.float32)
  p = P.to_bf16_panels(w)
  assert p.dtype == jnp.bfloat16 and p.shape == (3, k, 32)
  np.testing.assert_array_equal(_plain(p, 70), _bf16_round(w))
  # Rows 0 and 1 are interleaved column by column.
  np.testing.assert_array_equal(np.asarray(p[0, 0, :4], np.float32),
                                _bf16_round(w[[0, 1, 0, 1], [0, 0, 1, 1]]))


def test_int8_quantization_is_symmetric_per_column():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((40, 70)).astype(np.float32)
  w[:, 5] = 0.0  # a zero column gets scale 0, not NaN
  q, scale = P.to_int8_panels(w)
  assert q.dtype == jnp.int8 and q.shape == (3, 40, 32) and scale.shape == (96,)
  np.testing.assert_allclose(scale[:70], np.abs(w).max(0) / 127, rtol=1e-6)
  assert scale[5] == 0 and not np.any(scale[70:])
  deq = _plain(q, 70, scale)
  assert np.all(np.abs(deq - w) <= scale[:70] / 2 + 1e-7)
  assert np.abs(np.asarray(q)).max() == 127


needs_amx = pytest.mark.skipif(not native.amx(), reason="no AMX on this CPU / kernel / "
                               "build (the AVX-512 path is tested instead)")


@pytest.fixture(params=["amx", "avx512"])
def kernel_path(request):
  """Runs a test on the AMX path (skipped without AMX; bf16 from 1 row, which
  the default leaves to the dot products) and with AMX off."""
  if request.param == "amx" and not native.amx():
    pytest.skip("no AMX on this CPU / kernel / build")
  was = native.amx()
  rows = native.set_amx_min_rows(bf16=1) if request.param == "amx" else None
  native.set_amx(request.param == "amx")
  yield request.param
  native.set_amx(was)
  if rows:
    native.set_amx_min_rows(bf16=rows["bf16"])


@needs_compiler
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 21, 40])
@pytest.mark.parametrize("k,n", [(5, 3), (64, 32), (101, 70), (576, 192)])
def test_lowbit_kernels_match_an_f32_reference(rows, k, n, kernel_path):
  """Native bf16/int8 kernels (AMX tiles and the AVX-512 path) against float64
  math on the same dequantized weights and bf16-rounded activations (as the
  kernels define); K not a multiple of 32 and padded panels included."""
  assert native.load(), native.status()
  rng = np.random.default_rng(rows * 1000 + k + n)
  x = rng.standard_normal((rows, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  wb = P.to_bf16_panels(w)
  q, scale = P.to_int8_panels(w)
  tol = dict(rtol=1e-4, atol=1e-4 * np.sqrt(k))
  on_amx = kernel_path == "amx" and rows >= native.amx_min_rows("bf16")
  assert native.panel_path("bf16", rows).startswith("AMX") == on_amx
  int8_amx = native.panel_path("int8", rows).startswith("AMX")  # rounds x to bf16
  yb = jax.jit(P.panel_matmul, static_argnums=2)(x, wb, n)
  np.testing.assert_allclose(yb, _bf16_round(x) @ _plain(wb, n), **tol)
  yq = jax.jit(lambda x, q, s: P.panel_matmul(x, q, n, scale=s))(x, q, scale)
  xq = _bf16_round(x) if int8_amx else x.astype(np.float64)
  np.testing.assert_allclose(yq, xq @ _plain(q, n, scale), **tol)
  # XLA's path (other platforms, no compiler) computes the same.
  np.testing.assert_allclose(P.panel_matmul(jnp.asarray(x), wb, n, use_native=False), yb,
                             **tol)
  if not int8_amx:
    np.testing.assert_allclose(
        P.panel_matmul(jnp.asarray(x), q, n, use_native=False, scale=scale), yq, **tol)


@needs_compiler
@needs_amx
def test_int8_amx_path_when_turned_on(tmp_path):
  """RLM_AMX_MIN_ROWS=2 puts int8 panels on AMX too (bf16-rounded activations)."""
  code = (
      "import numpy as np, jax.numpy as jnp\n"
      "from recursive_lm.kernels import native, panel as P\n"
      "rng = np.random.default_rng(4)\n"
      "for rows, k in [(2, 101), (8, 576), (21, 64), (40, 33)]:\n"
      "  x = rng.standard_normal((rows, k)).astype(np.float32)\n"
      "  w = rng.standard_normal((k, 70)).astype(np.float32)\n"
      "  q, s = P.to_int8_panels(w)\n"
      "  assert native.panel_path('int8', rows).startswith('AMX')\n"
      "  xr = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)\n"
      "  ref = xr @ np.asarray(P.from_panels(P.dequantized_panels(q, s), 70), np.float64)\n"
      "  np.testing.assert_allclose(P.panel_matmul(x, q, 70, scale=s), ref, rtol=1e-4,\n"
      "                             atol=1e-4 * np.sqrt(k))\n"
      "print(native.status())\n")
  env = dict(os.environ, RLM_AMX_MIN_ROWS="2")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, check=False, cwd=os.path.dirname(FIX) + "/..")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "int8 on AMX from 2 rows" in out.stdout


@needs_compiler
@needs_amx
def test_amx_path_equals_the_avx512_path_and_says_so():
  """Same compiled function, AMX on and off (read at each call): equal up to
  f32 summation order; panel_path and status name the path."""
  rng = np.random.default_rng(11)
  x = rng.standard_normal((8, 576)).astype(np.float32)
  w = rng.standard_normal((576, 1000)).astype(np.float32)
  wb, (q, s) = P.to_bf16_panels(w), P.to_int8_panels(w)
  fb = jax.jit(lambda x: P.panel_matmul(x, wb, 1000))
  fq = jax.jit(lambda x: P.panel_matmul(x, q, 1000, scale=s))
  assert native.set_amx(True)
  assert native.panel_path("bf16", 8) == "AMX-BF16 tiles"
  assert not native.panel_path("int8", 8).startswith("AMX")  # off by default
  # 1 row streams faster on the dot products (AMX_MIN_ROWS); set_amx_min_rows moves it.
  assert native.panel_path("bf16", 1) == "AVX-512 BF16 dot products"
  assert native.panel_path("bf16", 2) == "AMX-BF16 tiles"
  was = native.set_amx_min_rows(bf16=1)
  try:
    assert was["bf16"] == 2 and native.panel_path("bf16", 1) == "AMX-BF16 tiles"
    assert "AMX-BF16 tiles from 1 row," in native.status()
  finally:
    native.set_amx_min_rows(bf16=was["bf16"])
  assert native.panel_path("bf16", 1) == "AVX-512 BF16 dot products"
  assert "AMX-BF16 tiles from" in native.status()
  on = (np.asarray(fb(x)), np.asarray(fq(x)))
  assert not native.set_amx(False)
  try:
    assert native.panel_path("bf16", 8) == "AVX-512 BF16 dot products"
    assert "AMX: off, disabled" in native.status()
    off = (np.asarray(fb(x)), np.asarray(fq(x)))
  finally:
    native.set_amx(True)
  for a, b in zip(on, off):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@needs_compiler
def test_amx_off_by_environment_and_without_amx_in_the_build(tmp_path):
  """RLM_AMX=0, and a build without AMX code: the AVX-512 path, same results,
  and the status line says why AMX is off."""
  code = (
      "import numpy as np, jax, jax.numpy as jnp\n"
      "from recursive_lm.kernels import native, panel as P\n"
      "rng = np.random.default_rng(3)\n"
      "x = rng.standard_normal((9, 101)).astype(np.float32)\n"
      "w = rng.standard_normal((101, 70)).astype(np.float32)\n"
      "wb, (q, s) = P.to_bf16_panels(w), P.to_int8_panels(w)\n"
      "assert not native.amx() and native.panel_path('bf16', 9).startswith('AVX-512')\n"
      "for y, ref in [(P.panel_matmul(x, wb, 70), P.panel_matmul(x, wb, 70, use_native=False)),\n"
      "               (P.panel_matmul(x, q, 70, scale=s),\n"
      "                P.panel_matmul(x, q, 70, scale=s, use_native=False))]:\n"
      "  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)\n"
      "print(native.status())\n")
  for extra, want in [({"RLM_AMX": "0"}, "AMX: off, disabled"),
                      ({"RECURSIVE_LM_KERNEL_FLAGS": "-mno-amx-tile -mno-amx-bf16 -mno-amx-int8",
                        "RECURSIVE_LM_CACHE": str(tmp_path)}, "AMX: off, not built")]:
    env = dict(os.environ, **extra)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=False, cwd=os.path.dirname(FIX) + "/..")
    assert out.returncode == 0, out.stderr[-3000:]
    if want.endswith("disabled") or native.amx():  # "not built" only where AMX exists
      assert want in out.stdout, out.stdout


@needs_compiler
def test_lowbit_kernels_are_used_at_every_row_count():
  assert native.load()
  w = jnp.ones((64, 96))
  q, s = P.to_int8_panels(w)
  for rows in (1, P.MAX_NATIVE_ROWS + 1, 300):  # prefill too: XLA would widen W per call
    x = jnp.ones((rows, 64))
    hlo = jax.jit(P.panel_matmul, static_argnums=2).lower(x, P.to_bf16_panels(w), 96).as_text()
    assert native.PANEL_MATMUL_BF16 in hlo
    hlo = jax.jit(lambda x, q, s: P.panel_matmul(x, q, 96, scale=s)).lower(x, q, s).as_text()
    assert native.PANEL_MATMUL_INT8 in hlo


def test_bad_lowbit_inputs_are_named():
  q, s = P.to_int8_panels(jnp.ones((8, 40)))
  with pytest.raises(ValueError, match="int8 panels need their per-column scale"):
    P.panel_matmul(jnp.ones((2, 8)), q, 40)
  with pytest.raises(ValueError, match=r"scale must be \[64\]"):
    P.panel_matmul(jnp.ones((2, 8)), q, 40, scale=s[:40])
  with pytest.raises(ValueError, match="float32, bfloat16 or int8"):
    P.panel_matmul(jnp.ones((2, 8)), jnp.ones((2, 8, 32), jnp.float16), 40)
  cfg = tiny_config()
  with pytest.raises(ConfigError, match="kernel_layout='panel'"):
    decode_layout(cfg, init_params(cfg), "in_out", weights="int8")
  with pytest.raises(ConfigError, match="not one of f32|bf16|int8"):
    decode_layout(cfg, init_params(cfg), "panel", weights="fp8")


@needs_compiler
def test_widening_path_without_bf16_dot_products(tmp_path):
  """A CPU without AVX-512 BF16 widens the bf16 pairs to f32: same results."""
  code = (
      "import numpy as np, jax, jax.numpy as jnp\n"
      "from recursive_lm.kernels import native, panel as P\n"
      "rng = np.random.default_rng(3)\n"
      "x = rng.standard_normal((5, 101)).astype(np.float32)\n"
      "w = rng.standard_normal((101, 70)).astype(np.float32)\n"
      "wb = P.to_bf16_panels(w)\n"
      "y = jax.jit(P.panel_matmul, static_argnums=2)(x, wb, 70)\n"
      "ref = P.panel_matmul(jnp.asarray(x), wb, 70, use_native=False)\n"
      "np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)\n"
      "print(native.status())\n")
  env = dict(os.environ, RECURSIVE_LM_CACHE=str(tmp_path),
             RECURSIVE_LM_KERNEL_FLAGS="-mno-avx512bf16")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, check=False, cwd=os.path.dirname(FIX) + "/..")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "widened to f32" in out.stdout


def test_lowbit_fallback_without_a_compiler(tmp_path):
  code = (
      "import warnings, numpy as np, jax.numpy as jnp\n"
      "from recursive_lm.kernels import native, panel as P\n"
      "warnings.simplefilter('ignore')\n"
      "assert not native.load()\n"
      "w = np.arange(8 * 40, dtype=np.float32).reshape(8, 40) / 100\n"
      "q, s = P.to_int8_panels(w)\n"
      "x = jnp.ones((3, 8))\n"
      "ref = np.broadcast_to(w.sum(0), (3, 40))\n"
      "np.testing.assert_allclose(P.panel_matmul(x, P.to_bf16_panels(w), 40), ref, rtol=1e-2)\n"
      "np.testing.assert_allclose(P.panel_matmul(x, q, 40, scale=s), ref, rtol=1e-2)\n"
      "print(native.status())\n")
  env = dict(os.environ, CXX="no-such-compiler-xyz", RECURSIVE_LM_CACHE=str(tmp_path))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, check=False, cwd=os.path.dirname(FIX) + "/..")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "off (no C++ compiler" in out.stdout


def _cfg():
  return tiny_config(plan=DepthPlan(1, 2, 2, 1), lora_ranks=(("q", 2),), eos_id=None)


@pytest.mark.parametrize("fuse", [False, True])
def test_decode_layout_formats(fuse):
  cfg = _cfg()
  params = init_params(cfg, seed=1)
  _, pb = decode_layout(cfg, params, "panel", fuse, weights="bf16")
  _, pq = decode_layout(cfg, params, "panel", fuse, weights="int8")
  kernels = lambda tree: [(jax.tree_util.keystr(k), v) for k, v in
                          jax.tree_util.tree_leaves_with_path(tree)]
  for name, v in kernels(pb):
    if name.endswith("['kernel']"):
      assert v.dtype == jnp.bfloat16, name
    if "lora" in name or "norm" in name:
      assert v.dtype == jnp.float32, name
  assert pb["embed"]["embedding"].dtype == jnp.bfloat16
  n_kernels = sum(name.endswith("['kernel']") for name, _ in kernels(pq))
  scales = [v for name, v in kernels(pq) if name.endswith("['kernel_scale']")]
  assert len(scales) == n_kernels and "kernel_scale" in pq["lm_head"]
  assert all(v.dtype == jnp.int8 for name, v in kernels(pq) if name.endswith("['kernel']"))
  # Non-panel bf16: the same model in bf16 for XLA.
  cx, px = decode_layout(cfg, params, "in_out", weights="bf16")
  assert cx.dtype == "bfloat16" and px["embed"]["embedding"].dtype == jnp.bfloat16


def test_int8_engine_equals_f32_engine_on_the_dequantized_weights():
  """Same weights, f32 activations: the int8 engine is the f32 one (greedy)."""
  cfg = _cfg()
  params = init_params(cfg, seed=4)
  cq, pq = decode_layout(cfg, params, "panel", True, weights="int8")

  def deq(tree):
    if not isinstance(tree, dict):
      return tree
    if "kernel_scale" in tree:
      return {"kernel": P.dequantized_panels(tree["kernel"], tree["kernel_scale"])}
    return {k: deq(v) for k, v in tree.items()}

  pf = deq(pq)
  pf["embed"]["embedding"] = pq["embed"]["embedding"].astype(jnp.float32)
  prompts = [[3, 4, 5, 6, 7, 8, 9], [11], [20, 21, 22]]
  ref = Engine(cq, pf).generate(prompts, 12).tokens
  assert Engine(cq, pq).generate(prompts, 12).tokens == ref
  tokens = jnp.asarray([[3, 4, 5, 6, 7, 8, 9]])
  la = Transformer(cq).apply({"params": pq}, tokens)["logits"]
  lb = Transformer(cq).apply({"params": pf}, tokens)["logits"]
  np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)


def test_int8_rows_do_not_depend_on_the_batch():
  """A row's int8 result is the same alone and in a batch (the default paths)."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal((8, 64)).astype(np.float32)
  q, s = P.to_int8_panels(rng.standard_normal((64, 96)).astype(np.float32))
  f = jax.jit(lambda x: P.panel_matmul(x, q, 96, scale=s))
  np.testing.assert_allclose(f(x)[:1], f(x[:1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_lowbit_logits_stay_close_to_f32(weights):
  cfg = _cfg()
  params = init_params(cfg, seed=5)
  tokens = jnp.asarray([[3, 4, 5, 6, 7, 8, 9, 10]])
  ref = Transformer(cfg).apply({"params": params}, tokens)["logits"]
  c2, p2 = decode_layout(cfg, params, "panel", True, weights=weights)
  got = Transformer(c2).apply({"params": p2}, tokens)["logits"]
  err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
  assert err < (0.02 if weights == "bf16" else 0.05), err


def test_early_exit_and_speculative_engines_take_lowbit_layouts():
  """They call decode_layout: pre-converted bf16/int8 params run unchanged."""
  from recursive_lm.decode.early_exit import EarlyExitEngine
  from recursive_lm.decode.speculative import SelfSpeculativeEngine
  cfg = tiny_config(plan=DepthPlan(1, 2, 3, 1), eos_id=None)
  params = init_params(cfg, seed=2)
  prompts = [[3, 4, 5], [7]]
  for weights in ("bf16", "int8"):
    c2, p2 = decode_layout(cfg, params, "panel", True, weights=weights)
    plain = Engine(c2, p2).generate(prompts, 8).tokens
    spec = SelfSpeculativeEngine(c2, p2, draft_loops=1, draft_len=3)
    assert spec.generate(prompts, 8).tokens == plain  # speculative is lossless
    ee = EarlyExitEngine(c2, p2, policy="free", threshold=2.0)  # never exits early
    assert len(ee.generate(prompts, 8).tokens[0]) == 8


def test_api_engine_takes_weights():
  from recursive_lm.api import LoadedModel
  cfg = _cfg()
  m = LoadedModel(cfg, init_params(cfg), None, "tiny")
  eng = m.engine(1, weights="bf16")
  assert eng.generate([[3, 4]], 4).tokens[0]


def test_tiny_fixture_bf16_decode_matches_transformers_bf16():
  """bf16 panel decoding of the tiny HF fixture against transformers in bf16."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from recursive_lm.checkpoints import load_checkpoint
  from recursive_lm.nn.weights import params_from_hf
  path = os.path.join(FIX, "tiny_llama")
  ck = load_checkpoint(path)
  params = params_from_hf(ck.config, ck.weights)
  ref = np.load(os.path.join(FIX, "tiny_llama_reference.npz"))
  ids = ref["input_ids"]
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
  with torch.inference_mode():
    hf_logits = hf(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()
  c2, p2 = decode_layout(ck.config, params, "panel", True, weights="bf16")
  ours = np.asarray(Transformer(c2).apply({"params": p2}, jnp.asarray(ids))["logits"])
  f32 = ref["logits"]
  # Both are bf16 models of the same f32 one; ours keeps f32 activations between
  # the matmuls, so it sits closer to f32 than transformers' bf16 does.
  scale = np.abs(f32).max()
  err_ours, err_hf = np.abs(ours - f32).max() / scale, np.abs(hf_logits - f32).max() / scale
  assert err_ours < 0.02 and np.abs(ours - hf_logits).max() / scale < err_hf + 0.02
  assert (ours.argmax(-1) == hf_logits.argmax(-1)).mean() > 0.9


@pytest.mark.slow
def test_embedded_model_bf16_greedy_matches_f32():
  """SmolLM2-135M: bf16 panels give f32's greedy tokens on the reference prompts
  (first 32 new tokens)."""
  import json
  from recursive_lm import api
  with open(os.path.join(FIX, "smollm2_reference.json")) as f:
    ref = json.load(f)
  prompts = [ref["prompt"]["ids"], ref["chat"]["ids"]]
  m = api.load()
  cfg = m.cfg.replace(eos_id=None)
  f32 = Engine(cfg, m.params, kernel_layout="panel", fuse=True)
  want = f32.generate(prompts, 32, stop_at_eos=False).tokens
  del f32
  got = Engine(cfg, m.params, kernel_layout="panel", fuse=True, weights="bf16").generate(
      prompts, 32, stop_at_eos=False).tokens
  assert got == want


@needs_compiler
@needs_amx
@pytest.mark.parametrize("rows", [1, 8, 20])
def test_amx_prefetch_distance_does_not_change_results(rows, request):
  """The AMX path's L2 software prefetch (past a panel's end, and past the
  weights' end on the last panel) only moves data: results are bit-identical
  with it off, at another distance, and from 1 row (AMX there when asked for)."""
  min_rows = native.set_amx_min_rows(bf16=1)
  request.addfinalizer(lambda: native.set_amx_min_rows(bf16=min_rows["bf16"]))
  assert native.amx() and native.amx_min_rows("bf16") == 1
  rng = np.random.default_rng(rows)
  x = rng.standard_normal((rows, 576)).astype(np.float32)
  wb = P.to_bf16_panels(rng.standard_normal((576, 1000)).astype(np.float32))
  fb = jax.jit(lambda x, w: P.panel_matmul(x, w, 1000, use_native=True))
  was = native.set_amx_prefetch(0)
  try:
    ref = np.asarray(fb(x, wb))
    for ahead in (64, 8192, 1 << 20):
      native.set_amx_prefetch(ahead)
      np.testing.assert_array_equal(np.asarray(fb(x, wb)), ref)
  finally:
    native.set_amx_prefetch(was)
  assert was == 8192
  np.testing.assert_allclose(ref, _bf16_round(x) @ _plain(wb, 1000), rtol=1e-4,
                             atol=1e-4 * np.sqrt(576))


@needs_compiler
@needs_amx
@pytest.mark.parametrize("rows", [1, 8, 20])
@pytest.mark.parametrize("out", [1000, 96, 40])
def test_amx_chunk_prefetch_does_not_change_results(rows, out):
  """The bf16 AMX path's prefetch across chunk boundaries (into the panel the
  thread runs next, or nowhere after its last chunk) and of a first chunk's
  opening bytes only moves data: bit-identical with it off, with 1-32
  panels (one chunk of 1 panel per thread up to many), at distances short
  and longer than a panel."""
  rng = np.random.default_rng(rows + out)
  x = rng.standard_normal((rows, 576)).astype(np.float32)
  wb = P.to_bf16_panels(rng.standard_normal((576, out)).astype(np.float32))
  fb = jax.jit(lambda x, w: P.panel_matmul(x, w, out, use_native=True))
  was, ahead = native.set_amx_chunk_prefetch(False), native.set_amx_prefetch(8192)
  try:
    ref = np.asarray(fb(x, wb))
    native.set_amx_chunk_prefetch(True)
    for dist in (64, 8192, 1 << 17):
      native.set_amx_prefetch(dist)
      np.testing.assert_array_equal(np.asarray(fb(x, wb)), ref)
  finally:
    native.set_amx_chunk_prefetch(bool(was))
    native.set_amx_prefetch(ahead)
  assert was == 0  # off by default


@needs_compiler
@pytest.mark.parametrize("rows", [1, 3, 8, 20])
def test_bf16_dot_prefetch_distance_does_not_change_results(rows):
  """The bf16 dot-product path's L2 prefetch (AMX off; past a panel's end and
  past the weights' end on the last panel) only moves data: bit-identical
  results at every distance, odd K included."""
  assert native.load(), native.status()
  rng = np.random.default_rng(rows)
  for k in (576, 575):
    x = rng.standard_normal((rows, k)).astype(np.float32)
    wb = P.to_bf16_panels(rng.standard_normal((k, 1000)).astype(np.float32))
    fb = jax.jit(lambda x, w: P.panel_matmul(x, w, 1000, use_native=True))
    amx_was = native.amx()
    native.set_amx(False)
    was = native.set_bf16_prefetch(0)
    try:
      ref = np.asarray(fb(x, wb))
      for ahead in (64, 8192, 1 << 20):
        native.set_bf16_prefetch(ahead)
        np.testing.assert_array_equal(np.asarray(fb(x, wb)), ref)
    finally:
      native.set_bf16_prefetch(was)
      native.set_amx(amx_was)
    assert was == 8192
    np.testing.assert_allclose(ref, _bf16_round(x) @ _plain(wb, 1000), rtol=1e-4,
                               atol=1e-4 * np.sqrt(k))


@needs_compiler
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int8_prefetch_distance_does_not_change_results(rows):
  """The int8 FMA path's L2 prefetch only moves data: bit-identical results."""
  assert native.load(), native.status()
  rng = np.random.default_rng(rows)
  x = rng.standard_normal((rows, 576)).astype(np.float32)
  q, scale = P.to_int8_panels(rng.standard_normal((576, 1000)).astype(np.float32))
  fq = jax.jit(lambda x, q, s: P.panel_matmul(x, q, 1000, use_native=True, scale=s))
  was = native.set_int8_prefetch(0)
  try:
    ref = np.asarray(fq(x, q, scale))
    for ahead in (64, 8192, 1 << 20):
      native.set_int8_prefetch(ahead)
      np.testing.assert_array_equal(np.asarray(fq(x, q, scale)), ref)
  finally:
    native.set_int8_prefetch(was)
  assert was == 8192
  if not native.panel_path("int8", rows).startswith("AMX"):
    np.testing.assert_allclose(ref, x.astype(np.float64) @ _plain(q, 1000, scale), rtol=1e-4,
                               atol=1e-4 * np.sqrt(576))

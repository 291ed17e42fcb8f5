"""Native CPU kernels: the panel layout and its FFI matmul."""
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import ConfigError, DepthPlan, tiny_config
from recursive_lm.decode.engine import Engine
from recursive_lm.kernels import from_panels, native, panel_matmul, to_panels
from recursive_lm.kernels.panel import MAX_NATIVE_ROWS
from recursive_lm.nn.model import decode_layout, init_params

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="no C++ compiler")


def test_panels_round_trip_with_padding():
  w = jnp.arange(2 * 5 * 70, dtype=jnp.float32).reshape(2, 5, 70)
  p = to_panels(w)
  assert p.shape == (2, 3, 5, 32)
  np.testing.assert_array_equal(p[:, 2, :, 6:], 0)  # padded columns
  np.testing.assert_array_equal(from_panels(p, 70), w)


@needs_compiler
def test_native_kernel_builds_and_is_used():
  assert native.load(), native.status()
  x, w = jnp.ones((8, 64)), to_panels(jnp.ones((64, 96)))
  hlo = jax.jit(panel_matmul, static_argnums=2).lower(x, w, 96).as_text()
  assert native.PANEL_MATMUL in hlo
  # Prefill-sized inputs stay on XLA's GEMM.
  hlo = jax.jit(panel_matmul, static_argnums=2).lower(
      jnp.ones((MAX_NATIVE_ROWS + 1, 64)), w, 96).as_text()
  assert native.PANEL_MATMUL not in hlo


@needs_compiler
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 21])
@pytest.mark.parametrize("k,n", [(5, 3), (64, 32), (100, 70), (576, 192)])
def test_native_matmul_matches_numpy(rows, k, n):
  rng = np.random.default_rng(rows * 1000 + k + n)
  x = rng.standard_normal((rows, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  y = jax.jit(panel_matmul, static_argnums=2)(x, to_panels(jnp.asarray(w)), n)
  np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_leading_dims_and_xla_path_agree():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((48, 40)).astype(np.float32)
  p = to_panels(jnp.asarray(w))
  for shape in [(2, 1, 48), (3, 4, 48), (MAX_NATIVE_ROWS + 1, 48)]:  # native, native, XLA
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(panel_matmul(jnp.asarray(x), p, 40), x @ w, rtol=1e-5,
                               atol=1e-5)


def test_bad_panel_shape_is_named():
  with pytest.raises(ValueError, match=r"panel kernel must be \[P, 8, 32\]"):
    panel_matmul(jnp.ones((2, 8)), jnp.ones((1, 9, 32)), 32)


def test_missing_compiler_falls_back_with_a_warning(tmp_path):
  """No compiler: a warning names it, and the model still runs on XLA's dot."""
  code = (
      "import warnings, numpy as np, jax.numpy as jnp\n"
      "from recursive_lm.kernels import native, panel_matmul, to_panels\n"
      "with warnings.catch_warnings(record=True) as w:\n"
      "  warnings.simplefilter('always')\n"
      "  assert not native.load()\n"
      "assert 'no C++ compiler' in str(w[0].message), w\n"
      "x = np.ones((2, 8), np.float32)\n"
      "y = panel_matmul(jnp.asarray(x), to_panels(jnp.ones((8, 40))), 40)\n"
      "assert np.allclose(y, 8.0)\n"
      "print(native.status())\n")
  env = dict(os.environ, CXX="no-such-compiler-xyz", RECURSIVE_LM_CACHE=str(tmp_path))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, check=False)
  assert out.returncode == 0, out.stderr
  assert "off (no C++ compiler 'no-such-compiler-xyz'" in out.stdout


@needs_compiler
def test_failed_build_leaves_no_library(tmp_path, monkeypatch):
  bad = tmp_path / "bad.cc"
  bad.write_text("this is not C++\n")
  monkeypatch.setattr(native, "SOURCES", (str(bad),))
  monkeypatch.setenv("RECURSIVE_LM_CACHE", str(tmp_path / "cache"))
  with pytest.raises(RuntimeError, match="building bad.cc failed"):
    native.build()
  assert not list((tmp_path / "cache" / "kernels").iterdir())  # no partial .so


def test_panel_params_do_not_convert_back():
  cfg = tiny_config()
  c2, p2 = decode_layout(cfg, init_params(cfg), "panel")
  assert "lm_head" in p2 and c2.kernel_layout == "panel"  # tied head gets a panel copy
  with pytest.raises(ConfigError, match="decode-only"):
    decode_layout(c2, p2, "in_out")


@pytest.mark.parametrize("fuse", [False, True])
def test_panel_engine_generates_the_same_tokens(fuse):
  cfg = tiny_config(plan=DepthPlan(1, 2, 2, 1), lora_ranks=(("q", 2), ("down", 3)),
                    eos_id=None)
  params = init_params(cfg, seed=4)
  params["lora"] = jax.tree_util.tree_map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), params["lora"])
  prompts = [[3, 4, 5, 6, 7, 8, 9], [11], [20, 21, 22]]
  ref = Engine(cfg, params).generate(prompts, 10).tokens
  eng = Engine(cfg, params, kernel_layout="panel", fuse=fuse)
  assert eng.generate(prompts, 10).tokens == ref
  if native.load():  # the decode loop really runs the native kernel
    hlo = eng._generate.lower(eng.params, *_generate_args(eng, prompts)).as_text()
    assert len(re.findall(native.PANEL_MATMUL, hlo)) >= 3


def _generate_args(eng, prompts):
  from recursive_lm.decode.sampling import SamplingConfig
  from recursive_lm.nn.model import init_cache
  b = len(prompts)
  cache = init_cache(eng.cfg, b, 32)
  logits = jnp.zeros((b, eng.cfg.vocab_size))
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  return cache, logits, lengths, jax.random.key(0), 10, SamplingConfig(), True


@needs_compiler
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("b,t,hkv,g,s,d", [(1, 1, 3, 3, 40, 64), (8, 1, 2, 2, 33, 24),
                                            (2, 5, 1, 4, 17, 8), (3, 2, 2, 1, 64, 16),
                                            (2, 1, 2, 4, 50, 128), (2, 2, 1, 2, 70, 32),
                                            (1, 1, 2, 5, 20, 64)])
def test_native_cache_attention_matches_xla(b, t, hkv, g, s, d, grouped):
  """Holes in the mask, a row with no visible slot, large scores, odd head sizes;
  the grouped kernel (all heads of a group at once) and the per-head one."""
  assert native.load(), native.status()
  was = native.set_grouped_attention(grouped)
  try:
    _check_cache_attention(b, t, hkv, g, s, d)
  finally:
    native.set_grouped_attention(was)


@needs_compiler
@pytest.mark.parametrize("b,t,hkv,g,s", [(8, 1, 3, 3, 192), (1, 1, 3, 3, 40), (2, 3, 1, 4, 33)])
def test_cache_attention_prefetch_does_not_change_results(b, t, hkv, g, s):
  """The grouped kernel's K/V prefetch (value rows while keys are scored, the
  next row's keys while values are summed) only moves data: bit-identical."""
  assert native.load(), native.status()
  from recursive_lm.kernels.attention import cache_attention
  from recursive_lm.nn.layers import _attend_flat
  rng = np.random.default_rng(b * 10 + s)
  q = jnp.asarray(4 * rng.standard_normal((b * hkv, t * g, 64)), jnp.float32)
  k = jnp.asarray(4 * rng.standard_normal((b * hkv, s, 64)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b * hkv, s, 64)), jnp.float32)
  mask = jnp.asarray(rng.random((b, t, s)) < 0.6)
  fallback = lambda q, k, v, m: _attend_flat(q, k, v, m, hkv, jnp.float32)
  f = jax.jit(lambda *a: cache_attention(*a, fallback))
  was = native.set_attention_prefetch(False)
  try:
    ref = np.asarray(f(q, k, v, mask))
    native.set_attention_prefetch(True)
    np.testing.assert_array_equal(np.asarray(f(q, k, v, mask)), ref)
  finally:
    native.set_attention_prefetch(was)
  assert was


def _check_cache_attention(b, t, hkv, g, s, d):
  from recursive_lm.kernels.attention import cache_attention
  from recursive_lm.nn.layers import _attend_flat
  rng = np.random.default_rng(b * 100 + s)
  q = jnp.asarray(4 * rng.standard_normal((b * hkv, t * g, d)), jnp.float32)
  k = jnp.asarray(4 * rng.standard_normal((b * hkv, s, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b * hkv, s, d)), jnp.float32)
  mask = rng.random((b, t, s)) < 0.6
  mask[0, 0, :] = False  # no visible slot: uniform over all slots
  mask[-1, -1, -1] = True
  mask = jnp.asarray(mask)
  fallback = lambda q, k, v, m: _attend_flat(q, k, v, m, hkv, jnp.float32)
  got = jax.jit(lambda *a: cache_attention(*a, fallback))(q, k, v, mask)
  hlo = jax.jit(lambda *a: cache_attention(*a, fallback)).lower(q, k, v, mask).as_text()
  assert native.CACHE_ATTENTION in hlo
  np.testing.assert_allclose(got, fallback(q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_native_kernels_under_vmap():
  """MoR depth-wise batching vmaps the model: the FFI calls loop over the batch."""
  rng = np.random.default_rng(7)
  w = rng.standard_normal((16, 40)).astype(np.float32)
  xs = rng.standard_normal((3, 2, 16)).astype(np.float32)
  got = jax.jit(jax.vmap(lambda x: panel_matmul(x, to_panels(jnp.asarray(w)), 40)))(xs)
  np.testing.assert_allclose(got, xs @ w, rtol=1e-5, atol=1e-5)


def test_library_cache_key_covers_every_kernel_source(tmp_path, monkeypatch):
  here = os.path.dirname(native.__file__)
  on_disk = {f for f in os.listdir(here) if f.endswith((".cc", ".h"))}
  assert on_disk == {os.path.basename(f) for f in (*native.SOURCES, *native.HEADERS)}
  copies = []
  for src in (*native.SOURCES, *native.HEADERS):
    dst = tmp_path / os.path.basename(src)
    dst.write_bytes(open(src, "rb").read())
    copies.append(str(dst))
  n = len(native.SOURCES)
  monkeypatch.setattr(native, "SOURCES", tuple(copies[:n]))
  monkeypatch.setattr(native, "HEADERS", tuple(copies[n:]))
  keys = {native.library_path("g++")}
  for c in copies:  # editing any one file gives a new library name
    with open(c, "a") as f:
      f.write("\n// edited\n")
    keys.add(native.library_path("g++"))
  assert len(keys) == len(copies) + 1


@needs_compiler
@pytest.mark.parametrize("rows,v", [(1, 1), (3, 5), (8, 16), (2, 17), (5, 40), (8, 1000),
                                    (8, 49152), (21, 333)])
def test_native_argmax_equals_jnp_argmax(rows, v):
  """First index of the maximum on ties, the first NaN, all -inf rows, inf, the
  16-wide body and the scalar tail; the same answer as XLA's path."""
  from recursive_lm.decode.sampling import argmax, xla_argmax
  assert native.load(), native.status()
  rng = np.random.default_rng(rows * 1000 + v)
  x = rng.standard_normal((rows, v)).astype(np.float32)
  if rows > 1 and v > 1:
    x[1, v // 3] = x[1, v - 1] = x[1].max() + 1  # tie: the first index wins
  if rows > 2:
    x[2, :] = -np.inf
  if rows > 3:
    x[3, v - 1] = np.nan  # NaN in the tail
    x[3, v // 2] = np.inf
  if rows > 4:
    x[4, v // 2] = np.nan  # two NaNs: the first
    x[4, v - 1] = np.nan
  x = jnp.asarray(x)
  f = jax.jit(argmax)
  assert native.ARGMAX in f.lower(x).as_text()
  want = np.asarray(jnp.argmax(x, -1))
  np.testing.assert_array_equal(f(x), want)
  if rows <= 3:  # no NaN (XLA's max may skip a NaN after an inf: rows 3-4)
    np.testing.assert_array_equal(jax.jit(xla_argmax)(x), want)
  batched = jax.jit(jax.vmap(argmax))(x.reshape(1, rows, v))  # vmap: a loop of calls
  np.testing.assert_array_equal(batched[0], want)


@needs_compiler
def test_materialize_is_a_copy_and_a_fusion_barrier():
  """decode_ops.materialize returns its input; the RoPE tables go through it, so
  the compiled decode step computes cos/sin once, not in every RoPE fusion."""
  from recursive_lm.kernels import decode_ops
  from recursive_lm.nn.layers import rope_cos_sin
  from recursive_lm.config import RopeConfig
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 8)), jnp.float32)
  f = jax.jit(decode_ops.materialize)
  assert native.MATERIALIZE in f.lower(x).as_text()
  np.testing.assert_array_equal(f(x), x)
  np.testing.assert_array_equal(jax.jit(jax.vmap(decode_ops.materialize))(x), x)
  pos = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
  cos, sin = jax.jit(lambda p: rope_cos_sin(RopeConfig(), 16, p))(pos)
  was = decode_ops.MATERIALIZE
  decode_ops.MATERIALIZE = False
  try:
    cos0, sin0 = jax.jit(lambda p: rope_cos_sin(RopeConfig(), 16, p))(pos)
  finally:
    decode_ops.MATERIALIZE = was
  np.testing.assert_array_equal(cos, cos0)
  np.testing.assert_array_equal(sin, sin0)


@needs_compiler
def test_embed_rows_bf16_equals_the_gather_and_reads_no_whole_table_copy():
  """decode_ops.embed_rows: the rows of a bf16 table as f32, bit-equal to the
  XLA gather (negative ids count from the end, ids outside give NaN rows, as
  jnp.take), under jit and vmap; the compiled call has no whole-table op."""
  from recursive_lm.kernels import decode_ops
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.standard_normal((50, 24)), jnp.bfloat16)

  def xla(t, ids):
    return jnp.take(t, ids, axis=0).astype(jnp.float32)

  ids = jnp.asarray([[0, 49, 7], [-1, -50, 3]], jnp.int32)
  f = jax.jit(lambda t, i: decode_ops.embed_rows(t, i, xla))
  text = f.lower(table, ids).as_text()
  assert native.EMBED_ROWS_BF16 in text and "50x24xf32" not in text
  got = np.asarray(f(table, ids))
  assert got.shape == (2, 3, 24) and got.dtype == np.float32
  np.testing.assert_array_equal(got, np.asarray(xla(table, ids)))
  bad = np.asarray(f(table, jnp.asarray([50, -51, 2], jnp.int32)))
  assert np.isnan(bad[:2]).all() and not np.isnan(bad[2]).any()
  np.testing.assert_array_equal(bad[2], np.asarray(table[2], np.float32))
  np.testing.assert_array_equal(jax.jit(jax.vmap(f, in_axes=(None, 0)))(table, ids),
                                np.asarray(xla(table, ids)))
  was = decode_ops.NATIVE_EMBED
  decode_ops.NATIVE_EMBED = False
  try:
    assert native.EMBED_ROWS_BF16 not in jax.jit(
        lambda t, i: decode_ops.embed_rows(t, i, xla)).lower(table, ids).as_text()
  finally:
    decode_ops.NATIVE_EMBED = was


@needs_compiler
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 9, 20, 32, 40])
@pytest.mark.parametrize("k", [101, 576])
def test_f32_next_panel_prefetch_does_not_change_results(rows, k):
  """The f32 path's L2 prefetch of the next panel (rows spread over the row
  groups; past the weights' end on the last panel) only moves data: results
  are bit-identical with it off, from 1 row, and at the default (4 rows)."""
  assert native.load(), native.status()
  rng = np.random.default_rng(rows + k)
  x = rng.standard_normal((rows, k)).astype(np.float32)
  w = rng.standard_normal((k, 1000)).astype(np.float32)
  wp = to_panels(jnp.asarray(w))
  f = jax.jit(lambda x, w: panel_matmul(x, w, 1000, use_native=True))
  was = native.set_f32_prefetch(0)
  try:
    ref = np.asarray(f(x, wp))
    for min_rows in (1, 4, 64):
      native.set_f32_prefetch(min_rows)
      np.testing.assert_array_equal(np.asarray(f(x, wp)), ref)
  finally:
    native.set_f32_prefetch(was)
  assert was == 4 and native.f32_prefetch_rows() == 4
  np.testing.assert_allclose(ref, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4 * np.sqrt(k))


@needs_compiler
@pytest.mark.parametrize("fmt", ["f32", "bf16", "bf16_no_amx", "int8"])
@pytest.mark.parametrize("k", [101, 576])
def test_rows_of_any_call_of_8_or_more_rows_are_bitwise_equal(fmt, k):
  """A call's last, partial row group sums as its full groups do, so the rows of
  a 9-31-row call are bitwise those rows of a 32-row call (what lets a server
  run the head or a K/V fill on a few of its slots, in buckets of 4 rows from
  8 on, and keep the full-pool call's values)."""
  from recursive_lm.kernels import panel as P
  assert native.load(), native.status()
  rng = np.random.default_rng(k)
  x = rng.standard_normal((32, k)).astype(np.float32)
  w = rng.standard_normal((k, 200)).astype(np.float32)
  scale = None
  if fmt == "f32":
    wp = to_panels(jnp.asarray(w))
  elif fmt.startswith("bf16"):
    wp = P.to_bf16_panels(w)
  else:
    wp, scale = P.to_int8_panels(w)
  f = jax.jit(lambda x: P.panel_matmul(x, wp, 200, use_native=True, scale=scale))
  amx_was = native.amx()
  if fmt == "bf16_no_amx":
    native.set_amx(False)
  try:
    full = np.asarray(f(x))
    for m in (8, 9, 12, 15, 20, 28, 31):
      np.testing.assert_array_equal(np.asarray(f(x[:m])), full[:m], err_msg=f"{m} rows")
  finally:
    native.set_amx(amx_was)

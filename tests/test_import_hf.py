"""Hugging Face folder importer: tiny random folders written with safetensors."""
import json

import ml_dtypes
import numpy as np
import pytest
import tokenizers
from safetensors.numpy import save_file

from recursive_lm.checkpoints import (
    CheckpointError, expected_shapes, load_checkpoint, load_hf_folder,
    read_safetensors, validate_weights)
from recursive_lm.checkpoints import hf_folder
from recursive_lm.config import ConfigError, tiny_config


def random_weights(config, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32)
          for k, s in expected_shapes(config).items()}


def write_folder(path, config=None, weights=None, *, shards=1, dtype=None,
                 hf_overrides=None, tokenizer=False):
  """Writes config.json + safetensors (single or sharded) into ``path``."""
  config = config or tiny_config()
  weights = random_weights(config) if weights is None else weights
  path.mkdir(parents=True, exist_ok=True)
  hf = config.to_hf_config()
  hf.update(hf_overrides or {})
  (path / "config.json").write_text(json.dumps(hf))
  stored = {k: (v.astype(dtype) if dtype is not None else v)
            for k, v in weights.items()}
  if shards == 1:
    save_file(stored, str(path / "model.safetensors"))
  else:
    names = sorted(stored)
    weight_map = {}
    for s in range(shards):
      file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
      part = {k: stored[k] for k in names[s::shards]}
      save_file(part, str(path / file))
      weight_map.update({k: file for k in part})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
  if tokenizer:
    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("a", "b")]))
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>"},
        "add_bos_token": True, "chat_template": "{{ messages[0]['content'] }}"}))
  return config, {k: np.asarray(v, np.float32) for k, v in stored.items()}


def assert_same(got, want):
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == np.float32, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_single_file_roundtrip(tmp_path):
  config, want = write_folder(tmp_path / "m", tokenizer=True)
  ck = load_hf_folder(tmp_path / "m")
  assert ck.config == config.replace(name="llama")
  assert ck.source == str(tmp_path / "m")
  assert_same(ck.weights, want)
  tok = ck.tokenizer
  assert tok.encode("abab") == [0, 4, 4] and tok.bos_id == 0 and tok.eos_id == 1
  assert tok.apply_chat_template([{"role": "user", "content": "yo"}]) == "yo"
  assert load_checkpoint(str(tmp_path / "m")).weights.keys() == want.keys()
  assert load_checkpoint(str(tmp_path / "m" / "config.json")).tokenizer is not None


def test_sharded_roundtrip(tmp_path):
  _, want = write_folder(tmp_path / "m", shards=3)
  assert len(list((tmp_path / "m").glob("*.safetensors"))) == 3
  ck = load_hf_folder(tmp_path / "m")
  assert_same(ck.weights, want)
  assert ck.tokenizer is None


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_kept_or_upcast(tmp_path, dtype):
  config = tiny_config()
  src = random_weights(config)
  _, want = write_folder(tmp_path / "m", config, src, dtype=dtype)
  ck = load_hf_folder(tmp_path / "m")
  assert set(ck.weights) == set(want)
  for k, w in ck.weights.items():  # stored dtype kept on the host
    assert w.dtype == np.dtype(dtype), k
    np.testing.assert_array_equal(w.astype(np.float32), want[k], err_msg=k)
  assert_same(load_hf_folder(tmp_path / "m", dtype=np.float32).weights, want)
  w = "model.layers.0.mlp.up_proj.weight"
  assert not np.array_equal(want[w], src[w])
  np.testing.assert_allclose(want[w], src[w], rtol=1e-2, atol=1e-2)


def test_bf16_read_by_library_and_cast_on_device(tmp_path):
  import jax
  from recursive_lm.checkpoints import weights_to_device
  a = np.random.default_rng(0).standard_normal((5, 7)).astype(ml_dtypes.bfloat16)
  save_file({"x": a, "y": a[:2].astype(np.float32)}, str(tmp_path / "t.safetensors"))
  assert not hasattr(hf_folder, "_read_raw")  # no hand parsing of the format
  got = read_safetensors(str(tmp_path / "t.safetensors"))
  assert list(got) == ["x", "y"] and got["x"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got["x"], a)
  assert read_safetensors(str(tmp_path / "t.safetensors"), np.float32)["x"].dtype == np.float32
  dev = weights_to_device(got, "float32")
  assert not got  # host arrays are released as they move
  assert isinstance(dev["x"], jax.Array) and dev["x"].dtype == np.float32
  np.testing.assert_array_equal(np.asarray(dev["x"]), a.astype(np.float32))
  assert weights_to_device({"x": a}, None)["x"].dtype == ml_dtypes.bfloat16


def test_non_float_tensors_rejected(tmp_path):
  save_file({"x": np.zeros(3, np.int32)}, str(tmp_path / "i.safetensors"))
  with pytest.raises(CheckpointError, match=r"non-float tensors \[x \(I32\)\]"):
    read_safetensors(str(tmp_path / "i.safetensors"))


def test_tied_checkpoint_with_redundant_lm_head(tmp_path):
  config = tiny_config(tie_embeddings=True)
  weights = random_weights(config)
  weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
  weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  write_folder(tmp_path / "m", config, weights)
  ck = load_hf_folder(tmp_path / "m")
  assert ck.config.tie_embeddings and "lm_head.weight" not in ck.weights
  validate_weights(ck.config, ck.weights)


def test_llamamodel_prefix_is_added(tmp_path):
  config = tiny_config()
  weights = random_weights(config)
  bare = {(k[len("model."):] if k.startswith("model.") else k): v
          for k, v in weights.items()}
  write_folder(tmp_path / "m", config, bare)
  assert_same(load_hf_folder(tmp_path / "m").weights, weights)


def test_missing_config(tmp_path):
  write_folder(tmp_path / "m")
  (tmp_path / "m" / "config.json").unlink()
  with pytest.raises(CheckpointError, match="config.json not found.*model.safetensors"):
    load_hf_folder(tmp_path / "m")


def test_corrupt_config_json(tmp_path):
  write_folder(tmp_path / "m")
  (tmp_path / "m" / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="not valid JSON"):
    load_hf_folder(tmp_path / "m")


def test_missing_weights(tmp_path):
  write_folder(tmp_path / "m")
  (tmp_path / "m" / "model.safetensors").unlink()
  (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"x")
  with pytest.raises(CheckpointError,
                     match="no weights found: expected model.safetensors.*"
                           "pytorch_model"):
    load_hf_folder(tmp_path / "m")


def test_missing_shard(tmp_path):
  write_folder(tmp_path / "m", shards=2)
  (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(CheckpointError, match="model-00002-of-00002"):
    load_hf_folder(tmp_path / "m")


def test_corrupt_safetensors(tmp_path):
  write_folder(tmp_path / "m")
  (tmp_path / "m" / "model.safetensors").write_bytes(b"\x07garbage bytes" * 50)
  with pytest.raises(CheckpointError,
                     match="model.safetensors: not a readable safetensors file"):
    load_hf_folder(tmp_path / "m")


def test_truncated_safetensors(tmp_path):
  write_folder(tmp_path / "m")
  f = tmp_path / "m" / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-1000])
  with pytest.raises(CheckpointError, match="not a readable safetensors"):
    load_hf_folder(tmp_path / "m")


def test_wrong_shape(tmp_path):
  config = tiny_config()
  weights = random_weights(config)
  weights["model.layers.2.mlp.down_proj.weight"] = np.zeros((32, 60), np.float32)
  write_folder(tmp_path / "m", config, weights)
  with pytest.raises(CheckpointError) as e:
    load_hf_folder(tmp_path / "m")
  msg = str(e.value)
  assert "'model.layers.2.mlp.down_proj.weight'" in msg
  assert "(32, 60)" in msg and "(32, 64)" in msg


def test_unsupported_model_type(tmp_path):
  write_folder(tmp_path / "m", hf_overrides={"model_type": "gpt2",
                                             "architectures": ["GPT2LMHeadModel"]})
  with pytest.raises(ConfigError, match="'gpt2'"):
    load_hf_folder(tmp_path / "m")


def test_untied_without_lm_head(tmp_path):
  config = tiny_config(tie_embeddings=False)
  weights = random_weights(config)
  del weights["lm_head.weight"]
  write_folder(tmp_path / "m", config, weights)
  with pytest.raises(CheckpointError, match="lm_head.weight.*tie_embeddings=False"):
    load_hf_folder(tmp_path / "m")


def test_validate_weights_lists_are_truncated():
  config = tiny_config()
  weights = random_weights(config)
  for i in range(20):
    weights[f"extra.{i:02d}"] = np.zeros(1, np.float32)
  for k in [k for k in weights if k.startswith("model.layers.3.")]:
    del weights[k]
  with pytest.raises(CheckpointError) as e:
    validate_weights(config, weights)
  msg = str(e.value)
  assert "missing 9 tensors" in msg and "20 unexpected tensors" in msg
  assert "(+12 more)" in msg and "extra.19" not in msg
  assert isinstance(e.value, ConfigError)


def test_bad_spec(tmp_path):
  with pytest.raises(CheckpointError, match="not a preset"):
    load_checkpoint(str(tmp_path / "nothing-here"))
  with pytest.raises(CheckpointError, match="is not a folder"):
    load_hf_folder(tmp_path / "nothing-here")

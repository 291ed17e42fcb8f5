"""save_model/load_model round trip and the unrolled Hugging Face export."""
import functools
import json
import os
import pathlib

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from recursive_lm.checkpoints import CheckpointError, load_checkpoint
from recursive_lm.config import ConfigError, DepthPlan
from recursive_lm.export import (
    CONFIG_FILE, PARAMS_FILE, export_unrolled_hf, load_model, save_model)
from recursive_lm.nn import weights as W
from recursive_lm.nn.model import Transformer
from recursive_lm.recursive import convert
from recursive_lm.tokenizer import Tokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TOKENS = np.random.default_rng(1).integers(0, 97, (2, 10)).astype(np.int32)


def _logits(cfg, params, tokens=TOKENS):
  with jax.disable_jit():  # tiny model: eager is faster than compiling per config
    return np.asarray(Transformer(cfg).apply({"params": params}, tokens)["logits"])


@functools.lru_cache(maxsize=None)
def _recursive(sharing="middle_cycle", fixture="tiny_llama"):
  """A fixture converted to a 2-loop model with non-trivial rank-4 LoRA
  (tiny_llama: untied head; tiny_llama3_rope: tied, llama3 RoPE scaling)."""
  ck = load_checkpoint(str(FIXTURES / fixture))
  return convert(ck.config, ck.weights, 2, sharing, "average", lora_ranks=4)


def _tokenizer():
  vocab = {f"w{i}": i for i in range(97)}
  vocab["<unk>"] = 96
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return Tokenizer(tok, bos_id=0, eos_id=1, unk_id=96)


def test_save_load_round_trip(tmp_path):
  cfg, params = _recursive()
  assert cfg.plan == DepthPlan(1, 1, 2, 1) and cfg.lora
  save_model(tmp_path / "m", cfg, params, tokenizer=_tokenizer())
  assert sorted(os.listdir(tmp_path / "m")) == [
      PARAMS_FILE, CONFIG_FILE, "tokenizer.json", "tokenizer_config.json"]
  cfg2, params2, tok2 = load_model(tmp_path / "m")
  assert cfg2 == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
  np.testing.assert_array_equal(_logits(cfg2, params2), _logits(cfg, params))
  assert tok2.encode("w5 w7 w96") == [5, 7, 96] and tok2.eos_id == 1


def test_save_load_keeps_bfloat16(tmp_path):
  cfg, params = _recursive()
  cfg = cfg.replace(param_dtype="bfloat16")
  bf = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16),
                              params)
  save_model(tmp_path, cfg, bf)
  m = load_model(tmp_path)
  assert m.tokenizer is None
  assert {str(x.dtype) for x in jax.tree_util.tree_leaves(m.params)} == {"bfloat16"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, m.params, bf)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama3_rope"])
def test_unrolled_export_loads_with_load_checkpoint(tmp_path, fixture):
  cfg, params = _recursive(fixture=fixture)
  want = _logits(cfg, params)
  export_unrolled_hf(tmp_path, cfg, params, tokenizer=_tokenizer())
  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf["num_hidden_layers"] == cfg.plan.effective_depth == 4
  ck = load_checkpoint(str(tmp_path))
  assert ck.config.plan == DepthPlan.vanilla(4) and ck.tokenizer is not None
  assert (ck.config.rope.scaling, ck.config.rope.theta, ck.config.tie_embeddings) == (
      cfg.rope.scaling, cfg.rope.theta, cfg.tie_embeddings)
  got = _logits(ck.config, W.params_from_hf(ck.config, ck.weights))
  np.testing.assert_allclose(got, want, atol=1e-5)


def _peer(name):
  """``name`` imported; skipped when missing, except under RLM_REQUIRE_PEER=1 (CI)."""
  if os.environ.get("RLM_REQUIRE_PEER") == "1":
    import importlib
    try:
      return importlib.import_module(name)
    except ImportError:
      pytest.fail(f"{name} is not installed but RLM_REQUIRE_PEER=1: install the peer "
                  "extra (pip install -e '.[peer]')")
  return pytest.importorskip(name)


def _bf16_params(params):
  """``params`` rounded to bfloat16 and back (what a bf16 export stores, exactly)."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x).astype(jax.numpy.bfloat16).astype(np.float32), params)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama3_rope"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unrolled_export_matches_transformers(tmp_path, fixture, dtype):
  torch = _peer("torch")
  transformers = _peer("transformers")
  cfg, params = _recursive("cycle", fixture)
  assert cfg.plan == DepthPlan(0, 2, 2, 0)
  # bf16 export: LoRA is merged in f32, then each unrolled tensor is rounded.
  export_unrolled_hf(tmp_path, cfg, params, dtype=dtype, max_shard_bytes=40_000)
  assert (tmp_path / "model.safetensors.index.json").exists()  # sharded
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == dtype
  ck = load_checkpoint(str(tmp_path))
  if dtype == "float32":
    want = _logits(cfg, params)
  else:
    assert {str(w.dtype) for w in ck.weights.values()} == {"bfloat16"}
    hf32 = {k: w.astype(np.float32) for k, w in W.hf_from_params(cfg, params).items()}
    rounded = {k: w.astype(jax.numpy.bfloat16).astype(np.float32) for k, w in hf32.items()}
    for k, w in ck.weights.items():
      np.testing.assert_array_equal(np.asarray(w, np.float32), rounded[k], err_msg=k)
    want = _logits(ck.config, W.params_from_hf(ck.config, rounded))
  ours = _logits(ck.config, W.params_from_hf(ck.config, ck.weights))
  np.testing.assert_allclose(ours, want, atol=1e-5)
  tokens = torch.as_tensor(TOKENS, dtype=torch.long)
  model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  with torch.no_grad():
    got = model.eval()(tokens).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
  if dtype == "bfloat16":
    # transformers computing in bf16 (its dtype="auto" reads torch_dtype) stays
    # within bf16 rounding of the f32 logits.
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype="auto")
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
      got16 = model.eval()(tokens).logits.float().numpy()
    scale = np.abs(want).max()
    assert np.abs(got16 - want).max() < 0.05 * scale
    assert (got16.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_export_dtype_errors(tmp_path):
  cfg, params = _recursive()
  with pytest.raises(CheckpointError, match="export dtype 'float16' is not supported"):
    export_unrolled_hf(tmp_path / "x", cfg, params, dtype="float16")
  assert not (tmp_path / "x").exists()


def test_load_model_errors(tmp_path):
  cfg, params = _recursive()
  with pytest.raises(CheckpointError, match="not a folder"):
    load_model(tmp_path / "nope")
  folder = tmp_path / "m"
  save_model(folder, cfg, params)
  (folder / PARAMS_FILE).rename(tmp_path / "params.bak")
  with pytest.raises(CheckpointError, match=f"{PARAMS_FILE} not found"):
    load_model(folder)
  (tmp_path / "params.bak").rename(folder / PARAMS_FILE)

  good_cfg = (folder / CONFIG_FILE).read_text()
  (folder / CONFIG_FILE).write_text(good_cfg[:40])
  with pytest.raises(CheckpointError, match="not valid JSON"):
    load_model(folder)
  (folder / CONFIG_FILE).write_text(json.dumps({"vocab_size": 3}))
  with pytest.raises(CheckpointError, match="does not describe a ModelConfig"):
    load_model(folder)
  d = json.loads(good_cfg)
  d["plan"]["loops"] = 3                      # LoRA stacks hold 2 loops
  (folder / CONFIG_FILE).write_text(json.dumps(d))
  with pytest.raises(CheckpointError, match=r"(?s)lora/layer_0_down_a: shape \(2, 64, 4\) but the config expects "
                     r"\(3, 64, 4\).*\+6 more"):
    load_model(folder)
  (folder / CONFIG_FILE).write_text(good_cfg)

  data = (folder / PARAMS_FILE).read_bytes()
  (folder / PARAMS_FILE).write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="not a readable safetensors"):
    load_model(folder)
  assert issubclass(CheckpointError, ConfigError)


def test_save_rejects_mismatched_params(tmp_path):
  cfg, params = _recursive()
  bad = dict(params)
  bad.pop("coda_0")
  with pytest.raises(CheckpointError, match=r"missing \d+ tensors \[coda_0/"):
    save_model(tmp_path / "a", cfg, bad)
  with pytest.raises(CheckpointError, match="lora"):
    export_unrolled_hf(tmp_path / "b", cfg.replace(lora_ranks=()), params)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  export_unrolled_hf(tmp_path / "hf", cfg, params)
  with pytest.raises(CheckpointError, match="load_checkpoint"):
    load_model(tmp_path / "hf")

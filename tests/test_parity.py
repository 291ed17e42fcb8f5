"""Parity with Hugging Face transformers, through committed reference fixtures.

The fixtures come from tests/fixtures/make_reference.py (the only place torch is
used); these tests need neither torch nor transformers.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.checkpoints import load_checkpoint
from recursive_lm.decode.engine import Engine
from recursive_lm.nn.model import Transformer
from recursive_lm.nn.weights import params_from_hf

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def _load(name):
  ck = load_checkpoint(os.path.join(FIX, name))
  return ck, params_from_hf(ck.config, ck.weights)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_llama3_rope"])
def test_tiny_logits_match_transformers(name):
  ck, params = _load(name)
  ref = np.load(os.path.join(FIX, f"{name}_reference.npz"))
  logits = Transformer(ck.config).apply({"params": params},
                                         jnp.asarray(ref["input_ids"]))["logits"]
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=2e-4, rtol=1e-4)


def test_tiny_greedy_matches_transformers():
  ck, params = _load("tiny_llama")
  ref = np.load(os.path.join(FIX, "tiny_llama_reference.npz"))
  eng = Engine(ck.config.replace(eos_id=None), params)
  out = eng.generate(ref["input_ids"].tolist(), max_new_tokens=20, stop_at_eos=False)
  assert out.tokens == ref["greedy"].tolist()


@pytest.fixture(scope="module")
def smollm2():
  ck = load_checkpoint("smollm2-135m")
  return ck, Engine(ck.config, params_from_hf(ck.config, ck.weights))


@pytest.mark.slow
def test_smollm2_logits_greedy_and_perplexity(smollm2):
  ck, eng = smollm2
  ref = np.load(os.path.join(FIX, "smollm2_reference.npz"))
  meta = json.load(open(os.path.join(FIX, "smollm2_reference.json")))
  tok = ck.tokenizer
  assert tok.encode(meta["prompt"]["text"]) == ref["prompt_ids"].tolist()
  logits = Transformer(ck.config).apply({"params": eng.params},
                                         jnp.asarray(ref["prompt_ids"][None]))["logits"]
  np.testing.assert_allclose(np.asarray(logits[0]), ref["logits"], atol=1e-3, rtol=0)
  assert int(np.argmax(logits[0, -1])) == 11452  # " Berlin"
  for ids, greedy in (("prompt_ids", "prompt_greedy"), ("chat_ids", "chat_greedy")):
    out = eng.generate([ref[ids].tolist()], max_new_tokens=64, stop_at_eos=False)
    assert out.tokens[0] == ref[greedy].tolist(), ids
  nll = eng.token_nll(ref["paragraph_ids"].tolist())
  ppl, ref_ppl = float(np.exp(nll.mean())), float(ref["paragraph_ppl"])
  assert abs(ppl / ref_ppl - 1) < 1e-3, (ppl, ref_ppl)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
  ck, _ = smollm2
  meta = json.load(open(os.path.join(FIX, "smollm2_reference.json")))
  for item in meta["tokenizer"]["sentences"]:
    assert ck.tokenizer.encode(item["text"]) == item["ids"], item["text"]
    assert ck.tokenizer.decode(item["ids"]) == item["text"]

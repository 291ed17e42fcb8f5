"""Tokenizer wrapper: tokenizer.json round trips, BOS handling, chat templates."""
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from recursive_lm.config import ConfigError
from recursive_lm.tokenizer import Tokenizer, TokenizerError

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["hello world, hello there", "the cat sat on the mat 12345",
          "def f(x):\n    return x + 1", "naïve café 日本 😀"] * 20
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != "
          "'system' %}{{ '<|im_start|>system\\nYou are helpful<|im_end|>\\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXTS = ["hello world", "the  cat\tsat\n\non 12345 mats", "naïve café 日本 😀!",
         "<|im_start|>user\nhi<|im_end|>", ""]


def train_bpe(post_bos=False):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  if post_bos:
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
  return tok


def write(tmp_path, cfg=None, post_bos=False, jinja=None):
  tmp_path.mkdir(parents=True, exist_ok=True)
  train_bpe(post_bos).save(str(tmp_path / "tokenizer.json"))
  if cfg is not None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
  if jinja is not None:
    (tmp_path / "chat_template.jinja").write_text(jinja)
  return (str(tmp_path / "tokenizer.json"), str(tmp_path / "tokenizer_config.json"))


VOCAB = train_bpe().get_vocab_size()
BASE_CFG = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
            "pad_token": "<|endoftext|>", "add_bos_token": False,
            "chat_template": CHATML}


def test_roundtrip_and_specials(tmp_path):
  tok = Tokenizer.from_file(*write(tmp_path, BASE_CFG))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
  assert tok.vocab_size == VOCAB and tok.special_tokens == SPECIAL
  for text in TEXTS:
    assert tok.decode(tok.encode(text)) == text
  ids = tok.encode(TEXTS[3])
  assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1
  assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
  assert tok.decode(np.array(ids, dtype=np.int32)) == TEXTS[3]
  assert tok.encode("hello")[0] != 1
  assert tok.encode("hello", add_bos=True) == [1] + tok.encode("hello")
  assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
  assert tok.encode_batch(TEXTS, add_bos=True)[0][0] == 1
  assert tok.id_to_token(tok.token_to_id("<|im_end|>")) == "<|im_end|>"
  assert f"vocab_size={VOCAB}" in repr(tok)


def test_add_bos_from_config_and_from_post_processor(tmp_path):
  tok = Tokenizer.from_file(*write(tmp_path / "a", dict(BASE_CFG, add_bos_token=True)))
  assert tok.add_bos and tok.encode("hello")[0] == 1
  assert tok.encode("hello", add_bos=False)[0] != 1
  cfg = {k: v for k, v in BASE_CFG.items() if k != "add_bos_token"}
  inferred = Tokenizer.from_file(*write(tmp_path / "b", cfg, post_bos=True))
  assert inferred.add_bos
  assert inferred.encode("hello").count(1) == 1  # Not doubled.
  plain = Tokenizer.from_file(*write(tmp_path / "c", cfg))
  assert not plain.add_bos


def test_without_config(tmp_path):
  tok = Tokenizer.from_file(write(tmp_path)[0])
  assert tok.bos_id is None and tok.chat_template is None and not tok.add_bos
  with pytest.raises(TokenizerError, match="no BOS"):
    tok.encode("x", add_bos=True)
  with_defaults = Tokenizer.from_file(write(tmp_path)[0],
                                      defaults={"bos_id": 1, "eos_id": 2})
  assert (with_defaults.bos_id, with_defaults.eos_id) == (1, 2)


def test_chat_template(tmp_path):
  tok = Tokenizer.from_file(*write(tmp_path, BASE_CFG))
  msgs = [{"role": "user", "content": "hi"}]
  assert tok.apply_chat_template(msgs) == (
      "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nhi"
      "<|im_end|>\n<|im_start|>assistant\n")
  sys_msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
              {"role": "assistant", "content": "a"}]
  assert tok.apply_chat_template(sys_msgs, add_generation_prompt=False) == (
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n"
      "<|im_start|>assistant\na<|im_end|>\n")
  ids = tok.encode(tok.apply_chat_template(msgs))
  assert ids.count(1) == 3 and ids.count(2) == 2
  # Template globals: bos_token, raise_exception, tojson; per-call override.
  assert tok.apply_chat_template(msgs, chat_template="{{ bos_token }}|"
                                 "{{ messages | tojson }}") == (
      '<|im_start|>|[{"role": "user", "content": "hi"}]')
  with pytest.raises(TokenizerError, match="only users"):
    tok.apply_chat_template(msgs, chat_template="{{ raise_exception('only users') }}")
  with pytest.raises(TokenizerError, match="does not compile"):
    tok.apply_chat_template(msgs, chat_template="{% for %}")


def test_template_list_form_and_jinja_file(tmp_path):
  cfg = dict(BASE_CFG, chat_template=[{"name": "tool_use", "template": "T"},
                                      {"name": "default", "template": "D"}])
  assert Tokenizer.from_file(*write(tmp_path / "a", cfg)).chat_template == "D"
  cfg = {k: v for k, v in BASE_CFG.items() if k != "chat_template"}
  tok = Tokenizer.from_file(*write(tmp_path / "b", cfg, jinja="J{{ 1 + 1 }}"))
  assert tok.apply_chat_template([]) == "J2"


def test_missing_template(tmp_path):
  cfg = {k: v for k, v in BASE_CFG.items() if k != "chat_template"}
  tok = Tokenizer.from_file(*write(tmp_path, cfg))
  with pytest.raises(TokenizerError, match="no chat template") as e:
    tok.apply_chat_template([{"role": "user", "content": "hi"}])
  assert isinstance(e.value, ConfigError)


def test_save_roundtrip(tmp_path):
  cfg = dict(BASE_CFG, add_bos_token=True)
  tok = Tokenizer.from_file(*write(tmp_path / "src", cfg))
  tok.save(tmp_path / "out")
  again = Tokenizer.from_file(tmp_path / "out" / "tokenizer.json",
                              tmp_path / "out" / "tokenizer_config.json")
  assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (1, 2, 0, True)
  assert again.chat_template == CHATML
  assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def test_gguf_metadata_tokenizer():
  base = train_bpe()
  vocab = base.get_vocab()
  tokens = sorted(vocab, key=vocab.get)
  merges = json.loads(base.to_str())["model"]["merges"]
  merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
  meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
          "tokenizer.ggml.token_type": [3 if t in SPECIAL else 1 for t in tokens],
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.chat_template": CHATML}
  tok = Tokenizer.from_gguf_metadata(meta)
  assert tok.vocab_size == VOCAB and tok.special_tokens == SPECIAL
  for text in TEXTS:
    assert tok.decode(tok.encode(text)) == text
  # Same ids as the trained tokenizer except that digits are always split.
  assert tok.encode("hello world") == base.encode("hello world").ids
  assert [tok.id_to_token(i) for i in tok.encode("12345")] == list("12345")
  assert len(base.encode("12345").ids) < 5


def test_gguf_metadata_errors():
  with pytest.raises(TokenizerError, match="'llama' is not supported"):
    Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama"})
  with pytest.raises(TokenizerError, match="no tokenizer.ggml.tokens"):
    Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})


def test_corrupt_files(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{broken")
  with pytest.raises(TokenizerError, match="cannot load tokenizer"):
    Tokenizer.from_file(tmp_path / "tokenizer.json")
  write(tmp_path / "ok")
  (tmp_path / "ok" / "tokenizer_config.json").write_text("nope")
  with pytest.raises(TokenizerError, match="not valid JSON"):
    Tokenizer.from_file(tmp_path / "ok" / "tokenizer.json",
                        tmp_path / "ok" / "tokenizer_config.json")

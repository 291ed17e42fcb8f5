"""Tokenizer: a thin wrapper over a Hugging Face ``tokenizers.Tokenizer``.

Built either from a ``tokenizer.json`` (+ optional ``tokenizer_config.json``)
or from the ``tokenizer.ggml.*`` metadata of a GGUF file. The wrapper knows
the checkpoint's special ids, whether BOS is prepended, and its chat template
(rendered with jinja2 the way ``transformers`` does).
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from recursive_lm.config import ConfigError

# GGUF token types (gguf.TokenType).
_CONTROL = 3
_USER_DEFINED = 4
# Llama-3 ("llama-bpe") pre-tokenizer regex, as in its tokenizer.json.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
    r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class TokenizerError(ConfigError):
  """A tokenizer cannot be built or used as asked."""


def _token_str(tok: Any) -> str | None:
  """``tokenizer_config.json`` tokens are strings or AddedToken dicts."""
  if isinstance(tok, Mapping):
    return tok.get("content")
  return tok if isinstance(tok, str) else None


def _pick_template(tpl: Any) -> str | None:
  """Chat templates are a string or a list of {name, template} dicts."""
  if tpl is None or isinstance(tpl, str):
    return tpl
  if isinstance(tpl, (list, tuple)):
    named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, Mapping)}
    return named.get("default") or next(iter(named.values()), None)
  return None


class Tokenizer:
  """Encodes/decodes text and renders chat prompts for one checkpoint."""

  def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int | None = None,
               eos_id: int | None = None, pad_id: int | None = None,
               unk_id: int | None = None, add_bos: bool = False,
               chat_template: str | None = None, vocab_size: int | None = None):
    """Wraps ``tok``.

    Args:
      tok: the underlying ``tokenizers.Tokenizer``.
      bos_id, eos_id, pad_id, unk_id: special ids (None when unknown).
      add_bos: whether ``encode`` prepends BOS by default.
      chat_template: jinja2 chat template, or None.
      vocab_size: the model's vocabulary size when it differs from ``tok``'s.
    """
    self._tok = tok
    self._bos_id, self._eos_id, self._pad_id, self._unk_id = (
        bos_id, eos_id, pad_id, unk_id)
    self.add_bos = bool(add_bos)
    self._chat_template = chat_template
    self._compiled = None
    self._vocab_size = vocab_size

  # --- constructors ----------------------------------------------------------
  @classmethod
  def from_file(cls, tokenizer_json: str | os.PathLike,
                tokenizer_config: str | os.PathLike | None = None, *,
                defaults: Mapping[str, Any] | None = None) -> "Tokenizer":
    """Loads a Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``).

    Args:
      tokenizer_json: path of ``tokenizer.json``.
      tokenizer_config: optional path of ``tokenizer_config.json``; a
        ``chat_template.jinja`` beside it is used when the config has none.
      defaults: fallback ``bos_id``/``eos_id``/``pad_id`` (e.g. from config.json).
    """
    path = os.fspath(tokenizer_json)
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception subclasses.
      raise TokenizerError(f"{path}: cannot load tokenizer ({e})") from e
    cfg: dict[str, Any] = {}
    if tokenizer_config is not None and os.path.exists(tokenizer_config):
      try:
        with open(tokenizer_config, encoding="utf-8") as f:
          cfg = json.load(f)
      except json.JSONDecodeError as e:
        raise TokenizerError(f"{tokenizer_config} is not valid JSON ({e})") from e
    template = _pick_template(cfg.get("chat_template"))
    folder = os.path.dirname(os.fspath(tokenizer_config or path))
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.exists(jinja_file):
      with open(jinja_file, encoding="utf-8") as f:
        template = f.read()
    defaults = dict(defaults or {})

    def _id(key: str) -> int | None:
      name = _token_str(cfg.get(f"{key}_token"))
      tid = tok.token_to_id(name) if name is not None else None
      return tid if tid is not None else defaults.get(f"{key}_id")

    bos_id = _id("bos")
    if "add_bos_token" in cfg:
      add_bos = bool(cfg["add_bos_token"])
    else:  # Infer from the post-processor (Llama-style TemplateProcessing).
      with_sp = tok.encode("a", add_special_tokens=True).ids
      add_bos = (bos_id is not None and len(with_sp) > 0 and with_sp[0] == bos_id
                 and with_sp != tok.encode("a", add_special_tokens=False).ids)
    return cls(tok, bos_id=bos_id, eos_id=_id("eos"), pad_id=_id("pad"),
               unk_id=_id("unk"), add_bos=add_bos, chat_template=template)

  @classmethod
  def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
    """Builds the tokenizer from decoded GGUF ``tokenizer.*`` metadata.

    Args:
      meta: key -> Python value (strings, ints, lists) for the GGUF keys
        ``tokenizer.ggml.{model,pre,tokens,token_type,merges,bos_token_id,
        eos_token_id,padding_token_id,unknown_token_id,add_bos_token}`` and
        ``tokenizer.chat_template``.

    Raises:
      TokenizerError: for tokenizer models other than byte-level BPE ("gpt2").
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
      raise TokenizerError(
          f"GGUF tokenizer model {kind!r} is not supported; recursive_lm builds "
          "byte-level BPE tokenizers (tokenizer.ggml.model='gpt2') only. Use the "
          "Hugging Face folder's tokenizer.json instead.")
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    merges = meta.get("tokenizer.ggml.merges") or []
    if not tokens:
      raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
      vocab.setdefault(t, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    pre = meta.get("tokenizer.ggml.pre") or "default"
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                     byte_fallback=False, ignore_merges=(pre == "llama-bpe"))
    tok = tokenizers.Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # llama.cpp: \p{N} split first, then the GPT-2 regex.
      tok.pre_tokenizer = pre_tokenizers.Sequence(
          [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "llama-bpe":
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_PATTERN), "isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
      tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [tokenizers.AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [tokenizers.AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if special:
      tok.add_special_tokens(special)
    if user:
      tok.add_tokens(user)

    def _id(key: str) -> int | None:
      v = meta.get(f"tokenizer.ggml.{key}")
      return None if v is None else int(v)

    return cls(tok, bos_id=_id("bos_token_id"), eos_id=_id("eos_token_id"),
               pad_id=_id("padding_token_id"), unk_id=_id("unknown_token_id"),
               add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
               chat_template=meta.get("tokenizer.chat_template"),
               vocab_size=len(tokens))

  def save(self, folder: str | os.PathLike) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    self._tok.save(os.path.join(folder, "tokenizer.json"))
    cfg: dict[str, Any] = {"add_bos_token": self.add_bos,
                           "tokenizer_class": "PreTrainedTokenizerFast"}
    for key, tid in (("bos", self._bos_id), ("eos", self._eos_id),
                     ("pad", self._pad_id), ("unk", self._unk_id)):
      if tid is not None:
        cfg[f"{key}_token"] = self._tok.id_to_token(tid)
    if self._chat_template is not None:
      cfg["chat_template"] = self._chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w",
              encoding="utf-8") as f:
      json.dump(cfg, f, indent=2, ensure_ascii=False)

  # --- properties ------------------------------------------------------------
  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The wrapped ``tokenizers.Tokenizer``."""
    return self._tok

  @property
  def vocab_size(self) -> int:
    n = self._tok.get_vocab_size(with_added_tokens=True)
    return max(n, self._vocab_size or 0)

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int | None:
    return self._eos_id

  @property
  def pad_id(self) -> int | None:
    return self._pad_id

  @property
  def unk_id(self) -> int | None:
    return self._unk_id

  @property
  def chat_template(self) -> str | None:
    return self._chat_template

  @property
  def special_tokens(self) -> list[str]:
    """Contents of the added tokens marked special, in id order."""
    dec = self._tok.get_added_tokens_decoder()
    return [dec[i].content for i in sorted(dec) if dec[i].special]

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, tid: int) -> str | None:
    return self._tok.id_to_token(int(tid))

  # --- encode / decode -------------------------------------------------------
  def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
    add = self.add_bos if add_bos is None else add_bos
    if add:
      if self._bos_id is None:
        raise TokenizerError("add_bos=True but this tokenizer has no BOS token")
      return [self._bos_id] + ids
    return ids

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of ``text``; special tokens in the text become single ids.

    Args:
      text: the text.
      add_bos: prepend BOS; None uses the checkpoint's default (``add_bos``).
    """
    return self._with_bos(self._tok.encode(text, add_special_tokens=False).ids,
                          add_bos)

  def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None
                   ) -> list[list[int]]:
    """``encode`` for many texts (parallel in the Rust backend)."""
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [self._with_bos(e.ids, add_bos) for e in encs]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of ``ids`` (a list, tuple or 1-D integer array)."""
    return self._tok.decode([int(i) for i in ids],
                            skip_special_tokens=skip_special_tokens)

  # --- chat --------------------------------------------------------------------
  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True, *,
                          chat_template: str | None = None, **kwargs) -> str:
    """Renders ``messages`` ([{"role", "content"}, ...]) into a prompt string.

    Rendered like ``transformers`` does: sandboxed jinja2 with
    ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson`` and
    ``strftime_now``; ``bos_token``/``eos_token`` are available to the template.

    Raises:
      TokenizerError: when there is no chat template or the template fails.
    """
    template = chat_template or self._chat_template
    if not template:
      raise TokenizerError(
          "this tokenizer has no chat template (the checkpoint ships none); pass "
          "chat_template=... or format the prompt yourself")
    import jinja2
    from jinja2 import sandbox

    def _raise(msg):
      raise jinja2.exceptions.TemplateError(msg)

    def _tojson(x, ensure_ascii=False, indent=None, separators=None,
                sort_keys=False):
      return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                        separators=separators, sort_keys=sort_keys)

    if chat_template is None and self._compiled is not None:
      compiled = self._compiled
    else:
      env = sandbox.ImmutableSandboxedEnvironment(
          trim_blocks=True, lstrip_blocks=True,
          extensions=["jinja2.ext.loopcontrols"])
      env.filters["tojson"] = _tojson
      env.globals["raise_exception"] = _raise
      env.globals["strftime_now"] = (
          lambda fmt: datetime.datetime.now().strftime(fmt))
      try:
        compiled = env.from_string(template)
      except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from e
      if chat_template is None:
        self._compiled = compiled
    tok = lambda i: self._tok.id_to_token(i) if i is not None else None  # noqa: E731
    ctx = dict(bos_token=tok(self._bos_id), eos_token=tok(self._eos_id),
               pad_token=tok(self._pad_id))
    ctx.update(kwargs)
    try:
      return compiled.render(messages=list(messages),
                             add_generation_prompt=add_generation_prompt, **ctx)
    except jinja2.exceptions.TemplateError as e:
      raise TokenizerError(f"chat template failed to render: {e}") from e

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, add_bos={self.add_bos}, "
            f"chat_template={'yes' if self.chat_template else 'no'})")

"""A byte-level tokenizer for the tiny random test models (vocab 97 of ``tiny_config``).

Imported by the test modules (pytest puts ``tests/`` on ``sys.path``).
"""


class ToyTokenizer:
  """Byte-level: UTF-8 byte b -> id b % 95 + 2; id 1 is EOS."""
  eos_id = 1

  def encode(self, text, add_bos=None):
    del add_bos
    return [b % 95 + 2 for b in text.encode("utf-8")]

  def decode(self, ids, skip_special_tokens=False):
    del skip_special_tokens
    return "".join(chr(32 + (i - 2) % 95) for i in ids)

  def apply_chat_template(self, messages):
    return "<user>" + messages[0]["content"] + "<assistant>"

"""Tests for recursive_lm.data (sources, pydoc TFDS builder, grain pipeline)."""

from __future__ import annotations

import collections
import json
import os
import sys
import time

import numpy as np
import pytest

from recursive_lm import data as D
from recursive_lm.data import pydoc_corpus

EOS = 1


def encode(s: str) -> list[int]:
  return [ord(c) % 250 + 3 for c in s]


def toy_docs(n: int = 23) -> list[str]:
  # Varied lengths, including documents longer than the test seq_len (16).
  return [f"d{i}:" + "abcdefghij"[: i % 10] * (1 + i % 5) for i in range(n)]


def doc_tokens(text: str) -> tuple[int, ...]:
  return tuple(encode(text) + [EOS])


def rows(batches):
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      yield {k: b[k][r] for k in D.BATCH_KEYS}


def stream(batches) -> dict[str, np.ndarray]:
  """Concatenation of all non-padding tokens, in order."""
  out = collections.defaultdict(list)
  for row in rows(batches):
    keep = row["segment_ids"] > 0
    for k in D.BATCH_KEYS:
      out[k].append(row[k][keep])
  return {k: np.concatenate(v) for k, v in out.items()}


def split_docs(inputs: np.ndarray) -> list[tuple[int, ...]]:
  """Splits a token stream after every EOS into documents."""
  docs, cur = [], []
  for t in inputs.tolist():
    cur.append(t)
    if t == EOS:
      docs.append(tuple(cur))
      cur = []
  assert not cur, "stream must end with EOS"
  return docs


# ---------------------------------------------------------------------------
# pydoc corpus (TFDS builder, TF-free).


@pytest.fixture(scope="module")
def pydoc_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  pydoc_corpus.build_pydoc_corpus(data_dir)
  return data_dir


def test_pydoc_builder_reads_back_via_tfds(pydoc_dir):
  import tensorflow_datasets as tfds

  keys = {}
  for split in ("train", "validation"):
    src = tfds.data_source("pydoc_corpus", split=split, data_dir=pydoc_dir)
    assert len(src) > 0
    rec = src[0]
    assert isinstance(rec["text"], bytes) and rec["text"].strip()
    keys[split] = {src[i]["key"].decode() for i in range(len(src))}
    assert len(keys[split]) == len(src)
  assert not keys["train"] & keys["validation"]
  expected = {k for k, _ in pydoc_corpus.corpus_documents()}
  assert keys["train"] | keys["validation"] == expected
  assert all(D.is_validation_key(k) for k in keys["validation"])
  frac = len(keys["validation"]) / len(expected)
  assert 0.02 < frac < 0.12, frac
  assert any(k.startswith("topic/") for k in expected)
  assert any(k.startswith("module/") for k in expected)
  assert "tensorflow" not in sys.modules  # Built and read without TF.


def test_pydoc_builder_cached_and_make_source(pydoc_dir):
  info = next(pydoc_dir.rglob("dataset_info.json"))
  mtime = info.stat().st_mtime_ns
  t0 = time.perf_counter()
  builder = pydoc_corpus.build_pydoc_corpus(pydoc_dir)
  assert time.perf_counter() - t0 < 1.0
  assert info.stat().st_mtime_ns == mtime  # Not rebuilt.
  assert len(builder.as_data_source("train")) > 100
  train = D.make_source("pydoc", "train", data_dir=pydoc_dir)
  val = D.make_source(None, "validation", data_dir=pydoc_dir)
  assert isinstance(train[0], str) and isinstance(val[0], str)
  assert set(train[:]).isdisjoint(set(val[:]))
  # Same data through the generic TFDS scheme.
  via_tfds = D.make_source("tfds:pydoc_corpus", "validation",
                           data_dir=pydoc_dir)
  assert sorted(via_tfds[:]) == sorted(val[:])
  stats = pydoc_corpus.corpus_stats(pydoc_dir)
  assert stats["train"]["documents"] == len(train)
  assert stats["train"]["characters"] == sum(map(len, train[:]))


def test_tfds_spec_errors(pydoc_dir, tmp_path):
  with pytest.raises(KeyError, match=r"features found: \['key', 'text'\]"):
    D.make_source("tfds:pydoc_corpus:body", "train", data_dir=pydoc_dir)
  with pytest.raises(ValueError, match="Available splits"):
    D.make_source("tfds:pydoc_corpus", "test", data_dir=pydoc_dir)
  with pytest.raises(ValueError, match="not prepared|Cannot open"):
    D.make_source("tfds:mnist", "train", data_dir=tmp_path)
  with pytest.raises(ValueError, match="Cannot open|not prepared"):
    D.make_source("tfds:no_such_dataset_xyz", "train", data_dir=tmp_path)


# ---------------------------------------------------------------------------
# Packing.


def test_tokenize_document_targets():
  d = D.tokenize_document("abc", encode, EOS)
  assert d["inputs"].tolist() == encode("abc") + [EOS]
  assert d["targets"].tolist() == encode("bc") + [EOS, 0]
  assert d["loss_mask"].tolist() == [1, 1, 1, 0]


def test_packing_layout_and_coverage():
  docs = toy_docs() + ["L" * 50]  # One doc spans >= 4 rows of 16.
  seq_len, bs = 16, 3
  batches = list(D.make_lm_iterator(
      D.TextSource(docs, "toy"), encode, EOS, seq_len, bs, num_epochs=1,
      shuffle=False))
  for b in batches:
    assert set(b) == set(D.BATCH_KEYS)
    for k in D.BATCH_KEYS:
      assert b[k].shape == (bs, seq_len) and b[k].dtype == np.int32
  # In order and without shuffle, the packed stream is exactly the
  # concatenation of the tokenized documents (nothing lost, nothing repeated).
  flat = [D.tokenize_document(d, encode, EOS) for d in docs]
  s = stream(batches)
  for k in ("inputs", "targets", "loss_mask"):
    np.testing.assert_array_equal(s[k], np.concatenate([f[k] for f in flat]))
  # Per row: segment ids 1,2,3.. contiguous, positions restart per segment,
  # padding only at the end; segments change only after an EOS.
  n_rows_long = 0
  for row in rows(batches):
    seg, pos, inp = row["segment_ids"], row["positions"], row["inputs"]
    n = int((seg > 0).sum())
    assert (seg[n:] == 0).all() and (row["loss_mask"][n:] == 0).all()
    assert n == 0 or seg[0] == 1
    for i in range(1, n):
      if seg[i] == seg[i - 1]:
        assert pos[i] == pos[i - 1] + 1
      else:
        assert seg[i] == seg[i - 1] + 1 and pos[i] == 0
        assert inp[i - 1] == EOS  # New segment only after a document ends.
    if n and (inp[:n] == encode("L")[0]).sum() >= 8:
      n_rows_long += 1
  assert n_rows_long >= 3
  # No target crosses a document: every masked-in target is the next token of
  # the same document; the EOS (last token) is masked out.
  m = s["loss_mask"] == 1
  assert (s["inputs"][~m] == EOS).all()
  np.testing.assert_array_equal(s["targets"][:-1][m[:-1]],
                                s["inputs"][1:][m[:-1]])


def test_every_token_once_per_epoch_with_shuffle():
  docs = toy_docs(31)
  batches = list(D.make_lm_iterator(
      D.TextSource(docs, "toy"), encode, EOS, 16, 4, seed=7, num_epochs=2))
  got = split_docs(stream(batches)["inputs"])
  want = [doc_tokens(d) for d in docs]
  assert len(got) == 2 * len(docs)
  first, second = got[: len(docs)], got[len(docs):]
  assert sorted(first) == sorted(want) and sorted(second) == sorted(want)
  assert first != want  # Shuffled...
  assert first != second  # ...and reshuffled every epoch.


def test_shuffle_deterministic_by_seed():
  src = D.TextSource(toy_docs(40), "toy")

  def first(seed, n=6):
    it = D.make_lm_iterator(src, encode, EOS, 16, 2, seed=seed)
    return np.stack([next(it)["inputs"] for _ in range(n)])

  np.testing.assert_array_equal(first(3), first(3))
  assert not np.array_equal(first(3), first(4))


def test_sharding_disjoint_and_covering():
  docs = toy_docs(29)
  src = D.TextSource(docs, "toy")
  seen = []
  for shard in range(3):
    batches = list(D.make_lm_iterator(
        src, encode, EOS, 16, 2, seed=1, num_epochs=1, shard_index=shard,
        shard_count=3))
    seen.append(collections.Counter(split_docs(stream(batches)["inputs"])))
  for a in range(3):
    for b in range(a + 1, 3):
      assert not set(seen[a]) & set(seen[b])
  total = sum(seen, collections.Counter())
  assert total == collections.Counter(doc_tokens(d) for d in docs)
  with pytest.raises(ValueError, match="shard_index"):
    D.make_lm_iterator(src, encode, EOS, 16, 2, shard_index=3, shard_count=3)


@pytest.mark.parametrize("num_threads", [0, 2])
def test_iterator_state_restore(num_threads):
  src = D.TextSource(toy_docs(37) + ["Z" * 40], "toy")

  def make():
    return D.make_lm_iterator(src, encode, EOS, 16, 2, seed=5,
                              num_threads=num_threads)

  for k in (0, 1, 4, 9, 23):  # Mid-document and epoch-crossing states.
    it = make()
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # As Orbax stores it.
    expected = [next(it) for _ in range(7)]
    fresh = make()
    fresh.set_state(state)
    for want in expected:
      got = next(fresh)
      for key in D.BATCH_KEYS:
        np.testing.assert_array_equal(got[key], want[key])


def test_orbax_checkpoint_roundtrip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  src = D.TextSource(toy_docs(30), "toy")

  def make():
    return D.make_lm_iterator(src, encode, EOS, 16, 2, seed=2)

  it = make()
  for _ in range(6):
    next(it)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(6, args=ocp.args.Composite(data=D.iterator_checkpoint_args(it)))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(4)]
  fresh = make()
  restored = mngr.restore(6, args=ocp.args.Composite(
      data=D.iterator_checkpoint_args(fresh, restore=True)))
  assert restored.data is fresh
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
  mngr.close()


def test_eval_batches_deterministic_and_finite():
  docs = toy_docs(25)
  src = D.TextSource(docs, "toy")
  a = D.eval_batches(src, encode, EOS, 16, 2, max_batches=3)
  b = D.eval_batches(src, encode, EOS, 16, 2, max_batches=3)
  assert len(a) == 3
  for x, y in zip(a, b):
    for k in D.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])
  full = D.eval_batches(src, encode, EOS, 16, 2, max_batches=None)
  assert split_docs(stream(full)["inputs"]) == [doc_tokens(d) for d in docs]
  padded = D.eval_batches(src, encode, EOS, 16, 2, max_batches=len(full) + 2,
                          pad_to_max_batches=True)
  assert len(padded) == len(full) + 2
  assert (padded[-1]["loss_mask"] == 0).all()


# ---------------------------------------------------------------------------
# Local file sources.


def test_jsonl_source(tmp_path):
  p = tmp_path / "d.jsonl"
  rows_ = [{"text": f"doc number {i}", "body": f"b{i}"} for i in range(60)]
  p.write_text("\n".join(json.dumps(r) for r in rows_) + "\n\n")
  src = D.make_source(str(p), split="all")
  assert len(src) == 60 and src[3] == "doc number 3"
  assert D.make_source(f"{p}:body", split="all")[0] == "b0"
  train = D.make_source(str(p), "train")
  val = D.make_source(str(p), "validation")
  assert set(train[:]).isdisjoint(val[:])
  assert sorted(train[:] + val[:]) == sorted(r["text"] for r in rows_)
  with pytest.raises(KeyError, match=r"fields found: \['body', 'text'\]"):
    D.make_source(f"{p}:content", split="all")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{not json\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
    D.make_source(str(bad))


def test_txt_source(tmp_path):
  p = tmp_path / "d.txt"
  p.write_text("first para\nline two\n\n\nsecond para\n  \nthird\n")
  src = D.make_source(str(p), split="all")
  assert list(src[:]) == ["first para\nline two", "second para", "third"]
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n  \n")
  with pytest.raises(ValueError, match="no non-empty documents"):
    D.make_source(str(empty))


def test_parquet_source(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  p = tmp_path / "d.parquet"
  pq.write_table(pa.table({"text": ["alpha", None, "beta"],
                           "id": [1, 2, 3]}), p)
  assert list(D.make_source(str(p), split="all")[:]) == ["alpha", "beta"]
  with pytest.raises(KeyError, match=r"columns found: \['text', 'id'\]"):
    D.make_source(f"{p}:body", split="all")
  with pytest.raises(ValueError, match="must hold strings"):
    D.make_source(f"{p}:id", split="all")


def test_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    D.make_source(str(tmp_path / "missing.jsonl"))
  with pytest.raises(ValueError, match="Unknown data scheme 'hf'"):
    D.make_source("hf:wikitext")
  with pytest.raises(ValueError, match="Unsupported data spec"):
    D.make_source(str(tmp_path / "data.csv"))
  p = tmp_path / "one.txt"
  p.write_text("only one document")
  with pytest.raises(ValueError, match="split 'test'|Split 'test'"):
    D.make_source(str(p), "test")
  with pytest.raises(ValueError, match="has no documents"):
    D.make_lm_iterator(D.TextSource([], "empty"), encode, EOS, 16, 2)
  assert os.path.exists(p)


def test_first_pydoc_build_prints_nothing_on_stdout(tmp_path, capsys):
  """A first build (fresh machine) must not write TFDS's "Downloading and
  preparing dataset ..." line to stdout: `recursive-lm eval --json` prints its
  JSON there (it reached the JSON once, in a CI run on a fresh machine)."""
  pydoc_corpus.build_pydoc_corpus(tmp_path / "tfds")
  assert capsys.readouterr().out == ""

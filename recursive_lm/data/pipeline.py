"""Grain input pipeline: documents -> packed, batched LM rows.

::

    source (len / [i] -> str)                       grain.MapDataset.source
      -> shard  docs[shard_index::shard_count]       (disjoint per host)
      -> shuffle(seed), reshuffled every epoch       ShuffleMapDataset
      -> repeat(num_epochs)                          (None: forever)
      -> tokenize: encode(doc) + [eos_id]            .map
      -> to_iter_dataset (ordered, threaded reads)
      -> pack into rows of seq_len                   PackIterDataset (below)
      -> batch(batch_size), last batch zero-padded   .batch
      -> {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
         each an int32 numpy array of shape [batch_size, seq_len]

Per document the token sequence is ``t = encode(text) + [eos_id]``;
``inputs = t``, ``targets[i] = t[i+1]`` and ``loss_mask[i] = 1`` except for the
last token (the EOS), whose next token would belong to another document:
``targets = 0, loss_mask = 0`` there.  Targets are computed *before* packing,
so no target ever crosses a document boundary, and a document split across
rows keeps its true next-token target at the cut.

Packing is concat-then-split: documents fill a row back to back; one that does
not fit is cut and continues at the start of the next row (so documents longer
than ``seq_len`` span several rows and no token is dropped).  In each row the
pieces get ``segment_ids`` 1, 2, 3, ... and ``positions`` 0, 1, 2, ... that
restart for every piece; padding (only at the very end of a finite stream) has
``segment_ids = 0`` and ``loss_mask = 0``.  Attention must be restricted to
``segment_ids[q] == segment_ids[k] != 0`` (plus causality).

Why not ``grain.experimental.ConcatThenSplitIterDataset``?  In grain 0.2.18 its
state does not survive the JSON round trip that grain's own Orbax handler
performs (its ``(-1, -1)`` "no remainder" tuples come back as lists and the
restored iterator then resumes at the wrong place); ``FirstFitPack`` /
``BestFitPack`` truncate over-long documents.  The packer here keeps a tiny,
JSON-safe state: the parent state before the current document plus the token
offset into it, and restores exactly.

Checkpointing (Orbax, see :func:`iterator_checkpoint_args`)::

    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(ckpt_dir)
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=iterator_checkpoint_args(train_iter)))          # CheckpointSave
    ...
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=iterator_checkpoint_args(train_iter, restore=True)))
    train_iter = restored.data   # the same object, now at the saved position

Without Orbax: ``json.dumps(it.get_state())`` / ``it.set_state(json.loads(s))``.

Process-count-independent sharding (what the trainer uses,
:func:`make_sharded_lm_iterator` / :func:`sharded_eval_batches`): the global
batch of ``B`` rows is assembled from ``S`` fixed *data shards* (default
``S = B``); shard ``s`` is its own pipeline over ``docs[s::S]`` (seed
``seed + 7919 s``) giving ``B / S`` rows of every batch, in shard order.
Process ``p`` of ``P`` builds and reads only shards ``[p S/P, (p+1) S/P)``,
which are exactly the rows of the global batch its devices hold. So the
global batch at every step is the same for 1, 2, 4, ... processes (``P`` must
divide ``S``), and a checkpoint stores one iterator state per shard (not per
process): a run restarted with another process count continues the same data
stream (``recursive_lm.training.checkpointing``).  With ``with_doc_ids`` every
row also carries ``doc_ids`` (the source index of each token's document, -1
in padding) for tracing which documents a process read.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

__all__ = [
    "BATCH_KEYS",
    "PackIterDataset",
    "eval_batches",
    "iterator_checkpoint_args",
    "make_lm_dataset",
    "make_lm_iterator",
    "make_sharded_lm_iterator",
    "plan_data_shards",
    "resolve_shard",
    "ShardedBatchIterator",
    "sharded_eval_batches",
    "tokenize_document",
]

#: Keys of every batch (all int32, shape [batch_size, seq_len]).
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
_DOC_KEYS = ("inputs", "targets", "loss_mask")

Encoder = Callable[[str], Sequence[int]]


def tokenize_document(text: str, encode: Encoder,
                      eos_id: int) -> dict[str, np.ndarray]:
  """One document -> ``inputs``/``targets``/``loss_mask`` (1-D int32)."""
  inputs = np.asarray(list(encode(text)) + [eos_id], dtype=np.int32)
  targets = np.zeros_like(inputs)
  targets[:-1] = inputs[1:]
  loss_mask = np.ones_like(inputs)
  loss_mask[-1] = 0
  return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


class _Tokenize:
  """Picklable map function (``functools.partial`` of tokenize_document)."""

  def __init__(self, encode: Encoder, eos_id: int):
    self.encode = encode
    self.eos_id = int(eos_id)

  def __call__(self, item) -> dict[str, np.ndarray]:
    if isinstance(item, tuple):  # (document id, text) from _IndexedSource
      doc_id, text = item
      doc = tokenize_document(text, self.encode, self.eos_id)
      doc["doc_ids"] = np.full_like(doc["inputs"], doc_id)
      return doc
    return tokenize_document(item, self.encode, self.eos_id)


class _IndexedSource:
  """``source[i] -> (i, source[i])``: documents that remember their index."""

  def __init__(self, source: Sequence[str]):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[int, str]:
    return int(index), self._source[index]


class _PackDatasetIterator(grain.DatasetIterator):
  """Concat-then-split packer; see the module docstring."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int,
               with_doc_ids: bool = False):
    super().__init__(parent)
    self._seq_len = seq_len
    self._copy_keys = _DOC_KEYS + (("doc_ids",) if with_doc_ids else ())
    self._arange = np.arange(seq_len, dtype=np.int32)
    self._doc: dict[str, np.ndarray] | None = None  # Current (partial) doc.
    self._doc_parent_state: dict[str, Any] | None = None  # State before it.
    self._offset = 0  # Tokens of the current doc already emitted.

  def _next_doc(self) -> bool:
    state = copy.deepcopy(self._parent.get_state())
    try:
      doc = next(self._parent)
    except StopIteration:
      return False
    self._doc, self._doc_parent_state, self._offset = doc, state, 0
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    length = self._seq_len
    row = {k: np.zeros(length, np.int32) for k in BATCH_KEYS}
    if len(self._copy_keys) > len(_DOC_KEYS):
      row["doc_ids"] = np.full(length, -1, np.int32)
    fill, segment = 0, 0
    while fill < length:
      if self._doc is None and not self._next_doc():
        break
      doc_len = len(self._doc["inputs"])
      take = min(doc_len - self._offset, length - fill)
      if take > 0:
        segment += 1
        stop = self._offset + take
        for key in self._copy_keys:
          row[key][fill:fill + take] = self._doc[key][self._offset:stop]
        row["segment_ids"][fill:fill + take] = segment
        row["positions"][fill:fill + take] = self._arange[:take]
        fill += take
        self._offset = stop
      if self._offset >= doc_len:
        self._doc = None
    if fill == 0:
      raise StopIteration
    return row

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {"parent": copy.deepcopy(self._parent.get_state()), "offset": 0}
    return {"parent": copy.deepcopy(self._doc_parent_state),
            "offset": int(self._offset)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc = None
    self._offset = 0
    if int(state["offset"]) > 0:
      if not self._next_doc():
        raise ValueError(f"Cannot restore packer state {state}: the parent "
                         "iterator has no document at that position.")
      self._offset = int(state["offset"])


class PackIterDataset(grain.IterDataset):
  """Packs tokenized documents (dicts of ``_DOC_KEYS``) into seq_len rows."""

  def __init__(self, parent: grain.IterDataset, seq_len: int,
               with_doc_ids: bool = False):
    super().__init__(parent)
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    self._seq_len = int(seq_len)
    self._with_doc_ids = bool(with_doc_ids)

  def __iter__(self) -> grain.DatasetIterator:
    return _PackDatasetIterator(self._parent.__iter__(), self._seq_len,
                                self._with_doc_ids)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len})"


def resolve_shard(shard_index: int | None,
                  shard_count: int | None) -> tuple[int, int]:
  """Explicit shard args, or (jax.process_index(), jax.process_count())."""
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"Need 0 <= shard_index < shard_count, got "
                     f"{shard_index=} {shard_count=}.")
  return int(shard_index), int(shard_count)


def make_lm_dataset(
    source: Sequence[str],
    encode: Encoder,
    eos_id: int,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int | None = 0,
    shard_count: int | None = 1,
    *,
    shuffle: bool = True,
    num_threads: int = 2,
    prefetch_buffer_size: int = 16,
    with_doc_ids: bool = False,
) -> grain.IterDataset:
  """The pipeline as a ``grain.IterDataset`` (see the module docstring).

  ``shard_index``/``shard_count`` = None use ``jax.process_index()`` /
  ``jax.process_count()``.  Documents are sharded before shuffling, so hosts
  see disjoint documents that together cover the source (shard sizes differ
  by at most one document).  ``num_threads``/``prefetch_buffer_size`` set
  grain's ordered, threaded reading + tokenization (0/0: all inline).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}.")
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"Source {source!r} has no documents.")
  ds = grain.MapDataset.source(_IndexedSource(source) if with_doc_ids else source)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
    if len(ds) == 0:  # pylint: disable=g-explicit-length-test
      raise ValueError(
          f"Shard {shard_index}/{shard_count} of {source!r} is empty: the "
          f"source has only {len(source)} documents.")
  if shuffle:
    ds = ds.shuffle(seed=int(seed) % 2**32)
  ds = ds.repeat(num_epochs)
  ds = ds.map(_Tokenize(encode, eos_id))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads,
      prefetch_buffer_size=prefetch_buffer_size if num_threads else 0))
  ds = PackIterDataset(ds, seq_len, with_doc_ids)
  return ds.batch(
      batch_size,
      drop_remainder=False,
      batch_fn=functools.partial(grain.experimental.batch_and_pad,
                                 batch_size=batch_size),
  )


def make_lm_iterator(
    source: Sequence[str],
    encode: Encoder,
    eos_id: int,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int | None = 0,
    shard_count: int | None = 1,
    **kwargs,
) -> grain.DatasetIterator:
  """Iterator of ``{inputs, targets, loss_mask, segment_ids, positions}``.

  Each value is an int32 array ``[batch_size, seq_len]``.  With
  ``num_epochs=None`` it never ends; otherwise the last batch is zero-padded
  (``segment_ids = loss_mask = 0``) and then ``StopIteration``.  Supports
  ``get_state()`` / ``set_state(state)`` (JSON-serializable) and Orbax via
  :func:`iterator_checkpoint_args`.  ``kwargs`` go to :func:`make_lm_dataset`.
  """
  return iter(make_lm_dataset(source, encode, eos_id, seq_len, batch_size,
                              seed, num_epochs, shard_index, shard_count,
                              **kwargs))


def eval_batches(
    source: Sequence[str],
    encode: Encoder,
    eos_id: int,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    shard_index: int | None = 0,
    shard_count: int | None = 1,
    *,
    pad_to_max_batches: bool = False,
) -> list[dict[str, np.ndarray]]:
  """A deterministic, finite list of batches (source order, no shuffle).

  At most ``max_batches`` batches (None: the whole source, one pass).  With
  ``pad_to_max_batches`` the list is topped up with all-zero batches
  (``loss_mask = 0``) so every host gets exactly ``max_batches`` batches.
  """
  ds = make_lm_dataset(source, encode, eos_id, seq_len, batch_size,
                       num_epochs=1, shard_index=shard_index,
                       shard_count=shard_count, shuffle=False,
                       num_threads=0, prefetch_buffer_size=0)
  batches = []
  for batch in ds:
    if max_batches is not None and len(batches) >= max_batches:
      break
    batches.append(batch)
  if pad_to_max_batches and max_batches is not None:
    while len(batches) < max_batches:
      batches.append({k: np.zeros((batch_size, seq_len), np.int32)
                      for k in BATCH_KEYS})
  return batches


def plan_data_shards(batch_size: int, num_shards: int | None = None,
                     process_index: int | None = None,
                     process_count: int | None = None) -> tuple[range, int]:
  """(shards this process reads, rows per shard) of a ``batch_size`` global batch.

  ``num_shards`` None means ``batch_size`` (one shard per row).  Process ``p``
  of ``P`` reads the contiguous shards ``[p S/P, (p+1) S/P)``.
  """
  p, n = resolve_shard(process_index, process_count)
  s = int(num_shards or batch_size)
  if batch_size < 1 or s < 1 or batch_size % s:
    raise ValueError(f"{s} data shards do not divide the global batch of {batch_size} "
                     "rows; use config.data.shards = a divisor of the batch size "
                     "(None: one shard per row)")
  if s % n:
    raise ValueError(f"{n} processes cannot split {s} data shards evenly; use a "
                     f"process count that divides {s}, or config.data.shards = a "
                     f"multiple of {n} that divides the batch size {batch_size}")
  per = s // n
  return range(p * per, (p + 1) * per), batch_size // s


class ShardedBatchIterator:
  """This process's rows of the global batch, from its data shards (module doc).

  ``next()`` concatenates one batch of ``rows_per_shard`` rows from every owned
  shard, in shard order.  ``shard_states()`` / ``set_shard_states()`` give and
  take one JSON-safe grain state per shard (what checkpoints store);
  ``get_state()`` / ``set_state()`` wrap them in one dict.
  """

  def __init__(self, iterators: dict[int, grain.DatasetIterator], num_shards: int):
    self._iters = dict(sorted(iterators.items()))
    self.num_shards = int(num_shards)

  @property
  def shards(self) -> list[int]:
    return list(self._iters)

  def __iter__(self) -> "ShardedBatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._iters.values()]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def shard_states(self) -> dict[int, Any]:
    return {s: copy.deepcopy(it.get_state()) for s, it in self._iters.items()}

  def set_shard_states(self, states: dict[int, Any]) -> None:
    missing = [s for s in self._iters if s not in states]
    if missing:
      raise ValueError(f"no saved state for data shards {missing} of "
                       f"{self.num_shards}")
    for s, it in self._iters.items():
      it.set_state(states[s])

  def get_state(self) -> dict[str, Any]:
    return {"num_shards": self.num_shards,
            "shards": {str(s): st for s, st in self.shard_states().items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state["num_shards"]) != self.num_shards:
      raise ValueError(f"state of {state['num_shards']} data shards cannot restore "
                       f"an iterator over {self.num_shards}")
    self.set_shard_states({int(s): st for s, st in state["shards"].items()})


def make_sharded_lm_iterator(
    source: Sequence[str],
    encode: Encoder,
    eos_id: int,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_shards: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    num_epochs: int | None = None,
    with_doc_ids: bool = False,
) -> ShardedBatchIterator:
  """This process's ``[batch_size / P, seq_len]`` rows of the global batch.

  ``batch_size`` is the *global* batch; see the module docstring and
  :func:`plan_data_shards`.  Defaults: ``num_shards = batch_size``,
  process index/count from JAX.  Each shard reads with 2 threads when a
  process owns at most 8 shards, inline otherwise.
  """
  shards, rows = plan_data_shards(batch_size, num_shards, process_index, process_count)
  s_total = int(num_shards or batch_size)
  threads = 2 if len(shards) <= 8 else 0
  iters = {s: iter(make_lm_dataset(
      source, encode, eos_id, seq_len, rows, seed=int(seed) + 7919 * s,
      num_epochs=num_epochs, shard_index=s, shard_count=s_total,
      num_threads=threads, prefetch_buffer_size=4, with_doc_ids=with_doc_ids))
           for s in shards}
  return ShardedBatchIterator(iters, s_total)


def sharded_eval_batches(
    source: Sequence[str],
    encode: Encoder,
    eos_id: int,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    num_shards: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[dict[str, np.ndarray]]:
  """``max_batches`` held-out batches, this process's rows of each.

  Shard ``s`` contributes :func:`eval_batches` of ``docs[s::S]`` (source
  order, zero-padded to ``max_batches``; an empty shard gives zero rows), so
  the global held-out set does not depend on the process count.
  """
  if max_batches is None or max_batches < 1:
    raise ValueError(f"max_batches must be >= 1, got {max_batches}")
  shards, rows = plan_data_shards(batch_size, num_shards, process_index, process_count)
  s_total = int(num_shards or batch_size)
  per_shard = []
  for s in shards:
    if s >= len(source):
      per_shard.append([{k: np.zeros((rows, seq_len), np.int32) for k in BATCH_KEYS}
                        for _ in range(max_batches)])
      continue
    per_shard.append(eval_batches(source, encode, eos_id, seq_len, rows, max_batches,
                                  shard_index=s, shard_count=s_total,
                                  pad_to_max_batches=True))
  return [{k: np.concatenate([b[i][k] for b in per_shard]) for k in BATCH_KEYS}
          for i in range(max_batches)]


def iterator_checkpoint_args(iterator: grain.DatasetIterator,
                             restore: bool = False):
  """Orbax ``CheckpointArgs`` for a grain iterator (save or restore).

  ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` are registered
  with Orbax for ``grain.checkpoint.CheckpointHandler``, which writes the
  iterator state as JSON to ``process_<i>-of-<n>.json`` (one file per host).
  Use as an item of ``ocp.args.Composite`` (see the module docstring).
  """
  try:
    save_cls = grain.checkpoint.CheckpointSave
    restore_cls = grain.checkpoint.CheckpointRestore
  except AttributeError as e:  # Orbax not importable.
    raise ImportError("iterator_checkpoint_args needs orbax-checkpoint "
                      "(pip install orbax-checkpoint).") from e
  return restore_cls(iterator) if restore else save_cls(iterator)

"""Process-count-independent data shards (recursive_lm.data.pipeline): the
global batch is the same for 1, 2 and 4 processes, each process reads only
its shards, and per-shard states restore across process counts."""
import json

import numpy as np
import pytest

from recursive_lm.data import (make_sharded_lm_iterator, plan_data_shards,
                               sharded_eval_batches)

DOCS = [("doc %d " % i) * (i % 7 + 1) for i in range(50)]


def encode(text):
  return [2 + b % 50 for b in text.encode()]


def iters(procs, **kw):
  return [make_sharded_lm_iterator(DOCS, encode, 1, 16, 8, seed=3, process_index=p,
                                   process_count=procs, with_doc_ids=True, **kw)
          for p in range(procs)]


def test_global_batch_does_not_depend_on_process_count():
  runs = {n: iters(n) for n in (1, 2, 4)}
  for _ in range(6):
    batches = {n: [next(it) for it in its] for n, its in runs.items()}
    one = batches[1][0]
    assert one["inputs"].shape == (8, 16)
    for n in (2, 4):
      for k in one:
        np.testing.assert_array_equal(np.concatenate([b[k] for b in batches[n]]), one[k])
    for p, b in enumerate(batches[4]):  # process p reads shards 2p, 2p+1 only
      ids = b["doc_ids"]
      for j in range(2):
        assert set(ids[j][ids[j] >= 0] % 8) == {2 * p + j}


def test_shard_states_restore_on_another_process_count():
  (single,) = iters(1)
  for _ in range(3):
    next(single)
  states = json.loads(json.dumps(single.shard_states()))
  want = next(single)
  two = iters(2)
  for it in two:  # each process takes the states of the shards it now owns
    it.set_shard_states({s: states[str(s)] for s in it.shards})
  got = [next(it) for it in two]
  np.testing.assert_array_equal(np.concatenate([g["inputs"] for g in got]), want["inputs"])
  (again,) = iters(1)
  again.set_state(json.loads(json.dumps(single.get_state())))
  np.testing.assert_array_equal(next(again)["inputs"], next(single)["inputs"])


def test_eval_batches_do_not_depend_on_process_count():
  one = sharded_eval_batches(DOCS, encode, 1, 16, 8, 3, process_index=0, process_count=1)
  two = [sharded_eval_batches(DOCS, encode, 1, 16, 8, 3, process_index=p, process_count=2)
         for p in range(2)]
  assert len(one) == 3 and "doc_ids" not in one[0]
  for i in range(3):
    for k in one[i]:
      np.testing.assert_array_equal(np.concatenate([two[0][i][k], two[1][i][k]]),
                                    one[i][k])
  few = sharded_eval_batches(DOCS[:3], encode, 1, 16, 8, 1, process_index=1,
                             process_count=2)  # shards 4-7 have no documents
  assert not few[0]["loss_mask"].any()


def test_plan_errors_name_the_fix():
  assert plan_data_shards(8, None, 1, 2) == (range(4, 8), 1)
  assert plan_data_shards(8, 4, 1, 2) == (range(2, 4), 2)
  with pytest.raises(ValueError, match="do not divide the global batch"):
    plan_data_shards(8, 3, 0, 1)
  with pytest.raises(ValueError, match="3 processes cannot split 8 data shards"):
    plan_data_shards(8, None, 0, 3)

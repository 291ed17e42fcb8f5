"""Training checkpoints (orbax): TrainState + grain data iterator + JSON meta.

One step directory per save, written by ``ocp.CheckpointManager``::

    <directory>/<step>/state/        TrainState (params, opt_state, step, rng) as
                                     an OCDBT pytree, written collectively (each
                                     process writes the shards it holds); the
                                     typed PRNG key is stored as its raw ``key_data``
    <directory>/<step>/data_shards/  one JSON per *data shard*
                                     (``shard_<s>-of-<S>.json``, written by the
                                     process that reads that shard), for a
                                     ``data.ShardedBatchIterator``
    <directory>/<step>/data/         (plain grain iterators) one JSON per process
    <directory>/<step>/meta/         JSON: model config, run facts (process 0)

Restarting with another process count works: the state is restored into the
shardings of the new mesh (orbax reshards on read) and every process reads
the states of the data shards it now owns, so the run continues with the same
global batches (``data.pipeline``, "Process-count-independent sharding").

Atomicity: orbax writes every step into ``<step>.orbax-checkpoint-tmp`` and
renames it to ``<step>`` only after all items are committed (on local and
POSIX file systems; ``AtomicRenameTemporaryPath``; object stores use a commit
file instead). A process killed mid-save leaves only the tmp directory, which
``latest_step`` ignores and the next ``Checkpointer`` deletes
(``cleanup_tmp_directories``).

Failure policy. ``restore()`` restores one step (default: the latest) and
raises ``CheckpointCorruptError`` naming the step directory, the problem, the
other steps and the fix when it is unreadable (truncated/garbage/missing
files; with several processes, when *any* process could not read its part:
the processes agree before anyone goes on), or ``CheckpointIncompatibleError``
when it was written for another model config. ``restore_latest_intact()``
(what the trainer uses) walks back from the newest step: a corrupt one is
logged as a warning naming it and **moved aside** to ``<step>.corrupt`` (never
deleted; not a step name, so orbax ignores it), and the next older step is
tried; ``strict=True`` (``config.train.strict_restore``) raises the error
instead. Incompatible checkpoints always raise (every step would fail the
same way, a human has to choose the workdir).

Preemption: ``PreemptionGuard``. With one process it installs a SIGTERM
handler that only sets a flag; with several it leaves SIGTERM to JAX's
preemption service (installed by ``jax.distributed.initialize``), and
``should_stop(step)`` asks orbax's ``reached_preemption`` (JAX's preemption
sync point) so that every process stops, saves and exits at the same step.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from typing import Any

import flax.serialization
import jax
import numpy as np
from absl import logging
from etils import epath

import grain
import orbax.checkpoint as ocp

_STATE, _DATA, _META = "state", "data", "meta"
_SHARDS = "data_shards"  # data.ShardedBatchIterator: one JSON per data shard
_MAX_LISTED = 8


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written or restored."""


class CheckpointCorruptError(CheckpointError):
  """A step directory exists but cannot be read (truncated/garbage files)."""


class CheckpointIncompatibleError(CheckpointError):
  """A readable checkpoint that was written for another model/config."""


@dataclasses.dataclass
class Restored:
  """What ``Checkpointer.restore`` returns."""
  step: int
  state: Any
  meta: dict
  data_iterator: Any


# --------------------------------------------------------------------------- #
# Data-shard states (one file per shard, not per process).
def _shard_file(directory, shard: int, num_shards: int):
  return directory / f"shard_{shard}-of-{num_shards}.json"


class ShardedIteratorHandler:
  """Orbax handler for ``data.ShardedBatchIterator``: every process writes and
  reads ``shard_<s>-of-<S>.json`` of the data shards it owns."""

  def save(self, directory, item=None, args=None):
    item = item or args.item
    for s, state in item.shard_states().items():
      _shard_file(directory, s, item.num_shards).write_text(json.dumps(state, indent=1))

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    states = {}
    for s in item.shards:
      f = _shard_file(directory, s, item.num_shards)
      if not f.exists():
        found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
        raise FileNotFoundError(
            f"{f} is missing (found {_short(found) or 'nothing'}); a checkpoint "
            f"written with another config.data.shards cannot continue this stream")
      states[s] = json.loads(f.read_text())
    item.set_shard_states(states)
    return item

  def structure(self, directory):
    del directory

  def metadata(self, directory):
    del directory

  def finalize(self, directory):
    del directory

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(ShardedIteratorHandler, for_save=True)
@dataclasses.dataclass
class ShardedIteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ShardedIteratorHandler, for_restore=True)
@dataclasses.dataclass
class ShardedIteratorRestore(ocp.args.CheckpointArgs):
  item: Any


def _is_sharded(it) -> bool:
  return hasattr(it, "shard_states") and hasattr(it, "num_shards")


def all_processes_ok(ok: bool) -> bool:
  """True when ``ok`` holds on every process (one tiny all-gather if > 1)."""
  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray(0 if ok else 1, np.int32))
  return not bool(np.any(flags))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- #
# PRNG keys <-> raw data (orbax stores plain arrays).
def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(x):
  if isinstance(x, jax.Array):
    return jax.random.key_impl(x)
  box = []
  jax.eval_shape(lambda k: box.append(jax.random.key_impl(k)) or 0, x)
  return box[0]


def _to_saveable(state: Any) -> dict:
  state = jax.tree_util.tree_map(
      lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
  return flax.serialization.to_state_dict(state)


def _abstract(x) -> jax.ShapeDtypeStruct:
  if _is_key(x):
    data = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype,
                                sharding=getattr(x, "sharding", None))
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _flat(tree: Any, is_leaf=None) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                   for k in path): leaf for path, leaf in flat}


def _short(items: list[str]) -> str:
  more = len(items) - _MAX_LISTED
  return ", ".join(items[:_MAX_LISTED]) + (f", ... (+{more} more)" if more > 0 else "")


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:400] if text else ''}"


class Checkpointer:
  """Saves/restores a run's TrainState + data iterator every N steps, keeps K.

  Usage::

    ckpt = Checkpointer(workdir / "checkpoints", save_every=50, keep=3)
    if ckpt.latest_step() is not None:
      r = ckpt.restore(target=state, data_iterator=train_iter)
      state, train_iter = r.state, r.data_iterator
    ...
    ckpt.maybe_save(step, state, train_iter, meta={...})
    ckpt.close()   # waits for async writes

  Args:
    directory: where step directories live (created if missing).
    save_every: ``should_save(step)`` is true every ``save_every`` steps
      (None/0: only forced saves).
    keep: how many of the latest steps to keep (older ones are deleted after a
      successful save).
    async_save: write in a background thread; the device->host copy happens
      before ``save`` returns, so the caller may donate/overwrite the state.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int | None = None,
               keep: int = 3, async_save: bool = True):
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 (number of checkpoints to keep), got {keep}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = save_every or 0
    self.async_save = bool(async_save)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        create=True)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _DATA: grain.checkpoint.CheckpointHandler(),
                       _SHARDS: ShardedIteratorHandler(),
                       _META: ocp.JsonCheckpointHandler()})

  # -- queries ---------------------------------------------------------------
  def all_steps(self) -> list[int]:
    """Committed steps, ascending (tmp directories of unfinished saves excluded)."""
    return sorted(int(s) for s in self._mngr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def should_save(self, step: int) -> bool:
    return bool(self.save_every) and step > 0 and step % self.save_every == 0

  # -- save ------------------------------------------------------------------
  def save(self, step: int, state: Any, data_iterator: Any = None,
           meta: dict | None = None) -> bool:
    """Writes step ``step`` (no-op returning False if it already exists)."""
    step = int(step)
    if step in self._mngr.all_steps():
      return False
    items = {_STATE: ocp.args.StandardSave(_to_saveable(state)),
             _META: ocp.args.JsonSave(dict(meta or {}, step=step))}
    if _is_sharded(data_iterator):
      items[_SHARDS] = ShardedIteratorSave(data_iterator)
    elif data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("checkpoint: saving step %d to %s (%s)", step, self.step_dir(step),
                 "async" if self.async_save else "sync")
    return bool(saved)

  def maybe_save(self, step: int, state: Any, data_iterator: Any = None,
                 meta: dict | None = None, force: bool = False) -> bool:
    if force or self.should_save(step):
      return self.save(step, state, data_iterator, meta)
    return False

  def wait(self) -> None:
    """Blocks until pending async saves are committed (raises their errors)."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- restore ---------------------------------------------------------------
  def read_meta(self, step: int) -> dict:
    """The JSON meta of ``step`` (``CheckpointCorruptError`` if unreadable)."""
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          **{_META: ocp.args.JsonRestore()}))
      return dict(out[_META] or {})
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(step, e) from e

  def restore(self, target: Any, data_iterator: Any = None, step: int | None = None,
              expect_meta: dict | None = None) -> Restored:
    """Restores ``step`` (default: the latest) into the structure of ``target``.

    Args:
      target: a TrainState (or any pytree) of arrays or ``ShapeDtypeStruct``s
        carrying the wanted shardings; typed PRNG keys are handled.
      data_iterator: a fresh grain iterator of the same pipeline; it is moved
        to the saved position (in place) and returned as ``data_iterator``.
      step: which step; None means the latest.
      expect_meta: entries that must equal the saved meta (e.g. the model
        config dict); differences raise ``CheckpointIncompatibleError``.

    Raises:
      FileNotFoundError: there is no checkpoint (or not that step).
      CheckpointIncompatibleError: written for another config (names/shapes).
      CheckpointCorruptError: unreadable files; lists the other steps.
    """
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoints in {self.directory}")
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {self.directory}; available steps: "
          f"{steps or 'none'}")
    meta = self.read_meta(step)
    self._check_meta(step, meta, expect_meta or {})
    saveable = jax.tree_util.tree_map(_abstract, target)
    saveable = flax.serialization.to_state_dict(saveable)
    self._check_shapes(step, saveable)
    # The item handlers are called directly (no orbax barrier inside), then the
    # processes agree: a part that one process cannot read fails the step on
    # all of them instead of leaving the others waiting in a barrier.
    path = epath.Path(self.step_dir(step))
    error, restored, data_out = None, None, None
    handler = ocp.StandardCheckpointHandler()
    try:
      restored = handler.restore(path / _STATE, args=ocp.args.StandardRestore(saveable))
      if data_iterator is not None:
        data_out = self._restore_data(step, path, data_iterator)
    except CheckpointIncompatibleError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      error = e
    finally:
      handler.close()
    if not all_processes_ok(error is None):
      raise self._corrupt(step, error or RuntimeError(
          "another process could not read its part of it (see that process's log)")
                          ) from error

    def unwrap(tmpl, x):
      if _is_key(tmpl):
        return jax.random.wrap_key_data(x, impl=_key_impl(tmpl))
      return x

    state = flax.serialization.from_state_dict(target, restored)
    state = jax.tree_util.tree_map(unwrap, target, state)
    logging.info("checkpoint: restored step %d from %s", step, self.step_dir(step))
    return Restored(step=step, state=state, meta=meta, data_iterator=data_out)

  def _restore_data(self, step: int, path, data_iterator):
    if _is_sharded(data_iterator):
      if not (path / _SHARDS).is_dir():
        if (path / _DATA).is_dir():
          raise CheckpointIncompatibleError(
              f"checkpoint {self.step_dir(step)} (step {step}) stores the data "
              "position per process (older format), this run reads per data shard; "
              "resume it with the recursive_lm version that wrote it, or use a "
              "fresh workdir")
        raise FileNotFoundError(f"the data-iterator item '{_SHARDS}' is missing")
      return ShardedIteratorHandler().restore(path / _SHARDS, data_iterator)
    if not (path / _DATA).is_dir():
      raise FileNotFoundError("the data-iterator item 'data' is missing")
    return grain.checkpoint.CheckpointHandler().restore(path / _DATA, data_iterator)

  def restore_latest_intact(self, target: Any, data_iterator: Any = None,
                            expect_meta: dict | None = None, strict: bool = False
                            ) -> Restored | None:
    """Restores the newest readable step, moving corrupt newer ones aside.

    Every corrupt step is logged (a warning naming its directory and the
    problem) and renamed to ``<step>.corrupt`` (``.corrupt.1``, ... if taken;
    never deleted); then the next older step is tried. Returns None when no
    step is left (the caller starts fresh; ``data_iterator`` may then be
    partly moved: build a new one).

    Raises:
      CheckpointCorruptError: with ``strict=True``, for the newest step when it
        is unreadable (nothing is moved).
      CheckpointIncompatibleError: a step written for another config.
    """
    while True:
      step = self.latest_step()
      if step is None:
        return None
      try:
        return self.restore(target, data_iterator, step=step, expect_meta=expect_meta)
      except CheckpointCorruptError as e:
        if strict:
          raise CheckpointCorruptError(
              f"{e}\n(config.train.strict_restore=True: not falling back to an older "
              "step; set it to False to move the corrupt step aside and resume from "
              "the newest intact one)") from e
        moved = self.move_aside(step)
        logging.warning("checkpoint %s (step %d) is corrupt and was moved to %s; "
                        "resuming from the newest intact step instead. %s",
                        self.step_dir(step), step, moved, str(e).splitlines()[0])

  def move_aside(self, step: int) -> str:
    """Renames step ``step`` to ``<step>.corrupt[.k]`` (process 0; all wait)."""
    src = self.step_dir(step)
    dst = src + ".corrupt"
    k = 0
    while os.path.exists(dst):
      k += 1
      dst = f"{src}.corrupt.{k}"
    _sync(f"rlm_move_aside_{step}_start")
    if jax.process_index() == 0:
      os.rename(src, dst)
    _sync(f"rlm_move_aside_{step}_done")
    self._mngr.reload()
    return dst

  # -- errors ----------------------------------------------------------------
  def _others_hint(self, step: int) -> str:
    others = [s for s in self.all_steps() if s != step]
    if not others:
      return (f"No other checkpoints are available in {self.directory}; remove "
              f"{self.step_dir(step)} to start from scratch, or use another workdir.")
    prev = max((s for s in others if s < step), default=max(others))
    return (f"Other checkpoints available in {self.directory}: steps {others}. To "
            f"resume from step {prev}, move the broken one aside (`mv "
            f"{self.step_dir(step)} {self.step_dir(step)}.broken`) and rerun, or "
            f"call restore(step={prev}).")

  def _corrupt(self, step: int, e: BaseException) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"checkpoint {self.step_dir(step)} (step {step}) is unreadable/corrupt: "
        f"{_first_line(e)}\n{self._others_hint(step)}")

  def _incompatible(self, step: int, problems: list[str]) -> CheckpointIncompatibleError:
    return CheckpointIncompatibleError(
        f"checkpoint {self.step_dir(step)} (step {step}) does not fit this run "
        f"(it was written for a different model/config):\n  "
        + "\n  ".join(problems[:_MAX_LISTED])
        + (f"\n  ... (+{len(problems) - _MAX_LISTED} more)"
           if len(problems) > _MAX_LISTED else "")
        + f"\nUse a fresh workdir for this config, or rerun with the config that "
        f"wrote {self.directory} (its settings are in the 'meta' item).")

  def _check_meta(self, step: int, meta: dict, expect: dict) -> None:
    problems = []
    expect = json.loads(json.dumps(expect))  # tuples -> lists, as saved
    for key, want in expect.items():
      if key not in meta:
        continue
      got = meta[key]
      if isinstance(want, dict) and isinstance(got, dict):
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        problems += [f"{key}.{k}: checkpoint has {got.get(k)!r}, this run has "
                     f"{want.get(k)!r}" for k in diff]
      elif got != want:
        problems.append(f"{key}: checkpoint has {got!r}, this run has {want!r}")
    if problems:
      raise self._incompatible(step, problems)

  def _check_shapes(self, step: int, saveable: dict) -> None:
    try:
      md = self._mngr.item_metadata(step)[_STATE]
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(step, e) from e
    if md is None:
      raise self._corrupt(step, FileNotFoundError("the state item is missing"))
    tree = getattr(md, "tree", md)
    got = {k: tuple(v.shape) for k, v in _flat(
        tree, is_leaf=lambda x: hasattr(x, "shape")).items() if hasattr(v, "shape")}
    want = {k: tuple(v.shape) for k, v in _flat(saveable).items()}
    def order(keys):  # params first: the most telling names
      return sorted(keys, key=lambda k: (not k.startswith("params"), k))
    problems = [f"{k}: checkpoint shape {got[k]}, expected {want[k]}"
                for k in order(want) if k in got and got[k] != want[k]]
    missing = order(k for k in want if k not in got)
    extra = order(k for k in got if k not in want)
    if missing:
      problems.append(f"{len(missing)} arrays missing from the checkpoint: "
                      f"{_short(missing)}")
    if extra:
      problems.append(f"{len(extra)} unexpected arrays in the checkpoint: "
                      f"{_short(extra)}")
    if problems:
      raise self._incompatible(step, problems)


# --------------------------------------------------------------------------- #
class PreemptionGuard:
  """Context manager: SIGTERM (a preemption notice) -> stop at a common step.

  One process: SIGTERM sets a flag instead of killing the process (the
  previous handler is restored on exit; outside the main thread the guard is
  inert and logs a warning). Several processes: SIGTERM stays with JAX's
  preemption service (``jax.distributed.initialize`` installs it; a Python
  handler would hide the signal from it) and :meth:`should_stop` asks orbax /
  JAX for the preemption sync point, the step all processes agreed to stop at
  (max step + 1), so they save the same step and exit together.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.signals = signals
    self._flag = False
    self._previous: dict[int, Any] = {}
    self._multi = False

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("received signal %d: will save a checkpoint after the current "
                    "step and exit", signum)
    self._flag = True

  def trigger(self) -> None:
    """Requests a stop as if a signal had arrived (for callers and tests)."""
    self._flag = True

  @property
  def requested(self) -> bool:
    """A stop was requested on this process (signal or :meth:`trigger`)."""
    return self._flag

  def should_stop(self, step: int) -> bool:
    """Call once per step on every process: True when all should stop now."""
    if not self._multi:
      return self._flag
    if ocp.multihost.reached_preemption(int(step)):
      logging.warning("preemption sync point reached at step %d", step)
      self._flag = True
    return self._flag

  def __enter__(self) -> "PreemptionGuard":
    self._multi = jax.process_count() > 1
    if self._multi:
      return self
    if threading.current_thread() is not threading.main_thread():
      logging.warning("PreemptionGuard: not in the main thread; SIGTERM will not "
                      "trigger a clean save")
      return self
    for s in self.signals:
      self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, prev in self._previous.items():
      signal.signal(s, prev)
    self._previous.clear()


__all__ = ["CheckpointError", "CheckpointCorruptError", "CheckpointIncompatibleError",
           "Checkpointer", "PreemptionGuard", "Restored", "ShardedIteratorHandler",
           "all_processes_ok"]

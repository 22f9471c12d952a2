"""Orbax checkpoints of the train state plus JSON metadata (data position, stage, tokenizer).

The decision whether to resume from them (and from which) is `sosm_jax.train.resume`'s; this
file only reads, writes and moves checkpoints, and turns every failure of a save into
`SaveFailed` as soon as it is known.
"""
from __future__ import annotations

import contextlib
import logging as std_logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class SaveFailed(RuntimeError):
  """A checkpoint could not be written (read-only or full disk, lost bucket access, ...)."""


def _path_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/embed/embedding': (shape, dtype name)} of every array leaf of a state or metadata tree.

  Dataclass fields, dict keys and tuple indices all become path parts, so a `TrainState` of
  ShapeDtypeStructs and orbax's metadata of the checkpoint written from it give the same paths.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is None:
      continue
    out["/".join(_path_name(p) for p in path)] = (tuple(int(d) for d in shape),
                                                  str(getattr(leaf, "dtype", "")))
  return out


@contextlib.contextmanager
def quiet_restore():
  """Keeps the asyncio/orbax error logs of a failing restore (thousands of lines) off the terminal.

  The caller reports the failure itself in one line.
  """
  loggers = [std_logging.getLogger(n) for n in ("asyncio", "absl", "orbax")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(std_logging.CRITICAL)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def first_line(error: BaseException, limit: int = 300) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {(text[0] if text else '')[:limit]}"


class Checkpointer:
  """Async saves every so often, keeping the last `keep`; reads, restores and moves checkpoints.

  A save that fails raises `SaveFailed` at the latest on the next `save`/`check`/`wait` call; the
  loop calls `check` every step, so training stops right after the failure.

  form: how a state is stored and restored (`state.checkpoint_form(optimizer)`; None: as it is
  in memory): `to_saved(state)` before a save, and `sources(abstract_state)` the forms it
  restores, what it writes first (see `sources`; the fused optimizer's moments as per-parameter
  trees, the per-leaf chain's state, ...).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, form=None):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    self._keep, self._async = keep, async_save
    self.form = form
    self._manager = self._open()
    self._unconfirmed = None    # step of an async save whose outcome `check` has not seen
    self.on_save = []   # callables(step) run after each save starts (e.g. the host memory)

  def _open(self):
    options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                           enable_async_checkpointing=self._async,
                                           cleanup_tmp_directories=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, *, wait: bool = False) -> bool:
    """Starts saving `state` and `meta` as checkpoint `step`; False if this step is already saved.

    Raises SaveFailed if this save (with wait) or an earlier async one failed.
    """
    if self._unconfirmed is not None:
      self.wait()   # orbax would wait for it too; this names the earlier step if it failed
    self.check()
    if step in self._manager.all_steps():
      return False
    try:
      saved = state if self.form is None else self.form.to_saved(state)
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(saved),
                                                       meta=ocp.args.JsonSave(meta)), force=True)
      self._unconfirmed = step
      for hook in self.on_save:
        hook(step)
    except Exception as e:  # pylint: disable=broad-except
      raise SaveFailed(self._failure(str(step), e)) from e
    if wait:
      self.wait()
    return True

  def _failure(self, which: str, error) -> str:
    try:
      done = [s for s in self.all_steps() if which != f"{s}"]
    except Exception:  # pylint: disable=broad-except
      done = []
    newest = f"step {done[-1]}" if done else "none"
    return (f"checkpoint {which} could not be written to {self.directory} ({first_line(error)}). "
            f"Training stopped so that no more work is lost; the newest complete checkpoint is "
            f"{newest}. Free space or fix the permissions of the directory, then run the same "
            f"command to resume.")

  def check(self) -> None:
    """Raises SaveFailed if an async save finished with an error (cheap: call every step).

    A finished save's outcome is read by joining its (already ended) finalize thread, which is
    where orbax keeps the error; nothing waits for a save still in progress.
    """
    step = self._unconfirmed
    try:
      self._manager.check_for_errors()
      if step is not None and not self._manager.is_saving_in_progress():
        self._unconfirmed = None
        self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise SaveFailed(self._failure(str(step), e)) from e

  def wait(self) -> None:
    """Blocks until pending saves are committed; raises SaveFailed if one failed."""
    step, self._unconfirmed = self._unconfirmed, None
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise SaveFailed(self._failure(str(step), e)) from e

  def read_meta(self, step: int) -> dict:
    with quiet_restore():
      return dict(self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def read_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """`leaf_shapes` of the state saved as checkpoint `step` (from its metadata, no arrays read)."""
    with quiet_restore():
      metadata = self._manager.item_metadata(step)["state"]
    if metadata is None:
      raise ValueError("no state metadata")
    return leaf_shapes(metadata)

  def sources(self, abstract_state: Any) -> list[tuple[Any, Any]]:
    """What a checkpoint this run restores onto `abstract_state` may hold, what it writes first:
    [(the checkpoint's state, abstract; how it becomes `abstract_state`'s: callable(restored
    state) -> state, or None: as it is)]. The checkpoint's leaf shapes and paths say which it is
    (e.g. the fused optimizer's moment trees or the per-leaf chain's state)."""
    return [(abstract_state, None)] if self.form is None else self.form.sources(abstract_state)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, meta) of checkpoint `step`, placed as `abstract_state` says (any mesh), from
    whichever of `sources` the checkpoint holds (the first where its shapes match none)."""
    sources = self.sources(abstract_state)
    target, convert = sources[0]
    if len(sources) > 1:
      saved = self.read_shapes(step)
      target, convert = next(((t, c) for t, c in sources if leaf_shapes(t) == saved),
                             sources[0])
    with quiet_restore():
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                        meta=ocp.args.JsonRestore()))
    state = restored.state if convert is None else convert(restored.state)
    return state, dict(restored.meta)

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
    """(state, meta, step) of the newest checkpoint that restores, or None; for readers
    (export, tests). Training decides with `sosm_jax.train.resume.decide` instead."""
    for step in reversed(self.all_steps()):
      try:
        return (*self.restore(step, abstract_state), step)
      except Exception:  # pylint: disable=broad-except
        continue
    return None

  def restore_meta(self, step: int) -> dict:
    return self.read_meta(step)

  def move_aside(self, step: int) -> str:
    """Moves checkpoint `step` to `<directory>/corrupt/<step>[.N]` (so the step can be saved again)."""
    root = epath.Path(self.directory)
    target = root / "corrupt" / str(step)
    n = 1
    while target.exists():
      target = root / "corrupt" / f"{step}.{n}"
      n += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    (root / str(step)).rename(target)
    self._manager.reload()
    return str(target)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


def move_run_aside(workdir: str, names=("checkpoints", "metrics.jsonl", "tensorboard",
                                        "config.json")) -> str:
  """Moves an earlier run's files to `<workdir>/previous/<UTC time>/` (nothing is deleted)."""
  root = epath.Path(workdir)
  target = root / "previous" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
  n = 1
  while target.exists():
    target = root / "previous" / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.{n}"
    n += 1
  target.mkdir(parents=True)
  for name in names:
    if (root / name).exists():
      (root / name).rename(target / name)
  return str(target)

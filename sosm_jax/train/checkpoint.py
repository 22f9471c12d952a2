"""Orbax checkpoints of the train state plus JSON metadata (data position, stage, tokenizer)."""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Async saves every so often, keeping the last `keep`; restores the newest readable one.

  A checkpoint that fails to restore (corrupt, partial, written by an incompatible config) is
  skipped with a warning and the one before it is tried; orbax already ignores directories whose
  write never finished (it commits a step by an atomic rename).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self.on_save = []   # callables(step) run after each save starts (e.g. the host memory)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, *, wait: bool = False) -> bool:
    """Starts saving `state` and `meta` as checkpoint `step`; returns False if it already exists."""
    if step in self._manager.all_steps():
      return False
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
    for hook in self.on_save:
      hook(step)
    if wait:
      self._manager.wait_until_finished()
    return True

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
    """Returns (state, meta, step) of the newest checkpoint that restores, or None if none does."""
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint %d in %s could not be restored (%s: %s); trying an older one",
                        step, self.directory, type(e).__name__, str(e).splitlines()[0][:300])
        continue
      return restored.state, dict(restored.meta), step
    return None

  def restore_meta(self, step: int) -> dict:
    return dict(self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

"""Checks run before the first compile: every data source of every stage yields a batch.

A bad path, an empty validation split, a synthetic task that does not fit a stage's length or
a tfds name that is not prepared then fails in a second, naming the key, instead of after the
first compile (tens of seconds) or, worse, after a stage of training (its evaluation).
"""
from __future__ import annotations

from typing import Callable, Sequence


class InputCheckFailed(ValueError):
  """A data source named by the config cannot give the batches a stage needs."""


def check_stage_inputs(config, stages: Sequence, first_step: int,
                       make_pipeline: Callable, eval_batch_size: Callable) -> None:
  """Pulls one batch per remaining stage from the train split, and from the validation split
  where the stage-end evaluation reads it.

  make_pipeline(seq_len, global_batch, split) -> a data Pipeline (rows as the loop reads them:
  seq_len × memory.segments with memory). eval_batch_size(stage) -> the evaluation's batch.
  Raises InputCheckFailed naming the config key and the stage.
  """
  segments = int(config.memory.segments) if config.memory.enabled else 1
  seen = set()
  for stage in stages:
    if stage.end_step <= first_step:
      continue
    wants = [("train", stage.seq_len * segments, stage.global_batch, "data.source")]
    if config.train.eval_batches > 0:
      key = "data.eval_source" if config.data.eval_source else "data.source"
      wants.append(("validation", stage.seq_len, eval_batch_size(stage), key))
    for split, seq_len, batch, key in wants:
      if (split, seq_len, batch) in seen:
        continue
      seen.add((split, seq_len, batch))
      _one_batch(make_pipeline, seq_len, batch, split, key, stage)


def _one_batch(make_pipeline, seq_len, batch, split, key, stage) -> None:
  where = f"{stage.name}, {split} split, {batch} rows of {seq_len} tokens"
  try:
    pipeline = make_pipeline(seq_len, batch, split)
  except ValueError as e:
    msg = str(e)
    raise InputCheckFailed(msg if msg.startswith("config.") else
                           f"config.{key}: {msg} ({where})") from None
  try:
    next(pipeline)
  except StopIteration:
    hint = ("set data.eval_source to a source with documents, raise data.val_fraction, or set "
            "train.eval_batches=0 to skip the evaluation" if split == "validation" else
            "use a source with documents")
    raise InputCheckFailed(f"config.{key}: the {split} split yields no batch ({where}); "
                           f"{hint}") from None
  except ValueError as e:
    raise InputCheckFailed(f"config.{key}: {e} ({where})") from None
  finally:
    pipeline.close()

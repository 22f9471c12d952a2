"""Checks run before the workdir is touched: every data source of every stage yields a batch,
and every stage's train step compiles and fits the devices' memory (the preflight).

A bad path, an empty validation split, a synthetic task that does not fit a stage's length or
a tfds name that is not prepared then fails in a second, naming the key, instead of after the
first compile (tens of seconds) or, worse, after a stage of training (its evaluation). A 100K
stage whose step needs more memory than a device has fails at start, naming the stage and the
fix, instead of after hours of the stages before it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from etils import epath

from sosm_jax.train import aot
from sosm_jax.train import curriculum as curriculum_lib

# train.preflight: 'auto' | 'all_stages' | 'off' (see preflight_stages)
PREFLIGHT_SETTINGS = ("auto", "all_stages", "off")


class InputCheckFailed(ValueError):
  """A data source named by the config cannot give the batches a stage needs."""


class StageDoesNotFit(RuntimeError):
  """A stage's compiled train step needs more memory per device than the device has."""


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


def check_memory(compiled, stage, mesh, memory_limit_bytes: float | None) -> dict[str, float]:
  """{'compiled_memory_gib', 'temp_memory_gib'} of a stage's compiled step on `mesh` ({} where the
  backend gives no memory analysis); raises StageDoesNotFit naming the stage, the memory it needs
  against `memory_limit_bytes` per device and the fixes (fsdp, remat, grad_accum)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  need = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  if memory_limit_bytes and need > memory_limit_bytes:
    fixes = aot.fixes(stage, analysis.argument_size_in_bytes, memory_limit_bytes,
                      dict(mesh.shape), mesh.devices.size)
    raise StageDoesNotFit(aot.does_not_fit_message(
        stage, need, memory_limit_bytes, fixes,
        " (the device's limit, or train.memory_limit_gib where set)"))
  return {"compiled_memory_gib": need / 2**30,
          "temp_memory_gib": analysis.temp_size_in_bytes / 2**30}


def stages_to_preflight(setting: str, stages: Sequence, first_step: int, stop_at_step: int,
                        memory_limit_bytes: float | None) -> list:
  """The stages `preflight_stages` compiles, longest sequences first (the likeliest not to fit).

  'off': none (each stage compiles when it starts; the same memory check runs then).
  'all_stages': every stage the run will reach: from `first_step` (the newest checkpoint's step)
  to the end, or to train.stop_at_step when that is set.
  'auto' (the default): 'all_stages' where a per-device memory limit is known (a GPU or TPU
  reports one; train.memory_limit_gib sets one), else 'off': on a CPU there is nothing to check
  against, and compiling ahead would only move the compile time of a smoke run to its start.
  """
  if setting not in PREFLIGHT_SETTINGS:
    raise ValueError(f"config.train.preflight: {setting!r} is unknown; use one of "
                     f"{PREFLIGHT_SETTINGS}")
  if setting == "off" or (setting == "auto" and not memory_limit_bytes):
    return []
  reached = [s for s in stages if s.end_step > first_step
             and (stop_at_step <= 0 or s.first_step < stop_at_step)]
  return sorted(reached, key=lambda s: -s.seq_len)


def preflight_stages(setting: str, stages: Sequence, first_step: int, stop_at_step: int,
                     memory_limit_bytes: float | None,
                     compile_stage: Callable[[Any], tuple[Any, dict]],
                     say: Callable[[str], Any] | None = None) -> dict[int, tuple]:
  """Compiles the train step of every stage the run will reach before any training step (see
  `stages_to_preflight` for which, by `config.train.preflight`): {stage index: what
  compile_stage(stage) returned}, which the loop runs instead of compiling the stage again.

  compile_stage(stage) -> (compiled, info) is the trainer's own compile-and-check of the stage
  (the step it runs: `step.jit_train_step` on `step.abstract_batch`); it raises StageDoesNotFit,
  which stops the run here, before the workdir is touched. say(line): progress, one line per
  stage (a long curriculum compiles for minutes before its first step).
  """
  todo = stages_to_preflight(setting, stages, first_step, stop_at_step, memory_limit_bytes)
  limit = f" of {aot.size_text(memory_limit_bytes)}" if memory_limit_bytes else ""
  out = {}
  for stage in todo:
    out[stage.index] = compile_stage(stage)
    info = out[stage.index][1]
    if say is not None:
      memory = (f", {aot.size_text(info['compiled_memory_gib'] * 2**30)}{limit} per device"
                if "compiled_memory_gib" in info else "")
      say(f"Preflight ({len(out)}/{len(todo)}): {stage.name} compiled in "
          f"{info['compile_seconds']:.1f}s{memory}")
  return out


def newest_checkpoint_step(checkpoint_dir: str) -> int:
  """The newest checkpoint's step in `checkpoint_dir` (0 when there is none), read from its
  folder names without opening the checkpoints or changing anything (a local path or a URL)."""
  root = epath.Path(checkpoint_dir)
  if not root.is_dir():
    return 0
  return max((int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()), default=0)


def compile_fitting_remat(stage, compile_with: Callable[[Any], tuple]) -> tuple[Any, dict]:
  """compile_with(stage) for the stage's remat policy, or for 'auto' for each policy of
  `curriculum.AUTO_REMAT_ORDER` until one fits: (compiled, info with 'remat': the policy).

  compile_with raises StageDoesNotFit for a policy that does not fit; the last one's error is
  raised when none fits (its message names the remaining fixes).
  """
  policies = curriculum_lib.remat_candidates(stage)
  for i, policy in enumerate(policies):
    try:
      compiled, info = compile_with(dataclasses.replace(stage, remat=policy))
    except StageDoesNotFit:
      if i == len(policies) - 1:
        raise
      continue
    return compiled, {**info, "remat": policy}
  raise AssertionError("unreachable")

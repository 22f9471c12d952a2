"""Curriculum arithmetic: stages of growing context length and where a global step falls in them."""
from __future__ import annotations

import dataclasses
from typing import Sequence


# curriculum.remat 'auto': the train step is compiled with these policies in turn, lightest first,
# and the first one whose compiled memory fits the device's limit is kept
AUTO_REMAT_ORDER = ("none", "dots", "full")


def remat_candidates(stage: "Stage") -> tuple[str, ...]:
  """The remat policies to compile a stage's step with, in order: its own, or for 'auto' the
  lightest first (AUTO_REMAT_ORDER)."""
  return AUTO_REMAT_ORDER if stage.remat == "auto" else (stage.remat,)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One context length of the curriculum.

  `global_batch` sequences of `seq_len` tokens per optimizer step, split into `grad_accum`
  micro-batches; steps [first_step, first_step + steps) of the run belong to it.
  """
  index: int
  seq_len: int
  steps: int
  global_batch: int
  grad_accum: int
  remat: str
  rope_base: float
  first_step: int

  @property
  def end_step(self) -> int:
    return self.first_step + self.steps

  @property
  def tokens_per_step(self) -> int:
    return self.seq_len * self.global_batch

  @property
  def name(self) -> str:
    return f"stage {self.index} (seq_len {self.seq_len})"


def _per_stage(values: Sequence, n: int, key: str, default):
  """Expands an optional per-stage override tuple (empty = default, one value = every stage)."""
  values = tuple(values)
  if not values:
    return (default,) * n
  if len(values) == 1:
    return values * n
  if len(values) != n:
    raise ValueError(f"curriculum.{key} has {len(values)} entries but there are {n} stages: "
                     f"give one value, one per stage, or none")
  return values


def stage_rope_base(cur_cfg, stage_index: int, default_rope_base: float) -> float:
  """The RoPE base stage `stage_index` trains with (`curriculum.rope_base`, else the model's)."""
  bases = _per_stage(cur_cfg.rope_base, len(tuple(cur_cfg.seq_lens)), "rope_base",
                     default_rope_base)
  return float(bases[stage_index])


def build_stages(cur_cfg, *, data_parallel: int, default_remat: str,
                 default_rope_base: float) -> list[Stage]:
  """Turns the `curriculum` config section into Stages, checking every stage's batch arithmetic.

  By default the tokens per step stay constant: global batch = tokens_per_step / seq_len. A stage
  whose batch is not a whole number, is smaller than the data-parallel size, or does not split into
  its micro-batches evenly across the data-parallel devices is an error naming the stage.
  """
  seq_lens = tuple(int(s) for s in cur_cfg.seq_lens)
  n = len(seq_lens)
  if n == 0:
    raise ValueError("curriculum.seq_lens is empty: give at least one context length")
  if cur_cfg.steps_per_stage > 0:
    steps = (cur_cfg.steps_per_stage,) * n
  else:
    steps = _per_stage(cur_cfg.steps, n, "steps", None)
  batches = _per_stage(cur_cfg.global_batch, n, "global_batch", 0)
  accums = _per_stage(cur_cfg.grad_accum, n, "grad_accum", 1)
  remats = _per_stage(cur_cfg.remat, n, "remat", default_remat)
  rope_bases = _per_stage(cur_cfg.rope_base, n, "rope_base", default_rope_base)

  stages, first = [], 0
  for i in range(n):
    seq_len, n_steps, accum = seq_lens[i], steps[i], int(accums[i])
    where = f"curriculum stage {i} (seq_len {seq_len})"
    if seq_len <= 0:
      raise ValueError(f"{where}: seq_len must be positive")
    if n_steps is None or int(n_steps) <= 0:
      raise ValueError(f"{where}: steps must be positive (set curriculum.steps or "
                       f"curriculum.steps_per_stage)")
    batch = int(batches[i])
    if batch <= 0:
      if cur_cfg.tokens_per_step % seq_len:
        raise ValueError(f"{where}: tokens_per_step {cur_cfg.tokens_per_step} is not a multiple of "
                         f"seq_len; pick tokens_per_step divisible by every seq_len")
      batch = cur_cfg.tokens_per_step // seq_len
    if accum < 1 or batch % accum:
      raise ValueError(f"{where}: global batch {batch} does not split into grad_accum={accum} "
                       f"micro-batches")
    micro = batch // accum
    if micro < data_parallel or micro % data_parallel:
      raise ValueError(
          f"{where}: micro-batch {micro} (global batch {batch} / grad_accum {accum}) must be a "
          f"positive multiple of the data-parallel size {data_parallel}; raise "
          f"curriculum.tokens_per_step, lower grad_accum, or use fewer data/fsdp devices")
    stages.append(Stage(i, seq_len, int(n_steps), batch, accum, str(remats[i]),
                        float(rope_bases[i]), first))
    first += int(n_steps)
  return stages


def total_steps(stages: Sequence[Stage]) -> int:
  return stages[-1].end_step if stages else 0


def stage_at_step(stages: Sequence[Stage], step: int) -> Stage | None:
  """The stage that global step `step` belongs to; None once the curriculum is finished."""
  for stage in stages:
    if step < stage.end_step:
      return stage
  return None

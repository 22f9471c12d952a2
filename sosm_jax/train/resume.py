"""Whether a run resumes, and from which checkpoint: a decision, never a silent fallback.

Checkpoints in the work directory are looked at newest first:
- unreadable (its files are damaged or missing; `verify` may add its own checks, e.g. the host
  memory saved beside it) -> skipped with one line and, once a readable one is found, moved to
  `<checkpoints>/corrupt/<step>` so the step can be written again later;
- readable but from another model (a model key that changes what the parameters are, the
  tokenizer, or any array's shape) -> the run is refused with the differing keys named; a
  changed `optimizer.fused` is no difference (the checkpoint form converts the optimizer state,
  `state.checkpoint_form`);
- readable and matching -> resumed.
If checkpoints exist and none is readable the run is refused too. `restart=True` turns both
refusals into: move the earlier run aside (`<workdir>/previous/<time>/`, nothing deleted) and
start at step 0. A matching checkpoint is always resumed, restart or not.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from sosm_jax.train import checkpoint as ckpt_lib

# Model keys that change how the model is computed, not which parameters it has or what they
# mean: a run may resume with other values (e.g. another kernel path on another machine).
EXECUTION_KEYS = ("remat", "attn_impl", "attn_block_size", "linear_impl", "chunk_size",
                  "loss_chunk_size", "rope_base", "graph.query_chunk", "graph.key_chunk",
                  "attn_decode_read_len", "attn_decode_impl")


class ResumeRefused(RuntimeError):
  """The work directory holds a run this configuration cannot continue."""


class CorruptCheckpoint(ValueError):
  """Raised by a `verify` callback: a file saved with the checkpoint is unreadable."""


@dataclasses.dataclass
class Resumed:
  state: Any
  meta: dict
  step: int
  skipped: list[int]          # unreadable newer checkpoints, moved aside
  moved_to: str | None = None  # where a refused earlier run went (restart=True)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def model_differences(saved: dict, current: dict) -> list[str]:
  """'key: saved X, now Y' for every model key (but EXECUTION_KEYS) whose value differs.

  A key the checkpoint does not have was added to the code after it was written; it is not a
  difference by itself (parameters it adds show up as shape differences).
  """
  a, b = _flatten(saved), _flatten(current)
  keys = sorted(set(a) - set(EXECUTION_KEYS))
  return [f"model.{k}: saved {a.get(k)!r}, now {b.get(k)!r}" for k in keys
          if _norm(a.get(k)) != _norm(b.get(k))]


def _norm(v):
  return tuple(v) if isinstance(v, (list, tuple)) else v


def tokenizer_differences(saved: dict, current: dict) -> list[str]:
  keys = sorted((set(saved) | set(current)) - {"path"})
  return [f"tokenizer {k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in keys
          if saved.get(k) != current.get(k)]


def shape_differences(saved: dict, wanted: dict, limit: int = 6) -> list[str]:
  """Arrays missing, extra or of another shape/dtype between two `leaf_shapes` dicts."""
  diffs = []
  for key in sorted(set(saved) | set(wanted), key=lambda k: (not k.startswith("params/"), k)):
    if key not in saved:
      diffs.append(f"{key}: not in the checkpoint")
    elif key not in wanted:
      diffs.append(f"{key}: in the checkpoint but not in this model/optimizer")
    elif saved[key] != wanted[key]:
      diffs.append(f"{key}: saved {saved[key][0]} {saved[key][1]}, now {wanted[key][0]} "
                   f"{wanted[key][1]}")
  if len(diffs) > limit:
    diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more arrays"]
  return diffs


def _choices(workdir: str) -> str:
  return (f"Either resume with the settings the run was started with (its config.json in "
          f"{workdir}), or train in a new --workdir, or add --config.train.restart=true to move "
          f"the earlier run aside to {workdir}/previous/ (nothing is deleted) and start at step 0.")


def decide(checkpointer: ckpt_lib.Checkpointer, abstract_state, *, workdir: str, model: dict,
           tokenizer: dict, restart: bool,
           verify: Callable[[int, dict], None] | None = None) -> Resumed | None:
  """Restores the newest usable checkpoint, or returns None to start fresh (see module doc).

  model: the requested `config.model` as a dict; tokenizer: the tokenizer's identity().
  verify(step, meta): raises CorruptCheckpoint if something saved beside the checkpoint is bad.
  Raises ResumeRefused (naming keys and choices) when the run must not start.
  """
  # what a checkpoint may hold for this run (its form's, what it writes first; the fused moments
  # as per-parameter trees or the per-leaf chain's state, for either setting of optimizer.fused)
  readable = [ckpt_lib.leaf_shapes(t) for t, _ in checkpointer.sources(abstract_state)]
  unreadable: list[tuple[int, str]] = []
  for step in reversed(checkpointer.all_steps()):
    try:
      meta = checkpointer.read_meta(step)
      saved_shapes = checkpointer.read_shapes(step)
    except Exception as e:  # pylint: disable=broad-except
      unreadable.append((step, ckpt_lib.first_line(e)))
      continue
    shapes = []
    if saved_shapes not in readable:   # named against the nearest form
      nearest = min(readable, key=lambda want: sum(
          saved_shapes.get(k) != want.get(k) for k in set(saved_shapes) | set(want)))
      shapes = shape_differences(saved_shapes, nearest)
    diffs = (model_differences(meta.get("config", {}).get("model", {}), model)
             + tokenizer_differences(meta.get("tokenizer", {}), tokenizer) + shapes)
    if diffs:
      return _refuse_or_restart(
          checkpointer, workdir, restart,
          f"checkpoint {step} in {checkpointer.directory} was written by a different model, so "
          f"this run cannot continue it:\n  " + "\n  ".join(diffs) + "\n" + _choices(workdir))
    try:
      state, meta = checkpointer.restore(step, abstract_state)
      if verify is not None:
        verify(step, meta)
    except Exception as e:  # pylint: disable=broad-except
      unreadable.append((step, ckpt_lib.first_line(e)))
      continue
    for bad, why in unreadable:
      moved = checkpointer.move_aside(bad)
      print(f"Checkpoint {bad} is unreadable ({why}); moved to {moved}.", flush=True)
    return Resumed(state=state, meta=meta, step=step, skipped=[s for s, _ in unreadable])
  if not unreadable:
    return None
  listing = "\n  ".join(f"checkpoint {s}: {why}" for s, why in unreadable)
  return _refuse_or_restart(
      checkpointer, workdir, restart,
      f"no checkpoint in {checkpointer.directory} can be read:\n  {listing}\n" + _choices(workdir))


def _refuse_or_restart(checkpointer, workdir: str, restart: bool, message: str):
  if not restart:
    raise ResumeRefused(message)
  checkpointer.close()
  moved = ckpt_lib.move_run_aside(workdir)
  print(f"train.restart: the earlier run in {workdir} was moved to {moved}; starting at step 0.",
        flush=True)
  return Resumed(state=None, meta={}, step=0, skipped=[], moved_to=moved)

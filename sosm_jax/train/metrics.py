"""Metrics: JSONL and TensorBoard files in the work directory, MFU and device memory."""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from etils import epath

# Dense bf16 peak FLOP/s per chip, for MFU. Unknown devices (CPU) report no MFU.
_PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("h800", 989e12), ("a100", 312e12), ("l4", 121e12),
    ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # libtpu names v5p chips "TPU v5" (after the "lite" and "v5e" rows)
    ("tpu v4", 275e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind.lower()
  for name, flops in _PEAK_FLOPS:
    if name in kind:
      return flops
  return None


def device_memory() -> dict[str, float]:
  """Peak and limit of device memory in GiB (first local device), where the platform reports it."""
  stats = jax.local_devices()[0].memory_stats() or {}
  out = {}
  if "peak_bytes_in_use" in stats:
    out["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
  if "bytes_limit" in stats:
    out["memory_limit_gib"] = stats["bytes_limit"] / 2**30
  return out


def device_memory_limit_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def _scalar(value: Any):
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


def drop_replayed(workdir: str, step: int, redo_eval_stage: int | None = None) -> int:
  """Before resuming at checkpoint `step`: moves the records the resumed run will write again out
  of metrics.jsonl, appending them to metrics.replayed.jsonl (nothing an earlier run wrote is
  lost, and no step is recorded twice in metrics.jsonl).

  Those are records after `step`, stage records at `step` (the stage is compiled again) and,
  when the stage-end evaluation of stage `redo_eval_stage` is redone, its eval record. Returns
  how many records were moved. Only the writing process calls this.
  """
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return 0
  kept, replayed = [], []
  for line in path.read_text().splitlines(keepends=True):
    line = line if line.endswith("\n") else line + "\n"
    try:
      rec = json.loads(line)
    except ValueError:   # a line cut short by a kill
      replayed.append(line)
      continue
    again = (rec.get("step", 0) > step
             or (rec.get("step") == step and rec.get("kind") == "stage")
             or (rec.get("step") == step and rec.get("kind") == "eval"
                 and redo_eval_stage is not None and rec.get("stage") == redo_eval_stage))
    (replayed if again else kept).append(line)
  if replayed:
    # archived first, then metrics.jsonl written beside and renamed: a kill in between leaves
    # the records in both files, never in neither
    with (path.parent / "metrics.replayed.jsonl").open("a") as archive:
      archive.write("".join(replayed))
    partial = path.parent / "metrics.jsonl.tmp"
    partial.write_text("".join(kept))
    partial.replace(path)
  return len(replayed)


class MetricsWriter:
  """Appends one JSON object per record to `metrics.jsonl` and mirrors scalars to TensorBoard.

  Only the writing process (process 0) creates files; the others get a writer that does nothing.
  In a bucket (gs://...), where an object cannot be appended to, the lines are kept and the
  object is rewritten at most every `remote_flush_seconds` and at close.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, remote_flush_seconds: float = 60.0):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self._lines: list[str] | None = None
    self._flushed_at = time.time()
    self._flush_every = remote_flush_seconds
    if not enabled:
      return
    self.path = epath.Path(workdir) / "metrics.jsonl"
    if "://" in str(workdir):
      self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
    else:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(self.path, "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter  # no TensorFlow needed; gs:// via google-cloud-storage
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self._tb = None

  def write(self, step: int, record: dict[str, Any], *, kind: str = "train") -> None:
    if not self.enabled:
      return
    clean = {k: _scalar(v) for k, v in record.items() if v is not None}
    line = json.dumps({"step": int(step), "kind": kind, "time": time.time(), **clean}) + "\n"
    if self._lines is not None:
      self._lines.append(line)
      if kind != "train" or time.time() - self._flushed_at > self._flush_every:
        self._flush_remote()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._tb is not None:
      for key, value in clean.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(f"{kind}/{key}", value, int(step))

  def _flush_remote(self) -> None:
    self.path.write_text("".join(self._lines))
    self._flushed_at = time.time()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._lines is not None:
      self._flush_remote()
    if self._tb is not None:
      self._tb.close()

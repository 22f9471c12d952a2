"""Training with memory beyond the window: segment-by-segment streams, host retrieval, checkpoints.

With `config.memory.enabled`, every batch row is a stream: the data pipeline packs rows of
`memory.segments × seq_len` tokens and each train step takes the next window of `seq_len`
tokens of every row (so the compiled step, tokens per step and FLOPs are those of the stage).
Per step (`SegmentFeeder`):

1. probe: the memory layers' q/k/v of the window (a jitted forward pass with the current params);
2. host retrieve: top-k entries per query from the stream's memory, only from the same document
   (entries carry the row's document id; padding is never stored), as batch['memory'];
3. the train step runs with those memory edges (dispatched asynchronously);
4. `after_dispatch`: the window's keys/values are added to the memory while the step computes
   (and, with `memory.prefetch`, the next window's memory is retrieved then too).

Memory is reset when a row starts (a new set of streams) and, per stream, when a window starts
a new document. It is saved beside each checkpoint (`<checkpoints>/memory/<step>/layer_<i>/
stream_<j>`: the FAISS index files and the stored keys/values/metadata) and restored on resume,
which continues the interrupted row at the next window. Single process only.

Config (`config.memory`): the host memory keys of `sosm_jax.memory.store.MEMORY_DEFAULTS`
(index, top_k, capacity, num_shards, hnsw_m, hnsw_ef_construction, hnsw_ef_search,
search_threads) plus
  enabled    False: train without memory (batch rows are independent windows)
  segments   windows of seq_len tokens per stream row (memory spans segments × seq_len tokens)
  layers     memory layers (graph layer indices); () = every 'graph' layer
  prefetch   True: probe window s+1 with the params of step s and search the memory for it
             while step s computes (queries one step stale; hides the host search). The first
             window of a row is never prefetched. False: probe and search before each step.
"""
from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sosm_jax.memory.segments import SegmentRunner, memory_layer_indices
from sosm_jax.memory.store import MEMORY_DEFAULTS, HostMemory, validate_memory_config
from sosm_jax.train.resume import CorruptCheckpoint

TRAIN_KEYS = dict(enabled=False, segments=4, layers=(), prefetch=False)
_BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def default_config() -> ml_collections.ConfigDict:
  """`config.memory`: trainer keys (`TRAIN_KEYS`) plus the host memory keys (`MEMORY_DEFAULTS`)."""
  return ml_collections.ConfigDict({**TRAIN_KEYS, **MEMORY_DEFAULTS})


def store_config(mem_cfg) -> dict:
  """The host memory keys of `config.memory` (for `HostMemory`)."""
  return {k: mem_cfg[k] for k in MEMORY_DEFAULTS}


def validate_config(config) -> None:
  """Raises ValueError naming the bad `config.memory` key and the fix."""
  m = config.memory
  try:
    validate_memory_config(store_config(m))
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  if not isinstance(m.segments, int) or m.segments < 1:
    raise ValueError(f"config.memory.segments: {m.segments!r} must be an int >= 1 (windows of "
                     f"seq_len tokens per stream row); use e.g. 4")
  if not m.enabled:
    return
  try:
    memory_layer_indices(config.model, tuple(m.layers))
  except ValueError as e:
    msg = str(e)
    raise ValueError(f"config.{msg}" if msg.startswith("memory.")
                     else f"config.memory.enabled: {msg}") from None
  if jax.process_count() > 1:
    raise ValueError("config.memory.enabled: training with memory runs on one process (the host "
                     "memory holds this process's streams); use one host or disable memory")


def memory_dir(checkpoint_dir: str, step: int) -> str:
  """Where the memory of checkpoint `step` lives (beside orbax's `<checkpoint_dir>/<step>`)."""
  return os.path.join(checkpoint_dir, "memory", str(int(step)))


class SegmentFeeder:
  """The data iterator of one stage with memory (see module doc); duck-types `Pipeline`.

  make_pipeline(seq_len, start_state) -> a data `Pipeline` of `[batch, seq_len]` rows.
  start_state: a state from `get_state` (or a plain pipeline state, or None).
  restore_dir: memory saved with the checkpoint being resumed (None: not resuming).
  """

  def __init__(self, model, mem_cfg, *, seq_len: int, batch_size: int, make_pipeline,
               start_state=None, restore_dir: str | None = None):
    self.seq_len, self.n = int(seq_len), int(mem_cfg.segments)
    self.row_len = self.seq_len * self.n
    self.runner = SegmentRunner(model, store_config(mem_cfg), num_streams=batch_size,
                                layers=tuple(mem_cfg.layers) or None)
    state = start_state if isinstance(start_state, dict) else {}
    resume = (state.get("memory_rows") and state["row_len"] == self.row_len
              and 0 < state["segment"] < self.n and restore_dir is not None)
    if state.get("memory_rows"):
      pipe_state = state["before"] if resume or state["segment"] == 0 else state["after"]
    else:
      pipe_state = start_state
    self.pipeline = make_pipeline(self.row_len, pipe_state)
    self.before = self.after = self.pipeline.get_state()
    self.row, self.segment, self.pending = None, self.n, None
    self.prefetch = bool(mem_cfg.prefetch)
    self.next_probe = self.ready = None
    self.counts = {"windows": 0, "memory_edges": 0.0, "memory_slots": 0.0}
    if resume:
      self._fetch_row()
      self.segment = int(state["segment"])
      self.restore(restore_dir)

  # ------------------------------------------------------------------ iteration

  def _fetch_row(self):
    self.before = self.pipeline.get_state()
    self.row = next(self.pipeline)
    self.after = self.pipeline.get_state()
    self.segment = 0
    self.runner.reset()        # new rows: every stream starts empty

  def _window(self, s: int) -> dict:
    L = self.seq_len
    return {k: np.asarray(self.row[k][:, s * L:(s + 1) * L]) for k in _BATCH_KEYS}

  def _probe(self, params, seg):
    """The memory layers' q/k/v of a window (device arrays: dispatched, not waited for)."""
    return self.runner.probe(params, jnp.asarray(seg["inputs"]), jnp.asarray(seg["positions"]),
                             jnp.asarray(seg["segment_ids"]))

  def _retrieve(self, s: int, seg, probed):
    """Host search for window s (after window s-1 was added): (numpy probe, memory)."""
    doc = seg["segment_ids"]
    if s > 0:   # a stream whose window starts a new document forgets the previous one
      starts = np.nonzero(doc[:, 0] != self.row["segment_ids"][:, s * self.seq_len - 1])[0]
      if len(starts):
        self.runner.reset(starts.tolist())
    probed = jax.tree.map(np.asarray, probed)
    return probed, self.runner.retrieve(probed, match={"doc": doc})

  def next_batch(self, params) -> dict:
    """The next window `[batch, seq_len]` of every stream with its retrieved 'memory'.

    With prefetch, the window's memory was already retrieved during the previous step (see
    `after_dispatch`), and the next window of the row is probed now, with these params.
    """
    if self.segment >= self.n:
      self._fetch_row()
    s = self.segment
    if self.ready is not None and self.ready[0] == s:
      _, seg, probed, memory = self.ready
    else:
      seg = self._window(s)
      probed, memory = self._retrieve(s, seg, self._probe(params, seg))
    self.ready = None
    if self.prefetch and s + 1 < self.n:   # dispatched before the step donates these params
      nxt = self._window(s + 1)
      self.next_probe = (s + 1, nxt, self._probe(params, nxt))
    self.pending = (probed, seg["positions"], seg["segment_ids"], s)
    self.segment += 1
    mask = memory[self.runner.layers[0]][2]
    self.counts["windows"] += 1
    self.counts["memory_edges"] += float(mask.sum())
    self.counts["memory_slots"] += float(mask.size)
    return {**seg, "memory": memory}

  def after_dispatch(self) -> None:
    """Host work while the step computes (call right after dispatching it).

    Adds the window's keys/values; with prefetch, then retrieves the next window's memory (its
    queries from the params before this step: one step stale, which only affects which entries
    are found; the step that uses them attends with its own queries).
    """
    if self.pending is not None:
      probed, pos, doc, s = self.pending
      self.runner.add(probed, positions=pos, segment=s, metadata={"doc": doc}, where=doc > 0)
      self.pending = None
    if self.next_probe is not None:
      s, seg, probed = self.next_probe
      self.next_probe = None
      self.ready = (s, seg) + self._retrieve(s, seg, probed)

  def __iter__(self):
    return self

  def __next__(self):
    raise TypeError("SegmentFeeder needs the params: call next_batch(params).")

  # ------------------------------------------------------------------ state

  def get_state(self) -> dict:
    """JSON-able: pipeline states before/after the current row and the windows consumed."""
    return {"memory_rows": True, "before": self.before, "after": self.after,
            "segment": int(self.segment), "row_len": self.row_len}

  def stats(self) -> dict:
    out = dict(self.pipeline.stats())
    entries = self.runner.entries()
    out["memory_entries_mean"] = float(np.mean(entries))
    if self.counts["memory_slots"]:
      out["memory_valid_fraction"] = self.counts["memory_edges"] / self.counts["memory_slots"]
    return out

  def close(self) -> None:
    self.pipeline.close()

  def save(self, directory: str) -> None:
    self.after_dispatch()
    self.runner.save(directory)

  def restore(self, directory: str) -> None:
    if os.path.exists(directory):
      self.runner.load(directory)
      logging.info("memory restored from %s: %s entries per stream", directory, self.runner.entries())
      return
    raise ValueError(f"resuming in the middle of a row needs its memory at {directory!r}, which is "
                     f"missing; restore that folder (saved with the checkpoint) or delete the "
                     f"checkpoint to resume from an earlier one")


def needs_memory(data_state, segments: int) -> bool:
  """Whether resuming at `data_state` continues a row, so needs the memory saved with it."""
  return (isinstance(data_state, dict) and bool(data_state.get("memory_rows"))
          and 0 < int(data_state.get("segment", 0)) < int(segments))


def check_saved_memory(directory: str) -> None:
  """Loads every stream's memory under `directory` (layer_<i>/stream_<j>); ValueError naming a
  missing or damaged file."""
  if not os.path.isdir(directory):
    raise ValueError(f"{directory}: the host memory saved with this checkpoint is missing")
  layers = sorted(n for n in os.listdir(directory) if n.startswith("layer_"))
  if not layers:
    raise ValueError(f"{directory}: holds no layer_<i> memory")
  for layer in layers:
    for stream in sorted(os.listdir(os.path.join(directory, layer))):
      HostMemory.load(os.path.join(directory, layer, stream))


class MemoryTraining:
  """The loop's hooks: a feeder per stage, the abstract memory inputs, save/restore with checkpoints."""

  def __init__(self, config, checkpoint_dir: str, resume_step: int | None = None):
    if "://" in checkpoint_dir:
      raise ValueError(f"config.memory.enabled: the host memory is saved as local files beside the "
                       f"checkpoints, but they go to {checkpoint_dir!r}; use a local --workdir")
    self.cfg = config.memory
    self.checkpoint_dir = checkpoint_dir
    self.resume_step = resume_step
    self.feeder: SegmentFeeder | None = None

  def verify(self, step: int, meta: dict) -> None:
    """Raises CorruptCheckpoint if resuming checkpoint `step` needs its memory and that is bad."""
    if not needs_memory(meta.get("data_state"), self.cfg.segments):
      return
    try:
      check_saved_memory(memory_dir(self.checkpoint_dir, step))
    except ValueError as e:
      raise CorruptCheckpoint(str(e)) from None

  def stage_feeder(self, model, stage, make_pipeline, start_state) -> SegmentFeeder:
    """make_pipeline(seq_len, global_batch, start_state) -> Pipeline."""
    restore = None
    if self.resume_step is not None:
      restore, self.resume_step = memory_dir(self.checkpoint_dir, self.resume_step), None
    self.feeder = SegmentFeeder(
        model, self.cfg, seq_len=stage.seq_len, batch_size=stage.global_batch,
        make_pipeline=lambda n, st: make_pipeline(n, stage.global_batch, st),
        start_state=start_state, restore_dir=restore)
    return self.feeder

  def abstract_inputs(self, model, stage, sharding) -> dict:
    """{'memory': ShapeDtypeStructs} the compiled step takes beside the batch."""
    runner = self.feeder.runner if self.feeder is not None else None
    layers = runner.layers if runner else memory_layer_indices(model.cfg, tuple(self.cfg.layers))
    from sosm_jax.layers.graph import graph_dims  # pylint: disable=import-outside-toplevel
    d = graph_dims(model.cfg)
    shape = (stage.global_batch, stage.seq_len, int(self.cfg.top_k))
    kv = jax.ShapeDtypeStruct(shape + (d["kv_heads"], d["head_dim"]), jnp.float32, sharding=sharding)
    mask = jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=sharding)
    return {"memory": {i: (kv, kv, mask) for i in layers}}

  def save(self, step: int) -> None:
    """Checkpointer hook: the current memory beside checkpoint `step`; drops that of deleted ones.

    Written to `<step>.tmp` and renamed, so a memory folder is either complete or absent.
    """
    if self.feeder is None:
      return
    target = memory_dir(self.checkpoint_dir, step)
    partial = target + ".tmp"
    for path in (partial, target):
      if os.path.exists(path):
        shutil.rmtree(path)
    self.feeder.save(partial)
    os.replace(partial, target)
    root = os.path.dirname(target)
    kept = {str(s) for s in _orbax_steps(self.checkpoint_dir)} | {str(int(step))}
    for name in os.listdir(root):
      if name not in kept:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _orbax_steps(directory: str) -> list[int]:
  return [int(n) for n in os.listdir(directory) if n.isdigit()]

"""The grain input pipeline: documents -> shuffle -> shard -> tokenize -> pack -> batch -> prefetch.

    ds = MapDataset per source component (text/stdlib/tfds/array_record readers, or task
         generators), each shuffled with a seed derived from `seed` and repeated (train), mixed
         by weight (`mix:`), then sliced [process_index::process_count] so every process reads
         different documents
    -> .map(tokenize)                 BOS + ids + EOS per text document; task examples as made
    -> .to_iter_dataset(ReadOptions)  documents read by `read_threads` threads
    -> PackIterDataset                rows of seq_len + 1 tokens (packing.py)
    -> .batch(batch_size) -> .map(rows_to_batch)
    -> ThreadPrefetchIterDataset      (num_workers = 0) or .mp_prefetch (num_workers > 0)

Training data repeats forever (each epoch reshuffled); validation data is one pass in file order,
its last batch filled with empty rows. `Pipeline.get_state()` is JSON: the grain iterator state
plus what the pipeline was built from; `set_state` restores the exact next batch.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import weakref
from typing import Any

import grain
import numpy as np

from sosm_jax.data import config as config_lib
from sosm_jax.data import sources
from sosm_jax.data import tasks
from sosm_jax.data.packing import Doc, PackIterDataset, rows_to_batch
from sosm_jax.data.tokenizers import ByteTokenizer, check_tokenizer_identity

STATE_VERSION = 1
_INFINITE = 2**62  # length of a generated (task) stream for training
# Built-from values that a saved state must match; seq_len and batch_size may change.
_MUST_MATCH = ("source", "split", "seed", "process_index", "process_count", "num_workers",
               "shuffle")


class _Tokenize:
  """Raw document -> Doc: text gets BOS + ids + EOS; token records are used as stored."""

  def __init__(self, tokenizer):
    self._tok = tokenizer
    self._bytes = isinstance(tokenizer, ByteTokenizer)

  def __call__(self, item) -> Doc:
    if isinstance(item, np.ndarray):
      return Doc(item)
    text, replaced = item
    if not text:
      return Doc(np.zeros(0, np.int32), replaced=replaced)
    if self._bytes:  # fast path: UTF-8 bytes are the ids
      ids = np.frombuffer(text.encode("utf-8"), np.uint8)
    else:
      ids = self._tok.encode_array(text)
    out = np.empty(len(ids) + 2, np.int32)
    out[0], out[-1] = self._tok.bos_id, self._tok.eos_id
    out[1:-1] = ids
    return Doc(out, replaced=replaced)


@dataclasses.dataclass(frozen=True)
class _TaskOptions:
  """The task keys of the data config, as a plain picklable value."""
  mqar_num_pairs: int
  mqar_num_queries: int
  task_vocab_size: int
  passkey_digits: int
  passkey_depth: float
  niah_num_needles: int
  niah_digits: int
  answer_weight: int
  task_depths: str
  niah_kind_weights: tuple


class _TaskDocs:
  """Index -> task example Doc; deterministic in (seed, split, index, length)."""

  def __init__(self, task: str, tokenizer, length: int, seed: int, split_code: int,
               options: _TaskOptions):
    self._task, self._tok, self._len = task, tokenizer, length
    self._seed, self._split_code, self._options = seed, split_code, options

  def __call__(self, index: int) -> Doc:
    rng = np.random.default_rng([self._seed, self._split_code, int(index)])
    ex = tasks.make_example(self._task, self._tok, self._len, rng, self._options)
    mask = (ex.answer_mask > 0).astype(np.uint8) * np.uint8(self._options.answer_weight)
    return Doc(ex.tokens, mask=mask, atomic=True)


def _component_seed(seed: int, index: int) -> int:
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _component(comp: sources.Component, index: int, data_cfg, tokenizer, *, split: str,
               training: bool, seed: int, task_length: int):
  """One source component -> (MapDataset of Doc, listing summary)."""
  cseed = _component_seed(seed, index)
  if comp.kind == "synthetic":
    options = _TaskOptions(data_cfg.mqar_num_pairs, data_cfg.mqar_num_queries,
                           data_cfg.task_vocab_size, data_cfg.passkey_digits,
                           data_cfg.passkey_depth, data_cfg.niah_num_needles,
                           data_cfg.niah_digits, data_cfg.task_answer_weight,
                           data_cfg.task_depths, tuple(data_cfg.niah_kind_weights))
    make = _TaskDocs(comp.arg, tokenizer, task_length, cseed, 0 if training else 1, options)
    # bad task settings fail here, not later inside a reader thread
    tasks.check_task_length(comp.arg, tokenizer, task_length, options)
    n = _INFINITE if training else data_cfg.eval_examples
    return grain.MapDataset.range(n).map(make), {"source": f"synthetic:{comp.arg}",
                                                "documents": n, "task_length": task_length}
  reader = sources.open_documents(comp, data_cfg, split)
  ds = grain.MapDataset.source(reader)
  if training:
    if data_cfg.shuffle:
      ds = ds.shuffle(seed=cseed)
    ds = ds.repeat()
  return ds.map(_Tokenize(tokenizer)), sources.describe(reader)


def build_documents(source: str, data_cfg, tokenizer, *, split: str, training: bool, seed: int,
                    task_length: int):
  """The (unsharded) MapDataset of Docs of `source`, and one listing summary per component."""
  comps = sources.parse_source(source)
  built = [_component(c, i, data_cfg, tokenizer, split=split, training=training, seed=seed,
                      task_length=task_length) for i, c in enumerate(comps)]
  summaries = [s for _, s in built]
  if len(built) == 1:
    return built[0][0], summaries
  total = sum(c.weight for c in comps)
  return grain.MapDataset.mix([d for d, _ in built], [c.weight / total for c in comps]), summaries


def _find_counts(state: Any) -> dict[str, int]:
  """Sums the packers' 'counts' found anywhere in a (possibly multi-worker) grain state."""
  total = {"documents": 0, "empty_documents": 0, "replaced_bytes": 0}
  stack = [state]
  while stack:
    node = stack.pop()
    if isinstance(node, dict):
      if "counts" in node and "has_current" in node:
        for k in total:
          total[k] += int(node["counts"].get(k, 0))
      else:
        stack.extend(node.values())
    elif isinstance(node, (list, tuple)):
      stack.extend(node)
    elif isinstance(node, (str, bytes)):
      try:  # multi-worker grain states nest the workers' states as JSON strings
        stack.append(json.loads(node))
      except (ValueError, TypeError):
        pass
  return total


_LIVE: "weakref.WeakSet[Pipeline]" = weakref.WeakSet()


@atexit.register
def _close_live_pipelines() -> None:
  # Prefetch threads and worker processes are stopped before interpreter teardown, which would
  # otherwise run grain's finalisers against half-unloaded modules.
  for pipeline in list(_LIVE):
    pipeline.close()


class Pipeline:
  """Iterator of batches (dicts of `[batch_size, seq_len]` numpy arrays) for this process."""

  def __init__(self, dataset: grain.IterDataset, meta: dict[str, Any], summaries: list[dict]):
    self._dataset = dataset
    self._iter = iter(dataset)
    self.meta = meta
    self.summaries = summaries
    _LIVE.add(self)

  def __iter__(self) -> "Pipeline":
    return self

  def _live(self):
    if self._iter is None:
      raise ValueError("this data pipeline is closed; build a new one with make_pipeline")
    return self._iter

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._live())
    if self.meta["num_workers"]:
      # Worker outputs live in shared memory until their finaliser runs; plain copies free it now
      # (and keep batches held at interpreter exit from outliving grain's modules).
      batch = {k: np.array(v, copy=True) for k, v in batch.items()}
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-able position: restoring it (here or in a rebuilt pipeline) yields the next batch."""
    return {"version": STATE_VERSION, "meta": dict(self.meta), "grain": self._live().get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state` (from get_state, possibly of a pipeline with another seq_len)."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
      raise ValueError(f"not a data pipeline state of version {STATE_VERSION}: "
                       f"{str(state)[:200]}")
    saved = state["meta"]
    diffs = [f"{k}: saved {saved.get(k)!r}, now {self.meta.get(k)!r}" for k in _MUST_MATCH
             if saved.get(k) != self.meta.get(k)]
    if diffs:
      raise ValueError("the data state was saved by a differently built pipeline ("
                       + "; ".join(diffs) + "); resume with the same data config, seed and "
                       "number of processes/workers, or start without a data state")
    check_tokenizer_identity(saved["tokenizer"], self.meta["tokenizer"])
    self._live().set_state(state["grain"])

  def stats(self) -> dict[str, int]:
    """Documents read, empty documents skipped, undecodable bytes replaced (since the start of
    the data, carried through checkpoints), plus the empty files skipped when listing."""
    counts = _find_counts(self._live().get_state())
    counts["empty_files_skipped"] = sum(int(s.get("empty_documents", 0)) for s in self.summaries)
    return counts

  def close(self) -> None:
    """Stops prefetch threads / worker processes; the pipeline cannot be used afterwards."""
    if self._iter is not None:
      self._iter.close()
      # Dropping the grain iterator now lets its finaliser run while modules are still loaded.
      self._iter = None

  def __enter__(self) -> "Pipeline":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def make_pipeline(data_cfg, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                  split: str = "train", process_index: int | None = None,
                  process_count: int | None = None, start_state: dict | None = None) -> Pipeline:
  """This process's batches of `data_cfg`'s source, packed to seq_len (see the module docstring).

  batch_size is per process. split: 'train' (repeats, shuffled) or 'validation' (one pass over
  the held-out documents, or over data_cfg.eval_source when set). start_state: a state from
  `Pipeline.get_state()`, also one saved at another seq_len / batch_size (curriculum stages).
  """
  config_lib.validate_data_config(data_cfg)
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive")
  if split not in ("train", "validation"):
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
  training = split == "train"
  source, source_split = data_cfg.source, split
  if not training and data_cfg.eval_source:
    source, source_split = data_cfg.eval_source, "all"
  task_length = config_lib.task_length_for(data_cfg, seq_len)
  has_tasks = any(c.kind == "synthetic" for c in sources.parse_source(source))
  if has_tasks and task_length > seq_len:
    raise ValueError(f"config.data.task_length={task_length} exceeds seq_len={seq_len}; a task "
                     f"example must fit one row: use 0 (= seq_len) or a smaller length")

  if has_tasks and task_length != (data_cfg.task_length or seq_len):
    for comp in sources.parse_source(source):   # name the key when its length is too short
      if comp.kind == "synthetic":
        try:
          tasks.check_task_length(comp.arg, tokenizer, task_length, data_cfg)
        except ValueError as e:
          raise ValueError(f"config.data.task_length_by_seq_len gives {task_length} at seq_len="
                           f"{seq_len}, too short for synthetic:{comp.arg}: {e}") from None
  docs, summaries = build_documents(source, data_cfg, tokenizer, split=source_split,
                                    training=training, seed=seed, task_length=task_length)
  docs = docs[process_index::process_count]
  read = grain.ReadOptions(num_threads=data_cfg.read_threads,
                           prefetch_buffer_size=4 * data_cfg.read_threads + 4)
  # A run of empty documents longer than two passes over the source means it has no text.
  listed = sum(int(s.get("documents", 0)) for s in summaries)
  ds = PackIterDataset(docs.to_iter_dataset(read), seq_len=seq_len, pad_id=tokenizer.pad_id,
                       max_empty_run=min(10_000, 2 * listed + 10))
  ds = ds.batch(batch_size, drop_remainder=False)
  ds = ds.map(_RowsToBatch(batch_size, data_cfg.separate_documents, tokenizer.pad_id))
  if data_cfg.num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; outside app.run
      flags.FLAGS.mark_as_parsed()   # (tests, notebooks) their defaults are what we want
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_cfg.num_workers, per_worker_buffer_size=max(1, data_cfg.prefetch)))
  elif data_cfg.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data_cfg.prefetch)

  meta = {"source": source, "split": split, "seed": int(seed), "process_index": int(process_index),
          "process_count": int(process_count), "num_workers": int(data_cfg.num_workers),
          "shuffle": bool(data_cfg.shuffle), "seq_len": int(seq_len),
          "batch_size": int(batch_size), "tokenizer": tokenizer.identity()}
  for s in summaries:
    logging.info("data %s: %s", split, s)
  pipeline = Pipeline(ds, meta, summaries)
  if start_state is not None:
    pipeline.set_state(start_state)
  return pipeline


class _RowsToBatch:
  """Picklable wrapper of rows_to_batch for the grain map (worker processes pickle it)."""

  def __init__(self, batch_size: int, separate_documents: bool, pad_id: int):
    self._kw = dict(batch_size=batch_size, separate_documents=bool(separate_documents),
                    pad_id=pad_id)

  def __call__(self, rows):
    return rows_to_batch(rows, **self._kw)

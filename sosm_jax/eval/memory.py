"""Scoring with host memory beyond the window, as a checkpoint trained with it was trained.

A checkpoint trained with `config.memory.enabled` saw windows of the trained length, each
stream (batch row) reading the earlier windows of its row through a host FAISS memory
(sosm_jax/train/memory_train.py). `MemoryScorer` scores a batch `[rows, time]` the same way:
per row a stream, per window of `window` tokens (the last one may be shorter)

1. probe: the memory layers' q/k/v of the window (with the batch's positions and segment ids);
2. retrieve: top-k entries of the stream's memory, only from the same document (segment id);
   a stream whose window starts a new document forgets the previous one first;
3. score: the model on the window with those memory edges (loss and argmax on the device);
4. add: the window's keys/values (padding never) go to the memory.

Memory is reset at every batch. Inputs no longer than one window see an empty memory, which
equals the model without memory. `resolve_memory` turns `--memory=auto|on|off` into a decision.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sosm_jax.eval import scoring
from sosm_jax.memory.segments import SegmentRunner, memory_layer_indices
from sosm_jax.train.memory_train import store_config
from sosm_jax.eval.scoring import _BATCH_KEYS, Batch, TokenScores, _nll_and_argmax, check_batch

MODES = ("auto", "on", "off")


def trained_with_memory(config) -> bool:
  """Whether the trainer config trained with host memory (config.memory.enabled)."""
  return bool(config.memory.enabled)


def memory_window(config) -> int:
  """Tokens per window: the longest trained sequence length (the last stage's windows)."""
  return int(max(config.curriculum.seq_lens))


def resolve_memory(config, mode: str) -> bool:
  """`--memory` mode -> whether to use host memory. auto = as trained; on needs a 'graph' layer.

  ValueError naming the flag for an unknown mode or a model that cannot read memory.
  """
  if mode not in MODES:
    raise ValueError(f"--memory={mode!r}: use one of {MODES} (auto = as the checkpoint trained)")
  if mode == "auto":
    return trained_with_memory(config)
  if mode == "on":
    try:
      memory_layer_indices(config.model, _layers(config))
    except ValueError as e:
      raise ValueError(f"--memory=on: {e}") from None
  return mode == "on"


def model_scorer(loaded, *, batch_size: int = 8, mode: str = "auto"):
  """(scorer, used) for a loaded checkpoint (eval/loading.py): a `MemoryScorer` when
  `resolve_memory(config, mode)` says so, else the plain `scoring.model_scorer`."""
  used = resolve_memory(loaded.config, mode)
  if used:
    return MemoryScorer(loaded.model, loaded.params, loaded.config, batch_size=batch_size), True
  return scoring.model_scorer(loaded.model, loaded.params, batch_size=batch_size), False


def _layers(config):
  """config.memory.layers, or None for every 'graph' layer."""
  return tuple(config.memory.layers) or None


def make_runner(model, config, num_streams: int):
  """A `SegmentRunner` with the config's memory settings (index, top_k, layers, ...)."""
  return SegmentRunner(model, store_config(config.memory), num_streams=num_streams,
                       layers=_layers(config))


def memory_description(config, used: bool, mode: str) -> str:
  """One line for the report: whether memory was used, and why."""
  trained = trained_with_memory(config)
  if not used:
    if trained:
      return f"off (--memory={mode}; the checkpoint trained with it)"
    return "off (not trained with host memory)"
  m = config.memory
  return (f"on (--memory={mode}): windows of {memory_window(config)} tokens, top-{m.top_k} of "
          f"FAISS {m.index}" + ("" if trained else "; the checkpoint did not train with it"))


def memory_span(config) -> int:
  """Tokens per stream that memory training read: the window times config.memory.segments."""
  return memory_window(config) * int(config.memory.segments)


def report_section(config, scorer: "MemoryScorer") -> dict:
  """report['memory']: the settings used and what the memory did (`MemoryCounts`)."""
  m = config.memory
  return {"window": scorer.window, "span": memory_span(config), "index": m.index,
          "top_k": int(m.top_k), "layers": list(scorer.runner.layers), **scorer.counts.as_dict()}


@dataclasses.dataclass
class MemoryCounts:
  """What the memory did while scoring: windows scored, memory edges found, slots offered."""
  windows: int = 0
  memory_edges: int = 0
  memory_slots: int = 0

  def as_dict(self) -> dict:
    frac = self.memory_edges / self.memory_slots if self.memory_slots else None
    return {"windows": self.windows, "memory_edges": self.memory_edges,
            "memory_slots": self.memory_slots, "valid_fraction": frac}


class MemoryScorer:
  """A scorer (see scoring.py) reading host memory window by window (module doc).

  model: a `LanguageModel`; params: its unboxed params; config: the trainer config (memory and
  curriculum sections). window: tokens per window (default: the trained length). batch_size:
  streams per pass; calls are split into (and the last piece padded to) rows of that size.
  """

  def __init__(self, model, params, config, *, batch_size: int = 8, window: int = 0):
    self.params = params
    self.window = int(window or memory_window(config))
    self.batch_size = int(batch_size)
    self.runner = make_runner(model, config, self.batch_size)
    self.counts = MemoryCounts()

    @jax.jit
    def score(p, inputs, targets, positions, segment_ids, memory):
      logits = model.apply(p, inputs, positions=positions, segment_ids=segment_ids, memory=memory)
      return _nll_and_argmax(logits, targets)

    self._score = score

  def __call__(self, batch: Batch) -> TokenScores:
    rows, _ = check_batch(batch)
    pieces = []
    for start in range(0, rows, self.batch_size):
      piece = {k: np.asarray(batch[k])[start:start + self.batch_size] for k in _BATCH_KEYS}
      n = piece["inputs"].shape[0]
      if n < self.batch_size:   # copies of the last row: the runner has batch_size streams
        piece = {k: np.concatenate([v, np.repeat(v[-1:], self.batch_size - n, 0)])
                 for k, v in piece.items()}
      nll, pred = self.score_rows(piece)
      pieces.append(TokenScores(nll[:n], pred[:n]))
    return TokenScores(np.concatenate([p.nll for p in pieces]),
                       np.concatenate([p.pred for p in pieces]))

  def score_rows(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """(nll, pred) `[batch_size, time]` of one piece, window by window with memory."""
    runner, w = self.runner, self.window
    arrays = {k: np.asarray(batch[k], np.int32) for k in
              ("inputs", "targets", "positions", "segment_ids")}
    doc_all = arrays["segment_ids"]
    runner.reset()
    outs = []
    for s, begin in enumerate(range(0, doc_all.shape[1], w)):
      seg = {k: v[:, begin:begin + w] for k, v in arrays.items()}
      doc = seg["segment_ids"]
      if s > 0:   # as in training: a stream whose window starts a new document forgets the last
        starts = np.nonzero(doc[:, 0] != doc_all[:, begin - 1])[0]
        if len(starts):
          runner.reset(starts.tolist())
      probed = jax.tree.map(np.asarray, runner.probe(
          self.params, jnp.asarray(seg["inputs"]), jnp.asarray(seg["positions"]),
          jnp.asarray(doc)))
      memory = runner.retrieve(probed, match={"doc": doc})
      outs.append(self._score(self.params, seg["inputs"], seg["targets"], seg["positions"], doc,
                              memory))      # dispatched asynchronously; the add overlaps it
      runner.add(probed, positions=seg["positions"], segment=s, metadata={"doc": doc},
                 where=doc > 0)
      mask = memory[runner.layers[0]][2]
      self.counts.windows += 1
      self.counts.memory_edges += int(mask.sum())
      self.counts.memory_slots += int(mask.size)
    nll, pred = jax.device_get((jnp.concatenate([o[0] for o in outs], 1),
                                jnp.concatenate([o[1] for o in outs], 1)))
    return np.asarray(nll, np.float32), np.asarray(pred, np.int32)

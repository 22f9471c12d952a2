"""Packing documents into fixed-length rows: a checkpointable grain transform, and batch assembly.

The documents form one token stream. Row r holds the stream's tokens [r*T, (r+1)*T) as inputs
plus one look-ahead token, the first token of the next row, so targets are the inputs shifted by
one and every stream token is an input exactly once and a target exactly once (the first token
of all aside): packing loses and duplicates nothing. Documents longer than the rest of a row are
split at the row end and continue in the next row. Atomic documents (task examples) are never
split: one that does not fit the rest of a row pads that row and starts the next.

Segment ids number the document pieces within a row from 1 (0 = padding); positions restart at 0
for each piece, since a row never sees the earlier part of a split document.

The iterator state is (parent state before the current document, offset into it): it does not
depend on the row length, so a pipeline rebuilt with another seq_len (a new curriculum stage)
restores it and continues from the exact next token: no token of a text document is repeated or
skipped. The task example waiting at that point is regenerated at the new length (tasks are
functions of (seed, index, length)).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import grain
import numpy as np


@dataclasses.dataclass
class Doc:
  """One document of the stream.

  tokens: int32 `[n]` (n = 0: an empty document, skipped and counted).
  mask: uint8 `[n]` (> 0: score this token as a target, with that loss weight) or None (score
    every token, weight 1).
  atomic: never split across rows (task examples).
  replaced: undecodable bytes that were replaced while reading it.
  """
  tokens: np.ndarray
  mask: np.ndarray | None = None
  atomic: bool = False
  replaced: int = 0


class _PackIterator(grain.DatasetIterator):
  """Yields rows {'tokens','segment_ids','positions','mask'}, each `[seq_len + 1]`."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int,
               max_empty_run: int):
    super().__init__(parent)
    self._t = seq_len
    self._pad = pad_id
    self._max_empty_run = max_empty_run
    self._arange = np.arange(seq_len + 1, dtype=np.int32)
    self._cur: Doc | None = None
    self._cur_state: dict[str, Any] | None = None
    self._off = 0
    self._exhausted = False
    self._counts = {"documents": 0, "empty_documents": 0, "replaced_bytes": 0}

  def _fetch(self, count: bool = True) -> bool:
    """Makes the next non-empty document current; False at the end of the parent."""
    empty_run = 0
    while True:
      state = self._parent.get_state()
      try:
        doc = next(self._parent)
      except StopIteration:
        self._exhausted, self._cur = True, None
        return False
      if count:
        self._counts["replaced_bytes"] += int(doc.replaced)
      if len(doc.tokens) == 0:
        if count:
          self._counts["empty_documents"] += 1
        empty_run += 1
        if empty_run >= self._max_empty_run:
          raise ValueError(f"the source produced {empty_run} empty documents in a row; it "
                           f"looks empty: point data.source at documents with text")
        continue
      if count:
        self._counts["documents"] += 1
      self._cur, self._cur_state, self._off = doc, state, 0
      return True

  def __next__(self) -> dict[str, np.ndarray]:
    t = self._t
    if self._exhausted and self._cur is None:
      raise StopIteration
    tokens = np.full(t + 1, self._pad, np.int32)
    seg = np.zeros(t + 1, np.int32)
    pos = np.zeros(t + 1, np.int32)
    mask = np.zeros(t + 1, np.uint8)
    filled, sid = 0, 0
    while filled < t:
      if self._cur is None and not self._fetch():
        break
      doc, off = self._cur, self._off
      n = len(doc.tokens)
      if doc.atomic:
        if n > t:
          raise ValueError(f"a task example of {n} tokens does not fit a row of seq_len={t}; "
                           f"set data.task_length to at most the smallest seq_len (0 = seq_len)")
        if n > t - filled:
          break  # the rest of this row is padding; the example starts the next row
      take = min(n - off, t - filled)
      sid += 1
      end = filled + take
      tokens[filled:end] = doc.tokens[off:off + take]
      seg[filled:end] = sid
      pos[filled:end] = self._arange[:take]
      mask[filled:end] = 1 if doc.mask is None else doc.mask[off:off + take]
      filled, self._off = end, off + take
      if self._off == n:
        self._cur = None
    if filled == 0:
      raise StopIteration
    if filled == t and (self._cur is not None or self._fetch()):
      doc, off = self._cur, self._off
      continuing = off > 0  # the document was split at this row's end
      tokens[t] = doc.tokens[off]
      seg[t] = sid if continuing else sid + 1
      pos[t] = pos[t - 1] + 1 if continuing else 0
      mask[t] = 1 if doc.mask is None else doc.mask[off]
    return {"tokens": tokens, "segment_ids": seg, "positions": pos, "mask": mask}

  def get_state(self) -> dict[str, Any]:
    has = self._cur is not None
    return {"parent": copy.deepcopy(self._cur_state if has else self._parent.get_state()),
            "has_current": has, "offset": self._off if has else 0,
            "exhausted": self._exhausted, "counts": dict(self._counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._cur, self._off = None, 0
    self._exhausted = bool(state["exhausted"])
    self._counts = {k: int(v) for k, v in state["counts"].items()}
    if state["has_current"]:
      if not self._fetch(count=False):
        raise ValueError("the data state points past the end of its source; the source changed "
                         "since the checkpoint was written")
      self._off = int(state["offset"])
      if self._off >= len(self._cur.tokens):
        raise ValueError("the data state points inside a document that is now shorter; the "
                         "source or tokenizer changed since the checkpoint was written")


class PackIterDataset(grain.IterDataset):
  """Packs a stream of `Doc`s into rows of seq_len + 1 tokens (see the module docstring)."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int,
               max_empty_run: int = 10_000):
    super().__init__(parent)
    if seq_len < 1:
      raise ValueError(f"seq_len must be positive, got {seq_len}")
    self._seq_len, self._pad_id, self._max_empty_run = seq_len, pad_id, max_empty_run

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id,
                         self._max_empty_run)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len})"


def rows_to_batch(rows: dict[str, np.ndarray], *, batch_size: int, separate_documents: bool,
                  pad_id: int) -> dict[str, np.ndarray]:
  """Stacked rows `[b <= batch_size, T + 1]` -> the model batch, `[batch_size, T]` each.

  inputs/targets int32; loss_mask float32 = the target's loss weight (the row mask's value: task
  answers only, all text tokens) where neither side is padding and (separate_documents) both are
  in the same document, else 0;
  segment_ids/positions int32 per document (separate_documents) or one segment per row.
  A short final batch (finite validation data) is filled with empty rows (loss_mask 0).
  """
  tok, seg, pos, mask = rows["tokens"], rows["segment_ids"], rows["positions"], rows["mask"]
  missing = batch_size - tok.shape[0]
  if missing > 0:
    fill = lambda x, v: np.concatenate([x, np.full((missing,) + x.shape[1:], v, x.dtype)])
    tok, seg, pos, mask = fill(tok, pad_id), fill(seg, 0), fill(pos, 0), fill(mask, 0)
  seg_in, seg_out = seg[:, :-1], seg[:, 1:]
  scored = (mask[:, 1:] > 0) & (seg_in > 0) & (seg_out > 0)
  if separate_documents:
    loss_mask = scored & (seg_in == seg_out)
    segment_ids, positions = seg_in, pos[:, :-1]
  else:
    loss_mask = scored
    valid = seg_in > 0  # padding only ever ends a row, so positions run 0..n-1 before it
    segment_ids = valid.astype(np.int32)
    positions = np.where(valid, np.arange(seg_in.shape[1], dtype=np.int32), 0).astype(np.int32)
  return {"inputs": np.ascontiguousarray(tok[:, :-1]), "targets": np.ascontiguousarray(tok[:, 1:]),
          "loss_mask": np.where(loss_mask, mask[:, 1:], 0).astype(np.float32),
          "segment_ids": np.ascontiguousarray(segment_ids, dtype=np.int32),
          "positions": np.ascontiguousarray(positions, dtype=np.int32)}

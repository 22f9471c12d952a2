"""Recall grids: MQAR accuracy over lengths x key-value pairs, passkey over lengths x depths.

Examples come from the DATA helper's generators (`sosm_jax.data.tasks`), the same format the
model trains on. Scoring is teacher-forced argmax (see `scoring.py`):
- MQAR: accuracy = fraction of queries whose value token is the argmax (Zoology's metric; every
  value is one token), plus the fraction of examples with every query right.
- passkey: accuracy = fraction of examples whose every answer digit is the argmax (exact match),
  plus the per-digit accuracy.
A cell that cannot be built (too many pairs for the length or the task vocabulary, a passkey
prompt longer than the length) is kept in the grid with `accuracy=None` and the reason.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from sosm_jax.data import tasks as tasks_lib
from sosm_jax.eval.scoring import Batch, Scorer, answer_correct

Progress = Callable[[int], None] | None


def cell_seed(seed: int, *parts: int) -> int:
  """A distinct, reproducible seed per grid cell (kept away from training seeds by `seed`)."""
  return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


def mqar_queries_that_fit(length: int, num_pairs: int) -> int:
  """Queries a row of `length` holds after BOS and `num_pairs` pairs (2 tokens per query)."""
  return max(0, (length - 1 - 2 * num_pairs) // 2)


def score_cells(scorer: Scorer, batches: list[Batch]
                ) -> list[tuple[np.ndarray, Batch, np.ndarray]]:
  """Scores equal-length batches in one call (one compiled shape); returns per batch (hits,
  the batch, the argmax predictions), hits and predictions `[rows, time]`."""
  joined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  scores = scorer(joined)
  hits, pred = answer_correct(scores, joined), np.asarray(scores.pred)
  out, start = [], 0
  for b in batches:
    n = b["inputs"].shape[0]
    out.append((hits[start:start + n], b, pred[start:start + n]))
    start += n
  return out


def mqar_grid(scorer: Scorer, tokenizer, *, lengths: Sequence[int], num_pairs: Sequence[int],
              num_examples: int = 16, seed: int = 1234, vocab_size: int = 256,
              num_queries: int = 0, progress: Progress = None) -> dict:
  """MQAR accuracy for every (length, num_pairs).

  Queries per example: `num_queries`, or (0) one per pair, in both cases capped at as many as fit
  (reported per cell as `num_queries`; e.g. 63 at (256, 64) because BOS takes one token); use the
  training data's mqar_num_queries to score at the trained density. Keys come from the first half
  of the task vocabulary, so num_pairs > vocab_size // 2 is skipped.
  Returns {'cells': [{'length', 'num_pairs', 'num_queries', 'accuracy', 'example_accuracy',
  'queries'} | {..., 'accuracy': None, 'skipped': reason}], 'mean_accuracy', 'chance',
  'bag_chance'}. `chance` is uniform guessing over the value vocabulary; `bag_chance` (mean of
  1/num_pairs over the scored cells) is a model that copies a random value of the context without
  binding it to its key, the level a model stuck before learning recall sits at.
  `progress(n)` is called with the number of cells finished.
  """
  cells = []
  for length in lengths:
    todo, batches = [], []
    for pairs in num_pairs:
      queries = min(num_queries or pairs, mqar_queries_that_fit(length, pairs))
      cell = {"length": int(length), "num_pairs": int(pairs), "num_queries": int(queries)}
      reason = None
      if pairs > vocab_size // 2:
        reason = (f"{pairs} pairs need {pairs} distinct keys; the task vocabulary has "
                  f"{vocab_size // 2}")
      elif queries < 1:
        reason = f"length {length} cannot hold {pairs} pairs and a query"
      if reason:
        cells.append({**cell, "accuracy": None, "skipped": reason})
        if progress:
          progress(1)
        continue
      batches.append(tasks_lib.mqar_eval_batch(
          tokenizer, seq_len=int(length), num_examples=num_examples,
          seed=cell_seed(seed, length, pairs), num_pairs=int(pairs), num_queries=int(queries),
          vocab_size=vocab_size))
      todo.append(cell)
    if not batches:
      continue
    for cell, (hits, batch, _) in zip(todo, score_cells(scorer, batches)):
      mask = batch["loss_mask"] > 0
      per_example = np.all(hits | ~mask, axis=1)
      cells.append({**cell, "accuracy": float(hits[mask].mean()),
                    "example_accuracy": float(per_example.mean()), "queries": int(mask.sum())})
      if progress:
        progress(1)
  cells.sort(key=lambda c: (c["length"], c["num_pairs"]))
  scored = [c["accuracy"] for c in cells if c["accuracy"] is not None]
  bag = [1.0 / c["num_pairs"] for c in cells if c["accuracy"] is not None]
  return {"cells": cells, "mean_accuracy": float(np.mean(scored)) if scored else None,
          "chance": 1.0 / (vocab_size - vocab_size // 2),
          "bag_chance": float(np.mean(bag)) if bag else None, "num_examples": num_examples}


def passkey_grid(scorer: Scorer, tokenizer, *, lengths: Sequence[int], depths: Sequence[float],
                 num_examples: int = 4, seed: int = 4321, digits: int = 5,
                 progress: Progress = None) -> dict:
  """Passkey exact-match accuracy for every (length, depth); `num_examples` keys per cell.

  Returns {'cells': [{'length', 'depth', 'accuracy', 'digit_accuracy'} | {..., 'accuracy': None,
  'skipped': reason}], 'mean_accuracy', 'chance'}.
  """
  cells = []
  for length in lengths:
    todo, batches = [], []
    for d_index, depth in enumerate(depths):
      cell = {"length": int(length), "depth": float(depth)}
      try:
        batch = tasks_lib.passkey_eval_batch(
            tokenizer, seq_len=int(length), num_examples=num_examples,
            seed=cell_seed(seed, length, d_index), depths=[float(depth)] * num_examples,
            digits=digits)
      except ValueError as e:  # the prompt does not fit this length
        cells.append({**cell, "accuracy": None, "skipped": str(e)})
        if progress:
          progress(1)
        continue
      batches.append(batch)
      todo.append(cell)
    if not batches:
      continue
    for cell, (hits, batch, _) in zip(todo, score_cells(scorer, batches)):
      mask = batch["loss_mask"] > 0
      cells.append({**cell, "accuracy": float(np.all(hits | ~mask, axis=1).mean()),
                    "digit_accuracy": float(hits[mask].mean())})
      if progress:
        progress(1)
  cells.sort(key=lambda c: (c["length"], c["depth"]))
  scored = [c["accuracy"] for c in cells if c["accuracy"] is not None]
  # Uniform guessing over the ten digits (the first digit is never 0, so this slightly errs low).
  return {"cells": cells, "mean_accuracy": float(np.mean(scored)) if scored else None,
          "chance": 0.1 ** digits, "num_examples": num_examples, "digits": digits}


def grid_matrix(cells: list[dict], row_key: str, col_key: str) -> tuple[list, list, np.ndarray]:
  """Cells -> (row values, column values, accuracy matrix [rows, cols] with NaN for skipped)."""
  rows = sorted({c[row_key] for c in cells})
  cols = sorted({c[col_key] for c in cells})
  matrix = np.full((len(rows), len(cols)), np.nan)
  for c in cells:
    if c.get("accuracy") is not None:
      matrix[rows.index(c[row_key]), cols.index(c[col_key])] = c["accuracy"]
  return rows, cols, matrix

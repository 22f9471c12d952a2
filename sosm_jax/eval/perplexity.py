"""Loss and perplexity by position bucket on held-out text: does loss keep falling with context?

Tokens are bucketed by their position inside their own document (`batch['positions']`, which
restarts at every packed document), so a bucket [1024, 2048) only holds tokens that really had
1024-2047 tokens of their document before them.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from sosm_jax.eval.scoring import Batch, Scorer, check_batch


def position_bucket_edges(seq_len: int, first: int = 16) -> list[int]:
  """[0, first, 2·first, 4·first, …, seq_len]: geometric buckets (the last may be shorter)."""
  if seq_len < 1 or first < 1:
    raise ValueError(f"seq_len ({seq_len}) and first ({first}) must be positive")
  edges, edge = [0], min(first, seq_len)
  while edge < seq_len:
    edges.append(edge)
    edge *= 2
  return edges + [seq_len]


def accumulate_by_position(nll: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                           edges: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-bucket sums: (nll_sum [K], token count [K], bucket id of each token [batch, time]).

  nll, mask, positions: `[batch, time]`. A token goes to bucket k when
  edges[k] <= position < edges[k+1]; positions past the last edge go to the last bucket.
  """
  bucket = np.clip(np.searchsorted(np.asarray(edges), positions, side="right") - 1, 0,
                   len(edges) - 2)
  weights = (np.asarray(mask) > 0).astype(np.float64)
  nll = np.where(weights > 0, np.asarray(nll, np.float64), 0.0)
  k = len(edges) - 1
  return (np.bincount(bucket.ravel(), weights=(nll * weights).ravel(), minlength=k),
          np.bincount(bucket.ravel(), weights=weights.ravel(), minlength=k), bucket)


def loss_by_position(scorer: Scorer, batches: Iterable[Batch], edges: list[int],
                     progress=None) -> dict:
  """Mean loss, perplexity and accuracy per position bucket over `batches` of held-out text.

  Returns {'edges', 'buckets': [{'start', 'end', 'tokens', 'loss', 'perplexity', 'accuracy'}],
  'loss', 'perplexity', 'tokens', 'context_gain', 'still_falling'} (overall values are
  token-weighted over all buckets; the last two from `context_trend`).
  Every batch is `[batch, time]` with time <= edges[-1]. `progress` (optional) is called
  once per batch.
  """
  k = len(edges) - 1
  nll_sum, count, correct = np.zeros(k), np.zeros(k), np.zeros(k)
  for batch in batches:
    _, time = check_batch(batch)
    if time > edges[-1]:
      raise ValueError(f"a batch of length {time} is longer than the last bucket edge "
                       f"{edges[-1]}; build edges with position_bucket_edges({time})")
    scores = scorer(batch)
    if np.isnan(scores.nll).any() and np.any(np.asarray(batch["loss_mask"]) > 0):
      raise ValueError("the scorer gives no likelihoods (NaN nll); perplexity needs a scorer "
                       "made from logits (scorer_from_logits or model_scorer)")
    s, c, bucket = accumulate_by_position(scores.nll, batch["loss_mask"], batch["positions"], edges)
    nll_sum += s
    count += c
    hit = ((scores.pred == np.asarray(batch["targets"])) & (np.asarray(batch["loss_mask"]) > 0))
    correct += np.bincount(bucket.ravel(), weights=hit.ravel().astype(np.float64), minlength=k)
    if progress is not None:
      progress()
  buckets = []
  for i in range(k):
    loss = nll_sum[i] / count[i] if count[i] else None
    buckets.append({"start": int(edges[i]), "end": int(edges[i + 1]), "tokens": int(count[i]),
                    "loss": loss, "perplexity": _safe_exp(loss),
                    "accuracy": correct[i] / count[i] if count[i] else None})
  total = float(count.sum())
  loss = float(nll_sum.sum() / total) if total else None
  return {"edges": [int(e) for e in edges], "buckets": buckets, "tokens": int(total),
          "loss": loss, "perplexity": _safe_exp(loss), **context_trend(buckets)}


def context_trend(buckets: list[dict]) -> dict:
  """'context_gain': loss of the first bucket with tokens minus that of the last (nats);
  'still_falling': whether the last bucket's loss is below the one before it (None if < 2)."""
  losses = [b["loss"] for b in buckets if b["loss"] is not None]
  if len(losses) < 2:
    return {"context_gain": None, "still_falling": None}
  return {"context_gain": losses[0] - losses[-1], "still_falling": bool(losses[-1] < losses[-2])}


def _safe_exp(x):
  if x is None:
    return None
  return math.exp(x) if x < 700 else float("inf")

"""Scorers: what every metric calls to turn a batch of tokens into per-token loss and predictions.

A *scorer* is any callable
  `scorer(batch) -> TokenScores(nll [batch, time] float32, pred [batch, time] int32)`
where `batch` is a dict of numpy `[batch, time]` arrays as the data pipeline makes them
(`inputs`, `targets`, `loss_mask`, `segment_ids`, `positions`). `nll[b, t]` is the negative
log-likelihood of `targets[b, t]` given `inputs[b, :t+1]`, and `pred[b, t]` the argmax next token:
metrics are teacher-forced (the true prefix, answer tokens included, is fed in one forward pass),
which is fast and exact for single-token answers and a close proxy for greedy decoding of longer
ones (a greedy decode can only be right where the teacher-forced argmax is right at every step).

Three ways to make one:
- `scorer_from_logits(fn)`: `fn(inputs, positions, segment_ids) -> logits [batch, time, vocab]`;
- `scorer_from_answers(fn)`: `fn(inputs, positions, segment_ids) -> next-token ids [batch, time]`
  (no likelihoods: `nll` is NaN, so perplexity refuses it);
- `model_scorer(model, params)`: the real model, jitted, computing loss and argmax on the device
  so only `[batch, time]` arrays come back (logits of long sequences are too large to move).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TokenScores:
  nll: np.ndarray   # float32 [batch, time]
  pred: np.ndarray  # int32 [batch, time]


Scorer = Callable[[Batch], TokenScores]

_BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def check_batch(batch: Batch) -> tuple[int, int]:
  """Returns (batch, time) after checking that every key is there with one `[batch, time]` shape."""
  missing = [k for k in _BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch lacks {missing}; a batch needs {_BATCH_KEYS} (as make_pipeline and "
                     f"sosm_jax.data.tasks make them)")
  shapes = {k: np.shape(batch[k]) for k in _BATCH_KEYS}
  if len(set(shapes.values())) != 1 or len(shapes["inputs"]) != 2:
    raise ValueError(f"batch arrays must all be [batch, time]; got shapes {shapes}")
  return shapes["inputs"]


def _nll_and_argmax(logits, targets):
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return nll, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def scorer_from_logits(logits_fn: Callable[..., Any]) -> Scorer:
  """Wraps `logits_fn(inputs, positions, segment_ids) -> [batch, time, vocab]` as a scorer."""

  def score(batch: Batch) -> TokenScores:
    check_batch(batch)
    logits = np.asarray(logits_fn(batch["inputs"], batch["positions"], batch["segment_ids"]),
                        np.float32)
    if logits.ndim != 3 or logits.shape[:2] != np.shape(batch["inputs"]):
      raise ValueError(f"logits_fn returned shape {logits.shape}; expected [batch, time, vocab] "
                       f"with [batch, time] = {np.shape(batch['inputs'])}")
    nll, pred = jax.device_get(_nll_and_argmax(jnp.asarray(logits), jnp.asarray(batch["targets"])))
    return TokenScores(np.asarray(nll, np.float32), np.asarray(pred, np.int32))

  return score


def scorer_from_answers(answer_fn: Callable[..., Any]) -> Scorer:
  """Wraps `answer_fn(inputs, positions, segment_ids) -> next-token ids [batch, time]`."""

  def score(batch: Batch) -> TokenScores:
    shape = check_batch(batch)
    pred = np.asarray(answer_fn(batch["inputs"], batch["positions"], batch["segment_ids"]))
    if pred.shape != shape:
      raise ValueError(f"answer_fn returned shape {pred.shape}; expected [batch, time] = {shape}")
    return TokenScores(np.full(shape, np.nan, np.float32), pred.astype(np.int32))

  return score


def model_scorer(model, params, *, batch_size: int | None = None) -> Scorer:
  """A scorer running `model.module.apply` on unboxed `params`, loss and argmax on the device.

  One compilation per `[batch, time]` shape. With `batch_size` set, every call is split into
  (and the last piece padded to) rows of that size, so a grid of lengths compiles once per length.
  """

  @jax.jit
  def run(p, inputs, targets, positions, segment_ids):
    logits = model.module.apply({"params": p}, inputs, positions=positions,
                                segment_ids=segment_ids)
    return _nll_and_argmax(logits, targets)

  def score_rows(batch: Batch) -> TokenScores:
    args = [jnp.asarray(batch[k], jnp.int32)
            for k in ("inputs", "targets", "positions", "segment_ids")]
    nll, pred = jax.device_get(run(params, *args))
    return TokenScores(np.asarray(nll, np.float32), np.asarray(pred, np.int32))

  def score(batch: Batch) -> TokenScores:
    rows, _ = check_batch(batch)
    if not batch_size or rows == batch_size:
      return score_rows(batch)
    pieces = []
    for start in range(0, rows, batch_size):
      piece = {k: np.asarray(batch[k])[start:start + batch_size] for k in _BATCH_KEYS}
      n = piece["inputs"].shape[0]
      if n < batch_size:  # pad with copies of the last row: same shape, same compiled function
        piece = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, 0)]) for k, v in
                 piece.items()}
      s = score_rows(piece)
      pieces.append(TokenScores(s.nll[:n], s.pred[:n]))
    return TokenScores(np.concatenate([p.nll for p in pieces]),
                       np.concatenate([p.pred for p in pieces]))

  return score


def answer_correct(scores: TokenScores, batch: Batch) -> np.ndarray:
  """bool `[batch, time]`: the argmax equals the target (only meaningful where loss_mask > 0)."""
  return scores.pred == np.asarray(batch["targets"])

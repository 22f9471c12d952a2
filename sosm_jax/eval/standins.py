"""Stand-in predictors whose scores are known: oracles (100%) and random guessers (chance).

They check the evaluator itself, without a trained model (tests, and
`launch/evaluate.py --predictor=oracle|random`):
- `induction_oracle`: predicts the token that followed the longest earlier match of the current
  suffix (an ideal "induction head"). It solves MQAR and passkey from the prompt alone, so it
  also checks that every answer really is recoverable from its prompt.
- `target_oracle(batch)`: knows the targets of one batch (a lookup table); perplexity 1.
- `random_guesser(candidates)`: uniform over `candidates` at every position, so its accuracy
  is 1 / len(candidates) for answers drawn from them.
- `random_logits(vocab_size)`: noise logits, a random argmax over the whole vocabulary.
- `fixed_probability_logits(p)`: puts probability p(position) on the true next token and spreads
  the rest uniformly: its loss at position t is exactly -log p(t).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from sosm_jax.eval.scoring import Batch


def longest_match_next(tokens: np.ndarray, min_match: int = 1) -> np.ndarray:
  """For each t, the token after the latest earlier position whose suffix matches longest.

  tokens: int `[time]` -> int32 `[time]` (-1 where no earlier position matches >= min_match).
  Sequential in t with a vectorised row of match lengths: O(time^2) work, for tests only.
  """
  n = len(tokens)
  pred = np.full(n, -1, np.int32)
  match = np.zeros(n, np.int64)  # match[s] = common suffix length of tokens[:s+1] and tokens[:t+1]
  for t in range(n):
    same = tokens[:t] == tokens[t]
    new = np.zeros(n, np.int64)
    if t > 0:
      new[1:t] = np.where(same[1:t], match[:t - 1] + 1, 0)
      new[0] = int(same[0])
      match = new
      best = match[:t].max()
      if best >= min_match:
        s = t - 1 - int(np.argmax(match[:t][::-1] == best))  # the latest of the longest
        pred[t] = tokens[s + 1]
  return pred


def induction_oracle(fallback: int = 0) -> Callable:
  """answer_fn(inputs, positions, segment_ids) -> `[batch, time]` longest-match predictions."""

  def answer(inputs, positions, segment_ids):
    del positions, segment_ids
    out = np.stack([longest_match_next(np.asarray(row)) for row in np.asarray(inputs)])
    return np.where(out < 0, fallback, out)

  return answer


def target_oracle(batch: Batch, vocab_size: int) -> Callable:
  """logits_fn that answers `batch`'s targets with certainty (any other input raises)."""
  key = np.asarray(batch["inputs"]).tobytes()
  targets = np.asarray(batch["targets"])

  def logits(inputs, positions, segment_ids):
    del positions, segment_ids
    if np.asarray(inputs).tobytes() != key:
      raise ValueError("target_oracle was built for another batch")
    out = np.full((*targets.shape, vocab_size), -1e4, np.float32)
    np.put_along_axis(out, targets[..., None], 0.0, axis=-1)
    return out

  return logits


def random_guesser(candidates, seed: int = 0) -> Callable:
  """answer_fn guessing uniformly among `candidates` (token ids) at every position."""
  candidates = np.asarray(candidates, np.int32)
  rng = np.random.default_rng(seed)

  def answer(inputs, positions, segment_ids):
    del positions, segment_ids
    return rng.choice(candidates, size=np.shape(inputs)).astype(np.int32)

  return answer


def fixed_probability_logits(targets_of: Callable[[np.ndarray], np.ndarray], vocab_size: int,
                             prob_at: Callable[[np.ndarray], np.ndarray]) -> Callable:
  """logits_fn giving probability prob_at(positions) `[batch, time]` to targets_of(inputs).

  The remaining mass is spread evenly over the other vocab_size - 1 tokens.
  """

  def logits(inputs, positions, segment_ids):
    del segment_ids
    p = np.clip(np.asarray(prob_at(np.asarray(positions)), np.float64), 1e-6, 1 - 1e-6)
    rest = (1 - p) / (vocab_size - 1)
    out = np.broadcast_to(np.log(rest)[..., None], (*p.shape, vocab_size)).copy()
    np.put_along_axis(out, np.asarray(targets_of(np.asarray(inputs)))[..., None],
                      np.log(p)[..., None], axis=-1)
    return out.astype(np.float32)

  return logits


def random_logits(vocab_size: int, seed: int = 0) -> Callable:
  """logits_fn of Gaussian noise: a uniformly random argmax over the whole vocabulary."""
  rng = np.random.default_rng(seed)

  def logits(inputs, positions, segment_ids):
    del positions, segment_ids
    return rng.normal(size=(*np.shape(inputs), vocab_size)).astype(np.float32)

  return logits

"""Next-token choice from logits: greedy, temperature, nucleus (top-p)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
  """Keeps the smallest set of tokens whose probability mass reaches top_p; others -> -inf.

  logits `[B, V]` float32 -> `[B, V]`. The most likely token is always kept.
  """
  if top_p >= 1.0:
    return logits
  return nucleus_filter(logits, jnp.full((logits.shape[0],), top_p, jnp.float32))


def sample_token(logits: jax.Array, rng, temperature: float, top_p: float) -> jax.Array:
  """logits `[B, V]` -> token ids `[B]` int32. temperature 0 = argmax (rng unused)."""
  logits = logits.astype(jnp.float32)
  if temperature <= 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = top_p_filter(logits / temperature, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def top_k_filter(logits: jax.Array, top_k: jax.Array) -> jax.Array:
  """Keeps each row's top_k most likely tokens; others -> -inf. top_k <= 0 keeps all.

  logits `[B, V]` float32, top_k `[B]` int (traced: no recompile per value) -> `[B, V]`.
  Ties with the k-th value are kept.
  """
  v = logits.shape[-1]
  k = jnp.clip(top_k, 1, v)
  kth = jnp.take_along_axis(jnp.sort(logits, axis=-1)[:, ::-1], (k - 1)[:, None], axis=-1)
  return jnp.where((top_k[:, None] <= 0) | (logits >= kth), logits, -jnp.inf)


def nucleus_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """Per row, the smallest set of most likely tokens whose mass reaches top_p; others -> -inf.

  logits `[B, V]` float32 (may hold -inf), top_p `[B]` float (>= 1: keeps every token, so a row
  without the filter is exactly its input). Result in vocabulary order.
  """
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  keep_sorted = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1)
  rows = jnp.arange(logits.shape[0])[:, None]
  keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, *, filtered: bool = True) -> jax.Array:
  """Per-row sampling with traced parameters (one compiled program serves every setting).

  logits `[B, V]`; keys `[B]` typed PRNG keys; temperature `[B]` float (<= 0: argmax);
  top_k `[B]` int (<= 0: off); top_p `[B]` float (>= 1: off) -> token ids `[B]` int32.
  Filters apply in the order temperature, top-k, top-p (the nucleus of the top-k set).
  filtered=False (static) skips the two sorts over the vocabulary that the filters need: for
  batches where every row has top-k and top-p off, with the same tokens as filtered=True (the
  draw is over the vocabulary in its own order either way).
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  if filtered:
    scaled = nucleus_filter(top_k_filter(scaled, top_k), top_p)
  sampled = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, scaled).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)

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
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = mass_before < top_p
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


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


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
  """Per-row sampling with traced parameters (one compiled program serves every setting).

  logits `[B, V]`; keys `[B]` typed PRNG keys; temperature `[B]` float (<= 0: argmax);
  top_k `[B]` int (<= 0: off); top_p `[B]` float (>= 1: off) -> token ids `[B]` int32.
  Filters apply in the order temperature, top-k, top-p (the nucleus of the top-k set).
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  scaled = top_k_filter(scaled, top_k)
  order = jnp.argsort(-scaled, axis=-1)
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
  choice = jax.vmap(lambda k, l: jax.random.categorical(k, l))(
      keys, jnp.where(keep_sorted, sorted_logits, -jnp.inf))
  sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)

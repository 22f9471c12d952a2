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

"""Gated linear attention (GLA; HGRN-2 is GLA with k = 1 - f): every form, and `gla` choosing one.

- `reference.py`: `gla_reference` (sequential, the ground truth) and `gla_step` (decode).
- `chunked.py`: `gla_chunked`, the chunked form in plain XLA (any platform).
- `pallas.py` (+ `pallas_scores.py`): `gla_pallas`, the same contract on Pallas kernels.
"""
from __future__ import annotations

from sosm_jax.ops.common.implementation import resolve
from sosm_jax.ops.gla.chunked import gla_chunked
from sosm_jax.ops.gla.reference import gla_reference, gla_step


def gla(q, k, v, log_f, *, scale=1.0, initial_state=None, chunk_size=64, implementation="auto"):
  """Gated linear attention over a sequence by the named implementation.

  Args:
    q, k, log_f: `[batch, time, heads, key_dim]` (log_f <= 0, per-channel log forget gate);
    v: `[batch, time, heads, value_dim]`; initial_state `[batch, heads, key_dim, value_dim]` or
    None; chunk_size: chunk of the chunked forms (static).
    implementation: 'auto' | 'xla' | 'pallas' | 'pallas_interpret' | 'reference'
      (`sosm_jax.ops.common.implementation`; None = 'auto').
  Returns:
    (o `[batch, time, heads, value_dim]` in v's dtype, final_state f32
    `[batch, heads, key_dim, value_dim]`).
  """
  impl = resolve("gla", implementation)
  if impl == "reference":
    return gla_reference(q, k, v, log_f, scale=scale, initial_state=initial_state)
  if impl == "xla":
    return gla_chunked(q, k, v, log_f, scale=scale, initial_state=initial_state,
                       chunk_size=chunk_size)
  from sosm_jax.ops.gla.pallas import gla_pallas  # pylint: disable=import-outside-toplevel
  return gla_pallas(q, k, v, log_f, scale=scale, initial_state=initial_state,
                    chunk_size=chunk_size, interpret=impl == "pallas_interpret")


__all__ = ["gla", "gla_chunked", "gla_reference", "gla_step"]

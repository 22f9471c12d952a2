"""Gated delta rule (Gated DeltaNet): every form, and `gated_delta_rule` choosing one.

- `reference.py`: `gated_delta_rule_reference` (sequential, the ground truth) and
  `gated_delta_rule_step` (decode).
- `chunked.py`: `gated_delta_rule_chunked`, the chunked (WY/UT) form in plain XLA (any platform).
- `pallas.py` (+ `pallas_kernels.py`, `pallas_recurrence.py`): `gated_delta_rule_pallas`, the
  same contract on Pallas kernels.
"""
from __future__ import annotations

from sosm_jax.ops.common.implementation import resolve
from sosm_jax.ops.gated_delta.chunked import gated_delta_rule_chunked
from sosm_jax.ops.gated_delta.reference import gated_delta_rule_reference, gated_delta_rule_step


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64,
                     implementation="auto"):
  """Gated delta rule over a sequence by the named implementation.

  Args:
    q, k: `[batch, time, heads, key_dim]` (L2-normalised by the caller);
    v: `[batch, time, heads, value_dim]`; g: `[batch, time, heads]` log-decay (<= 0);
    beta: `[batch, time, heads]` in (0, 1); scale: default key_dim**-0.5;
    initial_state: `[batch, heads, key_dim, value_dim]` or None; chunk_size: static.
    implementation: 'auto' | 'xla' | 'pallas' | 'pallas_interpret' | 'reference'
      (`sosm_jax.ops.common.implementation`; None = 'auto').
  Returns:
    (o `[batch, time, heads, value_dim]` in v's dtype, final_state f32
    `[batch, heads, key_dim, value_dim]`).
  """
  impl = resolve("gated_delta_rule", implementation)
  if impl == "reference":
    return gated_delta_rule_reference(q, k, v, g, beta, scale=scale, initial_state=initial_state)
  if impl == "xla":
    return gated_delta_rule_chunked(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                    chunk_size=chunk_size)
  from sosm_jax.ops.gated_delta.pallas import (  # pylint: disable=import-outside-toplevel
      gated_delta_rule_pallas)
  return gated_delta_rule_pallas(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                 chunk_size=chunk_size, interpret=impl == "pallas_interpret")


__all__ = ["gated_delta_rule", "gated_delta_rule_chunked", "gated_delta_rule_reference",
           "gated_delta_rule_step"]

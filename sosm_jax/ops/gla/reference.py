"""Gated linear attention (GLA) with per-key-channel decay: the sequential reference and the step.

Per head, state h is `[key_dim, value_dim]`; with f_t = exp(log_f_t) per key channel:

    h_t = diag(f_t) h_{t-1} + k_t v_t^T
    o_t = scale * h_t^T q_t

HGRN-2 (Qin et al. 2024) uses k = 1 - f, q = output gate, v = input; the layer builds those,
this file only holds the recurrence.
- `gla_reference`: token by token (lax.scan), float32. Ground truth.
- `gla_step`: one token, for decoding.
The chunked XLA form is `chunked.py`, the Pallas kernels `pallas.py`; `gla` in `__init__.py`
picks one by the `implementation` argument.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


def check_inputs(q, k, v, log_f, initial_state):
  """Raises ValueError naming the first inconsistent shape."""
  if q.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"gla: q, k, v, log_f must be [batch, time, heads, dim]; got q {q.shape}, v {v.shape}.")
  for name, x in (("k", k), ("log_f", log_f)):
    if x.shape != q.shape:
      raise ValueError(f"gla: {name} shape {x.shape} must equal q shape {q.shape}.")
  b, t, h, dk = q.shape
  if v.shape[:3] != (b, t, h):
    raise ValueError(f"gla: v shape {v.shape} must be [batch={b}, time={t}, heads={h}, value_dim].")
  if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
    raise ValueError(
        f"gla: initial_state shape {initial_state.shape} must be [batch, heads, key_dim, "
        f"value_dim] = {(b, h, dk, v.shape[-1])}.")


def init_state(q, v, initial_state):
  """initial_state in float32, or zeros `[batch, heads, key_dim, value_dim]`."""
  if initial_state is not None:
    return initial_state.astype(_F32)
  b, _, h, dk = q.shape
  return jnp.zeros((b, h, dk, v.shape[-1]), _F32)


def _step_f32(q, k, v, log_f, state, scale):
  """One token in float32. q,k,log_f [B,H,K], v [B,H,V], state [B,H,K,V]."""
  new_state = jnp.exp(log_f)[..., None] * state + k[..., :, None] * v[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q, new_state, precision=_HIGHEST)
  return o, new_state


def gla_step(q, k, v, log_f, state, *, scale=1.0):
  """One decoding step of gated linear attention.

  Args:
    q, k, log_f: `[batch, heads, key_dim]` (log_f <= 0 is the per-channel log forget gate).
    v: `[batch, heads, value_dim]`.
    state: `[batch, heads, key_dim, value_dim]` float32.
  Returns:
    (o `[batch, heads, value_dim]` in v's dtype, new_state float32).
  """
  if q.ndim != 3 or state.ndim != 4:
    raise ValueError(
        f"gla_step: q must be [batch, heads, key_dim] and state [batch, heads, key_dim, "
        f"value_dim]; got {q.shape} and {state.shape}. For whole sequences use gla.")
  f = lambda x: x.astype(_F32)
  o, new_state = _step_f32(f(q), f(k), f(v), f(log_f), f(state), scale)
  return o.astype(v.dtype), new_state


def gla_reference(q, k, v, log_f, *, scale=1.0, initial_state=None):
  """Sequential reference of gated linear attention (float32, lax.scan over time).

  Args:
    q, k, log_f: `[batch, time, heads, key_dim]`; v: `[batch, time, heads, value_dim]`.
    initial_state: `[batch, heads, key_dim, value_dim]` or None (zeros).
  Returns:
    (o `[batch, time, heads, value_dim]` in v's dtype, final_state float32
    `[batch, heads, key_dim, value_dim]`).
  """
  check_inputs(q, k, v, log_f, initial_state)
  state = init_state(q, v, initial_state)
  time_major = lambda x: jnp.moveaxis(x.astype(_F32), 1, 0)

  def body(s, x):
    o, s = _step_f32(*x, s, scale)
    return s, o

  final_state, o = lax.scan(body, state, tuple(map(time_major, (q, k, v, log_f))))
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), final_state

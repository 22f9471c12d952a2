"""Gated delta rule (Gated DeltaNet, Yang et al. ICLR 2025): the sequential reference and the step.

State orientation is `[key_dim, value_dim]` per head. With alpha_t = exp(g_t):

    S_t = alpha_t S_{t-1} + beta_t k_t (v_t - alpha_t S_{t-1}^T k_t)^T
        = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

- `gated_delta_rule_reference`: the recurrence token by token (lax.scan), float32. Ground truth.
- `gated_delta_rule_step`: one token, for decoding with a cache.
The chunked XLA form is `chunked.py`, the Pallas kernels `pallas.py`; `gated_delta_rule` in
`__init__.py` picks one by the `implementation` argument.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


def check_inputs(q, k, v, g, beta, initial_state):
  """Raises ValueError naming the first inconsistent shape."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"gated_delta_rule: q, k, v must be [batch, time, heads, dim]; got shapes "
        f"{q.shape}, {k.shape}, {v.shape}.")
  b, t, h, dk = q.shape
  if k.shape != q.shape:
    raise ValueError(f"gated_delta_rule: k shape {k.shape} must equal q shape {q.shape}.")
  if v.shape[:3] != (b, t, h):
    raise ValueError(
        f"gated_delta_rule: v shape {v.shape} must be [batch={b}, time={t}, heads={h}, value_dim].")
  for name, x in (("g", g), ("beta", beta)):
    if x.shape != (b, t, h):
      raise ValueError(
          f"gated_delta_rule: {name} shape {x.shape} must be [batch, time, heads] = {(b, t, h)}.")
  if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
    raise ValueError(
        f"gated_delta_rule: initial_state shape {initial_state.shape} must be "
        f"[batch, heads, key_dim, value_dim] = {(b, h, dk, v.shape[-1])}.")


def default_scale(scale, key_dim):
  return key_dim ** -0.5 if scale is None else scale


def zero_state(q, v):
  b, _, h, dk = q.shape
  return jnp.zeros((b, h, dk, v.shape[-1]), _F32)


def _step_f32(q, k, v, g, beta, state, scale):
  """One token in float32. q,k [B,H,K], v [B,H,V], g,beta [B,H], state [B,H,K,V]."""
  decayed = state * jnp.exp(g)[..., None, None]
  predicted = jnp.einsum("bhk,bhkv->bhv", k, decayed, precision=_HIGHEST)
  delta = beta[..., None] * (v - predicted)
  new_state = decayed + k[..., :, None] * delta[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q, new_state, precision=_HIGHEST)
  return o, new_state


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None):
  """One decoding step of the gated delta rule.

  Args:
    q, k: `[batch, heads, key_dim]` (L2-normalised by the caller).
    v: `[batch, heads, value_dim]`.
    g: `[batch, heads]` log-decay (<= 0). beta: `[batch, heads]` in (0, 1).
    state: `[batch, heads, key_dim, value_dim]` float32.
    scale: output scale, default key_dim**-0.5.
  Returns:
    (o `[batch, heads, value_dim]` in v's dtype, new_state float32 like `state`).
  """
  if q.ndim != 3 or state.ndim != 4:
    raise ValueError(
        f"gated_delta_rule_step: q must be [batch, heads, key_dim] and state "
        f"[batch, heads, key_dim, value_dim]; got {q.shape} and {state.shape}. "
        f"For whole sequences use gated_delta_rule.")
  scale = default_scale(scale, q.shape[-1])
  f = lambda x: x.astype(_F32)
  o, new_state = _step_f32(f(q), f(k), f(v), f(g), f(beta), f(state), scale)
  return o.astype(v.dtype), new_state


def gated_delta_rule_reference(q, k, v, g, beta, *, scale=None, initial_state=None):
  """Sequential reference of the gated delta rule (float32, lax.scan over time).

  Args:
    q, k: `[batch, time, heads, key_dim]` (L2-normalised by the caller).
    v: `[batch, time, heads, value_dim]`.
    g: `[batch, time, heads]` log-decay (<= 0). beta: `[batch, time, heads]` in (0, 1).
    scale: output scale, default key_dim**-0.5.
    initial_state: `[batch, heads, key_dim, value_dim]` or None (zeros).
  Returns:
    (o `[batch, time, heads, value_dim]` in v's dtype, final_state float32
    `[batch, heads, key_dim, value_dim]`).
  """
  check_inputs(q, k, v, g, beta, initial_state)
  scale = default_scale(scale, q.shape[-1])
  state = zero_state(q, v) if initial_state is None else initial_state.astype(_F32)
  time_major = lambda x: jnp.moveaxis(x.astype(_F32), 1, 0)
  xs = tuple(map(time_major, (q, k, v, g, beta)))

  def body(s, x):
    o, s = _step_f32(*x, s, scale)
    return s, o

  final_state, o = lax.scan(body, state, xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), final_state

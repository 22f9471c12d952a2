"""Time padding, chunk layout and matmul-dtype helpers shared by every linear-attention form."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def pad_time(x, pad, dtype=None):
  """x `[B, T, ...]` -> `[B, T + pad, ...]`, zeros appended along time; cast to `dtype` if given.

  Zero padding is an identity step for every op here (zero key, value, query and log-decay).
  """
  if dtype is not None:
    x = x.astype(dtype)
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths)


def to_chunks(x, chunk):
  """[B, T, H, ...] -> [B, H, N, C, ...] with T = N * C."""
  b, t, h = x.shape[:3]
  x = x.reshape((b, t // chunk, chunk, h) + x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def from_chunks(x):
  """[B, H, N, C, ...] -> [B, N*C, H, ...]."""
  b, h, n, c = x.shape[:4]
  x = jnp.moveaxis(x, 1, 3)
  return x.reshape((b, n * c, h) + x.shape[4:])


def matmul_dtype(*xs):
  """bf16 operands stay bf16 (fp32 accumulation) when all inputs are bf16; otherwise fp32."""
  return jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in xs) else _F32


def dot_f32(eq, a, b, dtype=None):
  """einsum with fp32 accumulation; operands cast to `dtype` when given; fp32 operands at full
  precision (the GPU default would be tf32)."""
  if dtype is not None:
    a, b = a.astype(dtype), b.astype(dtype)
  prec = lax.Precision.HIGHEST if a.dtype == _F32 or b.dtype == _F32 else None
  return jnp.einsum(eq, a, b, precision=prec, preferred_element_type=_F32)


def check_chunk_size(name, chunk_size):
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}.")


def pad_last(x, size):
  """Zero-pads the last axis of x to `size`."""
  extra = size - x.shape[-1]
  return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def padded_state(initial_state, batch, heads, key_dim, value_dim):
  """`[batch*heads, key_dim, value_dim]` f32: initial_state `[batch, heads, k, v]` zero-padded to
  (key_dim, value_dim), or zeros when it is None."""
  if initial_state is None:
    return jnp.zeros((batch * heads, key_dim, value_dim), _F32)
  s = initial_state.astype(_F32)
  s = jnp.pad(s, [(0, 0), (0, 0), (0, key_dim - s.shape[2]), (0, value_dim - s.shape[3])])
  return s.reshape(batch * heads, key_dim, value_dim)

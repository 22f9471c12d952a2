"""Shared layer pieces: dtypes from config, logically-partitioned params, Dense, RMSNorm, SwiGLU MLP.

Parameters are created in `param_dtype` (float32) with logical axis names (nn.with_logical_partitioning);
computation runs in `dtype` (bfloat16 on accelerators, float32 in CPU tests). Layers never name a
mesh axis; `sosm_jax/parallel/rules.py` maps the logical names.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_F32 = jnp.float32
BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
BATCH_LENGTH_HEADS = ("activation_batch", "activation_length", "activation_heads", None)
BATCH_LENGTH_KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", None)


def compute_dtype(cfg) -> jnp.dtype:
  """Activation / matmul dtype from `cfg.dtype` ('bfloat16', 'float32', ...)."""
  return jnp.dtype(cfg.dtype)


def param_dtype(cfg) -> jnp.dtype:
  return jnp.dtype(cfg.param_dtype)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint (a no-op outside a mesh / rules context)."""
  return nn.with_logical_constraint(x, tuple(names))


def fan_in_init(num_in_axes: int, scale: float = 1.0):
  """Truncated-normal init with variance scale / fan_in, fan_in = product of the first axes."""
  in_axes = tuple(range(num_in_axes))
  return lambda key, shape, dtype=_F32: nn.initializers.variance_scaling(
      scale, "fan_in", "truncated_normal", in_axis=in_axes,
      out_axis=tuple(range(num_in_axes, len(shape))))(key, shape, dtype)


class Dense(nn.Module):
  """Bias-free projection contracting the last `in_dims` input axes into `features`.

  x `[..., *in_shape]` -> `[..., *features]`; kernel `[*in_shape, *features]` named `axes`.
  The matmul runs in `dtype` (operands cast; XLA accumulates bf16 products in float32).
  """
  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  in_dims: int = 1
  dtype: Any = _F32
  param_dtype: Any = _F32
  kernel_init: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_dims:]
    shape = tuple(in_shape) + features
    if len(self.axes) != len(shape):
      raise ValueError(f"Dense {self.name}: {len(self.axes)} axis names {self.axes} for a kernel "
                       f"of shape {shape}.")
    init = self.kernel_init or fan_in_init(self.in_dims)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)), shape,
                        self.param_dtype)
    n_batch = x.ndim - self.in_dims
    letters = "abcdefghijklmnopqrstuvw"
    xs = letters[:x.ndim]
    ks = xs[n_batch:] + "xyz"[:len(features)]
    out = xs[:n_batch] + "xyz"[:len(features)]
    return jnp.einsum(f"{xs},{ks}->{out}", x.astype(self.dtype), jnp.asarray(kernel, self.dtype))


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
  """RMS normalisation over the last axis in float32; returns float32."""
  xf = x.astype(_F32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return y if scale is None else y * scale.astype(_F32)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, float32 inside, output in `dtype`.

  The scale has the shape of the trailing len(axes) axes of x: axes=('norm',) gives one scale
  vector `[dim]`; axes=('heads', 'head_dim') on `[B, T, H, Dh]` normalises each head on its own
  with its own scale `[H, Dh]`.
  """
  eps: float = 1e-6
  axes: tuple[str | None, ...] = ("norm",)
  dtype: Any = _F32
  param_dtype: Any = _F32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape[x.ndim - len(self.axes):]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.axes),
                       shape, self.param_dtype)
    return rms_norm(x, jnp.asarray(scale), self.eps).astype(self.dtype)


class MLP(nn.Module):
  """SwiGLU MLP: wo(silu(x wi_gate) * (x wi_up)). x `[B, T, D]` -> `[B, T, D]`."""
  cfg: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    kw = dict(dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg))
    m = cfg.mlp_dim
    gate = Dense((m,), ("embed", "mlp"), name="wi_gate", **kw)(x)
    up = Dense((m,), ("embed", "mlp"), name="wi_up", **kw)(x)
    h = nn.silu(gate) * up
    h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
    return Dense((cfg.d_model,), ("mlp", "embed"), name="wo", **kw)(h)

  @staticmethod
  def param_count(cfg) -> int:
    return 3 * cfg.d_model * cfg.mlp_dim

  @staticmethod
  def forward_flops_per_token(cfg) -> float:
    return 2.0 * MLP.param_count(cfg)


def document_starts(segment_ids: jax.Array | None) -> jax.Array | None:
  """`[batch, time]` bool: True where a new packed document begins (not at t=0), else None.

  Recurrent layers zero their state there (decay -> 0) so documents do not leak into each other;
  t=0 needs no reset because the state entering a sequence is the caller's (zeros or a cache).
  """
  if segment_ids is None:
    return None
  prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
  return segment_ids != prev


# Log-decay written at document starts. exp(-30) ~ 1e-13 removes the old state; a finite value
# keeps the chunked algorithms' cumulative sums exact enough (f32 spacing at 30 is ~2e-6).
RESET_LOG_DECAY = -30.0


def reset_log_decay(log_decay: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """Sets the log-decay `[batch, time, ...]` to RESET_LOG_DECAY at document starts."""
  starts = document_starts(segment_ids)
  if starts is None:
    return log_decay
  starts = starts.reshape(starts.shape + (1,) * (log_decay.ndim - 2))
  return jnp.where(starts, jnp.asarray(RESET_LOG_DECAY, log_decay.dtype), log_decay)

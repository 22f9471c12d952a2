"""Causal depthwise short convolution (width ~4) with a decode cache, as used before q/k/v.

y_t = bias + sum_{j=0}^{W-1} weight[j] * x_{t-(W-1)+j}: weight[W-1] multiplies the current
token, weight[0] the oldest (the layout of PyTorch's Conv1d with W-1 left padding). Inputs
before the sequence start come from `cache` (the last W-1 inputs seen, zeros at the start),
so a sequence can be processed in pieces, or token by token with `causal_conv1d_step`.
The activation (SiLU) belongs to the layer. Accumulation is in float32; y has x's dtype.
"""
from __future__ import annotations

import jax.numpy as jnp

_F32 = jnp.float32


def _check(x, weight, bias, cache, time_axis):
  c = x.shape[-1]
  if weight.ndim != 2 or weight.shape[1] != c:
    raise ValueError(f"causal_conv1d: weight must be [width, channels={c}], got {weight.shape}.")
  if bias is not None and bias.shape != (c,):
    raise ValueError(f"causal_conv1d: bias must be [channels={c}], got {bias.shape}.")
  want = (x.shape[0], weight.shape[0] - 1, c)
  if cache is not None and cache.shape != want:
    raise ValueError(
        f"causal_conv1d: cache must be [batch, width-1, channels] = {want}, got {cache.shape}"
        + (" (x is one token [batch, channels])." if not time_axis else "."))


def _conv_valid(xp, weight, bias, out_len, positions=None):
  """Sum of W shifted copies of xp [B, out_len+W-1, C] in float32 -> [B, out_len, C].

  With `positions` ([B, out_len], position of each output token within its document), the tap
  reaching s tokens back is dropped where s > position: that token belongs to an earlier document.
  """
  w = weight.astype(_F32)
  width = w.shape[0]

  def tap(j):
    term = xp[:, j:j + out_len].astype(_F32) * w[j]
    if positions is None or j == width - 1:
      return term
    return jnp.where((positions >= width - 1 - j)[..., None], term, 0.0)

  y = sum(tap(j) for j in range(width))
  if bias is not None:
    y = y + bias.astype(_F32)
  return y


def causal_conv1d(x, weight, bias=None, *, cache=None, positions=None):
  """Causal depthwise conv over a sequence.

  Args:
    x: `[batch, time, channels]`.
    weight: `[width, channels]` (depthwise). bias: `[channels]` or None.
    cache: `[batch, width-1, channels]`, the last width-1 inputs before x; None means zeros.
    positions: optional `[batch, time]` position of each token within its document (packed
      sequences): taps never reach into an earlier document. None: one stream, no boundaries.
  Returns:
    (y `[batch, time, channels]` in x's dtype, new_cache `[batch, width-1, channels]` = the last
    width-1 inputs of cache ++ x, in cache's dtype if given, else x's).
  """
  if x.ndim != 3:
    raise ValueError(f"causal_conv1d: x must be [batch, time, channels], got {x.shape}; "
                     f"for one token use causal_conv1d_step.")
  _check(x, weight, bias, cache, time_axis=True)
  width = weight.shape[0]
  cache_dtype = x.dtype if cache is None else cache.dtype
  if cache is None:
    cache = jnp.zeros((x.shape[0], width - 1, x.shape[-1]), x.dtype)
  xp = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
  y = _conv_valid(xp, weight, bias, x.shape[1], positions)
  new_cache = xp[:, xp.shape[1] - (width - 1):].astype(cache_dtype)
  return y.astype(x.dtype), new_cache


def causal_conv1d_step(x, weight, bias, cache):
  """One token of the causal depthwise conv.

  Args:
    x: `[batch, channels]`. weight: `[width, channels]`. bias: `[channels]` or None.
    cache: `[batch, width-1, channels]`, the previous width-1 inputs.
  Returns:
    (y `[batch, channels]` in x's dtype, new_cache like cache, shifted by one with x appended).
  """
  if x.ndim != 2:
    raise ValueError(f"causal_conv1d_step: x must be [batch, channels], got {x.shape}; "
                     f"for sequences use causal_conv1d.")
  _check(x, weight, bias, cache, time_axis=False)
  xp = jnp.concatenate([cache.astype(x.dtype), x[:, None]], axis=1)  # [B, W, C]
  y = _conv_valid(xp, weight, bias, 1)[:, 0]
  return y.astype(x.dtype), xp[:, 1:].astype(cache.dtype)

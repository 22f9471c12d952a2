"""Causal attention of a run of queries that starts at an offset in the sequence, over all its keys.

What one device computes when a sequence's time axis is split over devices (context parallelism):
queries at absolute positions offset .. offset+t-1 against keys 0 .. T-1 (all-gathered), with the
causal mask at that offset, packed-document segment ids and an optional sliding window.
- `offset_attention_reference`: explicit mask and softmax (the XLA path; `[t, T]` logits).
- `offset_blockwise_attention`: O(t * block) memory, the FlashAttention-2 algorithm in plain JAX
  with a custom VJP: a loop over key blocks (only those some query can see: the trip count
  depends on the offset, a traced value), every query block at once per step, online softmax;
  the backward walks the same key blocks, recomputing the logits from the saved log-sum-exp.
Layout `[batch, time, heads, head_dim]` with grouped KV heads, as `attention.py`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sosm_jax.ops.attention import attention_mask, masked_attention_reference

_F32 = jnp.float32
_NEG = -1e30


def _mask(q_index, k_index, seg_q, seg_k, window):
  """q_index `[t]`, k_index `[bk]`, seg_q `[B, t]`, seg_k `[B, bk]` -> `[B, 1, 1, t, bk]` bool."""
  m = k_index[None, :] <= q_index[:, None]
  if window > 0:
    m &= (q_index[:, None] - k_index[None, :]) < window
  m = m[None] & (seg_q[:, :, None] == seg_k[:, None, :])
  return m[:, None, None]


def _logits(q, k, scale):
  """q `[B,t,K,G,D]`, k `[B,bk,K,D]` -> `[B,K,G,t,bk]` float32."""
  return jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=_F32) * scale


def _visible_blocks(offset, t, block, num_blocks):
  """Key blocks holding a key at or before the last query (offset + t - 1)."""
  return jnp.minimum((offset + t - 1) // block + 1, num_blocks)


def _forward(q, k, v, seg_q, seg_k, offset, *, block, window, scale):
  """q `[B,t,K,G,D]`, k/v `[B,T,K,D]` (T a multiple of block) -> (o like q, lse `[B,K,G,t]`)."""
  b, t, kh, g, dh = q.shape
  n = k.shape[1] // block
  q_index = offset + jnp.arange(t)

  def step(j, carry):
    m, l, acc = carry
    kj = lax.dynamic_slice_in_dim(k, j * block, block, axis=1)
    vj = lax.dynamic_slice_in_dim(v, j * block, block, axis=1)
    sj = lax.dynamic_slice_in_dim(seg_k, j * block, block, axis=1)
    mask = _mask(q_index, j * block + jnp.arange(block), seg_q, sj, window)
    s = jnp.where(mask, _logits(q, kj, scale), _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), vj, preferred_element_type=_F32)
    return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

  shape = (b, kh, g, t)
  init = (jnp.full(shape, _NEG, _F32), jnp.zeros(shape, _F32), jnp.zeros(shape + (dh,), _F32))
  m, l, acc = lax.fori_loop(0, _visible_blocks(offset, t, block, n), step, init)
  l = jnp.maximum(l, 1e-30)                      # a query that sees nothing (not when causal)
  o = jnp.moveaxis(acc / l[..., None], 3, 1).astype(q.dtype)       # [B,t,K,G,D]
  return o, m + jnp.log(l)


def _backward(q, k, v, seg_q, seg_k, offset, o, lse, do, *, block, window, scale):
  """(dq, dk, dv) by a loop over the same key blocks."""
  b, t, kh, g, dh = q.shape
  n = k.shape[1] // block
  q_index = offset + jnp.arange(t)
  delta = jnp.einsum("bqkgd,bqkgd->bkgq", do.astype(_F32), o.astype(_F32))

  def step(j, carry):
    dq, dk, dv = carry
    kj = lax.dynamic_slice_in_dim(k, j * block, block, axis=1)
    vj = lax.dynamic_slice_in_dim(v, j * block, block, axis=1)
    sj = lax.dynamic_slice_in_dim(seg_k, j * block, block, axis=1)
    mask = _mask(q_index, j * block + jnp.arange(block), seg_q, sj, window)
    p = jnp.where(mask, jnp.exp(_logits(q, kj, scale) - lse[..., None]), 0.0)   # [B,K,G,t,bk]
    dv_j = jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do.dtype), do, preferred_element_type=_F32)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", do, vj, preferred_element_type=_F32)
    ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
    dk_j = jnp.einsum("bkgqs,bqkgd->bskd", ds, q, preferred_element_type=_F32)
    dq = dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=_F32)
    dk = lax.dynamic_update_slice_in_dim(dk, dk_j, j * block, axis=1)
    dv = lax.dynamic_update_slice_in_dim(dv, dv_j, j * block, axis=1)
    return dq, dk, dv

  init = (jnp.zeros(q.shape, _F32), jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32))
  dq, dk, dv = lax.fori_loop(0, _visible_blocks(offset, t, block, n), step, init)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, seg_q, seg_k, offset, block, window, scale):
  return _forward(q, k, v, seg_q, seg_k, offset, block=block, window=window, scale=scale)[0]


def _attention_fwd(q, k, v, seg_q, seg_k, offset, block, window, scale):
  o, lse = _forward(q, k, v, seg_q, seg_k, offset, block=block, window=window, scale=scale)
  return o, (q, k, v, seg_q, seg_k, offset, o, lse)


def _attention_bwd(block, window, scale, res, do):
  q, k, v, seg_q, seg_k, offset, o, lse = res
  dq, dk, dv = _backward(q, k, v, seg_q, seg_k, offset, o, lse, do, block=block, window=window,
                         scale=scale)
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check(q, k, v, offset_len):
  if q.ndim != 4 or k.shape != v.shape or q.shape[2] % k.shape[2]:
    raise ValueError(f"offset attention: q [B, t, H, D] and k = v [B, T, KV, D] with H a multiple "
                     f"of KV; got {q.shape}, {k.shape}, {v.shape}.")
  if q.shape[1] > offset_len:
    raise ValueError(f"offset attention: {q.shape[1]} queries but only {offset_len} keys.")


def offset_blockwise_attention(q, k, v, offset, *, q_segment_ids=None, k_segment_ids=None,
                               window=0, scale=None, block_size=512):
  """Causal attention of queries at positions offset..offset+t-1 over keys 0..T-1, O(t) memory.

  Args:
    q: `[batch, t, heads, head_dim]`; k, v: `[batch, T, kv_heads, head_dim]` (the whole sequence).
    offset: int32 scalar (may be traced), position of q's first token; offset + t <= T.
    q_segment_ids, k_segment_ids: `[batch, t]`, `[batch, T]` int (packed documents) or None.
    window: >0 = sliding window of this many tokens. scale: default head_dim**-0.5.
    block_size: key block (static); T is padded to a multiple (padding is never visible).
  Returns:
    `[batch, t, heads, head_dim]` in q's dtype.
  """
  _check(q, k, v, k.shape[1])
  b, t, h, d = q.shape
  total, kh = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else float(scale)
  block = int(min(block_size, total))
  pad = (-total) % block
  padk = lambda x, value=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2),
                                    constant_values=value)
  seg_q = (jnp.ones((b, t), jnp.int32) if q_segment_ids is None
           else q_segment_ids.astype(jnp.int32))
  seg_k = (jnp.ones((b, total), jnp.int32) if k_segment_ids is None
           else k_segment_ids.astype(jnp.int32))
  qg = q.reshape(b, t, kh, h // kh, d)
  o = _attention(qg, padk(k), padk(v), seg_q, padk(seg_k, -1), jnp.asarray(offset, jnp.int32),
                 block, int(window), scale)
  return o.reshape(b, t, h, d)


def offset_attention_reference(q, k, v, offset, *, q_segment_ids=None, k_segment_ids=None,
                               window=0, scale=None):
  """The same by an explicit `[batch, 1, t, T]` mask and softmax in float32 (ground truth)."""
  _check(q, k, v, k.shape[1])
  b, t = q.shape[:2]
  total = k.shape[1]
  q_index = offset + jnp.broadcast_to(jnp.arange(t), (b, t))
  k_index = jnp.broadcast_to(jnp.arange(total), (b, total))
  mask = attention_mask(q_index, k_index, window=window, q_segment_ids=q_segment_ids,
                        k_segment_ids=k_segment_ids)
  return masked_attention_reference(q, k, v, mask, scale=scale)

"""Memory-efficient causal attention in plain JAX (FlashAttention-2 algorithm, custom VJP).

For long sequences where the XLA path would materialise `[batch, heads, T, T]` logits and cuDNN
cannot take the mask (packed documents): queries and keys are cut into blocks of `block` tokens;
each query block visits only the key blocks the causal (and sliding-window) mask can reach, with
an online softmax; the backward pass recomputes the block logits from the saved log-sum-exp.
Memory is O(T) per head, work is the causal (or banded) part of the T x T square.

Layout `[batch, time, heads, head_dim]`, grouped KV heads, segment ids `[batch, time]`: the same
masks as `attention.attention_reference` (which the tests hold this against).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
_NEG = -1e30


def _pad_time(x, pad, value=0):
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _key_block_range(i, block, window, num_blocks):
  """Key blocks [lo, i] that query block i can see."""
  if window <= 0:
    return 0, i + 1
  lo = jnp.maximum(0, (i * block - window + 1) // block)
  return lo, i + 1


def _query_block_range(j, block, window, num_blocks):
  """Query blocks [j, hi) that see key block j."""
  if window <= 0:
    return j, num_blocks
  hi = jnp.minimum(num_blocks, (j * block + block - 1 + window - 1) // block + 1)
  return j, hi


def _mask(i, j, block, window, seg_q, seg_k):
  """`[batch, 1, 1, block_q, block_k]` bool for query block i, key block j."""
  qi = i * block + jnp.arange(block)
  kj = j * block + jnp.arange(block)
  m = kj[None, :] <= qi[:, None]
  if window > 0:
    m &= (qi[:, None] - kj[None, :]) < window
  m = m[None] & (seg_q[:, :, None] == seg_k[:, None, :])
  return m[:, None, None]


def _slice(x, i, block):
  return lax.dynamic_slice_in_dim(x, i * block, block, axis=1)


def _logits(q_blk, k_blk, scale):
  """q `[B,bq,K,G,D]`, k `[B,bk,K,D]` -> `[B,K,G,bq,bk]` float32."""
  return jnp.einsum("bqkgd,bskd->bkgqs", q_blk, k_blk, preferred_element_type=_F32) * scale


def _forward(q, k, v, seg, *, block, window, scale):
  """q `[B,T,K,G,D]` (T a multiple of block) -> (o like q, lse `[B,K,G,T]` float32)."""
  b, t, kh, g, d = q.shape
  n = t // block

  def query_block(i):
    q_blk = _slice(q, i, block)
    seg_q = _slice(seg, i, block)

    def body(j, carry):
      m, l, acc = carry
      s = _logits(q_blk, _slice(k, j, block), scale)
      mask = _mask(i, j, block, window, seg_q, _slice(seg, j, block))
      s = jnp.where(mask, s, _NEG)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      l = l * corr + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), _slice(v, j, block),
                      preferred_element_type=_F32)
      return m_new, l, acc * corr[..., None] + pv

    init = (jnp.full((b, kh, g, block), _NEG, _F32), jnp.zeros((b, kh, g, block), _F32),
            jnp.zeros((b, kh, g, block, d), _F32))
    lo, hi = _key_block_range(i, block, window, n)
    m, l, acc = lax.fori_loop(lo, hi, body, init)
    o = acc / l[..., None]                                     # every row sees itself: l > 0
    return jnp.moveaxis(o, 3, 1).astype(q.dtype), m + jnp.log(l)   # [B,bq,K,G,D], [B,K,G,bq]

  o, lse = lax.map(query_block, jnp.arange(n))                 # [n,B,bq,K,G,D], [n,B,K,G,bq]
  o = jnp.moveaxis(o, 0, 1).reshape(q.shape)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, t)
  return o, lse


def _backward(q, k, v, seg, o, lse, do, *, block, window, scale):
  """Gradients (dq, dk, dv) by recomputing block logits from lse (FlashAttention-2)."""
  b, t, kh, g, d = q.shape
  n = t // block
  delta = jnp.einsum("bqkgd,bqkgd->bkgq", do.astype(_F32), o.astype(_F32))   # [B,K,G,T]

  def key_block(dq, j):
    k_blk, v_blk, seg_k = _slice(k, j, block), _slice(v, j, block), _slice(seg, j, block)

    def body(i, carry):
      dk, dv, dq = carry
      q_blk, do_blk = _slice(q, i, block), _slice(do, i, block)
      lse_blk = lax.dynamic_slice_in_dim(lse, i * block, block, axis=3)
      delta_blk = lax.dynamic_slice_in_dim(delta, i * block, block, axis=3)
      mask = _mask(i, j, block, window, _slice(seg, i, block), seg_k)
      s = _logits(q_blk, k_blk, scale)
      p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)                # [B,K,G,bq,bk]
      dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do.dtype), do_blk,
                           preferred_element_type=_F32)
      dp = jnp.einsum("bqkgd,bskd->bkgqs", do_blk, v_blk, preferred_element_type=_F32)
      ds = (p * (dp - delta_blk[..., None]) * scale).astype(q.dtype)
      dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, q_blk, preferred_element_type=_F32)
      dq_blk = jnp.einsum("bkgqs,bskd->bqkgd", ds, k_blk, preferred_element_type=_F32)
      dq = lax.dynamic_update_slice_in_dim(dq, _slice(dq, i, block) + dq_blk, i * block, axis=1)
      return dk, dv, dq

    zeros = jnp.zeros((b, block, kh, d), _F32)
    lo, hi = _query_block_range(j, block, window, n)
    dk, dv, dq = lax.fori_loop(lo, hi, body, (zeros, zeros, dq))
    return dq, (dk, dv)

  dq, (dk, dv) = lax.scan(key_block, jnp.zeros(q.shape, _F32), jnp.arange(n))
  dk = jnp.moveaxis(dk, 0, 1).reshape(k.shape)
  dv = jnp.moveaxis(dv, 0, 1).reshape(v.shape)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, seg, block, window, scale):
  return _forward(q, k, v, seg, block=block, window=window, scale=scale)[0]


def _attention_fwd(q, k, v, seg, block, window, scale):
  o, lse = _forward(q, k, v, seg, block=block, window=window, scale=scale)
  return o, (q, k, v, seg, o, lse)


def _attention_bwd(block, window, scale, res, do):
  q, k, v, seg, o, lse = res
  dq, dk, dv = _backward(q, k, v, seg, o, lse, do, block=block, window=window, scale=scale)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q, k, v, *, segment_ids=None, window=0, scale=None, block_size=512):
  """Causal self-attention with O(T) memory (forward and backward).

  Args:
    q: `[batch, time, heads, head_dim]`; k, v: `[batch, time, kv_heads, head_dim]`.
    segment_ids: `[batch, time]` int or None (packed documents; 0 = padding).
    window: >0 = sliding window of this many tokens (the token itself included).
    scale: logit scale, default head_dim**-0.5.
    block_size: query/key block length (static); the time axis is padded to a multiple.
  Returns:
    `[batch, time, heads, head_dim]` in q's dtype.
  """
  b, t, h, d = q.shape
  kh = k.shape[2]
  if h % kh:
    raise ValueError(f"blockwise_attention: query heads {h} must be a multiple of kv heads {kh}.")
  scale = d ** -0.5 if scale is None else float(scale)
  block = int(min(block_size, t))
  pad = (-t) % block
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  # padded tokens form their own segment (-1): real queries never see them, and they see
  # themselves, so every softmax row is non-empty
  seg = _pad_time(seg, pad, value=-1)
  qg = _pad_time(q, pad).reshape(b, t + pad, kh, h // kh, d)
  o = _attention(qg, _pad_time(k, pad), _pad_time(v, pad), seg, block, int(window), scale)
  return o.reshape(b, t + pad, h, d)[:, :t]

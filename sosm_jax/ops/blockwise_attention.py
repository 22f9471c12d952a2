"""Memory-efficient causal attention in plain JAX (FlashAttention-2 algorithm, custom VJP).

For long sequences where the XLA path would materialise `[batch, heads, T, T]` logits and cuDNN
cannot take the mask (packed documents). The sequence is cut into n blocks of `block` tokens and
the work is organised by block diagonals: step d pairs every query block i with key block i - d,
all n pairs at once (one batched matmul per step, parallel enough for accelerators), with an
online softmax over the steps. Full causal attention takes n steps (half the pairs of the last
steps are empty), a sliding window only the ~window/block diagonals it reaches. The backward
pass walks the same diagonals, recomputing block logits from the saved log-sum-exp.
Memory: O(T * block) per head for the block logits of one step, no T x T array.

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


def _to_blocks(x, block):
  """[B, n*block, ...] -> [n, B, block, ...]."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape((b, t // block, block) + x.shape[2:]), 1, 0)


def _from_blocks(x):
  """[n, B, block, ...] -> [B, n*block, ...]."""
  n, b, blk = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape((b, n * blk) + x.shape[3:])


def num_diagonals(num_blocks: int, block: int, window: int) -> int:
  """Block diagonals that hold any visible (query, key) pair."""
  if window <= 0:
    return num_blocks
  return min(num_blocks, -(-(window - 1) // block) + 1)


def _pair_mask(q_block, d, block, window, seg_q, seg_k, valid):
  """`[n, B, 1, 1, bq, bk]` mask for query blocks q_block `[n]` against key blocks q_block - d."""
  qpos = q_block[:, None] * block + jnp.arange(block)            # [n, bq]
  kpos = qpos - d * block                                        # [n, bk]
  m = kpos[:, None, :] <= qpos[:, :, None]
  if window > 0:
    m &= (qpos[:, :, None] - kpos[:, None, :]) < window
  m = m[:, None] & (seg_q[..., :, None] == seg_k[..., None, :]) & valid[:, None, None, None]
  return m[:, :, None, None]


def _logits(q, k, scale):
  """q `[n,B,bq,K,G,D]`, k `[n,B,bk,K,D]` -> `[n,B,K,G,bq,bk]` float32."""
  return jnp.einsum("nbqkgd,nbskd->nbkgqs", q, k, preferred_element_type=_F32) * scale


def _forward(q, k, v, seg, *, block, window, scale):
  """q `[B,T,K,G,D]` (T a multiple of block) -> (o like q, lse `[n,B,K,G,block]` float32)."""
  qb, kb, vb, sb = (_to_blocks(x, block) for x in (q, k, v, seg))
  n, b, _, kh, g, dh = qb.shape
  idx = jnp.arange(n)

  def step(d, carry):
    m, l, acc = carry
    src = jnp.maximum(idx - d, 0)                                # key block of each query block
    s = _logits(qb, kb[src], scale)
    mask = _pair_mask(idx, d, block, window, sb, sb[src], idx >= d)
    s = jnp.where(mask, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    pv = jnp.einsum("nbkgqs,nbskd->nbkgqd", p.astype(v.dtype), vb[src],
                    preferred_element_type=_F32)
    return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

  shape = (n, b, kh, g, block)
  init = (jnp.full(shape, _NEG, _F32), jnp.zeros(shape, _F32), jnp.zeros(shape + (dh,), _F32))
  m, l, acc = lax.fori_loop(0, num_diagonals(n, block, window), step, init)
  o = acc / l[..., None]                                        # the diagonal is always visible
  o = _from_blocks(jnp.moveaxis(o, 4, 2)).astype(q.dtype)       # [B,T,K,G,D]
  return o, m + jnp.log(l)


def _backward(q, k, v, seg, o, lse, do, *, block, window, scale):
  """Gradients (dq, dk, dv) walking the same diagonals, vectorised over key blocks."""
  qb, kb, vb, sb, dob = (_to_blocks(x, block) for x in (q, k, v, seg, do))
  n = qb.shape[0]
  delta = jnp.einsum("bqkgd,bqkgd->bkgq", do.astype(_F32), o.astype(_F32))
  delta = jnp.moveaxis(delta.reshape(delta.shape[:3] + (n, block)), 3, 0)   # [n,B,K,G,bq]
  idx = jnp.arange(n)

  def step(d, carry):
    dq, dk, dv = carry
    src = jnp.minimum(idx + d, n - 1)                            # query block of each key block
    valid = idx + d < n
    q_d, do_d = qb[src], dob[src]
    mask = _pair_mask(src, d, block, window, sb[src], sb, valid)
    p = jnp.where(mask, jnp.exp(_logits(q_d, kb, scale) - lse[src][..., None]), 0.0)
    dv = dv + jnp.einsum("nbkgqs,nbqkgd->nbskd", p.astype(do.dtype), do_d,
                         preferred_element_type=_F32)
    dp = jnp.einsum("nbqkgd,nbskd->nbkgqs", do_d, vb, preferred_element_type=_F32)
    ds = (p * (dp - delta[src][..., None]) * scale).astype(q.dtype)
    dk = dk + jnp.einsum("nbkgqs,nbqkgd->nbskd", ds, q_d, preferred_element_type=_F32)
    dq_d = jnp.einsum("nbkgqs,nbskd->nbqkgd", ds, kb, preferred_element_type=_F32)
    dq = dq.at[src].add(jnp.where(valid[:, None, None, None, None, None], dq_d, 0.0))
    return dq, dk, dv

  init = (jnp.zeros(qb.shape, _F32), jnp.zeros(kb.shape, _F32), jnp.zeros(vb.shape, _F32))
  dq, dk, dv = lax.fori_loop(0, num_diagonals(n, block, window), step, init)
  return (_from_blocks(dq).astype(q.dtype), _from_blocks(dk).astype(k.dtype),
          _from_blocks(dv).astype(v.dtype))


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

"""Gated linear attention, chunked form in plain XLA (training and prefill on any platform).

b = cumulative log-decay inside a chunk (per key channel, non-increasing). The output of
position t is  scale * [ (q_t e^{b_t}) h_0  +  sum_{i<=t} sum_k q_tk k_ik e^{b_tk - b_ik} v_i ].
The usual factorisation (q e^{b}) (k e^{-b})^T overflows once -b exceeds ~88 (e.g. log_f = -20
for 5 steps). We use secondary chunking so that every exp() has a non-positive argument:
- the chunk is split into sub-chunks of `sub_chunk_size`. For query sub-chunk m and any key in
  an earlier sub-chunk, factor through the reference point r_m = b at the end of sub-chunk m-1:
  e^{b_t - b_i} = e^{b_t - r_m} e^{r_m - b_i}, both factors <= 1 (t after r_m, i before it);
  these are ordinary matmuls (the key factor is built per query sub-chunk, [M, C, K]).
- inside a diagonal sub-chunk the pairwise decays e^{b_t - b_i} (i <= t) are formed directly,
  a [S, S, K] tensor per sub-chunk (S = 16: 16x the size of q, a fused reduction in XLA).
- chunk-to-chunk: h_next = e^{b_C} h + sum_i (k_i e^{b_C - b_i}) v_i^T, exponents <= 0 again
  (`common.recurrence.chunk_recurrence`, shared with the delta rule).
Underflow to 0 can happen (for products that are truly below float32's range); overflow cannot.
The backward is XLA autodiff plus the recurrence's hand-written VJP. d/d log_f is a reverse cumsum
of terms of size |q*dq|, |k*dk| that cancel under strong decay, so its float32 error is ~1e-7 of
that scale (not of the tiny result).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from sosm_jax.ops.common.chunks import (check_chunk_size, dot_f32, from_chunks, matmul_dtype,
                                        pad_time, to_chunks)
from sosm_jax.ops.common.recurrence import chunk_recurrence
from sosm_jax.ops.gla.reference import check_inputs, init_state

_F32 = jnp.float32


def gla_chunked(q, k, v, log_f, *, scale=1.0, initial_state=None, chunk_size=64,
                sub_chunk_size=None):
  """Chunked gated linear attention for training and prefill.

  Same arguments and results as `gla_reference`, plus static `chunk_size` and `sub_chunk_size`
  (must divide chunk_size; default gcd(chunk_size, 16)). Time lengths that are not a multiple of
  chunk_size are padded inside with log_f=0, k=v=q=0 (state unchanged) and the output trimmed.
  bf16 inputs use bf16 matmul operands with fp32 accumulation; decays and state are fp32.
  """
  check_inputs(q, k, v, log_f, initial_state)
  check_chunk_size("gla_chunked", chunk_size)
  sub = math.gcd(chunk_size, 16) if sub_chunk_size is None else sub_chunk_size
  if not isinstance(sub, int) or sub < 1 or chunk_size % sub:
    raise ValueError(
        f"gla_chunked: sub_chunk_size={sub!r} must be a positive int dividing "
        f"chunk_size={chunk_size}.")
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  mm = matmul_dtype(q, k, v)
  pad = (-t) % chunk_size
  m_sub = chunk_size // sub

  # Batch and heads are merged (G = B*H) to keep array ranks low: XLA:CPU (jaxlib 0.10.2)
  # crashed inside a YNNPACK transpose in the backward pass of a rank-7 pairwise form.
  def chunks(x):  # [B,T,H,D] -> [G,N,C,D]
    x = to_chunks(pad_time(x, pad), chunk_size)
    return x.reshape((b * h,) + x.shape[2:])

  qc, kc, vc = chunks(q), chunks(k), chunks(v)
  qf, kf = qc.astype(_F32), kc.astype(_F32)
  bcum = jnp.cumsum(chunks(log_f.astype(_F32)), axis=-2)           # [G,N,C,K]
  n = bcum.shape[1]

  # Inter-chunk: states entering each chunk (all exponents <= 0).
  b_last = bcum[:, :, -1, :]                                       # [G,N,K]
  k_to_end = kf * jnp.exp(b_last[:, :, None, :] - bcum)
  state = init_state(q, v, initial_state).reshape((b * h, dk, dv))
  s_in, _, final_state = chunk_recurrence(None, vc.astype(mm), k_to_end.astype(mm),
                                          jnp.exp(b_last), state)   # s_in [G,N,K,V]
  o = dot_f32("gnck,gnkv->gncv", qf * jnp.exp(bcum), s_in, mm)     # [G,N,C,V]

  # Intra-chunk, keys in earlier sub-chunks: factor through r_m.
  bsub = bcum.reshape((b * h, n, m_sub, sub, dk))                  # [G,N,M,S,K]
  ref = jnp.concatenate(
      [jnp.zeros_like(bsub[:, :, :1, 0, :]), bsub[:, :, :-1, -1, :]], axis=2)  # [G,N,M,K]
  q_rel = qf.reshape(bsub.shape) * jnp.exp(bsub - ref[:, :, :, None, :])
  before = jnp.arange(chunk_size)[None, :] < (jnp.arange(m_sub) * sub)[:, None]  # [M,C]
  k_exp = jnp.where(before[..., None], ref[:, :, :, None, :] - bcum[:, :, None, :, :], -jnp.inf)
  k_rel = kf[:, :, None, :, :] * jnp.exp(k_exp)                    # [G,N,M,C,K]
  a_off = dot_f32("gnmsk,gnmck->gnmsc", q_rel, k_rel, mm)          # [G,N,M,S,C]
  o = o + dot_f32("gnmsc,gncv->gnmsv", a_off, vc, mm).reshape(o.shape)

  # Intra-chunk, diagonal sub-chunks: exact pairwise decays, flattened to [G*N*M, S, ...].
  flat = lambda x: x.reshape((-1, sub, x.shape[-1]))
  bflat = flat(bcum)
  idx = jnp.arange(sub)
  causal = (idx[:, None] >= idx[None, :])[..., None]               # [S,S,1]
  pair = jnp.where(causal, bflat[:, :, None, :] - bflat[:, None, :, :], -jnp.inf)
  a_diag = jnp.sum(flat(qf)[:, :, None, :] * flat(kf)[:, None, :, :] * jnp.exp(pair),
                   axis=-1)                                         # [G*N*M,S,S]
  o = o + dot_f32("gst,gtv->gsv", a_diag, flat(vc), mm).reshape(o.shape)

  o = from_chunks(o.reshape((b, h) + o.shape[1:]))[:, :t]
  return (scale * o).astype(v.dtype), final_state.reshape((b, h, dk, dv))

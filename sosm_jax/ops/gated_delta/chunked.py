"""Gated delta rule, chunked (WY/UT) form in plain XLA (training and prefill on any platform).

Within a chunk (local positions 1..C, gamma_i = cumulative log-decay inside the chunk, S0 the
state entering the chunk) write the update as S_t = e^{gamma_t} S0 + sum_{i<=t} e^{gamma_t -
gamma_i} k_i delta_i^T. Substituting into the recurrence gives the lower-triangular system
    delta + A delta = beta*V - beta*e^{gamma}*K S0,
    A = strictly_lower(diag(beta) (K K^T * e^{gamma_t - gamma_i})),
so with T = (I + A)^{-1}:  delta = U - W S0,  U = T (beta V),  W = T (beta e^{gamma} K).
Everything except "delta = U - W S0" and the state update is independent of S0, so it is
computed for all chunks at once; only the chunk-to-chunk state recurrence is sequential
(`common.recurrence.chunk_recurrence`, shared with GLA).
All decay factors used are exp of non-positive numbers (<= 1): no overflow is possible.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from sosm_jax.ops.common.chunks import (check_chunk_size, dot_f32, from_chunks, matmul_dtype,
                                        pad_time, to_chunks)
from sosm_jax.ops.common.recurrence import chunk_recurrence
from sosm_jax.ops.gated_delta.reference import check_inputs, default_scale, zero_state

_F32 = jnp.float32


def gated_delta_rule_chunked(q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64):
  """Chunked (WY/UT) gated delta rule for training and prefill.

  Same arguments and results as `gated_delta_rule_reference`, plus `chunk_size` (static).
  A time length that is not a multiple of `chunk_size` is padded inside with g=0, beta=0,
  k=v=q=0 (identity steps that leave the state unchanged) and the output is trimmed.
  bf16 inputs use bf16 matmul operands with fp32 accumulation; the state is always fp32.
  """
  check_inputs(q, k, v, g, beta, initial_state)
  check_chunk_size("gated_delta_rule_chunked", chunk_size)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = default_scale(scale, dk)
  state = zero_state(q, v) if initial_state is None else initial_state.astype(_F32)
  mm = matmul_dtype(q, k, v)
  pad = (-t) % chunk_size

  qc, kc, vc = (to_chunks(pad_time(x, pad), chunk_size) for x in (q, k, v))  # [B,H,N,C,*]
  gc, bc = (to_chunks(pad_time(x, pad, _F32), chunk_size) for x in (g, beta))  # [B,H,N,C]
  n = gc.shape[2]

  gamma = jnp.cumsum(gc, axis=-1)                                   # [B,H,N,C], non-increasing
  diff = gamma[..., :, None] - gamma[..., None, :]                  # gamma_t - gamma_i
  idx = jnp.arange(chunk_size)
  causal = idx[:, None] >= idx[None, :]
  strict = idx[:, None] > idx[None, :]
  # mask before exp: the upper triangle has positive exponents that could overflow
  decay_causal = jnp.exp(jnp.where(causal, diff, -jnp.inf))        # [B,H,N,C,C]

  kk = dot_f32("bhnck,bhndk->bhncd", kc, kc, mm)
  a = jnp.where(strict, kk * decay_causal, 0.0) * bc[..., :, None]
  rhs = jnp.concatenate(
      [bc[..., None] * vc.astype(_F32),
       (bc * jnp.exp(gamma))[..., None] * kc.astype(_F32)], axis=-1)  # [B,H,N,C,V+K]
  eye = jnp.eye(chunk_size, dtype=_F32)
  sol = lax.linalg.triangular_solve(eye + a, rhs, left_side=True, lower=True, unit_diagonal=True)
  u, w = sol[..., :dv], sol[..., dv:]                               # [B,H,N,C,V], [B,H,N,C,K]

  qk = dot_f32("bhnck,bhndk->bhncd", qc, kc, mm) * decay_causal        # causal incl. diagonal
  k_to_end = kc.astype(_F32) * jnp.exp(gamma[..., -1:] - gamma)[..., None]  # [B,H,N,C,K]
  chunk_decay = jnp.broadcast_to(jnp.exp(gamma[..., -1])[..., None], (b, h, n, dk))

  bh = lambda x: x.reshape((b * h,) + x.shape[2:])
  s_in, delta, final_state = chunk_recurrence(
      bh(w).astype(mm), bh(u).astype(mm), bh(k_to_end).astype(mm), bh(chunk_decay),
      state.reshape(b * h, dk, dv))
  s_in = s_in.reshape(b, h, n, dk, dv)
  delta = delta.reshape(b, h, n, chunk_size, dv)

  q_decayed = qc.astype(_F32) * jnp.exp(gamma)[..., None]
  o = (dot_f32("bhnck,bhnkv->bhncv", q_decayed, s_in, mm)
       + dot_f32("bhncd,bhndv->bhncv", qk, delta, mm))
  o = scale * from_chunks(o)[:, :t]
  return o.astype(v.dtype), final_state.reshape(b, h, dk, dv)

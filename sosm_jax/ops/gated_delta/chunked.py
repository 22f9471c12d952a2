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

import jax
import jax.numpy as jnp
from jax import lax

from sosm_jax.ops.common.chunks import (check_chunk_size, dot_f32, from_chunks, matmul_dtype,
                                        pad_time, to_chunks)
from sosm_jax.ops.common.recurrence import chunk_recurrence
from sosm_jax.ops.gated_delta.reference import check_inputs, default_scale, zero_state

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


@jax.custom_vjp
def unit_lower_inverse(a):
  """(I + a)^-1 for strictly lower-triangular `a` `[..., C, C]` (float32), by forward substitution.

  Plain jnp (a loop over the C rows: t_i = e_i - a_i t; the rows of t from i on are still identity
  rows, which a_i, zero from column i on, ignores) rather than `lax.linalg.triangular_solve`: on
  XLA:CPU (jaxlib 0.10) a batched triangular solve is a LAPACK custom call that spreads its batch
  over the intra-op thread pool and blocks a pool thread until the pieces are done, so as many
  concurrent solves as the pool has threads deadlock (a training step's backward pass has several;
  benchmarks/RESULTS.md, "CPU hang of the chunked gated delta rule"). Same accuracy as the solve.
  Gradient: d a = -strict_lower(t^T (d t) t^T), two matmuls, nothing saved but t.
  """
  c = a.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(c, dtype=a.dtype), a.shape)

  def row(i, t):
    a_i = lax.dynamic_slice_in_dim(a, i, 1, axis=-2)                # [..., 1, C]
    t_i = lax.dynamic_slice_in_dim(eye, i, 1, axis=-2) - jnp.einsum(
        "...ij,...jd->...id", a_i, t, precision=_HIGHEST)
    return lax.dynamic_update_slice_in_dim(t, t_i, i, axis=-2)

  return lax.fori_loop(1, c, row, eye)


def _unit_lower_inverse_fwd(a):
  t = unit_lower_inverse(a)
  return t, t


def _unit_lower_inverse_bwd(t, dt):
  c = t.shape[-1]
  strict = jnp.arange(c)[:, None] > jnp.arange(c)[None, :]
  da = -jnp.einsum("...ji,...jk,...lk->...il", t, dt, t, precision=_HIGHEST)
  return (jnp.where(strict, da, 0.0),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def unit_lower_solve(a, rhs):
  """(I + a)^-1 rhs for strictly lower-triangular a `[..., C, C]`, rhs `[..., C, D]` (float32).

  On CPU through `unit_lower_inverse` (the LAPACK solve can deadlock there, see above); on GPU
  and TPU through `lax.linalg.triangular_solve` (cuBLAS / XLA's blocked solve, as measured
  before; the plain-jnp loop is not timed there). Chosen when lowering, by platform.
  """
  def by_inverse(a, rhs):
    return jnp.einsum("...ij,...jd->...id", unit_lower_inverse(a), rhs, precision=_HIGHEST)

  def by_solve(a, rhs):
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    return lax.linalg.triangular_solve(eye + a, rhs, left_side=True, lower=True,
                                       unit_diagonal=True)

  return lax.platform_dependent(a, rhs, cpu=by_inverse, default=by_solve)


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
  sol = unit_lower_solve(a, rhs)
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

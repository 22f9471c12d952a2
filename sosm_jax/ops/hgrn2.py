"""HGRN-2 as gated linear attention (GLA) with per-key-channel decay: reference, step, chunked.

Per head, state h is `[key_dim, value_dim]`; with f_t = exp(log_f_t) per key channel:

    h_t = diag(f_t) h_{t-1} + k_t v_t^T
    o_t = scale * h_t^T q_t

HGRN-2 (Qin et al. 2024) uses k = 1 - f, q = output gate, v = input; the layer builds those,
this file only holds the recurrence.
- `gla_reference`: token by token (lax.scan), float32. Ground truth.
- `gla_step`: one token, for decoding.
- `gla_chunked`: training/prefill algorithm, numerically safe for any decay strength (see below).
`gla` picks one by name or by platform.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from sosm_jax.ops.gated_delta import (dot_f32, from_chunks, matmul_dtype, pad_time,
                                      select_implementation, to_chunks)

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


def _check_inputs(q, k, v, log_f, initial_state):
  """Raises ValueError naming the first inconsistent shape."""
  if q.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"gla: q, k, v, log_f must be [batch, time, heads, dim]; got q {q.shape}, v {v.shape}.")
  for name, x in (("k", k), ("log_f", log_f)):
    if x.shape != q.shape:
      raise ValueError(f"gla: {name} shape {x.shape} must equal q shape {q.shape}.")
  b, t, h, dk = q.shape
  if v.shape[:3] != (b, t, h):
    raise ValueError(f"gla: v shape {v.shape} must be [batch={b}, time={t}, heads={h}, value_dim].")
  if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
    raise ValueError(
        f"gla: initial_state shape {initial_state.shape} must be [batch, heads, key_dim, "
        f"value_dim] = {(b, h, dk, v.shape[-1])}.")


def _init_state(q, v, initial_state):
  if initial_state is not None:
    return initial_state.astype(_F32)
  b, _, h, dk = q.shape
  return jnp.zeros((b, h, dk, v.shape[-1]), _F32)


def _step_f32(q, k, v, log_f, state, scale):
  """One token in float32. q,k,log_f [B,H,K], v [B,H,V], state [B,H,K,V]."""
  new_state = jnp.exp(log_f)[..., None] * state + k[..., :, None] * v[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q, new_state, precision=_HIGHEST)
  return o, new_state


def gla_step(q, k, v, log_f, state, *, scale=1.0):
  """One decoding step of gated linear attention.

  Args:
    q, k, log_f: `[batch, heads, key_dim]` (log_f <= 0 is the per-channel log forget gate).
    v: `[batch, heads, value_dim]`.
    state: `[batch, heads, key_dim, value_dim]` float32.
  Returns:
    (o `[batch, heads, value_dim]` in v's dtype, new_state float32).
  """
  if q.ndim != 3 or state.ndim != 4:
    raise ValueError(
        f"gla_step: q must be [batch, heads, key_dim] and state [batch, heads, key_dim, "
        f"value_dim]; got {q.shape} and {state.shape}. For whole sequences use gla.")
  f = lambda x: x.astype(_F32)
  o, new_state = _step_f32(f(q), f(k), f(v), f(log_f), f(state), scale)
  return o.astype(v.dtype), new_state


def gla_reference(q, k, v, log_f, *, scale=1.0, initial_state=None):
  """Sequential reference of gated linear attention (float32, lax.scan over time).

  Args:
    q, k, log_f: `[batch, time, heads, key_dim]`; v: `[batch, time, heads, value_dim]`.
    initial_state: `[batch, heads, key_dim, value_dim]` or None (zeros).
  Returns:
    (o `[batch, time, heads, value_dim]` in v's dtype, final_state float32
    `[batch, heads, key_dim, value_dim]`).
  """
  _check_inputs(q, k, v, log_f, initial_state)
  state = _init_state(q, v, initial_state)
  time_major = lambda x: jnp.moveaxis(x.astype(_F32), 1, 0)

  def body(s, x):
    o, s = _step_f32(*x, s, scale)
    return s, o

  final_state, o = lax.scan(body, state, tuple(map(time_major, (q, k, v, log_f))))
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), final_state


# --------------------------------------------------------------------------- chunked form
#
# b = cumulative log-decay inside a chunk (per key channel, non-increasing). The output of
# position t is  scale * [ (q_t e^{b_t}) h_0  +  sum_{i<=t} sum_k q_tk k_ik e^{b_tk - b_ik} v_i ].
# The usual factorisation (q e^{b}) (k e^{-b})^T overflows once -b exceeds ~88 (e.g. log_f = -20
# for 5 steps). We use secondary chunking so that every exp() has a non-positive argument:
# - the chunk is split into sub-chunks of `sub_chunk_size`. For query sub-chunk m and any key in
#   an earlier sub-chunk, factor through the reference point r_m = b at the end of sub-chunk m-1:
#   e^{b_t - b_i} = e^{b_t - r_m} e^{r_m - b_i}, both factors <= 1 (t after r_m, i before it);
#   these are ordinary matmuls (the key factor is built per query sub-chunk, [M, C, K]).
# - inside a diagonal sub-chunk the pairwise decays e^{b_t - b_i} (i <= t) are formed directly,
#   a [S, S, K] tensor per sub-chunk (S = 16: 16x the size of q, a fused reduction in XLA).
# - chunk-to-chunk: h_next = e^{b_C} h + sum_i (k_i e^{b_C - b_i}) v_i^T, exponents <= 0 again.
# Underflow to 0 can happen (for products that are truly below float32's range); overflow cannot.
# Backward is XLA autodiff. d/d log_f is a reverse cumsum of terms of size |q*dq|, |k*dk| that
# cancel under strong decay, so its float32 error is ~1e-7 of that scale (not of the tiny result).


def gla_chunked(q, k, v, log_f, *, scale=1.0, initial_state=None, chunk_size=64,
                sub_chunk_size=None):
  """Chunked gated linear attention for training and prefill.

  Same arguments and results as `gla_reference`, plus static `chunk_size` and `sub_chunk_size`
  (must divide chunk_size; default gcd(chunk_size, 16)). Time lengths that are not a multiple of
  chunk_size are padded inside with log_f=0, k=v=q=0 (state unchanged) and the output trimmed.
  bf16 inputs use bf16 matmul operands with fp32 accumulation; decays and state are fp32.
  """
  _check_inputs(q, k, v, log_f, initial_state)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"gla_chunked: chunk_size must be a positive int, got {chunk_size!r}.")
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
  chunk_kv = dot_f32("gnck,gncv->gnkv", k_to_end, vc, mm)          # [G,N,K,V]

  def body(s, xs):
    dec_n, kv_n = xs
    return jnp.exp(dec_n)[..., None] * s + kv_n, s

  state = _init_state(q, v, initial_state).reshape((b * h, dk, dv))
  final_state, s_in = lax.scan(body, state, (jnp.moveaxis(b_last, 1, 0),
                                              jnp.moveaxis(chunk_kv, 1, 0)))
  s_in = jnp.moveaxis(s_in, 0, 1)                                  # [G,N,K,V]
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


def gla(q, k, v, log_f, *, scale=1.0, initial_state=None, chunk_size=64, implementation=None):
  """Gated linear attention over a sequence, by the best or the named implementation.

  Shapes as `gla_reference`. `implementation`: None or '' (registered GPU kernel 'gla' from
  `sosm_jax.ops.kernels` on gpu when present, else 'xla'), 'xla' (chunked), 'reference' or
  'kernel' (error if absent). A kernel is called with the arguments of `gla_chunked`
  (without sub_chunk_size).
  """
  fn = select_implementation("gla", implementation, gla_chunked, gla_reference)
  if fn is gla_reference:
    return fn(q, k, v, log_f, scale=scale, initial_state=initial_state)
  return fn(q, k, v, log_f, scale=scale, initial_state=initial_state, chunk_size=chunk_size)

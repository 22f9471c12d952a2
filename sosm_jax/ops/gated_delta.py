"""Gated delta rule (Gated DeltaNet, Yang et al. ICLR 2025): reference, decode step, chunked form.

State orientation is `[key_dim, value_dim]` per head. With alpha_t = exp(g_t):

    S_t = alpha_t S_{t-1} + beta_t k_t (v_t - alpha_t S_{t-1}^T k_t)^T
        = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

Three forms with one meaning:
- `gated_delta_rule_reference`: the recurrence token by token (lax.scan), float32. Ground truth.
- `gated_delta_rule_step`: one token, for decoding with a cache.
- `gated_delta_rule_chunked`: the training/prefill algorithm (WY/UT representation, see below).
`gated_delta_rule` picks one by name or by platform.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


# --------------------------------------------------------------------------- checks and helpers
# (pad_time, to_chunks, from_chunks, matmul_dtype, dot_f32, select_implementation are shared
# with hgrn2.py)


def _check_inputs(q, k, v, g, beta, initial_state):
  """Raises ValueError naming the first inconsistent shape."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"gated_delta_rule: q, k, v must be [batch, time, heads, dim]; got shapes "
        f"{q.shape}, {k.shape}, {v.shape}.")
  b, t, h, dk = q.shape
  if k.shape != q.shape:
    raise ValueError(f"gated_delta_rule: k shape {k.shape} must equal q shape {q.shape}.")
  if v.shape[:3] != (b, t, h):
    raise ValueError(
        f"gated_delta_rule: v shape {v.shape} must be [batch={b}, time={t}, heads={h}, value_dim].")
  for name, x in (("g", g), ("beta", beta)):
    if x.shape != (b, t, h):
      raise ValueError(
          f"gated_delta_rule: {name} shape {x.shape} must be [batch, time, heads] = {(b, t, h)}.")
  if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
    raise ValueError(
        f"gated_delta_rule: initial_state shape {initial_state.shape} must be "
        f"[batch, heads, key_dim, value_dim] = {(b, h, dk, v.shape[-1])}.")


def _default_scale(scale, key_dim):
  return key_dim ** -0.5 if scale is None else scale


def _zero_state(q, v):
  b, _, h, dk = q.shape
  return jnp.zeros((b, h, dk, v.shape[-1]), _F32)


def matmul_dtype(*xs):
  """bf16 operands stay bf16 (fp32 accumulation); anything else computes in fp32."""
  return jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in xs) else _F32


def dot_f32(eq, a, b, dtype):
  """einsum with operands cast to `dtype`, fp32 accumulation and full fp32 precision."""
  return jnp.einsum(eq, a.astype(dtype), b.astype(dtype), precision=_HIGHEST,
                    preferred_element_type=_F32)


# --------------------------------------------------------------------------- step and reference


def _step_f32(q, k, v, g, beta, state, scale):
  """One token in float32. q,k [B,H,K], v [B,H,V], g,beta [B,H], state [B,H,K,V]."""
  decayed = state * jnp.exp(g)[..., None, None]
  predicted = jnp.einsum("bhk,bhkv->bhv", k, decayed, precision=_HIGHEST)
  delta = beta[..., None] * (v - predicted)
  new_state = decayed + k[..., :, None] * delta[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q, new_state, precision=_HIGHEST)
  return o, new_state


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None):
  """One decoding step of the gated delta rule.

  Args:
    q, k: `[batch, heads, key_dim]` (L2-normalised by the caller).
    v: `[batch, heads, value_dim]`.
    g: `[batch, heads]` log-decay (<= 0). beta: `[batch, heads]` in (0, 1).
    state: `[batch, heads, key_dim, value_dim]` float32.
    scale: output scale, default key_dim**-0.5.
  Returns:
    (o `[batch, heads, value_dim]` in v's dtype, new_state float32 like `state`).
  """
  if q.ndim != 3 or state.ndim != 4:
    raise ValueError(
        f"gated_delta_rule_step: q must be [batch, heads, key_dim] and state "
        f"[batch, heads, key_dim, value_dim]; got {q.shape} and {state.shape}. "
        f"For whole sequences use gated_delta_rule.")
  scale = _default_scale(scale, q.shape[-1])
  f = lambda x: x.astype(_F32)
  o, new_state = _step_f32(f(q), f(k), f(v), f(g), f(beta), f(state), scale)
  return o.astype(v.dtype), new_state


def gated_delta_rule_reference(q, k, v, g, beta, *, scale=None, initial_state=None):
  """Sequential reference of the gated delta rule (float32, lax.scan over time).

  Args:
    q, k: `[batch, time, heads, key_dim]` (L2-normalised by the caller).
    v: `[batch, time, heads, value_dim]`.
    g: `[batch, time, heads]` log-decay (<= 0). beta: `[batch, time, heads]` in (0, 1).
    scale: output scale, default key_dim**-0.5.
    initial_state: `[batch, heads, key_dim, value_dim]` or None (zeros).
  Returns:
    (o `[batch, time, heads, value_dim]` in v's dtype, final_state float32
    `[batch, heads, key_dim, value_dim]`).
  """
  _check_inputs(q, k, v, g, beta, initial_state)
  scale = _default_scale(scale, q.shape[-1])
  state = _zero_state(q, v) if initial_state is None else initial_state.astype(_F32)
  time_major = lambda x: jnp.moveaxis(x.astype(_F32), 1, 0)
  xs = tuple(map(time_major, (q, k, v, g, beta)))

  def body(s, x):
    o, s = _step_f32(*x, s, scale)
    return s, o

  final_state, o = lax.scan(body, state, xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), final_state


# --------------------------------------------------------------------------- chunked form
#
# Within a chunk (local positions 1..C, gamma_i = cumulative log-decay inside the chunk, S0 the
# state entering the chunk) write the update as S_t = e^{gamma_t} S0 + sum_{i<=t} e^{gamma_t -
# gamma_i} k_i delta_i^T. Substituting into the recurrence gives the lower-triangular system
#     delta + A delta = beta*V - beta*e^{gamma}*K S0,
#     A = strictly_lower(diag(beta) (K K^T * e^{gamma_t - gamma_i})),
# so with T = (I + A)^{-1}:  delta = U - W S0,  U = T (beta V),  W = T (beta e^{gamma} K).
# Everything except "delta = U - W S0" and the state update is independent of S0, so it is
# computed for all chunks at once; only the chunk-to-chunk state recurrence is a lax.scan.
# All decay factors used are exp of non-positive numbers (<= 1): no overflow is possible.


def pad_time(x, pad):
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


def gated_delta_rule_chunked(q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64):
  """Chunked (WY/UT) gated delta rule for training and prefill.

  Same arguments and results as `gated_delta_rule_reference`, plus `chunk_size` (static).
  A time length that is not a multiple of `chunk_size` is padded inside with g=0, beta=0,
  k=v=q=0 (identity steps that leave the state unchanged) and the output is trimmed.
  bf16 inputs use bf16 matmul operands with fp32 accumulation; the state is always fp32.
  """
  _check_inputs(q, k, v, g, beta, initial_state)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(
        f"gated_delta_rule_chunked: chunk_size must be a positive int, got {chunk_size!r}.")
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = _default_scale(scale, dk)
  state = _zero_state(q, v) if initial_state is None else initial_state.astype(_F32)
  mm = matmul_dtype(q, k, v)
  pad = (-t) % chunk_size

  qc, kc, vc = (to_chunks(pad_time(x, pad), chunk_size) for x in (q, k, v))  # [B,H,N,C,*]
  gc, bc = (to_chunks(pad_time(x.astype(_F32), pad), chunk_size) for x in (g, beta))  # [B,H,N,C]

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
  chunk_decay = jnp.exp(gamma[..., -1])                              # [B,H,N]

  def body(s, xs):
    w_n, u_n, kend_n, dec_n = xs
    delta = u_n - dot_f32("bhck,bhkv->bhcv", w_n, s, mm)
    s_next = dec_n[..., None, None] * s + dot_f32("bhck,bhcv->bhkv", kend_n, delta, mm)
    return s_next, (s, delta)

  chunk_major = lambda x: jnp.moveaxis(x, 2, 0)
  final_state, (s_in, delta) = lax.scan(
      body, state, tuple(map(chunk_major, (w, u, k_to_end, chunk_decay))))
  s_in = jnp.moveaxis(s_in, 0, 2)                                    # [B,H,N,K,V]
  delta = jnp.moveaxis(delta, 0, 2)                                  # [B,H,N,C,V]

  q_decayed = qc.astype(_F32) * jnp.exp(gamma)[..., None]
  o = (dot_f32("bhnck,bhnkv->bhncv", q_decayed, s_in, mm)
       + dot_f32("bhncd,bhndv->bhncv", qk, delta, mm))
  o = scale * from_chunks(o)[:, :t]
  return o.astype(v.dtype), final_state


# --------------------------------------------------------------------------- dispatcher


def kernel_impl(name):
  """The GPU fast path registered in `sosm_jax.ops.kernels` under `name`, or None."""
  try:
    from sosm_jax.ops import kernels  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError as e:
    if e.name in ("sosm_jax.ops.kernels",):
      return None
    raise
  get = getattr(kernels, "get", None)
  return get(name) if get is not None else None


IMPLEMENTATIONS = ("xla", "reference", "kernel")


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64,
                     implementation=None):
  """Gated delta rule over a sequence, by the best or the named implementation.

  Shapes as `gated_delta_rule_reference`. `implementation`: None or '' (best for
  `jax.default_backend()`: the registered GPU kernel on gpu when `sosm_jax.ops.kernels` provides
  one, else 'xla'), 'xla' (chunked), 'reference' (sequential) or 'kernel' (error if absent).
  A kernel is called with the same arguments as `gated_delta_rule_chunked`.
  """
  fn = select_implementation("gated_delta_rule", implementation, gated_delta_rule_chunked,
               gated_delta_rule_reference)
  if fn is gated_delta_rule_reference:
    return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state)
  return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size)


def select_implementation(name, implementation, chunked, reference):
  """Shared dispatch logic for the linear-attention ops."""
  if implementation in (None, ""):
    kernel = kernel_impl(name) if jax.default_backend() == "gpu" else None
    return kernel if kernel is not None else chunked
  if implementation == "xla":
    return chunked
  if implementation == "reference":
    return reference
  if implementation == "kernel":
    kernel = kernel_impl(name)
    if kernel is None:
      raise ValueError(
          f"{name}: implementation='kernel' but sosm_jax.ops.kernels registers no '{name}' for "
          f"backend {jax.default_backend()!r}; use implementation=None or 'xla'.")
    return kernel
  raise ValueError(
      f"{name}: unknown implementation {implementation!r}; choose one of None, {IMPLEMENTATIONS}.")

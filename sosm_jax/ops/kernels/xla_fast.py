"""Fast chunked gated delta rule and GLA (HGRN-2): all intra-chunk work batched, one recurrence.

Same math as `sosm_jax/ops/gated_delta.py` / `hgrn2.py` chunked forms, arranged for speed:
- every intra-chunk product is one batched einsum over all chunks (bf16 operands, fp32
  accumulation when the inputs are bf16);
- the unit-lower-triangular inverse of the WY form is blocked (16x16 Neumann products, then
  pairwise merges) with a two-matmul VJP instead of a batched triangular solve;
- the only sequential work, the chunk-to-chunk state recurrence, is `recurrence.chunk_recurrence`
  with a hand-written VJP, run by lax.scan ('xla') or a Pallas kernel ('pallas');
- with backend='pallas' the gated delta rule is one custom VJP over Pallas kernels
  (`pallas_gdn_core.py`, [B, T, H, D] layout throughout), and GLA follows `pallas_gla.PATH`
  (fused kernels of `pallas_gla.py`, or the score kernels of `pallas_gla_scores.py` with the
  rest of this module's XLA form);
- GLA's intra-chunk scores use 16-token sub-chunks: exact per-channel decays inside a sub-chunk
  (a fused reduction with a hand-written VJP), a shared reference point between sub-chunks, so
  every exponent is <= 0 and nothing can overflow.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from sosm_jax.ops.kernels.recurrence import chunk_recurrence

_F32 = jnp.float32
_SUB = 16  # sub-chunk size for the blocked inverse and GLA's exact diagonal blocks


def _mm(eq, a, b):
  """einsum, fp32 accumulation; fp32 operands at full precision (the GPU default is tf32)."""
  prec = lax.Precision.HIGHEST if a.dtype == _F32 or b.dtype == _F32 else None
  return jnp.einsum(eq, a, b, precision=prec, preferred_element_type=_F32)


def _compute_dtype(*xs):
  return jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in xs) else _F32


def _chunked(x, chunk, pad):
  """[B, T, H, ...] -> [B, H, N, C, ...], zero-padding time by `pad`."""
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  b, t, h = x.shape[:3]
  x = x.reshape((b, t // chunk, chunk, h) + x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def _unchunked(x, t):
  """[B, H, N, C, D] -> [B, T, H, D] (trimmed to t)."""
  b, h, n, c, d = x.shape
  return jnp.moveaxis(x, 1, 3).reshape(b, n * c, h, d)[:, :t]


def _pallas_shapes_ok(chunk, key_dim, value_dim):
  """Triton tiles need power-of-two sizes >= 16; other shapes take the XLA recurrence path."""
  return all(x >= 16 and x & (x - 1) == 0 for x in (chunk, key_dim, value_dim))


def _check(name, q, k, v, gate, gate_shape, initial_state, chunk_size):
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"{name}: q, k must be [batch, time, heads, key_dim] with v "
                     f"[batch, time, heads, value_dim]; got {q.shape}, {k.shape}, {v.shape}.")
  if gate.shape != gate_shape:
    raise ValueError(f"{name}: gate shape {gate.shape} must be {gate_shape}.")
  b, _, h, dk = q.shape
  if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
    raise ValueError(f"{name}: initial_state shape {initial_state.shape} must be "
                     f"[batch, heads, key_dim, value_dim] = {(b, h, dk, v.shape[-1])}.")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}.")


# --------------------------------------------------------------------------- (I + L)^{-1}


def _neumann_inverse(lower):
  """(I + L)^{-1} for strictly lower L `[..., s, s]`, s a power of two: prod (I + (-L)^(2^j))."""
  s = lower.shape[-1]
  eye = jnp.eye(s, dtype=_F32)
  x = -lower
  inv = eye + x
  for _ in range(int(math.log2(s)) - 1):
    x = _mm("...ij,...jk->...ik", x, x)
    inv = _mm("...ij,...jk->...ik", inv, eye + x)
  return inv


def _blocked_inverse(lower):
  """(I + L)^{-1}: Neumann on 16x16 diagonal blocks, then merge pairs of blocks upward."""
  n = lower.shape[-1]
  s = min(_SUB, n)
  blocks = jnp.stack([lower[..., i:i + s, i:i + s] for i in range(0, n, s)], axis=-3)
  inv = _neumann_inverse(blocks)                                     # [..., n/s, s, s]
  while inv.shape[-3] > 1:
    nb = inv.shape[-3]
    merged = []
    for p in range(nb // 2):
      t1, t2 = inv[..., 2 * p, :, :], inv[..., 2 * p + 1, :, :]
      r0, r1 = 2 * p * s, (2 * p + 1) * s
      off = -_mm("...ij,...jk->...ik", _mm("...ij,...jk->...ik", t2, lower[..., r1:r1 + s, r0:r1]), t1)
      top = jnp.concatenate([t1, jnp.zeros_like(t1)], axis=-1)
      bottom = jnp.concatenate([off, t2], axis=-1)
      merged.append(jnp.concatenate([top, bottom], axis=-2))
    inv = jnp.stack(merged, axis=-3)
    s *= 2
  return inv[..., 0, :, :]


@jax.custom_vjp
def unit_lower_inverse(lower):
  """(I + L)^{-1} for strictly lower-triangular L `[..., C, C]` (float32)."""
  n = lower.shape[-1]
  if n & (n - 1) == 0:
    return _blocked_inverse(lower)
  eye = jnp.broadcast_to(jnp.eye(n, dtype=_F32), lower.shape)
  return lax.linalg.triangular_solve(eye + lower, eye, left_side=True, lower=True,
                                     unit_diagonal=True)


def _inv_fwd(lower):
  t = unit_lower_inverse(lower)
  return t, t


def _inv_bwd(t, dt):
  # d(M^-1) = -M^-1 dM M^-1  =>  dL = -T^T dT T^T, restricted to L's strictly lower pattern.
  g = -_mm("...ji,...jk->...ik", t, _mm("...ij,...kj->...ik", dt, t))
  n = t.shape[-1]
  return (jnp.where(jnp.tril(jnp.ones((n, n), bool), -1), g, 0.0),)


unit_lower_inverse.defvjp(_inv_fwd, _inv_bwd)


# --------------------------------------------------------------------------- gated delta rule


def gated_delta_rule_fast(q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64,
                          backend="xla", interpret=False, block_v=None):
  """Chunked gated delta rule (contract of `gated_delta_rule_chunked`), fast formulation.

  Args:
    q, k: `[batch, time, heads, key_dim]` (L2-normalised), v `[batch, time, heads, value_dim]`,
    g: `[batch, time, heads]` log-decay <= 0, beta `[batch, time, heads]` in (0, 1).
    scale: default key_dim**-0.5. initial_state: `[batch, heads, key_dim, value_dim]` or None.
    chunk_size: static. backend: 'xla' | 'pallas' for the recurrence; interpret, block_v: Pallas.
  Returns:
    (o `[batch, time, heads, value_dim]` in v's dtype, final_state f32
    `[batch, heads, key_dim, value_dim]`).
  """
  b, t, h, dk = q.shape
  _check("gated_delta_rule", q, k, v, g, (b, t, h), initial_state, chunk_size)
  if beta.shape != (b, t, h):
    raise ValueError(f"gated_delta_rule: beta shape {beta.shape} must be {(b, t, h)}.")
  dv = v.shape[-1]
  c = chunk_size
  scale = dk ** -0.5 if scale is None else scale
  dt = _compute_dtype(q, k, v)
  pad = (-t) % c
  gam = jnp.cumsum(_chunked(g.astype(_F32), c, pad), axis=-1)       # [B,H,N,C]
  bc = _chunked(beta.astype(_F32), c, pad)
  n = gam.shape[2]
  bh = lambda x: x.reshape((b * h,) + x.shape[2:])
  h0 = (jnp.zeros((b, h, dk, dv), _F32) if initial_state is None
        else initial_state.astype(_F32))
  a = jnp.broadcast_to(jnp.exp(gam[..., -1])[..., None], (b, h, n, dk))
  if backend == "pallas" and not _pallas_shapes_ok(c, dk, dv):
    backend = "xla"
  if backend == "pallas":
    return _gated_delta_pallas(q, k, v, gam, bc, a, h0, scale, c, pad, dt, interpret, block_v)
  qc, kc, vc = (_chunked(x.astype(dt), c, pad) for x in (q, k, v))  # [B,H,N,C,D]

  idx = jnp.arange(c)
  causal = idx[:, None] >= idx[None, :]
  # mask before exp: above the diagonal the exponent is positive and could overflow
  decay = jnp.exp(jnp.where(causal, gam[..., :, None] - gam[..., None, :], -jnp.inf))
  kk = _mm("bhncd,bhnmd->bhncm", kc, kc)
  lower = jnp.where(idx[:, None] > idx[None, :], kk * decay, 0.0) * bc[..., :, None]
  tinv = unit_lower_inverse(lower).astype(dt)                        # [B,H,N,C,C]
  u = _mm("bhncm,bhnmv->bhncv", tinv, (vc * bc[..., None]).astype(dt)).astype(dt)
  w = _mm("bhncm,bhnmk->bhnck", tinv,
          (kc * (bc * jnp.exp(gam))[..., None]).astype(dt)).astype(dt)
  kd = (kc * jnp.exp(gam[..., -1:] - gam)[..., None]).astype(dt)
  h_in, vn, h_last = chunk_recurrence(bh(w), bh(u), bh(kd), bh(a), bh(h0), backend, interpret,
                                      block_v)
  h_in = h_in.reshape(b, h, n, dk, dv)
  vn = vn.reshape(b, h, n, c, dv)

  qk = (_mm("bhncd,bhnmd->bhncm", qc, kc) * decay).astype(dt)
  qg = (qc * jnp.exp(gam)[..., None]).astype(dt)
  o = _mm("bhnck,bhnkv->bhncv", qg, h_in) + _mm("bhncm,bhnmv->bhncv", qk, vn)
  o = _unchunked(o * scale, t)
  return o.astype(v.dtype), h_last.reshape(b, h, dk, dv)


def _gated_delta_pallas(q, k, v, gam, bc, a, h0, scale, c, pad, dt, interpret, block_v):
  """Pallas path: one custom VJP over the WY preparation, recurrence and output-stage kernels
  (`pallas_gdn_core.py`), reading and writing the [B, T, H, D] layout."""
  from sosm_jax.ops.kernels import pallas_gdn_core  # pylint: disable=import-outside-toplevel
  del a
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  n = gam.shape[2]
  pad_t = lambda x: jnp.pad(x.astype(dt), [(0, 0), (0, pad), (0, 0), (0, 0)]) if pad else x.astype(dt)
  o, h_last = pallas_gdn_core.gdn_core(pad_t(q), pad_t(k), pad_t(v), bc.reshape(b * h, n * c),
                                       gam.reshape(b * h, n * c), h0.reshape(b * h, dk, dv),
                                       float(scale), c, interpret, block_v)
  return o[:, :t].astype(v.dtype), h_last.reshape(b, h, dk, dv)


# --------------------------------------------------------------------------- GLA (HGRN-2)


@jax.custom_vjp
def _diag_scores(q, k, gam):
  """Exact intra-sub-chunk scores: A[t,i] = sum_d q[t,d] k[i,d] exp(G[t,d]-G[i,d]), i <= t.

  q, k, gam `[..., s, K]` (f32) -> `[..., s, s]`. One fused reduction; no [s, s, K] residual.
  """
  return _diag_scores_fwd(q, k, gam)[0]


def _diag_decay(gam):
  s = gam.shape[-2]
  mask = jnp.tril(jnp.ones((s, s), bool))[..., None]
  return jnp.exp(jnp.where(mask, gam[..., :, None, :] - gam[..., None, :, :], -jnp.inf))


def _diag_scores_fwd(q, k, gam):
  a = jnp.sum(q[..., :, None, :] * k[..., None, :, :] * _diag_decay(gam), axis=-1)
  return a, (q, k, gam)


def _diag_scores_bwd(res, da):
  q, k, gam = res
  e = _diag_decay(gam) * da[..., None]                               # [..., s, s, K]
  dq = jnp.sum(e * k[..., None, :, :], axis=-2)
  dk = jnp.sum(e * q[..., :, None, :], axis=-3)
  # dA/dG[t] = q k e, dA/dG[i] = -q k e  =>  dG = q*dq - k*dk
  return dq, dk, q * dq - k * dk


_diag_scores.defvjp(_diag_scores_fwd, _diag_scores_bwd)


def _gla_scores(qc, kc, gam, dt):
  """Causal intra-chunk GLA scores `[B,H,N,C,C]` (f32) from q, k `[B,H,N,C,K]`, gam (cumsum)."""
  c = qc.shape[-2]
  s = min(_SUB, c) if c % min(_SUB, c) == 0 else c
  rows = []
  for p in range(c // s):
    sl = slice(p * s, (p + 1) * s)
    diag = _diag_scores(qc[..., sl, :].astype(_F32), kc[..., sl, :].astype(_F32), gam[..., sl, :])
    if p == 0:
      past = None
    else:
      ref = gam[..., p * s - 1:p * s, :]                             # G at the previous token
      qp = (qc[..., sl, :] * jnp.exp(gam[..., sl, :] - ref)).astype(dt)
      kp = (kc[..., :p * s, :] * jnp.exp(ref - gam[..., :p * s, :])).astype(dt)
      past = _mm("bhnsk,bhnmk->bhnsm", qp, kp)                        # [.., s, p*s]
    parts = ([past] if past is not None else []) + [diag]
    if (p + 1) * s < c:
      parts.append(jnp.zeros(diag.shape[:-1] + (c - (p + 1) * s,), _F32))
    rows.append(jnp.concatenate(parts, axis=-1))
  return jnp.concatenate(rows, axis=-2)


def gla_fast(q, k, v, log_f, *, scale=1.0, initial_state=None, chunk_size=64, backend="xla",
             interpret=False, block_v=None):
  """Chunked gated linear attention with per-key-channel decay (contract of `gla_chunked`).

  Args:
    q, k, log_f: `[batch, time, heads, key_dim]` (log_f <= 0), v `[batch, time, heads, value_dim]`.
    scale: output scale (default 1.0). initial_state: `[batch, heads, key_dim, value_dim]` or None.
    chunk_size: static. backend: 'xla' | 'pallas' (path `pallas_gla.PATH`) | 'pallas_<path>';
    interpret, block_v: Pallas.
  Returns:
    (o `[batch, time, heads, value_dim]` in v's dtype, final_state f32).
  """
  b, t, h, dk = q.shape
  _check("gla", q, k, v, log_f, q.shape, initial_state, chunk_size)
  dv = v.shape[-1]
  c = chunk_size
  scale = 1.0 if scale is None else scale
  path = None
  if backend.startswith("pallas") and not _pallas_shapes_ok(c, dk, dv):
    backend = "xla"
  elif backend.startswith("pallas"):  # 'pallas' follows pallas_gla.PATH; 'pallas_<path>' names one
    from sosm_jax.ops.kernels import pallas_gla  # pylint: disable=import-outside-toplevel
    path = pallas_gla.PATH if backend == "pallas" else backend[len("pallas_"):]
    backend = "pallas"
  dt = _compute_dtype(q, k, v)
  pad = (-t) % c
  if path == "auto":
    return _gla_pallas_auto(q, k, v, log_f, initial_state, scale, c, interpret, block_v)
  if path in ("parallel", "chunk", "split"):
    return _gla_pallas(q, k, v, log_f, initial_state, scale, c, pad, dt, interpret, block_v, path)
  qc, kc, vc = (_chunked(x.astype(dt), c, pad) for x in (q, k, v))
  gam = jnp.cumsum(_chunked(log_f.astype(_F32), c, pad), axis=-2)  # [B,H,N,C,K]
  n = gam.shape[2]

  kd = (kc * jnp.exp(gam[..., -1:, :] - gam)).astype(dt)
  a = jnp.exp(gam[..., -1, :])                                       # [B,H,N,K]
  bh = lambda x: x.reshape((b * h,) + x.shape[2:])
  h0 = (jnp.zeros((b, h, dk, dv), _F32) if initial_state is None
        else initial_state.astype(_F32))
  h_in, _, h_last = chunk_recurrence(None, bh(vc), bh(kd), bh(a), bh(h0), backend, interpret,
                                     block_v)
  h_in = h_in.reshape(b, h, n, dk, dv)

  qg = (qc * jnp.exp(gam)).astype(dt)
  if backend == "pallas":  # PATH 'legacy': intra-chunk score kernels, the rest in XLA
    from sosm_jax.ops.kernels.pallas_gla_scores import gla_scores  # pylint: disable=import-outside-toplevel
    flat = lambda x: x.reshape(b * h, n * c, dk)
    scores = gla_scores(flat(qc), flat(kc), flat(gam), c, interpret)
    scores = scores.reshape(b, h, n, c, c).astype(dt)
  else:
    scores = _gla_scores(qc, kc, gam, dt).astype(dt)
  o = _mm("bhnck,bhnkv->bhncv", qg, h_in) + _mm("bhncm,bhnmv->bhncv", scores, vc)
  o = _unchunked(o * scale, t)
  return o.astype(v.dtype), h_last.reshape(b, h, dk, dv)


def _gla_pallas(q, k, v, log_f, initial_state, scale, c, pad, dt, interpret, block_v, path):
  """Pallas path (`pallas_gla.py`): [B, T, H, D] layout throughout, one custom VJP."""
  from sosm_jax.ops.kernels import pallas_gla  # pylint: disable=import-outside-toplevel
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  pad_t = lambda x, d: (jnp.pad(x.astype(d), [(0, 0), (0, pad), (0, 0), (0, 0)]) if pad
                        else x.astype(d))
  lf = pad_t(log_f, _F32)
  h0 = (jnp.zeros((b * h, dk, dv), _F32) if initial_state is None
        else initial_state.astype(_F32).reshape(b * h, dk, dv))
  if path == "split":  # within-chunk cumulative sums inside the kernels
    from sosm_jax.ops.kernels import pallas_gla_split  # pylint: disable=import-outside-toplevel
    o, h_last = pallas_gla_split.gla_split(pad_t(q, dt), pad_t(k, dt), pad_t(v, dt), lf, h0,
                                           float(scale), c, interpret, block_v)
  else:
    gam = jnp.cumsum(lf.reshape(b, (t + pad) // c, c, h, dk), axis=2).reshape(lf.shape)
    o, h_last = pallas_gla.gla_core(pad_t(q, dt), pad_t(k, dt), pad_t(v, dt), gam, h0,
                                    float(scale), c, interpret, block_v, path)
  return o[:, :t].astype(v.dtype), h_last.reshape(b, h, dk, dv)


def _gla_pallas_auto(q, k, v, log_f, initial_state, scale, c, interpret, block_v):
  """PATH 'auto': the 'parallel' kernels when the call is not differentiated, the 'legacy' path
  (forward and its VJP) when it is. Both are exact forms of the same op."""
  b, _, h, dk = q.shape
  dv = v.shape[-1]
  h0 = (jnp.zeros((b, h, dk, dv), _F32) if initial_state is None else initial_state.astype(_F32))
  opts = dict(scale=scale, chunk_size=c, interpret=interpret, block_v=block_v)

  @jax.custom_vjp
  def op(q, k, v, log_f, h0):
    return gla_fast(q, k, v, log_f, initial_state=h0, backend="pallas_parallel", **opts)

  def op_fwd(q, k, v, log_f, h0):
    return jax.vjp(lambda *a: gla_fast(*a[:4], initial_state=a[4], backend="pallas_legacy", **opts),
                   q, k, v, log_f, h0)

  def op_bwd(vjp, cts):
    return vjp(cts)

  op.defvjp(op_fwd, op_bwd)
  return op(q, k, v, log_f, h0)

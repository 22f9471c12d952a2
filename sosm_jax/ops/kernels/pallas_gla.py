"""GLA (HGRN-2) Pallas path: per-key-channel decay, four kernels under one custom VJP.

Per chunk (q, k, gam `[C, K]`, gam the within-chunk cumulative log-decay, v `[C, V]`, h the
state entering the chunk `[K, V]`):

    o = scale * ((q e^gam) h + A v),  A[t, i] = sum_d q[t,d] k[i,d] e^(gam[t,d] - gam[i,d]), i <= t
    h_next = e^gam_C * h + (k e^(gam_C - gam))^T v

Kernels, all reading q, k, v, gam in the caller's `[B, T, H, D]` layout:
- recurrence (forward and reverse), one program per (batch*head, V block), state on chip; the
  reverse one forms dh = scale (q e^gam)^T do itself, so no `[N, K, V]` cotangent is stored;
- output stage: one program per chunk, 16-row sub-blocks. A never reaches memory: below the
  diagonal sub-blocks it is a matmul with a reference point (the token before the query block)
  so that both factors are exp of non-positive numbers; on the diagonal it is exact, one key at a
  time, so nothing overflows however strong the decay;
- backward post kernel: dq, dk, dv, dgam of a chunk in one pass (scores recomputed in the same
  way), using dgam = q dq - k dk (+ the chunk-end terms of the recurrence).
`interpret=True` runs on CPU (tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sosm_jax.ops.kernels.pallas_gla_scores import _exp  # one ex2.approx exp for both GLA paths
from sosm_jax.ops.kernels.pallas_recurrence import _compiler_params, _dot, _pick_block_v

_F32 = jnp.float32
# Diagonal sub-blocks: 'exact' = one key at a time over all 16 keys; 'split' = the lower-left
# 8 x 8 quadrant as a matmul through the block's middle token, exact only inside the two 8 x 8
# diagonal quadrants (half the exps and half the sequential steps). Both never overflow.
DIAG = "split"
# Path taken by `xla_fast.gla_fast(backend='pallas')`. 'split': the kernels of
# `pallas_gla_split.py` (scores kept from the forward, per-chunk output and dA/dv kernels, per
# sub-block dq/dk kernel; the fastest forward and forward+backward, see NOTES.md); 'parallel':
# these kernels, one program per 16-row sub-block; 'chunk': one program per chunk walking its
# sub-blocks; 'legacy': the score kernels of `pallas_gla_scores.py` with the rest in XLA; 'auto':
# 'parallel' for calls that are not differentiated, 'legacy' under differentiation, chosen by one
# custom VJP. H100, 4096 x 16, fwd / fwd+bwd ms: split 4.0 / 14.5, parallel 6.0 / 18.8, legacy
# 7.3 / 18.3 (o dropped), auto 6.3 / 19.9.
PATH = "split"
TUNING = {"out_warps": 4, "post_warps": 4, "rec_warps": 4, "rec_stages": 2}


def _sub(c):
  s = min(16, c)
  if c % s or s & (s - 1):
    raise ValueError(f"pallas gla: chunk_size {c} must be a power of two.")
  return s


def _iota(shape, axis):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


# --------------------------------------------------------------------------- recurrence


def _rec_fwd_kernel(kd_ref, v_ref, a_ref, h0_ref, hin_ref, hl_ref, *, n_chunks, chunk, key_dim):
  dt = v_ref.dtype

  def body(n, h):
    rows = pl.ds(n * chunk, chunk)
    hin_ref[pl.ds(n * key_dim, key_dim), :] = h.astype(dt)
    return a_ref[n, :][:, None] * h + _dot(kd_ref[rows, :], v_ref[rows, :], ta=True)

  hl_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))


def _rec_bwd_kernel(qe_ref, do_ref, a_ref, dhl_ref, hin_ref, lam_ref, lam0_ref, hl_ref, *,
                    n_chunks, chunk, key_dim, scale):
  dt = qe_ref.dtype

  def body(i, lam):
    n = n_chunks - 1 - i
    rows = pl.ds(n * chunk, chunk)
    states = pl.ds(n * key_dim, key_dim)
    lam_ref[states, :] = lam.astype(dt)
    hl_ref[n, :] = jnp.sum(hin_ref[states, :].astype(_F32) * lam, axis=1)   # d e^gam_C (per key)
    return a_ref[n, :][:, None] * lam + scale * _dot(qe_ref[rows, :], do_ref[rows, :], ta=True)

  lam0_ref[...] = lax.fori_loop(0, n_chunks, body, dhl_ref[...].astype(_F32))


def _rec_specs(heads, t, kdim, bv, n):
  seq = lambda w, j: pl.BlockSpec((None, t, None, w),
                                  lambda i, jj: (i // heads, 0, i % heads, jj if j else 0))
  return dict(k=seq(kdim, False), v=seq(bv, True),
              a=pl.BlockSpec((None, n, kdim), lambda i, j: (i, 0, 0)),
              state=pl.BlockSpec((None, kdim, bv), lambda i, j: (i, 0, j)),
              states=pl.BlockSpec((None, n * kdim, bv), lambda i, j: (i, 0, j)))


def _rec_params(interpret):
  return None if interpret else _compiler_params(TUNING["rec_warps"], TUNING["rec_stages"])


def rec_forward(kd, v, a, h0, *, chunk, interpret=False, block_v=None):
  """kd `[B,T,H,K]`, v `[B,T,H,V]`, a `[B*H,N,K]` f32, h0 `[B*H,K,V]` f32 ->
  (h_in `[B*H,N*K,V]` in v's dtype, h_last `[B*H,K,V]` f32)."""
  b, t, heads, kdim = kd.shape
  vdim = v.shape[-1]
  n = t // chunk
  bv = _pick_block_v(b * heads, vdim, block_v)
  sp = _rec_specs(heads, t, kdim, bv, n)
  kernel = functools.partial(_rec_fwd_kernel, n_chunks=n, chunk=chunk, key_dim=kdim)
  return pl.pallas_call(
      kernel, grid=(b * heads, vdim // bv), in_specs=[sp["k"], sp["v"], sp["a"], sp["state"]],
      out_specs=[sp["states"], sp["state"]],
      out_shape=[jax.ShapeDtypeStruct((b * heads, n * kdim, vdim), v.dtype),
                 jax.ShapeDtypeStruct((b * heads, kdim, vdim), _F32)],
      interpret=interpret, compiler_params=_rec_params(interpret), name="gla_recurrence_fwd")(
          kd, v, a, h0)


def rec_backward(qe, do, a, dh_last, h_in, *, chunk, scale, interpret=False, block_v=None):
  """qe = q e^gam `[B,T,H,K]`, do `[B,T,H,V]`, a, dh_last as `rec_forward`, h_in `[B*H,N*K,V]` ->
  (lam_next `[B*H,N*K,V]` = dL/dh_{n+1} for every chunk n, dL/dh_0 f32,
  hl `[B*H,N,K]` = rowsum(h_n * lam_{n+1}))."""
  b, t, heads, kdim = qe.shape
  vdim = do.shape[-1]
  n = t // chunk
  bv = _pick_block_v(b * heads, vdim, block_v)
  sp = _rec_specs(heads, t, kdim, bv, n)
  kernel = functools.partial(_rec_bwd_kernel, n_chunks=n, chunk=chunk, key_dim=kdim, scale=scale)
  nvb = vdim // bv
  lam, lam0, hl = pl.pallas_call(
      kernel, grid=(b * heads, nvb),
      in_specs=[sp["k"], sp["v"], sp["a"], sp["state"], sp["states"]],
      out_specs=[sp["states"], sp["state"], pl.BlockSpec((None, n, kdim), lambda i, j: (i, 0, j))],
      out_shape=[jax.ShapeDtypeStruct((b * heads, n * kdim, vdim), qe.dtype),
                 jax.ShapeDtypeStruct((b * heads, kdim, vdim), _F32),
                 jax.ShapeDtypeStruct((b * heads, n, nvb * kdim), _F32)],
      interpret=interpret, compiler_params=_rec_params(interpret), name="gla_recurrence_bwd")(
          qe, do.astype(qe.dtype), a, dh_last.astype(_F32), h_in)
  return lam, lam0, hl.reshape(b * heads, n, nvb, kdim).sum(2)


# --------------------------------------------------------------------------- diagonal sub-blocks


def _halves(g_ref, r0, q, k, g, sub, dt):
  """Quadrant factors through the middle token m: rows >= sub/2 get e^(gam - gam_m) (queries),
  rows < sub/2 get e^(gam_m - gam) (keys); both exponents are <= 0."""
  hf = sub // 2
  lo = _iota((sub, 1), 0) < hf
  gm = g_ref[r0 + hf - 1, :][None, :]
  qfac = jnp.exp(jnp.where(lo, -jnp.inf, g - gm))
  kfac = jnp.exp(jnp.where(lo, gm - g, -jnp.inf))
  return lo, qfac, kfac, (q * qfac).astype(dt), (k * kfac).astype(dt)


def _paired_row(ref, r0, j, hf, lo):
  """Row j of the block for the upper half, row hf + j for the lower half: `[sub, D]` f32."""
  return jnp.where(lo, ref[r0 + j, :][None, :], ref[r0 + hf + j, :][None, :]).astype(_F32)


def _diag_scores_split(k_ref, g_ref, r0, q, k, g, sub, fast, dt):
  """`_diag_scores` with the off-diagonal quadrant as one matmul (DIAG = 'split')."""
  hf = sub // 2
  lo, _, _, qf, kf = _halves(g_ref, r0, q, k, g, sub, dt)
  trow, tcol = _iota((sub, 1), 0), _iota((1, sub), 1)
  within = jnp.where(lo, trow, trow - hf)

  def body(j, acc):
    kj, gj = _paired_row(k_ref, r0, j, hf, lo), _paired_row(g_ref, r0, j, hf, lo)
    e = _exp(jnp.where(within >= j, g - gj, -jnp.inf), fast)
    col = jnp.sum(q * kj * e, axis=1)
    return acc + jnp.where(tcol == jnp.where(lo, j, j + hf), col[:, None], 0.0)

  return lax.fori_loop(0, hf, body, _dot(qf, kf, tb=True))


def _diag_grads_split(k_ref, v_ref, g_ref, r0, q, k, g, do, sub, scale, fast):
  """`_diag_grads` with the off-diagonal quadrant as matmuls (DIAG = 'split'); do in its dtype."""
  dt = do.dtype
  hf = sub // 2
  lo, qfac, kfac, qf, kf = _halves(g_ref, r0, q, k, g, sub, dt)
  trow, tcol = _iota((sub, 1), 0), _iota((1, sub), 1)
  within = jnp.where(lo, trow, trow - hf)
  da = scale * _dot(do, v_ref[pl.ds(r0, sub), :], tb=True)
  da_q = jnp.where(jnp.logical_not(lo) & (tcol < hf), da, 0.0).astype(dt)
  dq = _dot(da_q, kf) * qfac
  dk = _dot(da_q, qf, ta=True) * kfac
  dof = do.astype(_F32)

  def body(j, carry):
    dq, dk, a = carry
    kj, gj = _paired_row(k_ref, r0, j, hf, lo), _paired_row(g_ref, r0, j, hf, lo)
    e = _exp(jnp.where(within >= j, g - gj, -jnp.inf), fast)
    dcol = scale * jnp.sum(dof * _paired_row(v_ref, r0, j, hf, lo), axis=1)   # dA[t, key(t)]
    dq = dq + dcol[:, None] * kj * e
    part = dcol[:, None] * q * e
    dk = (dk + jnp.where(trow == j, jnp.sum(jnp.where(lo, part, 0.0), axis=0)[None, :], 0.0)
          + jnp.where(trow == j + hf, jnp.sum(jnp.where(lo, 0.0, part), axis=0)[None, :], 0.0))
    col = jnp.sum(q * kj * e, axis=1)
    a = a + jnp.where(tcol == jnp.where(lo, j, j + hf), col[:, None], 0.0)
    return dq, dk, a

  return lax.fori_loop(0, hf, body, (dq, dk, _dot(qf, kf, tb=True)))


# --------------------------------------------------------------------------- output stage


def _diag_scores(k_ref, g_ref, r0, q, g, sub, fast):
  """Exact A of the diagonal sub-block at rows r0.. (q, g its rows, f32) -> `[sub, sub]` f32."""
  trow, tcol = _iota((sub, 1), 0), _iota((1, sub), 1)

  def body(j, acc):
    kj = k_ref[r0 + j, :].astype(_F32)
    e = _exp(jnp.where(trow >= j, g - g_ref[r0 + j, :][None, :], -jnp.inf), fast)
    col = jnp.sum(q * kj[None, :] * e, axis=1)
    return acc + jnp.where(tcol == j, col[:, None], 0.0)

  return lax.fori_loop(0, sub, body, jnp.zeros((sub, sub), _F32))


def _past_keys(k_ref, g_ref, r0, gref, c):
  """k e^(gref - gam) for the rows before r0 (zero from r0 on, where the factor could overflow)."""
  rows = _iota((c, 1), 0)
  return k_ref[...].astype(_F32) * jnp.exp(jnp.where(rows < r0, gref[None, :] - g_ref[...],
                                                     -jnp.inf))


def _blocks(c, sub, path):
  """Sub-blocks a program handles: all (static loop, PATH 'chunk') or its own (PATH 'parallel')."""
  if path == "chunk":
    return [(s, pl.ds(s * sub, sub), s * sub) for s in range(c // sub)]
  s = pl.program_id(2)
  return [(s, pl.ds(s * sub, sub), s * sub)]


def _static(s):
  return isinstance(s, int)


def _out_kernel(q_ref, k_ref, v_ref, g_ref, h_ref, o_ref, *, scale, sub, fast, path):
  dt = q_ref.dtype
  c = q_ref.shape[0]
  for s, blk, r0 in _blocks(c, sub, path):
    q, g = q_ref[blk, :].astype(_F32), g_ref[blk, :]
    o = _dot((q * jnp.exp(g)).astype(dt), h_ref[...])
    if not _static(s) or s > 0:   # traced s: block 0 has no past keys, the mask makes it zero
      gref = g_ref[jnp.maximum(r0 - 1, 0), :]
      kg = _past_keys(k_ref, g_ref, r0, gref, c).astype(dt)
      a_past = _dot((q * jnp.exp(g - gref[None, :])).astype(dt), kg, tb=True)   # [sub, C]
      o = o + _dot(a_past.astype(dt), v_ref[...])
    if DIAG == "split" and sub % 2 == 0:
      a_diag = _diag_scores_split(k_ref, g_ref, r0, q, k_ref[blk, :].astype(_F32), g, sub, fast,
                                  dt)
    else:
      a_diag = _diag_scores(k_ref, g_ref, r0, q, g, sub, fast)
    o = o + _dot(a_diag.astype(dt), v_ref[blk, :])
    o_val = (o * scale).astype(o_ref.dtype)
    if path == "chunk":
      o_ref[blk, :] = o_val
    else:
      o_ref[...] = o_val


def _chunk_specs(heads, c, kdim, vdim):
  tok = lambda w: pl.BlockSpec((None, c, None, w), lambda i, n, *_: (i // heads, n, i % heads, 0))
  state = pl.BlockSpec((None, kdim, vdim), lambda i, n, *_: (i, n, 0))
  return tok(kdim), tok(vdim), state


def _out_specs(heads, c, sub, width, path):
  """Output rows of a program: its chunk (PATH 'chunk') or its sub-block (PATH 'parallel')."""
  if path == "chunk":
    return pl.BlockSpec((None, c, None, width), lambda i, n: (i // heads, n, i % heads, 0))
  nb = c // sub
  return pl.BlockSpec((None, sub, None, width), lambda i, n, p: (i // heads, n * nb + p,
                                                                  i % heads, 0))


def _grid(bh, t, c, sub, path):
  return (bh, t // c) if path == "chunk" else (bh, t // c, c // sub)


def output_forward(q, k, v, gam, h_in, *, chunk, scale, interpret=False, path="parallel"):
  """q, k `[B,T,H,K]`, v `[B,T,H,V]`, gam `[B,T,H,K]` f32, h_in `[B*H,N*K,V]` -> o `[B,T,H,V]`."""
  b, t, heads, kdim = q.shape
  vdim = v.shape[-1]
  sub = _sub(chunk)
  kspec, vspec, state = _chunk_specs(heads, chunk, kdim, vdim)
  kernel = functools.partial(_out_kernel, scale=scale, sub=sub, fast=not interpret, path=path)
  return pl.pallas_call(
      kernel, grid=_grid(b * heads, t, chunk, sub, path),
      in_specs=[kspec, kspec, vspec, kspec, state],
      out_specs=_out_specs(heads, chunk, sub, vdim, path),
      out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype), interpret=interpret,
      compiler_params=None if interpret else _compiler_params(TUNING["out_warps"], 1),
      name="gla_output_fwd")(q, k, v, gam, h_in)


# --------------------------------------------------------------------------- backward post kernel


def _diag_grads(k_ref, v_ref, g_ref, r0, q, g, do, sub, scale, fast):
  """Diagonal sub-block: (dq, dk `[sub, K]`, A `[sub, sub]`) from dA = scale do v^T (exact)."""
  trow, tcol = _iota((sub, 1), 0), _iota((1, sub), 1)
  kdim = q.shape[-1]

  def body(j, carry):
    dq, dk, a = carry
    kj = k_ref[r0 + j, :].astype(_F32)
    e = _exp(jnp.where(trow >= j, g - g_ref[r0 + j, :][None, :], -jnp.inf), fast)
    dcol = scale * jnp.sum(do * v_ref[r0 + j, :].astype(_F32)[None, :], axis=1)  # dA[:, j]
    dq = dq + dcol[:, None] * kj[None, :] * e
    dk = dk + jnp.where(trow == j, jnp.sum(dcol[:, None] * q * e, axis=0)[None, :], 0.0)
    a = a + jnp.where(tcol == j, jnp.sum(q * kj[None, :] * e, axis=1)[:, None], 0.0)
    return dq, dk, a

  zeros = jnp.zeros((sub, kdim), _F32)
  return lax.fori_loop(0, sub, body, (zeros, zeros, jnp.zeros((sub, sub), _F32)))


def _post_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, h_ref, lam_ref, dq_ref, dk_ref, dv_ref,
                 dg_ref, tail_ref, *, scale, sub, fast, path):
  """dq, dk, dv, dgam of the program's rows; tail_ref gets sum(k dkd) of each sub-block (the
  chunk-end decay's share, added with e^gam_C sum(h lam) to the chunk's last row by the caller)."""
  dt = q_ref.dtype
  c, kdim = q_ref.shape
  nb = c // sub
  rows, cols = _iota((c, 1), 0), _iota((1, c), 1)
  glast = g_ref[c - 1, :]
  for s, blk, r0 in _blocks(c, sub, path):
    q, k, g = q_ref[blk, :].astype(_F32), k_ref[blk, :].astype(_F32), g_ref[blk, :]
    do = do_ref[blk, :]
    # the state: o gets scale (q e^gam) h; h_next gets (k e^(gam_C - gam))^T v
    dq = scale * _dot(do, h_ref[...], tb=True) * jnp.exp(g)
    ed = jnp.exp(glast[None, :] - g)
    dkd = _dot(v_ref[blk, :], lam_ref[...], tb=True) * ed
    tail = jnp.sum(k * dkd, axis=0)
    dk = dkd
    dv = _dot((k * ed).astype(dt), lam_ref[...])
    if not _static(s) or s > 0:        # scores against earlier sub-blocks: this block's queries
      gref = g_ref[jnp.maximum(r0 - 1, 0), :]
      kg = _past_keys(k_ref, g_ref, r0, gref, c).astype(dt)
      da = jnp.where(cols < r0, scale * _dot(do, v_ref[...], tb=True), 0.0)          # [sub, C]
      dq = dq + _dot(da.astype(dt), kg) * jnp.exp(g - gref[None, :])
    if not _static(s) or s < nb - 1:   # scores against later sub-blocks: this block's keys
      r1 = r0 + sub - 1
      gend = g_ref[r1, :]
      later = rows > r1
      qg = (q_ref[...].astype(_F32)
            * jnp.exp(jnp.where(later, g_ref[...] - gend[None, :], -jnp.inf))).astype(dt)
      back = jnp.exp(gend[None, :] - g)
      a_col = _dot(qg, (k * back).astype(dt), tb=True)                                 # [C, sub]
      da_col = jnp.where(later, scale * _dot(do_ref[...], v_ref[blk, :], tb=True), 0.0)
      dk = dk + _dot(da_col.astype(dt), qg, ta=True) * back
      dv = dv + scale * _dot(a_col.astype(dt), do_ref[...], ta=True)
    if DIAG == "split" and sub % 2 == 0:
      dq_d, dk_d, a_diag = _diag_grads_split(k_ref, v_ref, g_ref, r0, q, k, g, do, sub, scale,
                                             fast)
    else:
      dq_d, dk_d, a_diag = _diag_grads(k_ref, v_ref, g_ref, r0, q, g, do.astype(_F32), sub, scale,
                                       fast)
    dq, dk = dq + dq_d, dk + dk_d
    dv = dv + scale * _dot(a_diag.astype(dt), do, ta=True)
    outs = (dq.astype(dq_ref.dtype), dk.astype(dk_ref.dtype), dv.astype(dv_ref.dtype),
            q * dq - k * dk)
    for ref, val in zip((dq_ref, dk_ref, dv_ref, dg_ref), outs):
      if path == "chunk":
        ref[blk, :] = val
      else:
        ref[...] = val
    if path == "chunk":
      tail_ref[s, :] = tail
    else:
      tail_ref[...] = tail


def post_backward(q, k, v, gam, do, h_in, lam_next, *, chunk, scale, interpret=False,
                  path="parallel"):
  """-> dq, dk `[B,T,H,K]` (q's dtype), dv `[B,T,H,V]`, dgam `[B,T,H,K]` f32 (without the
  chunk-end terms), tails `[B*H, N*C/16, K]` f32 (sum(k dkd) per 16-row sub-block)."""
  b, t, heads, kdim = q.shape
  vdim = v.shape[-1]
  sub = _sub(chunk)
  nb = chunk // sub
  kspec, vspec, state = _chunk_specs(heads, chunk, kdim, vdim)
  if path == "chunk":
    tail_spec = pl.BlockSpec((None, nb, kdim), lambda i, n: (i, n, 0))
  else:
    tail_spec = pl.BlockSpec((None, None, kdim), lambda i, n, p: (i, n * nb + p, 0))
  kernel = functools.partial(_post_kernel, scale=scale, sub=sub, fast=not interpret, path=path)
  rows_k = _out_specs(heads, chunk, sub, kdim, path)
  rows_v = _out_specs(heads, chunk, sub, vdim, path)
  return pl.pallas_call(
      kernel, grid=_grid(b * heads, t, chunk, sub, path),
      in_specs=[kspec, kspec, vspec, kspec, vspec, state, state],
      out_specs=[rows_k, rows_k, rows_v, rows_k, tail_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(gam.shape, _F32),
                 jax.ShapeDtypeStruct((b * heads, t // sub, kdim), _F32)],
      interpret=interpret,
      compiler_params=None if interpret else _compiler_params(TUNING["post_warps"], 1),
      name="gla_post_bwd")(q, k, v, gam, do.astype(v.dtype), h_in, lam_next)


# --------------------------------------------------------------------------- custom VJP


def _chunk_ends(gam, chunk):
  """a = e^gam_C `[B*H,N,K]` f32 and kd's exponent gam_C - gam `[B,T,H,K]`."""
  b, t, heads, kdim = gam.shape
  g5 = gam.reshape(b, t // chunk, chunk, heads, kdim)
  a = jnp.exp(jnp.moveaxis(g5[:, :, -1], 2, 1)).reshape(b * heads, t // chunk, kdim)
  return a, (g5[:, :, -1:] - g5).reshape(gam.shape)


def _forward(q, k, v, gam, h0, scale, chunk, interpret, block_v, path):
  a, to_end = _chunk_ends(gam, chunk)
  kd = (k.astype(_F32) * jnp.exp(to_end)).astype(k.dtype)
  h_in, h_last = rec_forward(kd, v, a, h0, chunk=chunk, interpret=interpret, block_v=block_v)
  o = output_forward(q, k, v, gam, h_in, chunk=chunk, scale=scale, interpret=interpret,
                     path=path)
  return (o, h_last), (q, k, v, gam, a, h_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def gla_core(q, k, v, gam, h0, scale, chunk, interpret=False, block_v=None, path="parallel"):
  """q, k `[B,T,H,K]`, v `[B,T,H,V]` (T a multiple of chunk, one dtype), gam `[B,T,H,K]` f32
  (within-chunk cumulative log-decay), h0 `[B*H,K,V]` f32 ->
  (o `[B,T,H,V]` in v's dtype, h_last `[B*H,K,V]` f32)."""
  return _forward(q, k, v, gam, h0, scale, chunk, interpret, block_v, path)[0]


def _core_fwd(q, k, v, gam, h0, scale, chunk, interpret, block_v, path):
  return _forward(q, k, v, gam, h0, scale, chunk, interpret, block_v, path)


def _core_bwd(scale, chunk, interpret, block_v, path, res, cts):
  q, k, v, gam, a, h_in = res
  do, dh_last = cts
  qe = (q.astype(_F32) * jnp.exp(gam)).astype(q.dtype)
  lam_next, lam0, hl = rec_backward(qe, do, a, dh_last, h_in, chunk=chunk, scale=scale,
                                    interpret=interpret, block_v=block_v)
  dq, dk, dv, dgam, tails = post_backward(q, k, v, gam, do, h_in, lam_next, chunk=chunk,
                                          scale=scale, interpret=interpret, path=path)
  return dq, dk, dv, add_chunk_end_terms(dgam, tails, a, hl, chunk), lam0


def add_chunk_end_terms(dgam, tails, a, hl, chunk):
  """dgam `[B,T,H,K]` plus the cotangent of each chunk's last cumulative decay gam_C, which
  scales the carried state (a = e^gam_C; hl = rowsum(h lam)) and every kd row (tails
  `[B*H, N*S, K]`: sum(k dkd) per sub-block); it belongs to the chunk's last row."""
  b, t, heads, kdim = dgam.shape
  n = t // chunk
  tail = tails.reshape(b * heads, n, -1, kdim).sum(2) + a * hl                  # [B*H, N, K]
  tail = jnp.moveaxis(tail.reshape(b, heads, n, kdim), 1, 2)                    # [B, N, H, K]
  return dgam.reshape(b, n, chunk, heads, kdim).at[:, :, -1].add(tail).reshape(dgam.shape)


gla_core.defvjp(_core_fwd, _core_bwd)

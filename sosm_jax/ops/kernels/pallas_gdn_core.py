"""The gated delta rule's Pallas path as one custom VJP: three forward kernels, three backward.

Forward (`pallas_gdn.py`, `pallas_recurrence.py`): WY preparation -> chunk recurrence -> output
stage. Backward: output-stage kernel (dq, dk, dgam, dh_in, dvn) -> reverse recurrence kernel
(dvn, lam_{n+1}) -> one post kernel per chunk that turns (h_n, lam_{n+1}, vn, dvn) into the
recurrence's input cotangents and runs the WY-preparation backward on them in the same pass:

    dw = -dvn h^T, dkd = vn lam^T                                                (recurrence)
    x = T^T dw, y = T^T du, dT = du (b v)^T + dw (b e^gam k)^T, dL = -T^T dT T^T  (WY form)

so no `[batch*heads, chunks, ...]` intermediate is transposed or re-read by XLA; dk and dv are
written in the caller's `[B, T, H, D]` layout. The reverse recurrence also forms the output
stage's dh and sum(h * lam) per chunk, so neither needs a `[N, K, V]` pass of its own.
Matmul operands are in the inputs' dtype (bf16: fp32 accumulation), fp32 inputs at full precision.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sosm_jax.ops.kernels import pallas_gdn
from sosm_jax.ops.kernels import pallas_recurrence as pr
from sosm_jax.ops.kernels.pallas_recurrence import _compiler_params, _dot

_F32 = jnp.float32
TUNING = {"post_warps": 4}
# True: the reverse recurrence forms the output stage's dh = scale (q e^gam)^T do itself, so the
# `[B*H, N, K, V]` dh never reaches memory (written once, read once otherwise).
FOLD_DH = True


def _strict(c):
  return lax.broadcasted_iota(jnp.int32, (c, c), 0) > lax.broadcasted_iota(jnp.int32, (c, c), 1)


def _post_kernel(k_ref, v_ref, b_ref, g_ref, t_ref, h_ref, lam_ref, vn_ref, dvn_ref, dko_ref,
                 dgo_ref, dk_ref, dv_ref, db_ref, dg_ref):
  """Fused: recurrence cotangents + WY-preparation backward + the output stage's dk, dgam."""
  dt = k_ref.dtype
  c = k_ref.shape[0]
  beta, g = b_ref[...], g_ref[...]
  kf = k_ref[...].astype(_F32)
  eg = jnp.exp(g)[:, None]
  glast = g_ref[c - 1]
  to_end = jnp.exp(glast - g)[:, None]
  tt = t_ref[...].astype(dt)
  du = dvn_ref[...].astype(dt)
  # value side: u = T (b v)
  y = _dot(tt, du, ta=True)                                       # T^T du  [C, V]
  vf = v_ref[...].astype(_F32)
  dv_ref[...] = (beta[:, None] * y).astype(dv_ref.dtype)
  dbeta = jnp.sum(vf * y, axis=1)
  d_t = _dot(du, (vf * beta[:, None]).astype(dt), tb=True)        # dT  [C, C]
  # key side: w = T (b e^gam k), with dw from the recurrence
  dwb = (-_dot(du, h_ref[...], tb=True)).astype(dt)                # dw = -dvn h^T
  x = _dot(tt, dwb, ta=True)                                      # T^T dw  [C, K]
  kb = kf * (beta[:, None] * eg)
  d_t = d_t + _dot(dwb, kb.astype(dt), tb=True)
  dbeta = dbeta + jnp.sum(kf * eg * x, axis=1)
  dgam = jnp.sum(kb * x, axis=1)
  # dkd = vn lam^T; kd = k e^(gam_C - gam)
  dkd_e = _dot(vn_ref[...], lam_ref[...], tb=True) * to_end
  dk = (beta[:, None] * eg) * x + dkd_e + dko_ref[...].astype(_F32)
  contrib = jnp.sum(dkd_e * kf, axis=1)
  # L = strictly_lower(b k k^T D): dL = -T^T dT T^T
  strict = _strict(c)
  m = _dot(tt, d_t.astype(dt), ta=True)
  dl = jnp.where(strict, -_dot(m.astype(dt), tt, tb=True), 0.0)
  dec = pallas_gdn._decay(g)  # pylint: disable=protected-access
  kk = k_ref[...]
  ld = jnp.where(strict, _dot(kk, kk, tb=True) * dec, 0.0)
  dbeta = dbeta + jnp.sum(dl * ld, axis=1)
  dll = dl * (beta[:, None] * ld)
  dgam = dgam + jnp.sum(dll, axis=1) - jnp.sum(dll, axis=0)
  ds = (dl * beta[:, None] * dec).astype(dt)
  dk = dk + _dot(ds, kk) + _dot(ds, kk, ta=True)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  last = lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1
  db_ref[...] = dbeta
  dg_ref[...] = dgam - contrib + jnp.where(last, jnp.sum(contrib), 0.0) + dgo_ref[...]


def _specs(heads, c, kdim, vdim):
  tok = lambda w: pl.BlockSpec((None, c, None, w), lambda i, n: (i // heads, n, i % heads, 0))
  row = lambda w: pl.BlockSpec((None, c, w), lambda i, n: (i, n, 0))
  state = pl.BlockSpec((None, kdim, vdim), lambda i, n: (i, n, 0))
  scal = pl.BlockSpec((None, c), lambda i, n: (i, n))
  return tok, row, state, scal


def _params(interpret, warps):
  return None if interpret else _compiler_params(warps, 1)


def post_backward(k, v, beta, gam, tmat, h_in, lam_next, vn, dvn, dk_o, dg_o, *, interpret=False):
  """k `[B,T,H,K]`, v `[B,T,H,V]`, beta, gam, dg_o `[B*H,T]`, tmat `[B*H,T,C]` f32, h_in,
  lam_next `[B*H,N,K,V]`, vn, dvn `[B*H,N,C,V]`, dk_o `[B,T,H,K]` ->
  (dk `[B,T,H,K]`, dv `[B,T,H,V]`, dbeta, dgam `[B*H,T]` f32). dgam lacks the chunk decays'
  e^gam_C sum(h lam) term (the reverse recurrence gives it)."""
  b, t, heads, kdim = k.shape
  vdim = v.shape[-1]
  bh, n, c, _ = vn.shape
  tok, row, state, scal = _specs(heads, c, kdim, vdim)
  flat_s = lambda x: x.reshape(bh, n * kdim, vdim)
  flat_c = lambda x: x.reshape(bh, n * c, x.shape[-1])
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
               jax.ShapeDtypeStruct((bh, t), _F32), jax.ShapeDtypeStruct((bh, t), _F32)]
  return pl.pallas_call(
      _post_kernel, grid=(bh, n),
      in_specs=[tok(kdim), tok(vdim), scal, scal, row(c), state, state, row(vdim), row(vdim),
                tok(kdim), scal],
      out_specs=[tok(kdim), tok(vdim), scal, scal], out_shape=out_shape,
      interpret=interpret, compiler_params=_params(interpret, TUNING["post_warps"]),
      name="gdn_post_bwd")(
          k, v, beta, gam, tmat, flat_s(h_in), flat_s(lam_next), flat_c(vn), flat_c(dvn),
          dk_o, dg_o)


# --------------------------------------------------------------------------- custom VJP


def _forward(q, k, v, beta, gam, h0, scale, chunk, interpret, block_v):
  bh, t = gam.shape
  n, c = t // chunk, chunk
  kdim = k.shape[-1]
  w, u, kd, tmat = pallas_gdn.prep_forward(k, v, beta, gam, chunk=c, interpret=interpret)
  per_chunk = lambda x: x.reshape(bh, n, c, x.shape[-1])
  a = jnp.broadcast_to(jnp.exp(gam.reshape(bh, n, c)[..., -1])[..., None], (bh, n, kdim))
  h_in, vn, h_last = pr.forward(per_chunk(w), per_chunk(u), per_chunk(kd), a, h0,
                                interpret=interpret, block_v=block_v)
  o = pallas_gdn.output_forward(q, k, gam, h_in, vn, scale=scale, interpret=interpret)
  return (o, h_last), (q, k, v, beta, gam, tmat, w, kd, a, h_in, vn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def gdn_core(q, k, v, beta, gam, h0, scale, chunk, interpret=False, block_v=None):
  """q, k `[B,T,H,K]`, v `[B,T,H,V]` (T a multiple of chunk, one dtype), beta, gam `[B*H,T]` f32
  (gam: within-chunk cumulative log-decay), h0 `[B*H,K,V]` f32 ->
  (o `[B,T,H,V]` in v's dtype, h_last `[B*H,K,V]` f32)."""
  return _forward(q, k, v, beta, gam, h0, scale, chunk, interpret, block_v)[0]


def _core_fwd(q, k, v, beta, gam, h0, scale, chunk, interpret, block_v):
  return _forward(q, k, v, beta, gam, h0, scale, chunk, interpret, block_v)


def _core_bwd(scale, chunk, interpret, block_v, res, cts):
  q, k, v, beta, gam, tmat, w, kd, a, h_in, vn = res
  do, dh_last = cts
  bh, n, c, _ = vn.shape
  fold = FOLD_DH
  dq, dk_o, dg_o, dh_in, dvn_o = pallas_gdn.output_backward(q, k, gam, h_in, vn, do, scale=scale,
                                                            interpret=interpret, with_dh=not fold)
  per_chunk = lambda x: x.reshape(bh, n, c, x.shape[-1])
  extra = dict(q=q, gam=gam, do=do, scale=scale) if fold else {}
  dvn, lam_next, lam0, hl = pr.backward(per_chunk(w), per_chunk(kd), a, dh_in, dvn_o, dh_last,
                                        interpret=interpret, block_v=block_v, h_in=h_in, **extra)
  dk, dv, dbeta, dgam = post_backward(k, v, beta, gam, tmat, h_in, lam_next, vn, dvn, dk_o, dg_o,
                                      interpret=interpret)
  # a = e^gam_C (broadcast over K) scales the carried state: d gam_C += e^gam_C sum(h lam)
  dgam = dgam.reshape(bh, n, c).at[..., -1].add(a[..., 0] * hl).reshape(bh, n * c)
  return dq, dk, dv, dbeta, dgam, lam0


gdn_core.defvjp(_core_fwd, _core_bwd)

"""Pallas (Triton backend) kernels for the chunked gated delta rule: output stage, WY preparation.

Per chunk (q, k `[C, K]`, cumulative log-decay gam `[C]`, entering state h `[K, V]`, corrected
values vn `[C, V]` from the recurrence):

    o = scale * ((q * e^gam) h + (q k^T * D) vn),   D[t, i] = e^(gam_t - gam_i) for i <= t, else 0

One program per (batch*head, chunk) reads q, k in their `[batch, time, heads, dim]` layout and
writes o in it, so no transposes and no `[C, C]` intermediates reach device memory. The backward
kernel gives dq, dk, dgam, dh, dvn of this stage in one pass:

    dvn = scale P^T do, dh = scale (q e^gam)^T do, dP = scale do vn^T, dS = dP * D,
    dq = dS k + scale (do h^T) e^gam, dk = dS^T q,
    dgam_t = sum_k q (scale (do h^T) e^gam) + sum_i (dP * P)[t, i] - sum_i (dP * P)[i, t]

(P = q k^T * D). `interpret=True` runs on CPU (tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sosm_jax.ops.kernels.pallas_recurrence import _compiler_params, _dot

_F32 = jnp.float32
TUNING = {"num_warps": 4, "num_stages": 1}


def _decay(g):
  c = g.shape[0]
  causal = lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return jnp.exp(jnp.where(causal, g[:, None] - g[None, :], -jnp.inf))


def _fwd_kernel(q_ref, k_ref, g_ref, h_ref, vn_ref, o_ref, *, scale):
  dt = q_ref.dtype
  q, k, g = q_ref[...], k_ref[...], g_ref[...]
  p = (_dot(q, k, tb=True) * _decay(g)).astype(dt)
  qg = (q.astype(_F32) * jnp.exp(g)[:, None]).astype(dt)
  o = _dot(qg, h_ref[...]) + _dot(p, vn_ref[...])
  o_ref[...] = (o * scale).astype(o_ref.dtype)


def _bwd_kernel(q_ref, k_ref, g_ref, h_ref, vn_ref, do_ref, dq_ref, dk_ref, dg_ref, *rest, scale,
                with_dh=True):
  dh_ref, dvn_ref = rest if with_dh else (None, rest[0])
  dt = q_ref.dtype
  q, k, g, h, vn, do = q_ref[...], k_ref[...], g_ref[...], h_ref[...], vn_ref[...], do_ref[...]
  d = _decay(g)
  p = _dot(q, k, tb=True) * d
  eg = jnp.exp(g)[:, None]
  qg = (q.astype(_F32) * eg).astype(dt)
  dvn_ref[...] = (scale * _dot(p.astype(dt), do, ta=True)).astype(dvn_ref.dtype)
  if with_dh:
    dh_ref[...] = (scale * _dot(qg, do, ta=True)).astype(dh_ref.dtype)
  dp = scale * _dot(do, vn, tb=True)
  ds = (dp * d).astype(dt)
  dq_inter = scale * _dot(do, h, tb=True) * eg
  dq_ref[...] = (_dot(ds, k) + dq_inter).astype(dq_ref.dtype)
  dk_ref[...] = _dot(ds, q, ta=True).astype(dk_ref.dtype)
  pp = dp * p
  dg_ref[...] = (jnp.sum(q.astype(_F32) * dq_inter, axis=1) + jnp.sum(pp, axis=1)
                 - jnp.sum(pp, axis=0))


def _specs(heads, c, kdim, vdim):
  tok = lambda width: pl.BlockSpec((None, c, None, width), lambda i, n: (i // heads, n, i % heads, 0))
  return dict(
      qk=tok(kdim), o=tok(vdim),
      g=pl.BlockSpec((None, c), lambda i, n: (i, n)),
      h=pl.BlockSpec((None, kdim, vdim), lambda i, n: (i, n, 0)),
      vn=pl.BlockSpec((None, c, vdim), lambda i, n: (i, n, 0)))


def _params(interpret):
  return None if interpret else _compiler_params(TUNING["num_warps"], TUNING["num_stages"])


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def output_forward(q, k, gam, h_in, vn, *, scale, interpret=False):
  """q, k `[B, T, H, K]`, gam `[B*H, T]` f32, h_in `[B*H, N, K, V]`, vn `[B*H, N, C, V]`
  -> o `[B, T, H, V]` (vn's dtype). T = N * C."""
  b, t, heads, kdim = q.shape
  bh, n, c, vdim = vn.shape
  sp = _specs(heads, c, kdim, vdim)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale), grid=(bh, n),
      in_specs=[sp["qk"], sp["qk"], sp["g"], sp["h"], sp["vn"]], out_specs=sp["o"],
      out_shape=jax.ShapeDtypeStruct((b, t, heads, vdim), vn.dtype), interpret=interpret,
      compiler_params=_params(interpret), name="gdn_output_fwd")(
          q, k, gam, h_in.reshape(bh, n * kdim, vdim), vn.reshape(bh, n * c, vdim))


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "with_dh"))
def output_backward(q, k, gam, h_in, vn, do, *, scale, interpret=False, with_dh=True):
  """Cotangent do `[B, T, H, V]` -> (dq, dk `[B, T, H, K]`, dgam `[B*H, T]` f32,
  dh_in `[B*H, N, K, V]` (None unless with_dh), dvn `[B*H, N, C, V]`)."""
  b, t, heads, kdim = q.shape
  bh, n, c, vdim = vn.shape
  sp = _specs(heads, c, kdim, vdim)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
               jax.ShapeDtypeStruct((bh, t), _F32)]
  out_specs = [sp["qk"], sp["qk"], sp["g"]]
  if with_dh:
    out_shape.append(jax.ShapeDtypeStruct((bh, n * kdim, vdim), h_in.dtype))
    out_specs.append(sp["h"])
  out_shape.append(jax.ShapeDtypeStruct((bh, n * c, vdim), vn.dtype))
  out_specs.append(sp["vn"])
  outs = pl.pallas_call(
      functools.partial(_bwd_kernel, scale=scale, with_dh=with_dh), grid=(bh, n),
      in_specs=[sp["qk"], sp["qk"], sp["g"], sp["h"], sp["vn"], sp["o"]],
      out_specs=out_specs, out_shape=out_shape,
      interpret=interpret, compiler_params=_params(interpret), name="gdn_output_bwd")(
          q, k, gam, h_in.reshape(bh, n * kdim, vdim), vn.reshape(bh, n * c, vdim),
          do.astype(vn.dtype))
  dq, dk, dg = outs[:3]
  dh = outs[3].reshape(h_in.shape) if with_dh else None
  return dq, dk, dg, dh, outs[-1].reshape(vn.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def chunk_output(q, k, gam, h_in, vn, scale, interpret=False):
  """The output stage (module docstring); shapes as `output_forward`."""
  return output_forward(q, k, gam, h_in, vn, scale=scale, interpret=interpret)


def _fwd(q, k, gam, h_in, vn, scale, interpret):
  return chunk_output(q, k, gam, h_in, vn, scale, interpret), (q, k, gam, h_in, vn)


def _bwd(scale, interpret, res, do):
  return output_backward(*res, do, scale=scale, interpret=interpret)


chunk_output.defvjp(_fwd, _bwd)


# --------------------------------------------------------------------------- WY preparation
#
# Per chunk, with b = beta, gam the cumulative log-decay and D as above:
#   L = strictly_lower(b[:, None] * (k k^T) * D),  T = (I + L)^{-1},
#   w = T (b e^gam k),  u = T (b v),  kd = k e^(gam_C - gam).
# T is built from 16x16 blocks: Neumann products on the diagonal, block forward substitution
# below it; L and T pass through T's output buffer (it is the residual for the backward).


def _neumann16(x):
  """(I + L)^{-1} of a strictly lower [s, s] block (s <= 16): prod_j (I + (-L)^(2^j))."""
  s = x.shape[0]
  eye = (lax.broadcasted_iota(jnp.int32, (s, s), 0)
         == lax.broadcasted_iota(jnp.int32, (s, s), 1)).astype(_F32)
  x = -x
  inv = eye + x
  m = 2
  while m < s:
    x = _dot(x, x)
    inv = _dot(inv, eye + x)
    m *= 2
  return inv


def _prep_kernel(k_ref, v_ref, b_ref, g_ref, w_ref, u_ref, kd_ref, t_ref, *, sub, barriers):
  def barrier():  # L and T pass through t_ref: make each thread's stores visible to the others
    if barriers:
      from jax.experimental.pallas import triton as plt  # pylint: disable=import-outside-toplevel
      plt.debug_barrier()

  dt = k_ref.dtype
  c = k_ref.shape[0]
  k, beta, g = k_ref[...], b_ref[...], g_ref[...]
  strict = (lax.broadcasted_iota(jnp.int32, (c, c), 0)
            > lax.broadcasted_iota(jnp.int32, (c, c), 1))
  lower = jnp.where(strict, beta[:, None] * _dot(k, k, tb=True) * _decay(g), 0.0)
  t_ref[...] = lower
  barrier()
  nb = c // sub
  blk = lambda i: slice(i * sub, (i + 1) * sub)
  tb = {}
  for i in range(nb):
    tii = _neumann16(t_ref[blk(i), blk(i)])
    tb[i, i] = tii
    for j in range(i - 1, -1, -1):
      acc = None
      for m in range(j, i):
        part = _dot(t_ref[blk(i), blk(m)], tb[m, j])
        acc = part if acc is None else acc + part
      tb[i, j] = -_dot(tii, acc)
  barrier()
  for (i, j), tij in tb.items():
    t_ref[blk(i), blk(j)] = tij
  for i in range(nb):
    for j in range(i + 1, nb):
      t_ref[blk(i), blk(j)] = jnp.zeros((sub, sub), _F32)
  barrier()
  t = t_ref[...].astype(dt)
  eg = jnp.exp(g)[:, None]
  kf = k.astype(_F32)
  w_ref[...] = _dot(t, (kf * (beta[:, None] * eg)).astype(dt)).astype(w_ref.dtype)
  u_ref[...] = _dot(t, (v_ref[...].astype(_F32) * beta[:, None]).astype(dt)).astype(u_ref.dtype)
  kd_ref[...] = (kf * jnp.exp(g_ref[c - 1] - g)[:, None]).astype(kd_ref.dtype)


def _prep_bwd_kernel(k_ref, v_ref, b_ref, g_ref, t_ref, dw_ref, du_ref, dkd_ref,
                     dk_ref, dv_ref, db_ref, dg_ref):
  dt = k_ref.dtype
  c = k_ref.shape[0]
  k, v, beta, g = k_ref[...], v_ref[...], b_ref[...], g_ref[...]
  t = t_ref[...]
  dw, du, dkd = dw_ref[...], du_ref[...], dkd_ref[...]
  kf, vf = k.astype(_F32), v.astype(_F32)
  eg = jnp.exp(g)[:, None]
  kb = kf * (beta[:, None] * eg)
  vb = vf * beta[:, None]
  tt = t.astype(dt)
  x = _dot(tt, dw, ta=True)                      # T^T dw  [C, K]
  y = _dot(tt, du, ta=True)                      # T^T du  [C, V]
  dv_ref[...] = (beta[:, None] * y).astype(dv_ref.dtype)
  dbeta = jnp.sum(vf * y, axis=1) + jnp.sum(kf * eg * x, axis=1)
  dgam = jnp.sum(kb * x, axis=1)
  d_t = _dot(du, vb.astype(dt), tb=True) + _dot(dw, kb.astype(dt), tb=True)   # dT [C, C]
  strict = (lax.broadcasted_iota(jnp.int32, (c, c), 0)
            > lax.broadcasted_iota(jnp.int32, (c, c), 1))
  dl = jnp.where(strict, -_dot(_dot(t, d_t, ta=True), t, tb=True), 0.0)   # -T^T dT T^T
  dec = _decay(g)
  s = _dot(k, k, tb=True)
  ld = jnp.where(strict, s * dec, 0.0)
  dbeta = dbeta + jnp.sum(dl * ld, axis=1)
  lfull = beta[:, None] * ld
  dll = dl * lfull
  dgam = dgam + jnp.sum(dll, axis=1) - jnp.sum(dll, axis=0)
  ds = (dl * beta[:, None] * dec).astype(dt)
  to_end = jnp.exp(g_ref[c - 1] - g)[:, None]
  kdf = kf * to_end
  dkd_f = dkd.astype(_F32)
  dk = (beta[:, None] * eg) * x + _dot(ds, k) + _dot(ds, k, ta=True) + dkd_f * to_end
  dk_ref[...] = dk.astype(dk_ref.dtype)
  # kd_t = k_t e^(gam_last - gam_t): -sum(dkd*kd) at t, +total at the last token
  contrib = jnp.sum(dkd_f * kdf, axis=1)
  last = lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1
  dgam = dgam - contrib + jnp.where(last, jnp.sum(contrib), 0.0)
  db_ref[...] = dbeta
  dg_ref[...] = dgam


def _prep_specs(heads, c, kdim, vdim):
  sp = _specs(heads, c, kdim, vdim)
  row = lambda width: pl.BlockSpec((None, c, width), lambda i, n: (i, n, 0))
  return sp["qk"], _specs(heads, c, vdim, vdim)["qk"], sp["g"], row


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def prep_forward(k, v, beta, gam, *, chunk, interpret=False):
  """k `[B, T, H, K]`, v `[B, T, H, V]`, beta, gam `[B*H, T]` f32 ->
  (w `[B*H, T, K]`, u `[B*H, T, V]`, kd `[B*H, T, K]` in k's dtype, T `[B*H, T, C]` f32)."""
  b, t, heads, kdim = k.shape
  vdim = v.shape[-1]
  kspec, vspec, gspec, row = _prep_specs(heads, chunk, kdim, vdim)
  bh = b * heads
  dt = k.dtype
  out_shape = [jax.ShapeDtypeStruct((bh, t, kdim), dt), jax.ShapeDtypeStruct((bh, t, vdim), dt),
               jax.ShapeDtypeStruct((bh, t, kdim), dt), jax.ShapeDtypeStruct((bh, t, chunk), _F32)]
  return pl.pallas_call(
      functools.partial(_prep_kernel, sub=min(16, chunk), barriers=not interpret), grid=(bh, t // chunk),
      in_specs=[kspec, vspec, gspec, gspec],
      out_specs=[row(kdim), row(vdim), row(kdim), row(chunk)], out_shape=out_shape,
      interpret=interpret, compiler_params=_params(interpret), name="gdn_prep_fwd")(
          k, v.astype(dt), beta, gam)


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def prep_backward(k, v, beta, gam, tmat, dw, du, dkd, *, chunk, interpret=False):
  """Cotangents of (w, u, kd) -> (dk `[B, T, H, K]`, dv `[B, T, H, V]`, dbeta, dgam `[B*H, T]`)."""
  b, t, heads, kdim = k.shape
  vdim = v.shape[-1]
  kspec, vspec, gspec, row = _prep_specs(heads, chunk, kdim, vdim)
  dt = k.dtype
  out_shape = [jax.ShapeDtypeStruct(k.shape, dt), jax.ShapeDtypeStruct(v.shape, v.dtype),
               jax.ShapeDtypeStruct(beta.shape, _F32), jax.ShapeDtypeStruct(gam.shape, _F32)]
  return pl.pallas_call(
      _prep_bwd_kernel, grid=(b * heads, t // chunk),
      in_specs=[kspec, vspec, gspec, gspec, row(chunk), row(kdim), row(vdim), row(kdim)],
      out_specs=[kspec, vspec, gspec, gspec], out_shape=out_shape,
      interpret=interpret, compiler_params=_params(interpret), name="gdn_prep_bwd")(
          k, v.astype(dt), beta, gam, tmat, dw.astype(dt), du.astype(dt), dkd.astype(dt))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def wy_prep(k, v, beta, gam, chunk, interpret=False):
  """(w, u, kd) of the WY form (section comment); shapes as `prep_forward`."""
  return prep_forward(k, v, beta, gam, chunk=chunk, interpret=interpret)[:3]


def _prep_fwd(k, v, beta, gam, chunk, interpret):
  w, u, kd, tmat = prep_forward(k, v, beta, gam, chunk=chunk, interpret=interpret)
  return (w, u, kd), (k, v, beta, gam, tmat)


def _prep_bwd(chunk, interpret, res, cts):
  k, v, beta, gam, tmat = res
  if PREP_BACKWARD == "xla":
    return prep_backward_xla(k, v, beta, gam, tmat, *cts, chunk=chunk)
  return prep_backward(k, v, beta, gam, tmat, *cts, chunk=chunk, interpret=interpret)


PREP_BACKWARD = "xla"  # 'xla' (batched einsums on the saved T) or 'pallas' (prep_backward)


def prep_backward_xla(k, v, beta, gam, tmat, dw, du, dkd, *, chunk):
  """`prep_backward` as batched XLA products over all chunks (same math, same results)."""
  b, t, heads, kdim = k.shape
  vdim = v.shape[-1]
  n, c = t // chunk, chunk
  dt = k.dtype
  mm = lambda eq, x, y: jnp.einsum(eq, x, y, preferred_element_type=_F32,
                                   precision=lax.Precision.HIGHEST if x.dtype == _F32 else None)
  chunked = lambda x: jnp.moveaxis(x.reshape(b, n, c, heads, x.shape[-1]), 3, 1).reshape(
      b * heads, n, c, x.shape[-1])
  per_chunk = lambda x: x.reshape(b * heads, n, c, -1)
  kc, vc = chunked(k), chunked(v.astype(dt))
  beta, gam = beta.reshape(b * heads, n, c), gam.reshape(b * heads, n, c)
  tm = per_chunk(tmat)                                               # [Z, N, C, C]
  dw, du, dkd = per_chunk(dw).astype(dt), per_chunk(du).astype(dt), per_chunk(dkd)
  eg = jnp.exp(gam)[..., None]
  kf, vf = kc.astype(_F32), vc.astype(_F32)
  kb, vb = kf * (beta[..., None] * eg), vf * beta[..., None]
  tt = tm.astype(dt)
  x = mm("zncm,zncd->znmd", tt, dw)
  y = mm("zncm,zncd->znmd", tt, du)
  dv = beta[..., None] * y
  dbeta = jnp.sum(vf * y, -1) + jnp.sum(kf * eg * x, -1)
  dgam = jnp.sum(kb * x, -1)
  d_t = mm("zncd,znmd->zncm", du, vb.astype(dt)) + mm("zncd,znmd->zncm", dw, kb.astype(dt))
  idx = jnp.arange(c)
  strict = idx[:, None] > idx[None, :]
  dl = jnp.where(strict, -mm("znic,znjc->znij", mm("znci,zncj->znij", tm, d_t), tm), 0.0)
  dec = jnp.exp(jnp.where(idx[:, None] >= idx[None, :], gam[..., :, None] - gam[..., None, :],
                          -jnp.inf))
  ld = jnp.where(strict, mm("zncd,znmd->zncm", kc, kc) * dec, 0.0)
  dbeta = dbeta + jnp.sum(dl * ld, -1)
  dll = dl * beta[..., None] * ld
  dgam = dgam + jnp.sum(dll, -1) - jnp.sum(dll, -2)
  ds = (dl * beta[..., None] * dec).astype(dt)
  to_end = jnp.exp(gam[..., -1:] - gam)[..., None]
  dkd_f = dkd.astype(_F32)
  dk = ((beta[..., None] * eg) * x + mm("zncm,znmd->zncd", ds, kc)
        + mm("znmc,znmd->zncd", ds, kc) + dkd_f * to_end)
  contrib = jnp.sum(dkd_f * kf * to_end, -1)
  dgam = dgam - contrib
  dgam = dgam.at[..., -1].add(jnp.sum(contrib, -1))
  unchunk = lambda x: jnp.moveaxis(x.reshape(b, heads, n, c, -1), 1, 3).reshape(b, t, heads, -1)
  return (unchunk(dk).astype(dt), unchunk(dv).astype(v.dtype), dbeta.reshape(b * heads, t),
          dgam.reshape(b * heads, t))


wy_prep.defvjp(_prep_fwd, _prep_bwd)

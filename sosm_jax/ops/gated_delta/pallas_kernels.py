"""Pallas (Triton) kernels of the chunked gated delta rule: WY preparation, output stage, post.

Per chunk (q, k `[C, K]`, cumulative log-decay gam `[C]`, entering state h `[K, V]`, corrected
values vn `[C, V]` from the recurrence):

    o = scale * ((q * e^gam) h + (q k^T * D) vn),   D[t, i] = e^(gam_t - gam_i) for i <= t, else 0

One program per (batch*head, chunk) reads q, k in their `[batch, time, heads, dim]` layout and
writes o in it, so no transposes and no `[C, C]` intermediates reach device memory. The backward
kernel gives dq, dk, dgam, dvn of this stage in one pass (its dh = scale (q e^gam)^T do is formed
by the reverse recurrence, `pallas_recurrence.backward`):

    dvn = scale P^T do, dP = scale do vn^T, dS = dP * D,
    dq = dS k + scale (do h^T) e^gam, dk = dS^T q,
    dgam_t = sum_k q (scale (do h^T) e^gam) + sum_i (dP * P)[t, i] - sum_i (dP * P)[i, t]

(P = q k^T * D). The post kernel (`post_backward`) is the backward of the WY preparation fused
with the recurrence's input cotangents (see `pallas.py`). `interpret=True` runs on any platform.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sosm_jax.ops.common.pallas import compiler_params, dot

_F32 = jnp.float32
# Products of fp32 inputs on tensor cores (common/pallas.F32_DOTS; with IEEE fp32 products these
# kernels took over 100 s to compile at head dim 128). With bf16 inputs the only fp32 operands are
# the WY inverse's 16x16 blocks below the diagonal, multiplied as tf32 (`_inverse_kernel`).
tc_dot = functools.partial(dot, f32="bf16x6")
_dot = tc_dot
WARPS = 4  # launch setting of every kernel here but the WY inverse (measured: NOTES.md)


def decay(g):
  """D `[C, C]`: e^(g_t - g_i) for i <= t, else 0 (g `[C]` f32, the within-chunk cumulative
  log-decay)."""
  c = g.shape[0]
  causal = lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return jnp.exp(jnp.where(causal, g[:, None] - g[None, :], -jnp.inf))


def _fwd_kernel(q_ref, k_ref, g_ref, h_ref, vn_ref, o_ref, *, scale):
  dt = q_ref.dtype
  q, k, g = q_ref[...], k_ref[...], g_ref[...]
  p = (_dot(q, k, tb=True) * decay(g)).astype(dt)
  qg = (q.astype(_F32) * jnp.exp(g)[:, None]).astype(dt)
  o = _dot(qg, h_ref[...]) + _dot(p, vn_ref[...])
  o_ref[...] = (o * scale).astype(o_ref.dtype)


def _bwd_kernel(q_ref, k_ref, g_ref, h_ref, vn_ref, do_ref, dq_ref, dk_ref, dg_ref, dvn_ref, *,
                scale):
  dt = q_ref.dtype
  q, k, g, h, vn, do = q_ref[...], k_ref[...], g_ref[...], h_ref[...], vn_ref[...], do_ref[...]
  d = decay(g)
  p = _dot(q, k, tb=True) * d
  eg = jnp.exp(g)[:, None]
  dvn_ref[...] = (scale * _dot(p.astype(dt), do, ta=True)).astype(dvn_ref.dtype)
  dp = scale * _dot(do, vn, tb=True)
  ds = (dp * d).astype(dt)
  dq_inter = scale * _dot(do, h, tb=True) * eg
  dq_ref[...] = (_dot(ds, k) + dq_inter).astype(dq_ref.dtype)
  dk_ref[...] = _dot(ds, q, ta=True).astype(dk_ref.dtype)
  pp = dp * p
  dg_ref[...] = (jnp.sum(q.astype(_F32) * dq_inter, axis=1) + jnp.sum(pp, axis=1)
                 - jnp.sum(pp, axis=0))


def _specs(heads, c, kdim, vdim):
  tok = lambda width: pl.BlockSpec((None, c, None, width),
                                   lambda i, n: (i // heads, n, i % heads, 0))
  return dict(
      qk=tok(kdim), o=tok(vdim),
      g=pl.BlockSpec((None, c), lambda i, n: (i, n)),
      h=pl.BlockSpec((None, kdim, vdim), lambda i, n: (i, n, 0)),
      vn=pl.BlockSpec((None, c, vdim), lambda i, n: (i, n, 0)))


def _params(interpret):
  return compiler_params(interpret, WARPS)


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


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def output_backward(q, k, gam, h_in, vn, do, *, scale, interpret=False):
  """Cotangent do `[B, T, H, V]` -> (dq, dk `[B, T, H, K]`, dgam `[B*H, T]` f32,
  dvn `[B*H, N, C, V]`)."""
  b, t, heads, kdim = q.shape
  bh, n, c, vdim = vn.shape
  sp = _specs(heads, c, kdim, vdim)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
               jax.ShapeDtypeStruct((bh, t), _F32),
               jax.ShapeDtypeStruct((bh, n * c, vdim), vn.dtype)]
  dq, dk, dg, dvn = pl.pallas_call(
      functools.partial(_bwd_kernel, scale=scale), grid=(bh, n),
      in_specs=[sp["qk"], sp["qk"], sp["g"], sp["h"], sp["vn"], sp["o"]],
      out_specs=[sp["qk"], sp["qk"], sp["g"], sp["vn"]], out_shape=out_shape,
      interpret=interpret, compiler_params=_params(interpret), name="gdn_output_bwd")(
          q, k, gam, h_in.reshape(bh, n * kdim, vdim), vn.reshape(bh, n * c, vdim),
          do.astype(vn.dtype))
  return dq, dk, dg, dvn.reshape(vn.shape)


# --------------------------------------------------------------------------- WY preparation
#
# Per chunk, with b = beta, gam the cumulative log-decay and D as above:
#   L = strictly_lower(b[:, None] * (k k^T) * D),  T = (I + L)^{-1},
#   w = T (b e^gam k),  u = T (b v),  kd = k e^(gam_C - gam).
# Two kernels: `wy_inverse` builds T in registers and writes it in the matmul dtype (bf16: half
# the bytes; w/u and the backward's post kernel multiply it as such), `wy_apply` reads it and
# writes w, u, kd. L's [sub, sub] blocks come from the key rows' own [sub, K] loads (Triton cannot
# slice a register tensor); each diagonal block is inverted by forward substitution row by row
# (exact fp32, a masked row pick and a column sum per row: no products); the blocks below the
# diagonal follow by block substitution, T_ij = -T_ii sum_{j<=m<i} L_im T_mj, whose [sub, sub]
# products run on tensor cores ('tf32' for bf16 inputs, whose T is rounded to bf16 anyway;
# bf16x6 for fp32). The inverse is a chain of small dependent steps: it ran fastest at 1 warp,
# the w/u products at 4 (NOTES.md has the forms and warp counts that measured slower). The block
# size is a parameter (`sub`) so that launch sweeps (`benchmarks/kernels.py --gdn-sweep`) can try
# fewer, larger blocks (more row steps, fewer block merges).
INVERSE_WARPS, INVERSE_SUB = 1, 16
# w/u at 2 pipeline stages: 0.547 ms against 0.624 at 1 (H200 sweep, 4,096 x 16; NOTES.md)
APPLY_STAGES = 2


def _strict(c):
  return lax.broadcasted_iota(jnp.int32, (c, c), 0) > lax.broadcasted_iota(jnp.int32, (c, c), 1)


def _substitute(lo):
  """(I + lo)^{-1} of a strictly lower-triangular f32 [s, s] block by forward substitution.

  With n = (I + lo)^{-1} - I: n_i = -lo_i - sum_{m<i} lo_im n_m. Row i of -lo is n's row i until
  step i replaces it, and it is zero from column i on, so the sum over all rows of n only sees the
  finished rows m < i. Rows 0 and 1 are final from the start."""
  s = lo.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (s, s), 0)
  n = -lo
  for i in range(2, s):
    pick = rows == i
    a = jnp.sum(jnp.where(pick, n, 0.0), axis=0)                   # -lo_i
    a = a + jnp.sum(a[:, None] * n, axis=0)
    n = jnp.where(pick, a[None, :], n)
  return n + (rows == lax.broadcasted_iota(jnp.int32, (s, s), 1)).astype(_F32)


def _inverse_kernel(k_ref, b_ref, g_ref, t_ref, *, sub):
  """T = (I + L)^{-1} into t_ref from k, beta, gam (comment above)."""
  dt = k_ref.dtype
  mm = functools.partial(dot, f32="bf16x6" if dt == _F32 else "tf32")
  c = k_ref.shape[0]
  nb = c // sub
  blk = lambda i: pl.ds(i * sub, sub)
  ks = [k_ref[blk(i), :] for i in range(nb)]
  bs = [b_ref[blk(i)] for i in range(nb)]
  gs = [g_ref[blk(i)] for i in range(nb)]
  strict = _strict(sub)
  lo = {}
  for i in range(nb):
    for j in range(i + 1):
      diff = gs[i][:, None] - gs[j][None, :]
      if i == j:  # mask before exp: the upper triangle's exponents are positive
        dec = jnp.exp(jnp.where(strict, diff, -jnp.inf))
      else:       # row block after column block: gam non-increasing, exponents <= 0
        dec = jnp.exp(diff)
      lo[i, j] = bs[i][:, None] * _dot(ks[i], ks[j], tb=True) * dec
  tb = {}
  for i in range(nb):
    tb[i, i] = _substitute(lo[i, i])
    for j in range(i - 1, -1, -1):
      acc = None
      for m in range(j, i):
        part = mm(lo[i, m], tb[m, j])
        acc = part if acc is None else acc + part
      tb[i, j] = -mm(tb[i, i], acc)
  zero = jnp.zeros((sub, sub), t_ref.dtype)
  for i in range(nb):
    for j in range(nb):
      t_ref[blk(i), blk(j)] = tb[i, j].astype(t_ref.dtype) if j <= i else zero


def _wu_kernel(k_ref, v_ref, b_ref, g_ref, t_ref, w_ref, u_ref, kd_ref=None):
  """w = T (b e^gam k), u = T (b v), kd = k e^(gam_C - gam) (no kd_ref: not written)."""
  dt = k_ref.dtype
  c = k_ref.shape[0]
  beta, g = b_ref[...], g_ref[...]
  t = t_ref[...].astype(dt)
  kf = k_ref[...].astype(_F32)
  w_ref[...] = _dot(t, (kf * (beta * jnp.exp(g))[:, None]).astype(dt)).astype(w_ref.dtype)
  u_ref[...] = _dot(t, (v_ref[...].astype(_F32) * beta[:, None]).astype(dt)).astype(u_ref.dtype)
  if kd_ref is not None:
    kd_ref[...] = (kf * jnp.exp(g_ref[c - 1] - g)[:, None]).astype(kd_ref.dtype)


def _prep_specs(heads, c, kdim, vdim):
  sp = _specs(heads, c, kdim, vdim)
  row = lambda width: pl.BlockSpec((None, c, width), lambda i, n: (i, n, 0))
  return sp["qk"], _specs(heads, c, vdim, vdim)["qk"], sp["g"], row


@functools.partial(jax.jit, static_argnames=("chunk", "interpret", "with_kd", "inverse_warps",
                                             "inverse_stages", "inverse_sub", "apply_warps",
                                             "apply_stages"))
def prep_forward(k, v, beta, gam, *, chunk, interpret=False, with_kd=True,
                 inverse_warps=INVERSE_WARPS, inverse_stages=1, inverse_sub=INVERSE_SUB,
                 apply_warps=WARPS, apply_stages=APPLY_STAGES):
  """k `[B, T, H, K]`, v `[B, T, H, V]`, beta, gam `[B*H, T]` f32 ->
  (w `[B*H, T, K]`, u `[B*H, T, V]`, kd `[B*H, T, K]`, T `[B*H, T, C]`, all in k's dtype):
  `wy_inverse` then `wy_apply` (launch settings: theirs, prefixed). with_kd False: kd is not
  written (None; the forward-only recurrence forms it from k)."""
  tmat = wy_inverse(k, beta, gam, chunk=chunk, interpret=interpret, warps=inverse_warps,
                    stages=inverse_stages, sub=inverse_sub)
  w, u, *kd = wy_apply(k, v, beta, gam, tmat, chunk=chunk, interpret=interpret, with_kd=with_kd,
                       warps=apply_warps, stages=apply_stages)
  return w, u, (kd[0] if with_kd else None), tmat


def check_inverse_sub(sub, chunk):
  """The WY inverse's block size: a power of two >= 16 (Triton tiles) that divides the chunk
  (capped at the chunk), else a ValueError."""
  sub = min(sub, chunk)
  if not (sub >= 16 and sub & (sub - 1) == 0 and chunk % sub == 0):
    raise ValueError(f"gated_delta_rule (pallas): inverse_sub={sub} must be a power of two >= 16 "
                     f"dividing chunk_size={chunk}.")
  return sub


@functools.partial(jax.jit, static_argnames=("chunk", "interpret", "warps", "stages", "sub"))
def wy_inverse(k, beta, gam, *, chunk, interpret=False, warps=INVERSE_WARPS, stages=1,
               sub=INVERSE_SUB):
  """k `[B, T, H, K]`, beta, gam `[B*H, T]` f32 -> T `[B*H, T, C]` in k's dtype. `sub`: the
  size of the blocks T is built from (capped at the chunk)."""
  b, t, heads, kdim = k.shape
  kspec, _, gspec, row = _prep_specs(heads, chunk, kdim, kdim)
  return pl.pallas_call(
      functools.partial(_inverse_kernel, sub=check_inverse_sub(sub, chunk)),
      grid=(b * heads, t // chunk), in_specs=[kspec, gspec, gspec], out_specs=row(chunk),
      out_shape=jax.ShapeDtypeStruct((b * heads, t, chunk), k.dtype), interpret=interpret,
      compiler_params=compiler_params(interpret, warps, stages),
      name="gdn_wy_inverse_fwd")(k, beta, gam)


@functools.partial(jax.jit, static_argnames=("chunk", "interpret", "warps", "stages", "with_kd"))
def wy_apply(k, v, beta, gam, tmat, *, chunk, interpret=False, warps=WARPS, stages=APPLY_STAGES,
             with_kd=True):
  """T `[B*H, T, C]` (any dtype) -> [w, u, kd] as `prep_forward` (kd only with `with_kd`)."""
  b, t, heads, kdim = k.shape
  vdim = v.shape[-1]
  kspec, vspec, gspec, row = _prep_specs(heads, chunk, kdim, vdim)
  dt = k.dtype
  bh = b * heads
  shapes = [jax.ShapeDtypeStruct((bh, t, kdim), dt), jax.ShapeDtypeStruct((bh, t, vdim), dt),
            jax.ShapeDtypeStruct((bh, t, kdim), dt)][:3 if with_kd else 2]
  specs = [row(kdim), row(vdim), row(kdim)][:3 if with_kd else 2]
  return pl.pallas_call(
      _wu_kernel, grid=(bh, t // chunk), in_specs=[kspec, vspec, gspec, gspec, row(chunk)],
      out_specs=specs, out_shape=shapes, interpret=interpret,
      compiler_params=compiler_params(interpret, warps, stages), name="gdn_wy_wu_fwd")(
          k, v.astype(dt), beta, gam, tmat)


# --------------------------------------------------------------------------- backward post kernel


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
  dec = decay(g)
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


def _post_specs(heads, c, kdim, vdim):
  tok = lambda w: pl.BlockSpec((None, c, None, w), lambda i, n: (i // heads, n, i % heads, 0))
  row = lambda w: pl.BlockSpec((None, c, w), lambda i, n: (i, n, 0))
  state = pl.BlockSpec((None, kdim, vdim), lambda i, n: (i, n, 0))
  scal = pl.BlockSpec((None, c), lambda i, n: (i, n))
  return tok, row, state, scal


def post_backward(k, v, beta, gam, tmat, h_in, lam_next, vn, dvn, dk_o, dg_o, *, interpret=False):
  """k `[B,T,H,K]`, v `[B,T,H,V]`, beta, gam, dg_o `[B*H,T]`, tmat `[B*H,T,C]` (k's dtype), h_in,
  lam_next `[B*H,N,K,V]`, vn, dvn `[B*H,N,C,V]`, dk_o `[B,T,H,K]` ->
  (dk `[B,T,H,K]`, dv `[B,T,H,V]`, dbeta, dgam `[B*H,T]` f32). dgam lacks the chunk decays'
  e^gam_C sum(h lam) term (the reverse recurrence gives it)."""
  b, t, heads, kdim = k.shape
  vdim = v.shape[-1]
  bh, n, c, _ = vn.shape
  tok, row, state, scal = _post_specs(heads, c, kdim, vdim)
  flat_s = lambda x: x.reshape(bh, n * kdim, vdim)
  flat_c = lambda x: x.reshape(bh, n * c, x.shape[-1])
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
               jax.ShapeDtypeStruct((bh, t), _F32), jax.ShapeDtypeStruct((bh, t), _F32)]
  return pl.pallas_call(
      _post_kernel, grid=(bh, n),
      in_specs=[tok(kdim), tok(vdim), scal, scal, row(c), state, state, row(vdim), row(vdim),
                tok(kdim), scal],
      out_specs=[tok(kdim), tok(vdim), scal, scal], out_shape=out_shape,
      interpret=interpret, compiler_params=_params(interpret),
      name="gdn_post_bwd")(
          k, v, beta, gam, tmat, flat_s(h_in), flat_s(lam_next), flat_c(vn), flat_c(dvn),
          dk_o, dg_o)

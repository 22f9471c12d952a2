"""Chunk-to-chunk state recurrence shared by the chunked XLA forms of GLA and the delta rule.

This is the only sequential part of the chunked algorithms. For chunks n = 0..N-1 of one
(batch, head) with state h_n `[K, V]` entering chunk n:

    vn_n    = u_n - w_n h_n                 (delta rule; vn_n = u_n when there is no w)
    h_{n+1} = a_n[:, None] * h_n + kd_n^T vn_n

`w_n, kd_n` are `[C, K]`, `u_n` is `[C, V]`, `a_n` is `[K]` (per-key decay over the chunk).
Outputs: h_in = (h_0 .. h_{N-1}) `[N, K, V]` (needed for the chunk outputs), vn `[N, C, V]` and
h_N. The backward pass is the reverse recurrence, with lam_n = dL/dh_n:

    dvn_n   = dvn_n(out) + kd_n lam_{n+1}
    lam_n   = dh_in_n + a_n[:, None] * lam_{n+1} - w_n^T dvn_n

after which every other gradient is a product over all chunks at once (done here in XLA):
du = dvn, dw_n = -dvn_n h_n^T, dkd_n = vn_n lam_{n+1}^T, da_n = rowsum(h_n * lam_{n+1}).
The columns of V never mix, so kernels may split V into blocks.

Both loops are lax.scan; the hand-written VJP keeps only the per-chunk states (no per-step
residuals of an autodiffed scan). The Pallas kernels of the same loops live beside each op.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sosm_jax.ops.common.chunks import dot_f32 as _mm

_F32 = jnp.float32


# --------------------------------------------------------------------------- XLA (lax.scan)


def scan_forward(w, u, kd, a, h0):
  """Forward recurrence with lax.scan.

  Args: w `[BH, N, C, K]` or None, u `[BH, N, C, V]`, kd `[BH, N, C, K]`, a `[BH, N, K]` f32,
    h0 `[BH, K, V]` f32. Matmul operands are in u's dtype.
  Returns: h_in `[BH, N, K, V]` (u's dtype), vn `[BH, N, C, V]` (u's dtype), h_N f32.
  """
  dt = u.dtype
  major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

  def body(h, xs):
    w_n, u_n, kd_n, a_n = xs
    hb = h.astype(dt)
    vn = u_n.astype(_F32)
    if w_n is not None:
      vn = vn - _mm("bck,bkv->bcv", w_n, hb)
    h_next = a_n[..., None] * h + _mm("bck,bcv->bkv", kd_n, vn.astype(dt))
    return h_next, (hb, vn.astype(dt))

  h_last, (h_in, vn) = lax.scan(body, h0.astype(_F32), (major(w), major(u), major(kd), major(a)))
  return jnp.moveaxis(h_in, 0, 1), jnp.moveaxis(vn, 0, 1), h_last


def scan_backward(w, kd, a, d_h_in, d_vn, d_h_last):
  """Reverse recurrence with lax.scan.

  Args: w `[BH, N, C, K]` or None, kd `[BH, N, C, K]`, a `[BH, N, K]`, cotangents d_h_in
    `[BH, N, K, V]`, d_vn `[BH, N, C, V]`, d_h_last `[BH, K, V]`.
  Returns: dvn_total `[BH, N, C, V]` (kd's dtype), lam_next `[BH, N, K, V]` (lam_{n+1}, kd's
    dtype), lam_0 `[BH, K, V]` f32.
  """
  dt = kd.dtype
  major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

  def body(lam, xs):
    w_n, kd_n, a_n, dh_n, dvn_n = xs
    lb = lam.astype(dt)
    dvn = dvn_n.astype(_F32) + _mm("bck,bkv->bcv", kd_n, lb)
    lam_prev = dh_n.astype(_F32) + a_n[..., None] * lam
    if w_n is not None:
      lam_prev = lam_prev - _mm("bck,bcv->bkv", w_n, dvn.astype(dt))
    return lam_prev, (dvn.astype(dt), lb)

  xs = (major(w), major(kd), major(a), major(d_h_in), major(d_vn))
  lam0, (dvn, lam_next) = lax.scan(body, d_h_last.astype(_F32), xs, reverse=True)
  return jnp.moveaxis(dvn, 0, 1), jnp.moveaxis(lam_next, 0, 1), lam0


# --------------------------------------------------------------------------- custom VJP


@jax.custom_vjp
def chunk_recurrence(w, u, kd, a, h0):
  """The chunk-state recurrence (module docstring) with a hand-written VJP.

  Args: w `[BH, N, C, K]` or None (no delta correction, GLA), u `[BH, N, C, V]`,
    kd `[BH, N, C, K]` (same dtype as u: the matmul operand dtype), a `[BH, N, K]` f32,
    h0 `[BH, K, V]` f32.
  Returns: (h_in `[BH, N, K, V]`, vn `[BH, N, C, V]` (u's dtype), h_N `[BH, K, V]` f32).
  """
  return scan_forward(w, u, kd, a, h0)


def _rec_fwd(w, u, kd, a, h0):
  h_in, vn, h_last = scan_forward(w, u, kd, a, h0)
  return (h_in, vn, h_last), (w, kd, a, h_in, vn, h0)


def _rec_bwd(res, cts):
  w, kd, a, h_in, vn, h0 = res
  d_h_in, d_vn, d_h_last = cts
  dvn, lam_next, lam0 = scan_backward(w, kd, a, d_h_in, d_vn, d_h_last)
  du = dvn.astype(vn.dtype)
  dw = None if w is None else (-_mm("bncv,bnkv->bnck", dvn, h_in)).astype(w.dtype)
  dkd = _mm("bncv,bnkv->bnck", vn, lam_next).astype(kd.dtype)
  da = jnp.sum(h_in.astype(_F32) * lam_next.astype(_F32), axis=-1).astype(a.dtype)
  return dw, du, dkd, da, lam0.astype(h0.dtype)


chunk_recurrence.defvjp(_rec_fwd, _rec_bwd)

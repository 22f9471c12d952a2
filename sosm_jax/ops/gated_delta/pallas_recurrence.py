"""Pallas (Triton) kernels of the delta rule's chunk-state recurrence, forward and reverse.

One program per (batch*head, V block) walks all chunks in order and keeps its `[K, BV]` slice of
the state in registers, so each chunk costs two small matmuls on chip instead of several XLA
launches. The math (and its XLA twin) is `sosm_jax/ops/common/recurrence.py`. `forward_output`
is the forward with the gated delta rule's output stage in the same loop (no backward).
`interpret=True` runs the same kernel code on any platform (tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sosm_jax.ops.common.pallas import compiler_params, pick_block_v
from sosm_jax.ops.gated_delta.pallas_kernels import decay, tc_dot as _dot

_F32 = jnp.float32
WARPS, STAGES = 4, 2  # launch settings (measured: NOTES.md)


# --------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, n_chunks, chunk, key_dim, has_w):
  if has_w:
    w_ref, u_ref, kd_ref, a_ref, h0_ref, hin_ref, vn_ref, hl_ref = refs
  else:
    u_ref, kd_ref, a_ref, h0_ref, hin_ref, hl_ref = refs
  dt = u_ref.dtype

  def body(n, h):
    rows = pl.ds(n * chunk, chunk)
    hb = h.astype(dt)
    hin_ref[pl.ds(n * key_dim, key_dim), :] = hb
    vn = u_ref[rows, :].astype(_F32)
    if has_w:
      vn = vn - _dot(w_ref[rows, :], hb)
      vn_ref[rows, :] = vn.astype(dt)
    a = a_ref[n, :]                                                  # [K]
    return a[:, None] * h + _dot(kd_ref[rows, :], vn.astype(dt), ta=True)

  h = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))
  hl_ref[...] = h


@functools.partial(jax.jit, static_argnames=("interpret", "block_v", "num_warps", "num_stages"))
def forward(w, u, kd, a, h0, *, interpret=False, block_v=None, num_warps=WARPS, num_stages=STAGES):
  """Forward recurrence; arguments and results as `common.recurrence.scan_forward`."""
  bh, n, c, kdim = kd.shape
  v = u.shape[-1]
  bv = pick_block_v(bh, v, block_v)
  has_w = w is not None
  flat = lambda x: x.reshape(bh, n * c, x.shape[-1])
  seq_k = pl.BlockSpec((None, n * c, kdim), lambda i, j: (i, 0, 0))
  seq_v = pl.BlockSpec((None, n * c, bv), lambda i, j: (i, 0, j))
  vec_a = pl.BlockSpec((None, n, kdim), lambda i, j: (i, 0, 0))
  state = pl.BlockSpec((None, kdim, bv), lambda i, j: (i, 0, j))
  all_states = pl.BlockSpec((None, n * kdim, bv), lambda i, j: (i, 0, j))
  in_specs = ([seq_k] if has_w else []) + [seq_v, seq_k, vec_a, state]
  args = ([flat(w)] if has_w else []) + [flat(u), flat(kd), a.astype(_F32), h0.astype(_F32)]
  out_shape = [jax.ShapeDtypeStruct((bh, n * kdim, v), u.dtype)]
  out_specs = [all_states]
  if has_w:
    out_shape.append(jax.ShapeDtypeStruct((bh, n * c, v), u.dtype))
    out_specs.append(seq_v)
  out_shape.append(jax.ShapeDtypeStruct((bh, kdim, v), _F32))
  out_specs.append(state)
  kernel = functools.partial(_fwd_kernel, n_chunks=n, chunk=c, key_dim=kdim, has_w=has_w)
  outs = pl.pallas_call(
      kernel, grid=(bh, v // bv), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      interpret=interpret,
      compiler_params=compiler_params(interpret, num_warps, num_stages),
      name="chunk_recurrence_fwd")(*args)
  h_in = outs[0].reshape(bh, n, kdim, v)
  vn = outs[1].reshape(bh, n, c, v) if has_w else u
  return h_in, vn, outs[-1]


# --------------------------------------------------------------------------- forward + output


def _fwd_out_kernel(*refs, n_chunks, chunk, scale, has_h0):
  """The forward recurrence with the gated delta rule's output stage in its loop: per chunk
  o = scale ((q e^gam) h + (q k^T * D) vn) for this program's V block (module docstring of
  `pallas_kernels`); neither h_in nor vn reaches memory, and kd = k e^(gam_C - gam) is formed
  from the k rows the output stage loads anyway (reading kd from memory instead measured 0.35 ms
  slower at 4096 x 16 on an H200: NOTES.md), as is the state's decay e^gam_C (no `[BH, N, K]`
  broadcast of it written by XLA and read back here)."""
  if has_h0:
    w_ref, u_ref, h0_ref, q_ref, k_ref, g_ref, o_ref, hl_ref = refs
  else:
    w_ref, u_ref, q_ref, k_ref, g_ref, o_ref, hl_ref = refs
  dt = u_ref.dtype

  def body(n, h):
    rows = pl.ds(n * chunk, chunk)
    hb = h.astype(dt)
    vn = (u_ref[rows, :].astype(_F32) - _dot(w_ref[rows, :], hb)).astype(dt)
    q, k, g = q_ref[rows, :], k_ref[rows, :], g_ref[rows]
    p = (_dot(q, k, tb=True) * decay(g)).astype(dt)
    qg = (q.astype(_F32) * jnp.exp(g)[:, None]).astype(dt)
    o_ref[rows, :] = ((_dot(qg, hb) + _dot(p, vn)) * scale).astype(o_ref.dtype)
    # gam_C picked by a masked sum (exact: the other terms are zeros) from the loaded rows
    last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
    g_last = jnp.sum(jnp.where(last, g, 0.0))
    kd = (k.astype(_F32) * jnp.exp(g_last - g)[:, None]).astype(dt)
    return jnp.exp(g_last) * h + _dot(kd, vn, ta=True)

  h0 = h0_ref[...].astype(_F32) if has_h0 else jnp.zeros(hl_ref.shape, _F32)
  hl_ref[...] = lax.fori_loop(0, n_chunks, body, h0)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_v", "num_warps",
                                             "num_stages"))
def forward_output(w, u, h0, q, k, gam, *, scale, interpret=False, block_v=None,
                   num_warps=WARPS, num_stages=STAGES):
  """Forward recurrence fused with the output stage, for a forward without a backward.

  Args: w `[BH, N, C, K]`, u `[BH, N, C, V]`, h0 `[BH, K, V]` f32 or None for zeros (as
    `forward`; kd and the decay a = e^gam_C are formed in the loop from k and gam; a None h0 is
    neither written by XLA nor read here), q, k `[B, T, H, K]` and gam `[B*H, T]` f32 (as
    `pallas_kernels.output_forward`).
  Returns: (o `[B, T, H, V]` in u's dtype, h_N `[BH, K, V]` f32).
  A variant that also wrote h_in and vn for the backward measured slower than `forward` followed
  by the output-stage kernel (NOTES.md), so the backward's forward uses those two.
  """
  bh, n, c, kdim = w.shape
  v = u.shape[-1]
  b, t, heads, _ = q.shape
  bv = pick_block_v(bh, v, block_v)
  dt = u.dtype
  flat = lambda x: x.reshape(bh, n * c, x.shape[-1])
  seq_k = pl.BlockSpec((None, n * c, kdim), lambda i, j: (i, 0, 0))
  seq_v = pl.BlockSpec((None, n * c, bv), lambda i, j: (i, 0, j))
  state = pl.BlockSpec((None, kdim, bv), lambda i, j: (i, 0, j))
  tok = lambda width, jj: pl.BlockSpec((None, n * c, None, width),
                                       lambda i, j: (i // heads, 0, i % heads, j if jj else 0))
  has_h0 = h0 is not None
  in_specs = [seq_k, seq_v] + ([state] if has_h0 else []) + [
      tok(kdim, False), tok(kdim, False), pl.BlockSpec((None, n * c), lambda i, j: (i, 0))]
  args = [flat(w), flat(u)] + ([h0.astype(_F32)] if has_h0 else []) + [
      q.astype(dt), k.astype(dt), gam.astype(_F32)]
  kernel = functools.partial(_fwd_out_kernel, n_chunks=n, chunk=c, scale=float(scale),
                             has_h0=has_h0)
  o, h_last = pl.pallas_call(
      kernel, grid=(bh, v // bv), in_specs=in_specs, out_specs=[tok(bv, True), state],
      out_shape=[jax.ShapeDtypeStruct((b, t, heads, v), dt),
                 jax.ShapeDtypeStruct((bh, kdim, v), _F32)],
      interpret=interpret, compiler_params=compiler_params(interpret, num_warps, num_stages),
      name="gdn_recurrence_output_fwd")(*args)
  return o, h_last


# --------------------------------------------------------------------------- backward


def _bwd_kernel(*refs, n_chunks, chunk, key_dim, has_w, out_grad=None, with_hl=False):
  refs = list(refs)
  w_ref = refs.pop(0) if has_w else None
  hl_ref = refs.pop() if with_hl else None        # last output
  hin_ref = refs.pop(-4) if with_hl else None     # last input, before the three outputs
  if out_grad is None:
    kd_ref, a_ref, dhin_ref, dvn_ref, dhl_ref, dvo_ref, lam_ref, lam0_ref = refs
  else:  # dh_in = scale (q e^gam)^T do is formed here (q, do [T, .] rows, gam [T] scalars)
    kd_ref, a_ref, q_ref, g_ref, do_ref, dvn_ref, dhl_ref, dvo_ref, lam_ref, lam0_ref = refs
  dt = kd_ref.dtype

  def dh_in(n, rows, states):
    if out_grad is None:
      return dhin_ref[states, :].astype(_F32)
    qe = (q_ref[rows, :].astype(_F32) * jnp.exp(g_ref[rows])[:, None]).astype(dt)
    return out_grad * _dot(qe, do_ref[rows, :], ta=True)

  def body(i, lam):
    n = n_chunks - 1 - i
    rows = pl.ds(n * chunk, chunk)
    states = pl.ds(n * key_dim, key_dim)
    lb = lam.astype(dt)
    lam_ref[states, :] = lb
    if with_hl:  # sum(h_n * lam_{n+1}): the cotangent of the chunk's decay e^gam_C
      hl = jnp.sum(jnp.sum(hin_ref[states, :].astype(_F32) * lam, axis=1), axis=0)
      hl_ref[n, :] = jnp.zeros((16,), _F32) + hl
    dvn = dvn_ref[rows, :].astype(_F32) + _dot(kd_ref[rows, :], lb)
    dvo_ref[rows, :] = dvn.astype(dt)
    a = a_ref[n, :]
    lam_prev = dh_in(n, rows, states) + a[:, None] * lam
    if has_w:
      lam_prev = lam_prev - _dot(w_ref[rows, :], dvn.astype(dt), ta=True)
    return lam_prev

  lam = lax.fori_loop(0, n_chunks, body, dhl_ref[...].astype(_F32))
  lam0_ref[...] = lam


@functools.partial(jax.jit, static_argnames=("interpret", "block_v", "num_warps", "num_stages",
                                             "scale"))
def backward(w, kd, a, d_h_in, d_vn, d_h_last, *, interpret=False, block_v=None,
             num_warps=WARPS, num_stages=STAGES, q=None, gam=None, do=None, scale=None, h_in=None):
  """Reverse recurrence; arguments and results as `common.recurrence.scan_backward`.

  With q `[B,T,H,K]`, gam `[B*H,T]` f32, do `[B,T,H,V]` and scale (d_h_in None), the kernel forms
  d_h_in = scale (q e^gam)^T do of every chunk itself (the gated delta rule's output stage).
  With h_in `[B*H,N,K,V]` it also returns hl `[B*H,N]` = sum(h_n * lam_{n+1}) per chunk.
  """
  bh, n, c, kdim = kd.shape
  v = d_vn.shape[-1]
  bv = pick_block_v(bh, v, block_v)
  has_w = w is not None
  dt = kd.dtype
  flat = lambda x: x.reshape(bh, -1, x.shape[-1])
  seq_k = pl.BlockSpec((None, n * c, kdim), lambda i, j: (i, 0, 0))
  seq_v = pl.BlockSpec((None, n * c, bv), lambda i, j: (i, 0, j))
  vec_a = pl.BlockSpec((None, n, kdim), lambda i, j: (i, 0, 0))
  state = pl.BlockSpec((None, kdim, bv), lambda i, j: (i, 0, j))
  all_states = pl.BlockSpec((None, n * kdim, bv), lambda i, j: (i, 0, j))
  if q is None:
    out_specs, out_args = [all_states], [flat(d_h_in.astype(dt))]
  else:
    heads = q.shape[2]
    tok = lambda w, jj: pl.BlockSpec((None, n * c, None, w),
                                     lambda i, j: (i // heads, 0, i % heads, j if jj else 0))
    out_specs = [tok(kdim, False), pl.BlockSpec((None, n * c), lambda i, j: (i, 0)), tok(bv, True)]
    out_args = [q.astype(dt), gam.astype(_F32), do.astype(dt)]
  with_hl = h_in is not None
  in_specs = (([seq_k] if has_w else []) + [seq_k, vec_a] + out_specs + [seq_v, state]
              + ([all_states] if with_hl else []))
  args = (([flat(w)] if has_w else []) + [flat(kd), a.astype(_F32)] + out_args
          + [flat(d_vn.astype(dt)), d_h_last.astype(_F32)] + ([flat(h_in)] if with_hl else []))
  out_shape = [jax.ShapeDtypeStruct((bh, n * c, v), dt),
               jax.ShapeDtypeStruct((bh, n * kdim, v), dt),
               jax.ShapeDtypeStruct((bh, kdim, v), _F32)]
  out_specs = [seq_v, all_states, state]
  if with_hl:
    out_shape.append(jax.ShapeDtypeStruct((bh, n, (v // bv) * 16), _F32))
    out_specs.append(pl.BlockSpec((None, n, 16), lambda i, j: (i, 0, j)))
  kernel = functools.partial(_bwd_kernel, n_chunks=n, chunk=c, key_dim=kdim, has_w=has_w,
                             out_grad=None if q is None else float(scale), with_hl=with_hl)
  outs = pl.pallas_call(
      kernel, grid=(bh, v // bv), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=interpret,
      compiler_params=compiler_params(interpret, num_warps, num_stages),
      name="chunk_recurrence_bwd")(*args)
  dvn, lam_next, lam0 = outs[:3]
  res = (dvn.reshape(bh, n, c, v), lam_next.reshape(bh, n, kdim, v), lam0)
  if with_hl:
    res += (outs[3].reshape(bh, n, v // bv, 16)[..., 0].sum(-1),)
  return res

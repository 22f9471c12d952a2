"""The gated delta rule on Pallas (Triton) kernels: one custom VJP over four forward and three
backward kernels.

Forward (`pallas_kernels.py`, `pallas_recurrence.py`): WY preparation (two kernels: T =
(I + L)^{-1}, then w, u, kd) -> chunk recurrence -> output stage (without a backward and for
bf16 inputs, recurrence and output stage are one kernel, `pallas_recurrence.forward_output`,
which also forms kd itself). Backward: output-stage kernel (dq, dk, dgam, dvn)
-> reverse recurrence kernel (dvn, lam_{n+1}, and the output stage's dh = scale (q e^gam)^T do
formed in its loop, so dh never reaches memory) -> one post kernel per chunk that turns (h_n,
lam_{n+1}, vn, dvn) into the recurrence's input cotangents and runs the WY-preparation backward
on them in the same pass:

    dw = -dvn h^T, dkd = vn lam^T                                                (recurrence)
    x = T^T dw, y = T^T du, dT = du (b v)^T + dw (b e^gam k)^T, dL = -T^T dT T^T  (WY form)

so no `[batch*heads, chunks, ...]` intermediate is transposed or re-read by XLA; dk and dv are
written in the caller's `[B, T, H, D]` layout. Matmul operands are in the inputs' dtype (bf16:
fp32 accumulation); fp32 inputs at fp32 accuracy through six bf16 tensor-core products each
(`pallas_kernels.tc_dot`). Measurements: `sosm_jax/ops/NOTES.md`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sosm_jax.ops.common.chunks import matmul_dtype, pad_last, pad_time, padded_state, to_chunks
from sosm_jax.ops.common.pallas import check_tile_chunk_size, padded_tile_size
from sosm_jax.ops.gated_delta import pallas_kernels as kern
from sosm_jax.ops.gated_delta import pallas_recurrence as rec
from sosm_jax.ops.gated_delta.reference import check_inputs, default_scale

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ForwardLaunch:
  """Triton launch settings of the forward kernels (defaults: the measured ones, NOTES.md).

  inverse_*: `pallas_kernels.wy_inverse` (warps, stages, block size `sub`); apply_*:
  `pallas_kernels.wy_apply` (both run in every forward, also the backward's); out_*: the
  forward-only recurrence+output kernel `pallas_recurrence.forward_output` (bf16 forward without
  a backward; out_block_v None: the op's `block_v`, which None chooses from the shapes).
  `benchmarks/kernels.py --gdn-sweep` times a grid of these on a GPU.
  """
  inverse_warps: int = kern.INVERSE_WARPS
  inverse_stages: int = 1
  inverse_sub: int = kern.INVERSE_SUB
  apply_warps: int = kern.WARPS
  apply_stages: int = kern.APPLY_STAGES
  out_warps: int = rec.WARPS
  out_stages: int = rec.STAGES
  out_block_v: int | None = None

  def prep(self):
    """`pallas_kernels.prep_forward`'s launch keywords."""
    return dict(inverse_warps=self.inverse_warps, inverse_stages=self.inverse_stages,
                inverse_sub=self.inverse_sub, apply_warps=self.apply_warps,
                apply_stages=self.apply_stages)


DEFAULT_LAUNCH = ForwardLaunch()


def chunk_state_decay(gam, chunk, key_dim):
  """a = e^gam_C, each chunk's decay of the carried state, `[B*H, N, key_dim]` f32 (broadcast
  over the key axis, as `pallas_recurrence.forward` and `backward` read it)."""
  bh, t = gam.shape
  n = t // chunk
  return jnp.broadcast_to(jnp.exp(gam.reshape(bh, n, chunk)[..., -1])[..., None],
                          (bh, n, key_dim))


def _prep(k, v, beta, gam, chunk, interpret, launch, with_kd=True):
  """WY preparation (`pallas_kernels.prep_forward`) -> (w, u, kd or None `[B*H, N, C, .]`,
  T `[B*H, T, C]`)."""
  w, u, kd, tmat = kern.prep_forward(k, v, beta, gam, chunk=chunk, interpret=interpret,
                                     with_kd=with_kd, **launch.prep())
  bh, t = gam.shape
  per_chunk = lambda x: None if x is None else x.reshape(bh, t // chunk, chunk, x.shape[-1])
  return per_chunk(w), per_chunk(u), per_chunk(kd), tmat


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def gdn_core(q, k, v, beta, gam, h0, scale, chunk, interpret=False, block_v=None,
             launch=DEFAULT_LAUNCH, zero_h0=False):
  """q, k `[B,T,H,K]`, v `[B,T,H,V]` (T a multiple of chunk, one dtype), beta, gam `[B*H,T]` f32
  (gam: within-chunk cumulative log-decay), h0 `[B*H,K,V]` f32 ->
  (o `[B,T,H,V]` in v's dtype, h_last `[B*H,K,V]` f32).

  Without a backward, bf16 inputs run the output stage inside the recurrence's loop, which also
  forms kd from the k rows it loads (neither h_in nor kd in memory: NOTES.md); fp32 inputs, and
  the forward of the backward (which needs h_in; there the fused kernel writing h_in measured
  slower), run recurrence and output stage as two kernels (NOTES.md). zero_h0: h0 is zeros (no
  initial state), which that fused kernel then neither reads nor needs XLA to write."""
  if q.dtype != jnp.bfloat16:
    return _core_fwd(q, k, v, beta, gam, h0, scale, chunk, interpret, block_v, launch,
                     zero_h0)[0]
  w, u, _, _ = _prep(k, v, beta, gam, chunk, interpret, launch, with_kd=False)
  out_bv = block_v if launch.out_block_v is None else launch.out_block_v
  return rec.forward_output(w, u, None if zero_h0 else h0, q, k, gam, scale=scale,
                            interpret=interpret, block_v=out_bv, num_warps=launch.out_warps,
                            num_stages=launch.out_stages)


def _core_fwd(q, k, v, beta, gam, h0, scale, chunk, interpret, block_v, launch,
              zero_h0):  # pylint: disable=unused-argument
  w, u, kd, tmat = _prep(k, v, beta, gam, chunk, interpret, launch)
  a = chunk_state_decay(gam, chunk, k.shape[-1])
  h_in, vn, h_last = rec.forward(w, u, kd, a, h0, interpret=interpret, block_v=block_v)
  o = kern.output_forward(q, k, gam, h_in, vn, scale=scale, interpret=interpret)
  return (o, h_last), (q, k, v, beta, gam, tmat, w, kd, a, h_in, vn)


def _core_bwd(scale, chunk, interpret, block_v, launch, zero_h0, res, cts):  # pylint: disable=unused-argument
  q, k, v, beta, gam, tmat, w, kd, a, h_in, vn = res
  do, dh_last = cts
  bh, n, c, _ = vn.shape
  dq, dk_o, dg_o, dvn_o = kern.output_backward(q, k, gam, h_in, vn, do, scale=scale,
                                               interpret=interpret)
  dvn, lam_next, lam0, hl = rec.backward(w, kd, a, None, dvn_o, dh_last,
                                         interpret=interpret, block_v=block_v, h_in=h_in, q=q,
                                         gam=gam, do=do, scale=scale)
  dk, dv, dbeta, dgam = kern.post_backward(k, v, beta, gam, tmat, h_in, lam_next, vn, dvn, dk_o,
                                           dg_o, interpret=interpret)
  # a = e^gam_C (broadcast over K) scales the carried state: d gam_C += e^gam_C sum(h lam)
  dgam = dgam.reshape(bh, n, c).at[..., -1].add(a[..., 0] * hl).reshape(bh, n * c)
  return dq, dk, dv, dbeta, dgam, lam0


gdn_core.defvjp(_core_fwd, _core_bwd)


def gated_delta_rule_pallas(q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64,
                            interpret=False, block_v=None, launch=None):
  """Chunked gated delta rule on the Pallas kernels (contract of `gated_delta_rule_chunked`).

  Args:
    q, k: `[batch, time, heads, key_dim]` (L2-normalised), v `[batch, time, heads, value_dim]`,
    g: `[batch, time, heads]` log-decay <= 0, beta `[batch, time, heads]` in (0, 1).
    scale: default key_dim**-0.5. initial_state: `[batch, heads, key_dim, value_dim]` or None.
    chunk_size: a power of two >= 16 (static). interpret: Pallas interpret mode (any platform).
    block_v: V block of the recurrence programs (None: chosen from the shapes).
    launch: `ForwardLaunch` (None: `DEFAULT_LAUNCH`), the forward kernels' launch settings.
  Returns:
    (o `[batch, time, heads, value_dim]` in v's dtype, final_state f32
    `[batch, heads, key_dim, value_dim]`).
  Time is zero-padded to a multiple of chunk_size (identity steps); key and value dims that are
  not powers of two >= 16 are zero-padded to one (zero key channels and value columns change
  nothing) and the results trimmed.
  """
  check_inputs(q, k, v, g, beta, initial_state)
  check_tile_chunk_size("gated_delta_rule (pallas)", chunk_size)
  launch = DEFAULT_LAUNCH if launch is None else launch
  if not isinstance(launch, ForwardLaunch):
    raise TypeError(f"gated_delta_rule (pallas): launch must be a ForwardLaunch, got {launch!r}.")
  kern.check_inverse_sub(launch.inverse_sub, chunk_size)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = default_scale(scale, dk)
  kp, vp = padded_tile_size(dk), padded_tile_size(dv)
  c = chunk_size
  pad = (-t) % c
  dt = matmul_dtype(q, k, v)
  prep = lambda x, size: pad_last(pad_time(x, pad, dt), size)
  bhs = lambda x: to_chunks(pad_time(x, pad, _F32), c).reshape(b * h, t + pad)  # [B*H, T]
  gam = jnp.cumsum(to_chunks(pad_time(g, pad, _F32), c), axis=-1).reshape(b * h, t + pad)
  h0 = padded_state(initial_state, b, h, kp, vp)
  o, h_last = gdn_core(prep(q, kp), prep(k, kp), prep(v, vp), bhs(beta), gam, h0, float(scale), c,
                       interpret, block_v, launch, initial_state is None)
  h_last = h_last.reshape(b, h, kp, vp)[:, :, :dk, :dv]
  return o[:, :t, :, :dv].astype(v.dtype), h_last

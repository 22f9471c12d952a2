"""Helpers for the Pallas (Triton) kernels of the linear-attention ops: matmul, exp, launch options.

Every kernel takes `interpret`: True runs the same kernel code in Pallas interpret mode on any
platform (CPU tests, `implementation='pallas_interpret'`); False compiles it with Triton (GPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sosm_jax.ops.common.chunks import check_chunk_size

_F32 = jnp.float32
_LOG2E = 1.4426950408889634


def compiler_params(interpret, num_warps, num_stages=1):
  """Triton launch options (None in interpret mode)."""
  if interpret:
    return None
  from jax.experimental.pallas import triton as plt  # pylint: disable=import-outside-toplevel
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# How `dot` multiplies fp32 operands. 'ieee': fp32 FMAs, which Triton unrolls into straight-line
# code (a [64,128] x [128,64] product is 4,096 FMAs per thread); at head dim 128 the gated delta
# rule's kernels took 14 to over 18 s each to compile on an H200 (ops/NOTES.md). 'bf16x6': six
# bf16 tensor-core products of the operands' bf16 parts (lax.DotAlgorithmPreset.BF16_BF16_F32_X6;
# there its fp32 forward+backward compiled and ran in 22 s, errors <= 5.4e-7). XLA:CPU
# (interpret mode) runs both as plain fp32 products. 'tf32': one tf32 tensor-core product (10-bit
# mantissas), for fp32 operands whose result is rounded to bf16 anyway (the gated delta rule's WY
# inverse blocks with bf16 inputs); XLA:CPU runs it as a plain fp32 product too.
F32_DOTS = {"ieee": (lax.Precision.HIGHEST, lax.Precision.HIGHEST),
            "bf16x6": lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
            "tf32": (lax.Precision.DEFAULT, lax.Precision.DEFAULT)}


def dot(a, b, *, ta=False, tb=False, f32="ieee"):
  """2-D matmul with fp32 accumulation; a^T b when ta, a b^T when tb; fp32 operands at fp32
  accuracy by the algorithm `f32` names (F32_DOTS)."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  prec = F32_DOTS[f32] if a.dtype == _F32 else None
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=_F32)


def fast_exp(x, fast):
  """exp; with `fast` (compiled for the GPU) one ex2.approx instruction (libdevice expf is
  several). exp(-inf) = 0 either way."""
  if not fast:
    return jnp.exp(x)
  from jax.experimental.pallas import triton as plt  # pylint: disable=import-outside-toplevel
  [y] = plt.elementwise_inline_asm(
      "ex2.approx.ftz.f32 $0, $1;", args=[x * _LOG2E], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, _F32)])
  return y


def pick_block_v(bh, v, block_v):
  """V block of a recurrence program: enough programs to fill the GPU (~132 SMs) without starving
  each of work; `block_v` (must divide v) overrides."""
  if block_v is not None:
    if v % block_v:
      raise ValueError(f"pallas recurrence: block_v={block_v} must divide value_dim={v}.")
    return block_v
  bv = min(v, 64)
  while bv > 16 and bh * (v // bv) < 128:
    bv //= 2
  return bv if v % bv == 0 else v


def is_tile_size(x):
  """Triton tiles: powers of two >= 16."""
  return x >= 16 and x & (x - 1) == 0


def check_tile_chunk_size(name, chunk_size):
  """A chunk size the Triton kernels tile: a power of two >= 16, else a ValueError naming it."""
  check_chunk_size(name, chunk_size)
  if not is_tile_size(chunk_size):
    raise ValueError(f"{name}: chunk_size={chunk_size} must be a power of two >= 16 (Triton "
                     f"tiles); set model.chunk_size, e.g. 64.")


def padded_tile_size(x):
  """The smallest power of two >= max(x, 16)."""
  return max(16, 1 << (int(x) - 1).bit_length())

"""Decode attention: queries against a heads-first KV cache, read in place by Pallas kernels.

`cached_attention` reads the cache with two batched products. When the serving engine reads only
the filled part of a long cache (`read_len` < max_len), XLA:GPU first copies that part out (a
slice of every slot's K and V: the GEMM needs its operand contiguous), which at 64 slots with
131,072-position caches cost a quarter of the decode step (benchmarks/RESULTS.md, "Serving").
This kernel reads the keys in place, block by block, and only the blocks that hold keys the query
may see (positions <= the query's, and within the sliding window), whatever read_len is; a read
length that is not whole blocks ends with a block that overlaps the one before it, masked.

Grid (batch, kv head, split): a program takes one kv head's query group (its `H / K` query heads,
padded to 16 rows for the tensor cores) over one contiguous span of the cache with an online
softmax, and writes its unnormalised output, running max and sum; the splits are merged in
XLA (flash decoding). Splits give a batch of one enough programs to fill the GPU.

A prefill piece that continues a cache (Tq > 1 queries at index - Tq .. index - 1) has its own
grid (batch, kv head, block of queries): 64 rows a program, consecutive tokens with their group's
heads, each program reading the cache up to its newest token (no splits: the query blocks fill
the GPU). On an H200 it prefilled a 64K prompt in 4,096-token pieces 16x faster than the XLA
form, whose pieces compute scores against the whole cache (benchmarks/RESULTS.md, "Serving").

int8 caches (`quantize_kv`) are read as int8: a key's scale multiplies its scores and a value's
scale its probabilities, as in `cached_attention`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sosm_jax.ops.common.pallas import compiler_params, dot

_F32 = jnp.float32
# Keys per loaded block (a [block, head_dim] tile).
BLOCK = 128
# Query rows per program: the group's heads padded to the smallest tensor-core tile.
_ROWS = 16
# Query rows per program of a prefill piece: tokens x the group's heads (padded to a power of two).
_PIECE_ROWS = 64
# Programs to aim for (~2 per SM of an H200); a split keeps at least _MIN_SPAN keys, since each
# split adds a partial output to merge.
_TARGET_PROGRAMS = 256
_MIN_SPAN = 512
# The running max before any key: finite, so that exp(m - m_new) of an empty split stays 0.
_NO_MAX = -1e30


def supports(tq: int, group: int, keys: int) -> bool:
  """Whether the kernels take this call: a query group of at most 16 heads, at least one block of
  keys to read, and no more queries than keys."""
  return group <= _ROWS and BLOCK <= keys and 1 <= tq <= keys


def num_splits(batch: int, kv_heads: int, keys: int) -> int:
  """Splits of the read length (a power of two): enough programs to fill the GPU, each at least
  _MIN_SPAN keys."""
  blocks = -(-keys // BLOCK)
  splits = 1
  while (batch * kv_heads * splits < _TARGET_PROGRAMS
         and blocks // (2 * splits) * BLOCK >= _MIN_SPAN):
    splits *= 2
  return splits


def _softmax_blocks(q, k_ref, v_ref, scale_refs, first, stop, *, keys, visible, scale):
  """Online softmax of q's rows `[rows, head_dim]` over the key blocks [first, stop) ->
  (running max `[rows]`, sum `[rows]`, unnormalised output `[rows, head_dim]`), float32.

  visible(pos `[1, BLOCK]`) -> bool mask broadcastable to `[rows, BLOCK]`: the keys a row sees.
  scale_refs: (key scales, value scales) of an int8 cache; () for a float cache.
  """
  cdt = q.dtype

  def body(j, carry):
    m, l, acc = carry
    # A read length that is not whole blocks: its last block is loaded from keys - BLOCK (inside
    # the cache) and the positions its neighbour holds are masked.
    start = jnp.minimum(j * BLOCK, keys - BLOCK)
    pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, BLOCK), 1)
    at = pl.ds(start, BLOCK)
    s = dot(q, k_ref[at, :].astype(cdt), tb=True) * scale              # [rows, BLOCK]
    if scale_refs:
      s = s * scale_refs[0][at][None, :]
    s = jnp.where((pos >= j * BLOCK) & visible(pos), s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    l = l * alpha + jnp.sum(p, axis=1)
    if scale_refs:
      p = p * scale_refs[1][at][None, :]
    acc = acc * alpha[:, None] + dot(p.astype(cdt), v_ref[at, :].astype(cdt))
    return m_new, l, acc

  rows, dh = q.shape
  init = (jnp.full((rows,), _NO_MAX, _F32), jnp.zeros((rows,), _F32),
          jnp.zeros((rows, dh), _F32))
  return jax.lax.fori_loop(first, jnp.maximum(stop, first), body, init)


def _token_kernel(index_ref, q_ref, k_ref, v_ref, *rest, keys, span_blocks, window, scale,
                  quantized):
  """One token's query group over one split of the cache."""
  scale_refs, (o_ref, m_ref, l_ref) = (rest[:2], rest[2:]) if quantized else ((), rest)
  query = index_ref[0] - 1                      # the query's position: the newest key
  lowest = jnp.maximum(query - window + 1, 0) if window else 0
  first_block = pl.program_id(2) * span_blocks
  first = jnp.maximum(first_block, lowest // BLOCK)
  stop = jnp.minimum(first_block + span_blocks, query // BLOCK + 1)
  m, l, acc = _softmax_blocks(q_ref[...], k_ref, v_ref, scale_refs, first, stop, keys=keys,
                              visible=lambda pos: (pos <= query) & (pos >= lowest), scale=scale)
  o_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _piece_kernel(index_ref, q_ref, k_ref, v_ref, *rest, keys, tq, tokens, group_pad, window,
                  scale, quantized):
  """A block of `tokens` consecutive queries of a prefill piece (each with its group's heads,
  row r = token r // group_pad, head r % group_pad) over the cache up to its newest token."""
  scale_refs, (o_ref,) = (rest[:2], rest[2:]) if quantized else ((), rest)
  q = q_ref[...]
  rows = q.shape[0]
  piece_start = index_ref[0] - tq               # the piece's first token's position
  block_start = piece_start + pl.program_id(2) * tokens
  qpos = block_start + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group_pad
  newest = jnp.minimum(block_start + tokens, index_ref[0]) - 1
  first = jnp.maximum(block_start - window + 1, 0) // BLOCK if window else 0
  if window:
    visible = lambda pos: (pos <= qpos) & (pos > qpos - window)
  else:
    visible = lambda pos: pos <= qpos
  _, l, acc = _softmax_blocks(q, k_ref, v_ref, scale_refs, first, newest // BLOCK + 1, keys=keys,
                              visible=visible, scale=scale)
  # Rows of padding tokens past the piece may see no key: 0, not 0 / 0.
  o_ref[...] = acc / jnp.where(l > 0, l, 1.0)[:, None]


def _cache_specs(cache, max_len, dh):
  """(BlockSpecs, arrays) of the whole cache of one (batch, kv head), for a grid whose first two
  axes are those: K, V and, for an int8 cache, their scales."""
  whole = pl.BlockSpec((None, None, max_len, dh), lambda i, j, s: (i, j, 0, 0))
  specs, arrays = [whole, whole], [cache["k"], cache["v"]]
  if "k_scale" in cache:
    scales = pl.BlockSpec((None, None, max_len), lambda i, j, s: (i, j, 0))
    specs += [scales, scales]
    arrays += [cache["k_scale"][..., 0], cache["v_scale"][..., 0]]
  return specs, arrays


def decode_attention(q, cache, *, window=0, scale=None, read_len=0, interpret=False):
  """`cached_attention` read in place by a Pallas kernel: one token's step, or a prefill piece.

  Args:
    q: `[batch, Tq, heads, head_dim]`, the queries at positions index - Tq .. index - 1.
    cache: as `ops.attention.init_kv_cache` (float or int8), already holding these keys; its
      'index' is the number of filled positions.
    read_len: static; > 0 bounds the positions read to [0, read_len) (the caller guarantees the
      queries are inside); 0 = the whole cache. Either way only blocks with visible keys are read.
    interpret: run the kernel in Pallas interpret mode (any platform; tests).
  Returns:
    `[batch, Tq, heads, head_dim]` in q's dtype.
  """
  b, tq, h, dh = q.shape
  kv_heads, max_len = cache["k"].shape[1:3]
  keys = read_len or max_len
  group = h // kv_heads
  if not supports(tq, group, keys):
    raise ValueError(f"decode_attention: takes at most {_ROWS} query heads per kv head (got "
                     f"{group}), a read length of at least {BLOCK} (got {keys}) and no more "
                     f"queries than that (got {tq}); use ops.attention.cached_attention's XLA "
                     f"form.")
  scale = dh ** -0.5 if scale is None else scale
  index = jnp.broadcast_to(cache["index"].astype(jnp.int32), (1,))
  if tq > 1:
    return _piece_attention(q, cache, index, keys, window, scale, interpret)
  quantized = "k_scale" in cache
  splits = num_splits(b, kv_heads, keys)
  span_blocks = -(-(-(-keys // BLOCK)) // splits)      # ceil(ceil(keys / BLOCK) / splits)
  qg = q.reshape(b, kv_heads, group, dh)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, _ROWS - group), (0, 0)))
  cache_specs, cache_arrays = _cache_specs(cache, max_len, dh)
  in_specs = [pl.BlockSpec((1,), lambda i, j, s: (0,)),
              pl.BlockSpec((None, None, _ROWS, dh), lambda i, j, s: (i, j, 0, 0)), *cache_specs]
  args = [index, qg, *cache_arrays]
  part = lambda *tail: pl.BlockSpec((None, None, None, _ROWS, *tail),
                                    lambda i, j, s: (i, j, s, 0, *[0] * len(tail)))
  kernel = functools.partial(_token_kernel, keys=keys, span_blocks=span_blocks, window=window,
                             quantized=quantized, scale=scale)
  o, m, l = pl.pallas_call(
      kernel, grid=(b, kv_heads, splits), in_specs=in_specs,
      out_specs=[part(dh), part(), part()],
      out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, _ROWS, dh), _F32),
                 jax.ShapeDtypeStruct((b, kv_heads, splits, _ROWS), _F32),
                 jax.ShapeDtypeStruct((b, kv_heads, splits, _ROWS), _F32)],
      interpret=interpret, compiler_params=compiler_params(interpret, num_warps=4, num_stages=2),
      name="decode_attention")(*args)
  # Merge the splits: each partial output and sum rescaled to the overall max.
  top = jnp.max(m, axis=2, keepdims=True)
  weight = jnp.exp(m - top)
  out = jnp.sum(o * weight[..., None], axis=2) / jnp.sum(l * weight, axis=2)[..., None]
  return out[:, :, :group].reshape(b, 1, h, dh).astype(q.dtype)


def _piece_attention(q, cache, index, keys, window, scale, interpret):
  """`decode_attention` for Tq > 1 (a prefill piece continuing the cache): grid (batch, kv head,
  block of queries); each program's rows are `_PIECE_ROWS // group_pad` consecutive tokens with
  their group's heads, over the cache up to its newest token."""
  b, tq, h, dh = q.shape
  kv_heads, max_len = cache["k"].shape[1:3]
  group = h // kv_heads
  group_pad = 1 << (group - 1).bit_length()
  tokens = _PIECE_ROWS // group_pad
  q_blocks = -(-tq // tokens)
  qg = jnp.pad(q.reshape(b, tq, kv_heads, group, dh),
               ((0, 0), (0, q_blocks * tokens - tq), (0, 0), (0, group_pad - group), (0, 0)))
  qg = qg.transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, q_blocks * _PIECE_ROWS, dh)
  cache_specs, cache_arrays = _cache_specs(cache, max_len, dh)
  rows = pl.BlockSpec((None, None, _PIECE_ROWS, dh), lambda i, j, t: (i, j, t, 0))
  kernel = functools.partial(_piece_kernel, keys=keys, tq=tq, tokens=tokens, group_pad=group_pad,
                             window=window, scale=scale, quantized="k_scale" in cache)
  o = pl.pallas_call(
      kernel, grid=(b, kv_heads, q_blocks),
      in_specs=[pl.BlockSpec((1,), lambda i, j, t: (0,)), rows, *cache_specs], out_specs=rows,
      out_shape=jax.ShapeDtypeStruct(qg.shape, _F32), interpret=interpret,
      compiler_params=compiler_params(interpret, num_warps=4, num_stages=2),
      name="piece_attention")(index, qg, *cache_arrays)
  o = o.reshape(b, kv_heads, q_blocks * tokens, group_pad, dh)[:, :, :tq, :group]
  return o.transpose(0, 2, 1, 3, 4).reshape(b, tq, h, dh).astype(q.dtype)

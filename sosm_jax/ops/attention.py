"""Causal softmax attention: RoPE, grouped KV heads, sliding window, packed documents, KV cache.

Layout everywhere: `[batch, time, heads, head_dim]`. Query heads `H` are a multiple of key/value
heads `K` (grouped-query attention); query head `h` reads key/value head `h // (H // K)`.

Forms with one meaning:
- `attention_reference`: explicit softmax over an explicit boolean mask (float32). Ground truth.
- `causal_attention`: training / prefill self-attention, implementation picked per platform and
  length (`select_implementation`): cuDNN flash attention on GPU (packed documents through cuDNN's
  sequence-packing layout, `packed_segments`), Pallas splash attention on TPU (`splash_attention`;
  'splash_interpret' runs the same kernel in Pallas interpret mode on any backend, for tests),
  `jax.nn.dot_product_attention` on XLA, or the O(T)-memory
  `blockwise_attention.blockwise_attention`.
- `cached_attention` + `update_kv_cache`: queries at absolute positions `index .. index+T-1`
  against a fixed-size KV cache (decode; jit-able, static shapes), or its first `read_len`
  positions; on a GPU a one-token step reads the cache in place (`decode_attention`, Pallas).

Masks: token t sees token s when s <= t, (window > 0) t - s < window, and (segment ids given)
segment_ids[s] == segment_ids[t]. Padding (segment id 0) only sees other padding, so its rows stay
finite; the loss masks them out. cuDNN's packed path separates contiguous runs of equal id
(the same thing for packed rows, where each document and the padding are one run each).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sosm_jax.ops import decode_attention
from sosm_jax.ops.blockwise_attention import blockwise_attention

_F32 = jnp.float32
IMPLEMENTATIONS = ("xla", "cudnn", "splash", "splash_interpret", "blockwise", "reference")
# How `cached_attention` computes ('' = auto; `decode_implementation`).
DECODE_IMPLEMENTATIONS = ("", "xla", "pallas", "pallas_interpret")
# Splash attention works on blocks of whole 128-lane tiles; the sequence is padded to a block.
_TPU_LANES = 128
# Above this length the auto choice avoids XLA's T x T logits (blockwise, or cuDNN on GPU).
XLA_MAX_LEN = 2048
# cuDNN's packed layout takes a static number M of documents per row. Its backward workspace
# grows with M x T (measured on H100: 195 GiB at T = 65,536, M = 512), so M is T // 128 capped
# at 2**20 // T (about 6 GiB at 12 heads x 64).
_TOKENS_PER_PACKED_SEGMENT = 128
_PACKED_SEGMENTS_TIMES_LENGTH = 1 << 20


# --------------------------------------------------------------------------- RoPE


def rope_inverse_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
  """`[head_dim // 2]` float32 inverse frequencies base**(-2i/head_dim)."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; set an even attn_head_dim.")
  return base ** (-jnp.arange(0, head_dim, 2, dtype=_F32) / head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (rotate-half form), computed in float32.

  Args:
    x: `[batch, time, heads, head_dim]`.
    positions: `[batch, time]` int positions (restart at 0 in each packed document).
    base: RoPE base; larger bases suit longer contexts.
  Returns:
    `[batch, time, heads, head_dim]` in x's dtype.
  """
  inv = rope_inverse_frequencies(x.shape[-1], base)
  angles = positions.astype(_F32)[..., None] * inv                  # [B, T, D/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(_F32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# --------------------------------------------------------------------------- masks and reference


def attention_mask(q_index: jax.Array, k_index: jax.Array, *, window: int = 0,
                   q_segment_ids: jax.Array | None = None,
                   k_segment_ids: jax.Array | None = None,
                   k_valid: jax.Array | None = None) -> jax.Array:
  """Boolean mask `[batch, 1, Tq, Tk]` (True = may attend).

  Args:
    q_index: `[batch, Tq]` absolute index of each query in the stream.
    k_index: `[batch, Tk]` absolute index of each key.
    window: >0 keeps only keys with q_index - k_index < window.
    q_segment_ids, k_segment_ids: `[batch, Tq]`, `[batch, Tk]` or None.
    k_valid: `[batch, Tk]` bool or None (e.g. filled cache slots).
  """
  qi = q_index[:, :, None]
  ki = k_index[:, None, :]
  mask = ki <= qi
  if window > 0:
    mask &= (qi - ki) < window
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
  if k_valid is not None:
    mask &= k_valid[:, None, :]
  return mask[:, None]


def _check_qkv(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention: q, k, v must be [batch, time, heads, head_dim]; got "
                     f"{q.shape}, {k.shape}, {v.shape}.")
  if k.shape != v.shape:
    raise ValueError(f"attention: k shape {k.shape} must equal v shape {v.shape}.")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"attention: query heads {q.shape[2]} must be a multiple of key/value heads "
                     f"{k.shape[2]}; fix attn_num_heads / attn_num_kv_heads.")


def masked_attention_reference(q, k, v, mask, *, scale=None):
  """Explicit softmax attention in float32.

  Args:
    q: `[batch, Tq, heads, head_dim]`; k, v: `[batch, Tk, kv_heads, head_dim]`.
    mask: `[batch, 1, Tq, Tk]` bool.
    scale: logit scale, default head_dim**-0.5.
  Returns:
    `[batch, Tq, heads, head_dim]` in q's dtype.
  """
  _check_qkv(q, k, v)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  groups = q.shape[2] // k.shape[2]
  kf = jnp.repeat(k.astype(_F32), groups, axis=2)
  vf = jnp.repeat(v.astype(_F32), groups, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(_F32), kf,
                      precision=jax.lax.Precision.HIGHEST) * scale
  logits = jnp.where(mask, logits, -1e30)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, vf, precision=jax.lax.Precision.HIGHEST)
  return out.astype(q.dtype)


def attention_reference(q, k, v, *, segment_ids=None, window=0, scale=None):
  """Causal self-attention by explicit softmax (the test ground truth).

  q `[batch, time, heads, head_dim]`, k, v `[batch, time, kv_heads, head_dim]`,
  segment_ids `[batch, time]` or None. Returns `[batch, time, heads, head_dim]`.
  """
  b, t = q.shape[:2]
  idx = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = attention_mask(idx, idx, window=window, q_segment_ids=segment_ids,
                        k_segment_ids=segment_ids)
  return masked_attention_reference(q, k, v, mask, scale=scale)


# --------------------------------------------------------------------------- fast self-attention


def select_implementation(implementation: str | None, dtype, has_segments: bool,
                          seq_len: int = 0, window: int = 0) -> str:
  """Which backend `causal_attention` uses.

  '' / None (auto): Pallas splash attention on TPU; cuDNN flash attention on GPU for bf16/fp16
  inputs (packed documents through cuDNN's sequence-packing layout; a sliding window together with
  segment ids is not supported there); otherwise XLA up to XLA_MAX_LEN tokens and 'blockwise'
  (O(T) memory, any mask) beyond. The platform is `jax.default_backend()`: a program compiled
  ahead of time for another platform (a TPU topology from a CPU host) names its implementation
  (`sosm_jax.train.aot.model_config_for_platform` does). 'xla', 'cudnn', 'splash',
  'splash_interpret', 'blockwise' and 'reference' force that backend.
  """
  if implementation in (None, ""):
    if jax.default_backend() == "tpu":
      return "splash"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and half and not (has_segments and window > 0):
      return "cudnn"
    return "blockwise" if seq_len > XLA_MAX_LEN else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention: unknown implementation {implementation!r}; choose '' (auto) or "
                     f"one of {IMPLEMENTATIONS} (model config key attn_impl).")
  if implementation == "cudnn" and has_segments and window > 0:
    raise ValueError("attention: implementation 'cudnn' cannot combine segment_ids (packed "
                     "documents) with a sliding window; use attn_impl='' or 'blockwise'.")
  return implementation


def default_packed_segments(seq_len: int) -> int:
  """Documents per row that the cuDNN packed layout separates by default at this length."""
  by_length = max(1, seq_len // _TOKENS_PER_PACKED_SEGMENT)
  by_memory = max(1, _PACKED_SEGMENTS_TIMES_LENGTH // max(seq_len, 1))
  return int(min(seq_len, by_length, by_memory))


def packed_segments(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
  """cuDNN's packed layout for the runs of equal segment id in each row.

  Args:
    segment_ids: `[batch, time]` int; documents are contiguous runs (as the data packer makes
      them; padding is a run of its own).
    max_segments: static M. Runs after the M-th of a row are merged into the M-th, which then
      spans several documents (they attend to each other): pick M above the documents per row.
  Returns:
    (lengths `[batch, M]`, offsets `[batch, M + 1]`) int32: run lengths and run starts within
    the row, -1 where a row has fewer runs.
  """
  b, t = segment_ids.shape
  change = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                           axis=1)
  starts = jax.vmap(lambda c: jnp.nonzero(c, size=max_segments, fill_value=t)[0])(change)
  starts = starts.astype(jnp.int32)
  ends = jnp.concatenate([starts[:, 1:], jnp.full((b, 1), t, jnp.int32)], axis=1)
  present = starts < t
  lengths = jnp.where(present, ends - starts, -1)
  offsets = jnp.concatenate([jnp.where(present, starts, -1), jnp.full((b, 1), -1, jnp.int32)],
                            axis=1)
  return lengths, offsets


def _cudnn_attention(q, k, v, *, segment_ids, window, scale, max_segments):
  """cuDNN flash attention (causal; window or packed documents)."""
  local = (window - 1, 0) if window > 0 else None
  if segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        local_window_size=local, implementation="cudnn")
  # The packed (THD) layout is reachable only through jax's cuDNN module; jax.nn's wrapper
  # takes padding lengths but not per-document offsets.
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=import-outside-toplevel
  lengths, offsets = packed_segments(segment_ids, max_segments or default_packed_segments(
      q.shape[1]))
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return cudnn.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths,
                                     q_offsets=offsets, kv_offsets=offsets, scale=scale,
                                     mask_type=cudnn.MaskType.PADDING_CAUSAL)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def splash_attention(q, k, v, *, segment_ids=None, window=0, scale=None, block_size=512,
                     interpret=False):
  """Causal GQA self-attention through Pallas splash attention (the TPU flash kernel).

  Args:
    q: `[batch, time, heads, head_dim]`; k, v: `[batch, time, kv_heads, head_dim]`.
    segment_ids: `[batch, time]` int (packed documents) or None.
    window: >0 = sliding window of this many tokens (the token itself included).
    scale: logit scale, default head_dim**-0.5.
    block_size: query/key block of the kernels (a multiple of 128, lowered to the padded length
      for short sequences); the sequence is zero-padded at its end to a whole block (causality
      keeps real queries from seeing the padding) and the padding's outputs are dropped.
    interpret: run the kernels in Pallas interpret mode (any backend; for tests).
  Returns:
    `[batch, time, heads, head_dim]` in q's dtype.

  The kernel is built for the heads it is given: under `jax.shard_map` that is this device's
  share of heads, so call it on per-device shards (the attention layer does).
  """
  # Imported here: the TPU kernel package is only needed where this path runs.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel
  _check_qkv(q, k, v)
  b, t, h, d = q.shape
  if block_size % _TPU_LANES:
    raise ValueError(f"splash attention: block_size {block_size} must be a multiple of "
                     f"{_TPU_LANES}; set attn_block_size accordingly.")
  scale = d ** -0.5 if scale is None else scale
  block = min(block_size, _round_up(t, _TPU_LANES))
  padded = _round_up(t, block)
  pad = [(0, 0), (0, padded - t), (0, 0), (0, 0)]
  # [B, T, H, D] -> [B, H, T, D], padded in time; the kernel does not scale logits itself.
  to_heads = lambda x: jnp.swapaxes(jnp.pad(x, pad), 1, 2)
  qh = to_heads((q.astype(_F32) * scale).astype(q.dtype))
  kh, vh = to_heads(k), to_heads(v.astype(k.dtype))
  shape = (padded, padded)
  mask = (splash.LocalMask(shape, window_size=(window - 1, 0), offset=0) if window > 0
          else splash.CausalMask(shape))
  blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                             block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                             block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([mask] * h), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)
  if segment_ids is None:
    out = jax.vmap(kernel)(qh, kh, vh)
  else:
    ids = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, padded - t)])
    per_row = lambda qi, ki, vi, si: kernel(qi, ki, vi, segment_ids=splash.SegmentIds(si, si))
    out = jax.vmap(per_row)(qh, kh, vh, ids)
  return jnp.swapaxes(out, 1, 2)[:, :t].astype(q.dtype)


def causal_attention(q, k, v, *, segment_ids=None, window=0, scale=None, implementation=None,
                     block_size=512, max_segments=0):
  """Causal self-attention (training, prefill).

  Args:
    q: `[batch, time, heads, head_dim]`; k, v: `[batch, time, kv_heads, head_dim]`.
    segment_ids: `[batch, time]` int (packed documents; 0 = padding) or None.
    window: >0 = sliding window of this many tokens (the token itself included).
    scale: logit scale, default head_dim**-0.5.
    implementation: None/'' (auto, see `select_implementation`), 'xla', 'cudnn', 'splash',
      'splash_interpret', 'blockwise', 'reference'.
    block_size: block length of the 'blockwise' and 'splash' implementations.
    max_segments: documents per row that 'cudnn' separates (0: `default_packed_segments`).
  Returns:
    `[batch, time, heads, head_dim]` in q's dtype.
  """
  _check_qkv(q, k, v)
  impl = select_implementation(implementation, q.dtype, segment_ids is not None, q.shape[1],
                               window)
  if impl == "reference":
    return attention_reference(q, k, v, segment_ids=segment_ids, window=window, scale=scale)
  if impl == "blockwise":
    return blockwise_attention(q, k, v, segment_ids=segment_ids, window=window, scale=scale,
                               block_size=block_size)
  if impl in ("splash", "splash_interpret"):
    return splash_attention(q, k, v, segment_ids=segment_ids, window=window, scale=scale,
                            block_size=_round_up(block_size, _TPU_LANES),
                            interpret=impl == "splash_interpret")
  if impl == "cudnn":
    return _cudnn_attention(q, k, v, segment_ids=segment_ids, window=window, scale=scale,
                            max_segments=max_segments)
  # jax's local_window_size=(left, right) counts neighbours excluding the token itself.
  local = (window - 1, 0) if window > 0 else None
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                      local_window_size=local, implementation="xla")


# --------------------------------------------------------------------------- KV cache


# '' = the activations' dtype; 'int8' = one byte per element plus a float32 scale per token and
# head (symmetric, absmax): half of a bf16 cache's bytes (the term that grows with context in
# decoding).
KV_CACHE_DTYPES = ("", "int8")
_INT8_MAX = 127.0


def init_kv_cache(batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                  dtype=jnp.float32, *, quantized: bool = False) -> dict:
  """Empty cache: {'k','v': `[batch, kv_heads, max_len, head_dim]`, 'index': int32 scalar}.

  Heads before positions: the decode products (`cached_attention`) batch over (batch, kv head)
  and read each head's keys as one `[positions, head_dim]` matrix, so XLA needs no transpose of
  the cache. With positions before heads XLA:GPU transposed every slot's whole cache into and out
  of the engine's decode loop (its vmap over slots; benchmarks/RESULTS.md, "Serving").
  quantized: 'k', 'v' in int8 and 'k_scale', 'v_scale' `[batch, kv_heads, max_len, 1]` float32
  (`quantize_kv`); `update_kv_cache` and `cached_attention` read the layout from the keys.
  """
  shape = (batch_size, num_kv_heads, max_len, head_dim)
  if not quantized:
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "index": jnp.zeros((), jnp.int32)}
  scales = jnp.ones(shape[:-1] + (1,), _F32)
  return {"k": jnp.zeros(shape, jnp.int8), "v": jnp.zeros(shape, jnp.int8),
          "k_scale": scales, "v_scale": scales, "index": jnp.zeros((), jnp.int32)}


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x `[..., head_dim]` -> (int8 values, float32 scale `[..., 1]`), x ~ values * scale.

  Symmetric per vector (one token of one head): scale = max|x| / 127, so each element is off by
  at most scale / 2; an all-zero vector gets scale 1.
  """
  x = x.astype(_F32)
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  scale = jnp.where(amax > 0, amax / _INT8_MAX, 1.0)
  return jnp.clip(jnp.round(x / scale), -_INT8_MAX, _INT8_MAX).astype(jnp.int8), scale


def update_kv_cache(cache: dict, k: jax.Array, v: jax.Array) -> dict:
  """Writes k, v `[batch, T, kv_heads, head_dim]` at slots index..index+T-1; advances index.

  An int8 cache (`init_kv_cache(quantized=True)`) stores `quantize_kv` of each. Writing past
  max_len is clamped by `dynamic_update_slice` (callers size the cache).
  """
  i = cache["index"]
  zero = jnp.zeros((), jnp.int32)

  def write(name, x):   # x `[batch, T, kv_heads, d]` into the cache's `[batch, kv_heads, L, d]`
    x = jnp.swapaxes(x, 1, 2).astype(cache[name].dtype)
    return jax.lax.dynamic_update_slice(cache[name], x, (zero, zero, i, zero))

  if "k_scale" not in cache:
    return {"k": write("k", k), "v": write("v", v), "index": i + k.shape[1]}
  (k8, k_scale), (v8, v_scale) = quantize_kv(k), quantize_kv(v)
  return {"k": write("k", k8), "v": write("v", v8), "k_scale": write("k_scale", k_scale),
          "v_scale": write("v_scale", v_scale), "index": i + k.shape[1]}


def decode_implementation(implementation: str, q_shape, cache: dict, read_len: int) -> str:
  """'xla' | 'pallas' | 'pallas_interpret': how `cached_attention` computes this call.

  '' (auto) is 'pallas' on a GPU (one-token steps and prefill pieces that continue a cache) and
  'xla' elsewhere. A call the kernels do not take (`decode_attention.supports`, e.g. a cache
  shorter than one block) uses 'xla' under any choice.
  """
  if implementation not in DECODE_IMPLEMENTATIONS:
    raise ValueError(f"cached_attention: unknown implementation {implementation!r}; choose one "
                     f"of {DECODE_IMPLEMENTATIONS} (config key model.attn_decode_impl).")
  on_gpu = jax.default_backend() == "gpu"
  if implementation == "pallas" and not on_gpu:
    raise ValueError("cached_attention: implementation 'pallas' compiles a Triton kernel, which "
                     f"needs a GPU; the backend is {jax.default_backend()!r}. Use '' or 'xla' "
                     "(or 'pallas_interpret' to run the kernel in interpret mode).")
  _, tq, h, _ = q_shape
  kv_heads, max_len = cache["k"].shape[1:3]
  if not decode_attention.supports(tq, h // kv_heads, read_len or max_len):
    return "xla"
  if implementation == "":
    return "pallas" if on_gpu else "xla"
  return implementation


def cached_attention(q, cache, *, window=0, scale=None, read_len=0, implementation=""):
  """Queries at absolute indices cache['index'] - Tq .. cache['index'] - 1 over the cache.

  Call after `update_kv_cache` has written this step's keys. 'xla': two products batched over
  (batch, kv head) with an explicit mask, float32 scores and softmax; 'pallas': the cache read
  in place by `decode_attention` (no copy of the read part, only blocks with visible keys);
  `decode_implementation` picks.

  Args:
    q: `[batch, Tq, heads, head_dim]`.
    cache: as `init_kv_cache`, already holding this step's keys.
    read_len: static int; > 0 reads only cache positions [0, read_len) (a static slice: a
      decode step then costs what that many keys cost, not the whole cache's max_len). The
      caller guarantees that every query's index is < read_len (keys beyond it would be
      silently left out); 0 = the whole cache.
    implementation: '' (auto) | 'xla' | 'pallas' | 'pallas_interpret' (config key
      model.attn_decode_impl).
  Returns:
    `[batch, Tq, heads, head_dim]` in q's dtype.
  """
  b, tq, h, dh = q.shape
  kv_heads, max_len = cache["k"].shape[1:3]
  if not 0 <= read_len <= max_len:
    raise ValueError(f"cached_attention: read_len {read_len} must be in [0, max_len {max_len}] "
                     f"(0 = the whole cache); see model.attn_decode_read_len.")
  impl = decode_implementation(implementation, q.shape, cache, read_len)
  if impl != "xla":
    return decode_attention.decode_attention(q, cache, window=window, scale=scale,
                                             read_len=read_len,
                                             interpret=impl == "pallas_interpret")
  if read_len:
    cache = {name: x[:, :, :read_len] if name != "index" else x for name, x in cache.items()}
  keys = read_len or max_len
  q_index = cache["index"] - tq + jnp.broadcast_to(jnp.arange(tq), (b, tq))
  k_index = jnp.broadcast_to(jnp.arange(keys), (b, keys))
  mask = attention_mask(q_index, k_index, window=window)   # [b, 1, tq, keys]
  qg = q.reshape(b, tq, kv_heads, h // kv_heads, dh)
  scores = jnp.einsum("bqkgd,bktd->bkgqt", qg, cache["k"].astype(q.dtype),
                      preferred_element_type=_F32) * (dh ** -0.5 if scale is None else scale)
  # An int8 cache: a key's scale multiplies its scores and a value's scale its probabilities,
  # the same sums as over values * scale without a dequantized copy of the cache.
  per_key = lambda s: s[:, :, None, None, :, 0]   # [b, kv, L, 1] -> [b, kv, 1, 1, L]
  if "k_scale" in cache:
    scores = scores * per_key(cache["k_scale"])
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(_F32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if "v_scale" in cache:
    probs = probs * per_key(cache["v_scale"])
  o = jnp.einsum("bkgqt,bktd->bqkgd", probs.astype(q.dtype), cache["v"].astype(q.dtype),
                 preferred_element_type=_F32)
  return o.reshape(b, tq, h, dh).astype(q.dtype)

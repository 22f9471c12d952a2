"""Tests for sosm_jax/ops/attention.py: fast paths against the explicit-softmax reference."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sosm_jax.ops import attention as att
from sosm_jax.ops.blockwise_attention import blockwise_attention

B, T, H, KV, D = 2, 24, 4, 2, 8


def _qkv(seed=0, t=T):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (B, t, H, D))
  k = jax.random.normal(ks[1], (B, t, KV, D))
  v = jax.random.normal(ks[2], (B, t, KV, D))
  return q, k, v


def _segments():
  # row 0: three documents; row 1: one document then padding (id 0)
  s0 = [1] * 7 + [2] * 10 + [3] * 7
  s1 = [1] * 18 + [0] * 6
  return jnp.array([s0, s1], jnp.int32)


def _naive(q, k, v, segment_ids=None, window=0):
  """Loop-over-everything numpy attention, independent of the library's mask helper."""
  q, k, v = map(np.asarray, (q, k, v))
  out = np.zeros_like(q)
  g = q.shape[2] // k.shape[2]
  for b in range(q.shape[0]):
    for t in range(q.shape[1]):
      for h in range(q.shape[2]):
        keep = [s for s in range(t + 1)
                if (window == 0 or t - s < window)
                and (segment_ids is None or segment_ids[b, s] == segment_ids[b, t])]
        logits = np.array([q[b, t, h] @ k[b, s, h // g] for s in keep]) / np.sqrt(q.shape[-1])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        out[b, t, h] = sum(wi * v[b, s, h // g] for wi, s in zip(w, keep))
  return out


@pytest.mark.parametrize("window,use_seg", [(0, False), (5, False), (0, True), (6, True)])
def test_reference_matches_naive(window, use_seg):
  q, k, v = _qkv()
  seg = _segments() if use_seg else None
  ref = jax.jit(att.attention_reference, static_argnames="window")(
      q, k, v, segment_ids=seg, window=window)
  np.testing.assert_allclose(ref, _naive(q, k, v, None if seg is None else np.asarray(seg), window),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,window,use_seg", [("xla", 0, False), ("xla", 6, True),
                                                   ("blockwise", 0, True), ("blockwise", 5, False)])
def test_fast_paths_match_reference_forward_and_grad(impl, window, use_seg):
  """XLA (explicit mask) and blockwise (custom VJP, 8-token blocks) against the explicit
  softmax, forward and gradients."""
  t = 27 if impl == "blockwise" else T      # 27: the blockwise path pads to 32 inside
  q, k, v = _qkv(1, t)
  seg = _segments()[:, :t] if t <= T else jnp.concatenate(
      [_segments(), jnp.array([[3] * 3, [0] * 3])], 1)
  seg = seg if use_seg else None
  w = jnp.cos(jnp.arange(B * t * H * D, dtype=jnp.float32)).reshape(B, t, H, D)
  fast = lambda q, k, v: att.causal_attention(q, k, v, segment_ids=seg, window=window,
                                              implementation=impl, block_size=8)
  ref = lambda q, k, v: att.attention_reference(q, k, v, segment_ids=seg, window=window)
  np.testing.assert_allclose(jax.jit(fast)(q, k, v), jax.jit(ref)(q, k, v), rtol=1e-5, atol=1e-5)
  grads = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(grads(fast), grads(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_auto_implementation_on_cpu():
  assert att.select_implementation(None, jnp.bfloat16, False, 1024) == "xla"
  assert att.select_implementation(None, jnp.bfloat16, True, 8192) == "blockwise"
  with pytest.raises(ValueError, match="sliding window"):
    att.select_implementation("cudnn", jnp.bfloat16, True, 1024, 16)
  with pytest.raises(ValueError, match="attn_impl"):
    att.select_implementation("flash", jnp.float32, False)


def _runs_by_loop(ids, max_segments):
  """Plain-Python run description: (lengths, offsets) rows, the tail merged into run M."""
  lengths, offsets = [], []
  for row in ids:
    starts = [t for t in range(len(row)) if t == 0 or row[t] != row[t - 1]][:max_segments]
    ends = starts[1:] + [len(row)]
    pad = max_segments - len(starts)
    lengths.append([e - s for s, e in zip(starts, ends)] + [-1] * pad)
    offsets.append(starts + [-1] * (pad + 1))
  return np.array(lengths), np.array(offsets)


@pytest.mark.parametrize("max_segments", [2, 4, 9])
def test_packed_segments_match_a_loop(max_segments):
  rng = np.random.default_rng(max_segments)
  # rows of 1..6 documents with random lengths, then padding (id 0)
  rows = []
  for _ in range(3):
    lens = rng.integers(1, 6, size=rng.integers(1, 7))
    row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])[:24]
    rows.append(np.concatenate([row, np.zeros(24 - len(row), int)]))
  ids = np.stack(rows)
  lengths, offsets = jax.jit(att.packed_segments, static_argnums=1)(jnp.asarray(ids),
                                                                     max_segments)
  want_lengths, want_offsets = _runs_by_loop(ids, max_segments)
  np.testing.assert_array_equal(lengths, want_lengths)
  np.testing.assert_array_equal(offsets, want_offsets)
  # every token is covered exactly once by the described runs
  assert (np.where(want_lengths > 0, want_lengths, 0).sum(axis=1) == 24).all()


def test_default_packed_segments_bounds():
  assert att.default_packed_segments(4) == 1
  assert att.default_packed_segments(4096) == 32
  assert att.default_packed_segments(16384) == 64
  assert att.default_packed_segments(65536) == 16
  assert att.default_packed_segments(1 << 22) == 1


@pytest.mark.parametrize("window", [0, 5])
def test_kv_cache_decode_matches_full(window):
  q, k, v = _qkv(2)
  full = jax.jit(att.attention_reference, static_argnames="window")(q, k, v, window=window)

  @jax.jit
  def step(q1, k1, v1, c):
    c = att.update_kv_cache(c, k1, v1)
    return att.cached_attention(q1, c, window=window), c

  # 10 tokens through the cache at once, then one token at a time
  o, cache = step(q[:, :10], k[:, :10], v[:, :10], att.init_kv_cache(B, T + 4, KV, D))
  outs = [o]
  for t in range(10, T):
    o, cache = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache)
    outs.append(o)
  assert int(cache["index"]) == T
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_quantize_kv_is_within_half_a_step_of_the_input():
  from sosm_jax.models.config import KV_CACHE_DTYPES  # pylint: disable=import-outside-toplevel
  assert KV_CACHE_DTYPES == att.KV_CACHE_DTYPES    # what config.model.attn_kv_cache_dtype accepts
  x = jax.random.normal(jax.random.PRNGKey(5), (3, 7, 2, D)) * jnp.array([1e-3, 1.0, 50.0])[:, None,
                                                                                            None, None]
  x = x.at[0, 0, 0].set(0.0)                                 # an all-zero vector: scale 1, zeros
  values, scale = att.quantize_kv(x)
  assert values.dtype == jnp.int8 and scale.shape == x.shape[:-1] + (1,)
  assert int(jnp.max(jnp.abs(values.astype(jnp.int32)))) == 127   # each vector's absmax maps to 127
  np.testing.assert_array_equal(values[0, 0, 0], 0)
  err = jnp.abs(values.astype(jnp.float32) * scale - x)
  assert bool(jnp.all(err <= scale / 2 * (1 + 1e-6)))


@pytest.mark.parametrize("window", [0, 5])
def test_int8_kv_cache_is_attention_over_its_dequantized_values(window):
  """Prefill of 10 tokens, then one at a time, through an int8 cache: exactly the attention over
  the dequantized keys/values, and within quantization error of the float cache."""
  q, k, v = _qkv(4)
  k = k * jnp.linspace(0.1, 3.0, T)[None, :, None, None]     # scales that differ per token

  @jax.jit
  def step(q1, k1, v1, c):
    c = att.update_kv_cache(c, k1, v1)
    return att.cached_attention(q1, c, window=window), c

  cache = att.init_kv_cache(B, T + 4, KV, D, quantized=True)
  assert cache["k"].dtype == jnp.int8 and cache["v_scale"].shape == (B, KV, T + 4, 1)
  o, cache = step(q[:, :10], k[:, :10], v[:, :10], cache)
  outs = [o]
  for t in range(10, T):
    o, cache = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache)
    outs.append(o)
  got = jnp.concatenate(outs, 1)
  dequantized = lambda x: (lambda vals, s: vals.astype(jnp.float32) * s)(*att.quantize_kv(x))
  exact = att.attention_reference(q, dequantized(k), dequantized(v), window=window)
  np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)
  float_cache = att.attention_reference(q, k, v, window=window)
  err = float(jnp.max(jnp.abs(got - float_cache)))
  assert 0 < err < 0.05, err      # int8: ~1% of a value's range per element


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("window", [0, 5])
def test_cached_attention_over_a_read_len_prefix_is_the_whole_caches(quantized, window):
  """Queries at indices 10..12 of a 40-position cache whose every position holds random values:
  reading the first 13 or 16 positions is the whole cache's result (the positions beyond are
  masked); reading 12 drops a key the last query sees, so it differs."""
  _, k, v = _qkv(6, t=40)
  q = jax.random.normal(jax.random.PRNGKey(7), (B, 3, H, D))
  cache = att.init_kv_cache(B, 40, KV, D, quantized=quantized)
  cache = att.update_kv_cache(cache, k, v)
  cache["index"] = jnp.asarray(13, jnp.int32)
  attend = jax.jit(att.cached_attention, static_argnames=("window", "read_len"))
  whole = attend(q, cache, window=window)
  for read_len in (13, 16, 40):
    np.testing.assert_allclose(attend(q, cache, window=window, read_len=read_len), whole,
                               rtol=1e-6, atol=1e-6)
  short = attend(q, cache, window=window, read_len=12)
  assert float(jnp.max(jnp.abs(short[:, -1] - whole[:, -1]))) > 1e-3
  np.testing.assert_allclose(short[:, :-1], whole[:, :-1], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="read_len"):
    att.cached_attention(q, cache, read_len=41)


def test_rope_relative_and_restarts():
  """RoPE dot products depend only on position differences; positions restart per document."""
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 2, 1, D))
  def dot(pq, pk):
    pos = jnp.array([[pq, pk]])
    r = att.apply_rope(x, pos)
    return float(jnp.sum(r[0, 0] * r[0, 1]))
  np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-4)
  assert abs(dot(5, 2) - dot(5, 4)) > 1e-3
  # norm preserved
  r = att.apply_rope(x, jnp.array([[7, 100]]))
  np.testing.assert_allclose(jnp.linalg.norm(r, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  with pytest.raises(ValueError, match="even"):
    att.apply_rope(jnp.zeros((1, 1, 1, 3)), jnp.zeros((1, 1), jnp.int32))


# --------------------------------------------------------------------------- splash (TPU kernel)


def _splash_case(t, seed):
  """q, k, v `[2, t, 4|2, 64]` and three documents in row 0, one document then padding in row 1."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (B, t, H, 64))
  k = jax.random.normal(ks[1], (B, t, KV, 64))
  v = jax.random.normal(ks[2], (B, t, KV, 64))
  cuts = np.sort(np.asarray(jax.random.choice(ks[3], t, (2,), replace=False)))
  row0 = np.searchsorted(cuts, np.arange(t), side="right") + 1
  row1 = np.where(np.arange(t) < t - 37, 1, 0)
  return q, k, v, jnp.asarray(np.stack([row0, row1]), jnp.int32)


@pytest.mark.parametrize("window,use_seg", [(0, False), (100, True)])
def test_splash_interpret_matches_reference_forward_and_grad(window, use_seg):
  """Pallas splash attention (the TPU kernel, run in interpret mode on the CPU): causal GQA,
  sliding window and packed documents against the explicit softmax, values and gradients.
  t = 200 with 128-token blocks: two blocks after padding to 256, so the kernels skip, fully
  compute and partially mask blocks, and the padded tail is dropped."""
  q, k, v, seg = _splash_case(200, 3 + window)
  seg = seg if use_seg else None
  w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
  splash = lambda q, k, v: att.causal_attention(q, k, v, segment_ids=seg, window=window,
                                                implementation="splash_interpret", block_size=128)
  ref = lambda q, k, v: att.attention_reference(q, k, v, segment_ids=seg, window=window)
  np.testing.assert_allclose(jax.jit(splash)(q, k, v), jax.jit(ref)(q, k, v), rtol=2e-5, atol=2e-5)
  grads = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(grads(splash), grads(ref)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)


def test_splash_is_the_tpu_choice_and_checks_its_block():
  from sosm_jax.models.config import ATTENTION_IMPLEMENTATIONS  # pylint: disable=import-outside-toplevel
  assert ATTENTION_IMPLEMENTATIONS == att.IMPLEMENTATIONS  # what config.model.attn_impl accepts
  assert "splash" in att.IMPLEMENTATIONS and "splash_interpret" in att.IMPLEMENTATIONS
  assert att.select_implementation("splash", jnp.bfloat16, True, 8192, 64) == "splash"
  with pytest.raises(ValueError, match="multiple of 128"):
    att.splash_attention(*_splash_case(128, 0)[:3], block_size=96)


def test_splash_layer_runs_per_device_shards_on_a_mesh():
  """The attention layer with the splash kernel on a data x fsdp x tensor mesh of 8 CPU devices
  (interpret mode) equals the XLA path, and the compiled program gathers no activations: each
  device runs the kernel on its own batch rows and heads (jax.shard_map)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from sosm_jax.layers.attention import Attention  # pylint: disable=import-outside-toplevel
  from sosm_jax.models.config import default_model_config, freeze  # pylint: disable=import-outside-toplevel
  from sosm_jax.parallel import LOGICAL_AXIS_RULES, make_mesh  # pylint: disable=import-outside-toplevel

  def cfg(impl):
    c = default_model_config()
    c.update(d_model=64, hgrn2_head_dim=16, attn_num_heads=4, attn_num_kv_heads=2, attn_head_dim=64,
             dtype="float32",
             attn_impl=impl, attn_block_size=128)
    return freeze(c)

  t = 128
  x = jax.random.normal(jax.random.PRNGKey(0), (4, t, 64))
  pos = jnp.broadcast_to(jnp.arange(t), (4, t))
  seg = jnp.asarray(np.repeat([[1, 2]], 4, 0).repeat(t // 2, 1), jnp.int32)
  params = jax.jit(Attention(cfg("xla")).init)(jax.random.PRNGKey(1), x, positions=pos,
                                               segment_ids=seg)
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  outs, hlo = {}, ""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    for impl in ("xla", "splash_interpret"):
      fn = jax.jit(lambda p, x: Attention(cfg(impl)).apply(p, x, positions=pos, segment_ids=seg)[0])
      outs[impl] = fn(params, x)
      if impl != "xla":
        hlo = fn.lower(params, x).compile().as_text()
  np.testing.assert_allclose(outs["splash_interpret"], outs["xla"], rtol=2e-5, atol=2e-5)
  # Only the fsdp-sharded weights are gathered; nothing with a time axis (t = 128) moves.
  moved = [line for line in hlo.splitlines()
           if any(f" {op}(" in line for op in ("all-gather", "all-to-all", "collective-permute"))]
  assert moved and not [line for line in moved if re.search(rf"\[[^\]]*\b{t}\b", line.split("=")[1])]

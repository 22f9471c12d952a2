"""The decode-attention Pallas kernel (interpret mode) against cached_attention's XLA form."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sosm_jax.ops import attention as att
from sosm_jax.ops import decode_attention as da

H, KV, D = 6, 2, 16


def _filled_cache(seed, batch, max_len, index, quantized, tq=1):
  """A cache whose every position holds random keys/values (beyond index too: must be masked),
  keys scaled per position so the softmax is far from uniform; tq queries."""
  kk, kv, kq = jax.random.split(jax.random.PRNGKey(seed), 3)
  spread = jnp.linspace(0.2, 3.0, max_len)[:, None, None]
  k = jax.random.normal(kk, (batch, max_len, KV, D)) * spread
  v = jax.random.normal(kv, (batch, max_len, KV, D))
  cache = att.update_kv_cache(att.init_kv_cache(batch, max_len, KV, D, quantized=quantized), k, v)
  cache["index"] = jnp.asarray(index, jnp.int32)
  return jax.random.normal(kq, (batch, tq, H, D)), cache


@functools.lru_cache(maxsize=None)
def _attend(impl, window=0, read_len=0):
  """cached_attention jitted once per choice (the fill level is a traced value)."""
  return jax.jit(lambda q, c: att.cached_attention(q, c, implementation=impl, window=window,
                                                   read_len=read_len))


# 1,000 positions: the last block overlaps the one before it
@pytest.mark.parametrize("max_len,quantized,window", [(1024, False, 0), (1000, False, 200),
                                                      (1024, True, 200), (1000, True, 0)])
def test_kernel_equals_the_xla_form(max_len, quantized, window):
  """One token at several fill levels (first key only, inside the first block, across blocks and
  splits, the last position), the whole cache and a read_len prefix, float and int8 caches."""
  for index in (1, 77, 600, 900, max_len):
    q, cache = _filled_cache(index, 2, max_len, index, quantized)
    for read_len in (0, 700) if index <= 700 else (0,):
      want = _attend("xla", window=window, read_len=read_len)(q, cache)
      got = _attend("pallas_interpret", window=window, read_len=read_len)(q, cache)
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("window", [0, 100])
def test_prefill_piece_kernel_equals_the_xla_form(quantized, window):
  """Pieces of 2, 37 and 300 tokens continuing a cache (ending at its first block, across
  blocks, at its ragged end), with and without a read_len bound."""
  for tq, index, read_len in ((2, 128, 0), (37, 700, 0), (300, 1000, 0), (37, 500, 640)):
    q, cache = _filled_cache(tq + index, 2, 1000, index, quantized, tq=tq)
    want = _attend("xla", window=window, read_len=read_len)(q, cache)
    got = _attend("pallas_interpret", window=window, read_len=read_len)(q, cache)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_kernel_under_vmap_over_slots_with_their_own_fill():
  """The engine's form: a vmap over slots of a one-slot step, each slot's cache at its own index."""
  qs, caches = zip(*[_filled_cache(s, 1, 512, i, False) for s, i in enumerate((3, 130, 512))])
  q = jnp.stack(qs)
  cache = jax.tree.map(lambda *x: jnp.stack(x), *caches)
  want = jax.vmap(_attend("xla"))(q, cache)
  got = jax.vmap(_attend("pallas_interpret"))(q, cache)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert float(jnp.max(jnp.abs(got[0] - got[1]))) > 1e-2    # the slots differ


def test_splits_fill_the_gpu_and_keep_whole_spans():
  assert da.num_splits(1, 4, 131072) == 64          # 256 programs of 2,048 keys
  assert da.num_splits(64, 4, 2048) == 1             # 256 programs already
  assert da.num_splits(1, 4, 1024) == 2              # no split below 512 keys
  assert da.num_splits(1, 4, 131104) == 64          # 1,025 blocks: the last split one block less
  assert da.num_splits(1, 4, 384) == 1               # spans of 1 block are too short
  assert da.supports(1, 3, 1000) and da.supports(512, 3, 1024) and not da.supports(2000, 3, 1024)
  assert not da.supports(1, 3, 100) and not da.supports(1, 32, 1024)


def test_calls_the_kernel_does_not_take_use_the_xla_form_and_bad_names_are_refused():
  q, cache = _filled_cache(0, 1, 1000, 40, False)
  assert att.decode_implementation("pallas_interpret", q.shape, cache, 100) == "xla"  # < a block
  assert att.decode_implementation("pallas_interpret", q.shape, cache, 896) == "pallas_interpret"
  assert att.decode_implementation("pallas_interpret", (1, 4, H, D), cache, 896) == (
      "pallas_interpret")
  assert att.decode_implementation("", q.shape, cache, 896) == (
      "pallas" if jax.default_backend() == "gpu" else "xla")
  assert att.decode_implementation("", (1, 4, H, D), cache, 896) == "xla"   # pieces: by name
  with pytest.raises(ValueError, match="attn_decode_impl"):
    att.cached_attention(q, cache, implementation="triton")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a GPU"):
      att.cached_attention(q, cache, read_len=896, implementation="pallas")


def test_the_model_config_key_takes_the_implementations_and_names_itself():
  from sosm_jax import models  # pylint: disable=import-outside-toplevel
  from sosm_jax.models import config  # pylint: disable=import-outside-toplevel
  assert config.DECODE_IMPLEMENTATIONS == att.DECODE_IMPLEMENTATIONS
  cfg = config.default_model_config("hybrid")
  cfg.attn_decode_impl = "cuda"
  with pytest.raises(ValueError, match="attn_decode_impl"):
    models.build_model(cfg)

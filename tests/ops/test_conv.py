"""Tests of sosm_jax/ops/conv.py: causal depthwise conv, its decode step and cache continuation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sosm_jax.ops import conv

B, T, C, W = 2, 11, 6, 4


def _data(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return f(B, T, C), f(W, C), f(C), f(B, W - 1, C)


def _numpy_conv(x, w, b, cache):
  """Direct definition: y_t = b + sum_j w[j] * x_{t-(W-1)+j}, history from cache."""
  xp = np.concatenate([np.asarray(cache), np.asarray(x)], axis=1)
  y = np.zeros(x.shape, np.float64) + np.asarray(b)
  for t in range(x.shape[1]):
    for j in range(W):
      y[:, t] += np.asarray(w)[j] * xp[:, t + j]
  return y


def test_full_matches_definition_and_returns_last_inputs():
  x, w, b, cache = _data()
  y, new_cache = conv.causal_conv1d(x, w, b, cache=cache)
  np.testing.assert_allclose(y, _numpy_conv(x, w, b, cache), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(new_cache, x[:, -(W - 1):])
  # no cache means zeros before the start: the first output sees only x_0
  y0, _ = conv.causal_conv1d(x, w)
  np.testing.assert_allclose(y0[:, 0], x[:, 0] * w[-1], rtol=1e-6)


def test_step_by_step_equals_full():
  x, w, b, cache = _data(1)
  y_full, cache_full = conv.causal_conv1d(x, w, b, cache=cache)
  step = jax.jit(conv.causal_conv1d_step)
  ys, c = [], cache
  for t in range(T):
    y_t, c = step(x[:, t], w, b, c)
    ys.append(y_t)
  np.testing.assert_allclose(jnp.stack(ys, axis=1), y_full, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(c, cache_full)


@pytest.mark.parametrize("cut", [2, 5])  # a piece shorter than W-1 and a longer one
def test_cache_continuation(cut):
  x, w, b, _ = _data(2)
  y_full, cache_full = conv.causal_conv1d(x, w, b)
  y1, c1 = conv.causal_conv1d(x[:, :cut], w, b)
  y2, c2 = conv.causal_conv1d(x[:, cut:], w, b, cache=c1)
  np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y_full, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(c2, cache_full)


def test_bf16_keeps_dtypes_and_causality():
  x, w, b, _ = _data(3)
  y, c = conv.causal_conv1d(x.astype(jnp.bfloat16), w, b)
  assert y.dtype == jnp.bfloat16 and c.dtype == jnp.bfloat16
  # a change at time 6 leaves earlier outputs unchanged
  y_changed, _ = conv.causal_conv1d(x.at[:, 6].add(10.0), w, b)
  y_ref, _ = conv.causal_conv1d(x, w, b)
  np.testing.assert_array_equal(y_changed[:, :6], y_ref[:, :6])
  assert not np.allclose(y_changed[:, 6], y_ref[:, 6])


def test_bad_shapes_raise_value_error():
  x, w, b, cache = _data()
  with pytest.raises(ValueError, match="weight"):
    conv.causal_conv1d(x, w[:, :3], b)
  with pytest.raises(ValueError, match="cache"):
    conv.causal_conv1d(x, w, b, cache=cache[:, :2])
  with pytest.raises(ValueError, match="causal_conv1d_step"):
    conv.causal_conv1d(x[:, 0], w, b)


def test_positions_keep_packed_documents_apart():
  """With positions restarting at each document, the conv equals running each document alone."""
  x, w, b, _ = _data(3)
  cuts = [0, 3, 4, 9, T]  # documents of 3, 1, 5 and 2 tokens in each row
  positions = np.concatenate([np.arange(e - s) for s, e in zip(cuts, cuts[1:])])
  positions = jnp.asarray(np.broadcast_to(positions, (B, T)), jnp.int32)
  y, _ = conv.causal_conv1d(x, w, b, positions=positions)
  for s, e in zip(cuts, cuts[1:]):
    alone, _ = conv.causal_conv1d(x[:, s:e], w, b)
    np.testing.assert_allclose(y[:, s:e], alone, rtol=1e-5, atol=1e-6)
  # Without positions the second document does see the first one.
  y_leaky, _ = conv.causal_conv1d(x, w, b)
  assert not np.allclose(y_leaky[:, 3], y[:, 3])

"""Tests for sparse graph attention (sosm_jax/ops/graph_attention.py) against a dense reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sosm_jax.ops import graph_attention as ga

B, T, H, HK, D, K, W, M = 2, 21, 4, 2, 4, 3, 4, 2


def _edges(rng):
  """Distinct earlier edges j <= t - W, some masked off."""
  idx = np.zeros((B, T, K), np.int32)
  mask = np.zeros((B, T, K), bool)
  for b in range(B):
    for t in range(T):
      c = np.arange(0, max(t - W + 1, 0))
      sel = rng.choice(c, size=min(K, len(c)), replace=False) if len(c) else []
      idx[b, t, :len(sel)] = sel
      mask[b, t, :len(sel)] = rng.random(len(sel)) < 0.8
  return jnp.asarray(idx), jnp.asarray(mask)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  idx, mask = _edges(rng)
  seg = np.ones((B, T), np.int32)
  seg[1, 12:] = 2
  return dict(q=r(B, T, H, D), k=r(B, T, HK, D), v=r(B, T, HK, D), idx=idx, mask=mask,
              bias=r(B, T, H, K), mk=r(B, T, M, H, D), mv=r(B, T, M, H, D),
              mm=jnp.asarray(rng.random((B, T, M)) < 0.5), mb=r(H), seg=jnp.asarray(seg))


def _call(fn, x, q, k, v, bias, mk, mv, mb):
  return fn(q, k, v, x["idx"], x["mask"], window=W, edge_bias=bias, segment_ids=x["seg"],
            memory_keys=mk, memory_values=mv, memory_mask=x["mm"], memory_bias=mb)


def test_forward_and_gradients_match_dense_reference(inputs):
  x = inputs
  args = (x["q"], x["k"], x["v"], x["bias"], x["mk"], x["mv"], x["mb"])

  def loss(fn):
    return lambda *a: jnp.sum(jnp.sin(3.0 * _call(fn, x, *a)))

  out = jax.jit(lambda *a: _call(ga.graph_attention, x, *a))(*args)
  ref = jax.jit(lambda *a: _call(ga.graph_attention_reference, x, *a))(*args)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
  grads = jax.jit(jax.grad(loss(ga.graph_attention), argnums=tuple(range(7))))(*args)
  ref_grads = jax.jit(jax.grad(loss(ga.graph_attention_reference), argnums=tuple(range(7))))(*args)
  for name, g, rg in zip(("q", "k", "v", "edge_bias", "mem_k", "mem_v", "mem_bias"), grads, ref_grads):
    assert float(jnp.abs(rg).max()) > 0, name
    np.testing.assert_allclose(g, rg, atol=5e-5, rtol=1e-4, err_msg=name)


def test_memory_absent_or_all_masked_is_exactly_memory_free(inputs):
  x = inputs

  @jax.jit
  def run(mm):
    common = (x["q"], x["k"], x["v"], x["idx"], x["mask"])
    base = ga.graph_attention(*common, window=W, edge_bias=x["bias"], segment_ids=x["seg"])
    masked = ga.graph_attention(*common, window=W, edge_bias=x["bias"], segment_ids=x["seg"],
                                memory_keys=x["mk"], memory_values=x["mv"],
                                memory_mask=jnp.zeros_like(mm), memory_bias=x["mb"])
    # memory with the kv-head count (grouped) against the reference
    kw = dict(window=W, segment_ids=x["seg"], memory_keys=x["mk"][:, :, :, :HK],
              memory_values=x["mv"][:, :, :, :HK], memory_mask=mm, memory_bias=x["mb"])
    return base, masked, ga.graph_attention(*common, **kw), ga.graph_attention_reference(*common, **kw)

  base, masked, grouped, grouped_ref = run(x["mm"])
  np.testing.assert_array_equal(np.asarray(base), np.asarray(masked))
  np.testing.assert_allclose(grouped, grouped_ref, atol=2e-5)
  mk = x["mk"][:, :, :, :HK]
  with pytest.raises(ValueError, match="together"):
    ga.graph_attention(x["q"], x["k"], x["v"], x["idx"], x["mask"], window=W, memory_keys=mk)


def test_decode_step_matches_full_sequence(inputs):
  x = inputs
  b = 0  # one row without segments: the step's window starts at seg_start = 0
  q, k, v = x["q"][b:b + 1], x["k"][b:b + 1], x["v"][b:b + 1]
  idx, mask, bias = x["idx"][b:b + 1], x["mask"][b:b + 1], x["bias"][b:b + 1]
  mk, mv, mm = x["mk"][b:b + 1], x["mv"][b:b + 1], x["mm"][b:b + 1]
  full = jax.jit(lambda *a: ga.graph_attention(*a, window=W, edge_bias=bias, memory_keys=mk,
                                               memory_values=mv, memory_mask=mm,
                                               memory_bias=x["mb"]))(q, k, v, idx, mask)
  step = jax.jit(lambda pos, *a: ga.graph_attention_step(
      *a[:3], pos, a[3], a[4], edge_bias=a[5], window=W, seg_start=jnp.zeros((1,), jnp.int32), memory_keys=a[6],
      memory_values=a[7], memory_mask=a[8], memory_bias=x["mb"]))
  length = T + 3  # a cache longer than the sequence; slots beyond pos hold garbage
  pad = lambda a: jnp.concatenate([a, 100.0 * jnp.ones((1, length - T) + a.shape[2:])], 1)
  kc, vc = pad(k), pad(v)
  for t in range(T):
    o = step(t, q[:, t], kc, vc, idx[:, t], mask[:, t], bias[:, t], mk[:, t], mv[:, t], mm[:, t])
    np.testing.assert_allclose(o, full[:, t], atol=2e-5, err_msg=f"t={t}")

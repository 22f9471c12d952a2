"""Tests for the graph-routing mixer (sosm_jax/layers/graph.py): causality, decode, gradients, provenance."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sosm_jax.layers import MIXERS
from sosm_jax.layers import graph as lg

B, T, DM = 2, 40, 32


def _cfg(graph_mode, **over):
  g = lg.default_graph_config()
  g.update(dict(window=4, k_max=4, k_min=1, k_base=2.0, select_block_size=4, select_num_blocks=2,
                query_chunk=16, key_chunk=8, semantic_dim=16, temporal_dim=8,
                block_weights=(0.5, 0.0, 0.3, 0.2), mutual_knn=True, hub_threshold=0.2, mode=graph_mode))
  g.update(over)
  return ml_collections.ConfigDict(dict(d_model=DM, attn_num_heads=4, attn_num_kv_heads=2,
                                        attn_head_dim=8, rope_base=10000.0, dtype="float32",
                                        param_dtype="float32", graph=g))


@functools.lru_cache(maxsize=None)
def _setup(mode):
  """Mixer, params, input, segments and a jitted forward; compiled once per mode for the module."""
  mixer = lg.GraphMixer(_cfg(mode), 0)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, DM))
  params = jax.jit(mixer.init)(jax.random.PRNGKey(1), x)
  seg = jnp.asarray(np.array([[1] * T, [1] * 15 + [2] * (T - 15)], np.int32))
  apply = jax.jit(lambda p, x, seg: mixer.apply(p, x, segment_ids=seg)[0])
  return mixer, params, x, seg, apply


@pytest.fixture(params=["block", "token"])
def setup(request):
  return _setup(request.param)


def test_registered_and_config_validation():
  assert MIXERS["graph"] is lg.GraphMixer
  cfg = _cfg("block")
  assert set(lg.GRAPH_DEFAULTS) == set(lg.default_graph_config().keys())
  for key, bad in [("window", 1), ("mode", "dense"), ("similarity", "dot"), ("k_min", 9),
                   ("block_weights", (1.0,))]:
    c = _cfg("block", **{key: bad})
    with pytest.raises(ValueError, match=key):
      lg.graph_opts(c.graph)
  assert lg.GraphMixer.param_count(cfg) == sum(
      x.size for x in jax.tree.leaves(jax.eval_shape(lg.GraphMixer(cfg, 0).init, jax.random.PRNGKey(0),
                                                     jnp.zeros((1, 8, DM)))))


def test_no_future_leakage(setup):
  _, params, x, seg, apply = setup
  cut = 23
  y = apply(params, x, seg)
  y2 = apply(params, x.at[:, cut:].set(jax.random.normal(jax.random.PRNGKey(5), (B, T - cut, DM))), seg)
  np.testing.assert_array_equal(np.asarray(y[:, :cut]), np.asarray(y2[:, :cut]))
  assert float(jnp.abs(y[:, cut:] - y2[:, cut:]).max()) > 1e-3
  # documents: the second document of row 1 does not see the first
  y3 = apply(params, x.at[1, :15].set(0.0), seg)
  np.testing.assert_allclose(np.asarray(y3[1, 15:]), np.asarray(y[1, 15:]), atol=1e-6)


def test_decode_steps_equal_full_forward(setup):
  mixer, params, x, _, apply = setup
  y = apply(params, x, jnp.ones((B, T), jnp.int32))  # one document per row (same compiled fn)
  prompt = 9
  prefill = jax.jit(lambda p, xx, c: mixer.apply(p, xx, cache=c))
  step = jax.jit(lambda p, xx, c: mixer.apply(p, xx, cache=c, decode=True))
  cache = mixer.init_cache(B, T + 5)
  yp, cache = prefill(params, x[:, :prompt], cache)
  outs = [yp]
  for t in range(prompt, T):
    yt, cache = step(params, x[:, t:t + 1], cache)
    outs.append(yt)
  assert int(cache["index"]) == T
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(y), atol=2e-5)


def test_gradients_reach_every_parameter_and_memory_gate():
  mixer, params, x, seg, apply = _setup("block")
  mem_k = jax.random.normal(jax.random.PRNGKey(4), (B, T, 2, 4, 8))
  mem_mask = jnp.ones((B, T, 2), bool).at[:, :5].set(False)

  def with_memory(p, mask):
    return mixer.apply(p, x, segment_ids=seg, memory_keys=mem_k, memory_values=mem_k,
                       memory_mask=mask)[0]

  grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(with_memory(p, mem_mask)))))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)

  @jax.jit
  def without_and_with_masked_memory(p, no_mask):
    return mixer.apply(p, x, segment_ids=seg)[0], with_memory(p, no_mask)

  y0, y1 = without_and_with_masked_memory(params, jnp.zeros_like(mem_mask))
  np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))  # all masked == no memory


def test_provenance_and_graph_structure():
  mixer, params, x, seg, _ = _setup("block")
  cfg = mixer.cfg
  _, state = jax.jit(lambda p, xx: mixer.apply(p, xx, segment_ids=seg, mutable=["intermediates"]))(params, x)
  st = state["intermediates"]["graph_stats"][0]
  kmax = cfg.graph.k_max
  contrib = np.asarray(st["block_contrib"])
  assert contrib.shape == (B, T, kmax + cfg.graph.num_shortcuts, 4)
  n_sem, n_sc = float(st["edges/semantic"]), float(st["edges/shortcut"])
  assert n_sem > 0 and n_sc > 0 and float(st["dominant_block_counts"].sum()) == n_sem + n_sc
  assert float(st["degree/out_mean"]) == pytest.approx((n_sem + n_sc) / (B * T))
  # local edges: min(window, position in document + 1) per token
  pos = np.concatenate([np.arange(T), np.arange(T)[:15], np.arange(T - 15)])
  assert float(st["edges/local"]) == np.minimum(pos + 1, cfg.graph.window).sum()
  assert 0 < float(st["kept_fraction/temporal_gate"]) <= float(st["kept_fraction/adaptive_k"]) <= 1
  # blockwise contributions sum to the edge's similarity sum_b w_b cos_b (recomputed here)
  kernel = params["params"]["sem_proj"]["kernel"]
  kernel = getattr(kernel, "value", kernel)
  sem = np.asarray(x @ kernel).reshape(B, T, 4, 4)
  n = sem / np.linalg.norm(sem, axis=-1, keepdims=True)
  idx, mask = np.asarray(st["edge_index"]), np.asarray(st["edge_mask"])
  w = np.asarray(cfg.graph.block_weights)
  for b, t, k in zip(*np.nonzero(mask)):
    want = (w * (n[b, t] * n[b, idx[b, t, k]]).sum(-1)).sum()
    assert contrib[b, t, k].sum() == pytest.approx(want, abs=1e-4)
  assert (contrib[~mask] == 0).all()
  # edges: earlier than the window, inside the document, no duplicates
  pos = np.arange(T)[None, :, None]
  segs = np.asarray(seg)
  assert (idx[mask] <= np.broadcast_to(pos - cfg.graph.window, idx.shape)[mask]).all()
  tgt_seg = np.take_along_axis(segs, idx.reshape(B, -1), 1).reshape(idx.shape)
  assert (tgt_seg[mask] == np.broadcast_to(segs[..., None], idx.shape)[mask]).all()
  for b, t in zip(*np.nonzero(mask.any(-1))):
    kept = idx[b, t][mask[b, t]]
    assert len(set(kept.tolist())) == len(kept)

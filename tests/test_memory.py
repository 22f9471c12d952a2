"""Tests for the host memory (sosm_jax/memory): add/search/reset/save/load, eviction, streams, layer."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sosm_jax.memory import HostMemory, MemoryBank, l2_normalize, resolve_config

DIM = 16


def _entries(rng, n, start=0):
  sk = rng.standard_normal((n, DIM)).astype(np.float32)
  keys = rng.standard_normal((n, 2, 4)).astype(np.float32)
  vals = rng.standard_normal((n, 2, 4)).astype(np.float32)
  return sk, keys, vals, {"position": np.arange(start, start + n)}


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_add_search_gather_matches_bruteforce(index):
  rng = np.random.default_rng(0)
  mem = HostMemory(DIM, index=index, top_k=5, capacity=1000, num_shards=2)
  sk, keys, vals, meta = _entries(rng, 300)
  ids = mem.add(sk, keys, vals, meta)
  np.testing.assert_array_equal(ids, np.arange(300))
  q = rng.standard_normal((20, DIM))
  scores, got = mem.search(q)
  exact = l2_normalize(q) @ l2_normalize(sk).T
  want = np.argsort(-exact, 1)[:, :5]
  if index == "flat":
    np.testing.assert_array_equal(got, want)
  else:   # approximate: most of the true top-5 found on this small set
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, want)]) >= 0.9
  np.testing.assert_allclose(scores, np.take_along_axis(exact, got, 1), atol=1e-5)
  k, v, m, valid = mem.gather(got)
  assert valid.all()
  np.testing.assert_array_equal(k, keys[got])
  np.testing.assert_array_equal(v, vals[got])
  np.testing.assert_array_equal(m["position"], got)


def test_fewer_entries_than_k_and_reset():
  rng = np.random.default_rng(1)
  mem = HostMemory(DIM, index="flat", top_k=8)
  mem.add(*_entries(rng, 3))
  s, ids = mem.search(rng.standard_normal((4, DIM)))
  assert (ids[:, :3] >= 0).all() and (ids[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all()
  _, _, _, valid = mem.gather(ids)
  np.testing.assert_array_equal(valid, ids >= 0)
  mem.reset()
  assert len(mem) == 0
  _, ids = mem.search(rng.standard_normal((2, DIM)))
  assert (ids == -1).all()


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_eviction_drops_oldest_shard(index):
  rng = np.random.default_rng(2)
  mem = HostMemory(DIM, index=index, capacity=40, num_shards=4, top_k=3)   # shards of 10
  sk, keys, vals, meta = _entries(rng, 57)
  mem.add(sk[:25], keys[:25], vals[:25], {"position": meta["position"][:25]})
  mem.add(sk[25:], keys[25:], vals[25:], {"position": meta["position"][25:]})
  # 57 entries in shards [0-9][10-19][20-29][30-39][40-49][50-56]: the two oldest are gone
  assert len(mem) == 37 and len(mem.shards) == 4
  _, ids = mem.search(sk[:10], k=1)          # an evicted entry is never returned
  assert (ids >= 20).all()
  _, ids = mem.search(sk[50:], k=1)          # recent entries are found exactly
  np.testing.assert_array_equal(ids[:, 0], np.arange(50, 57))
  _, _, _, valid = mem.gather(np.array([5, 25, 56]))
  np.testing.assert_array_equal(valid, [False, True, True])


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_save_load_round_trip(tmp_path, index):
  rng = np.random.default_rng(3)
  mem = HostMemory(DIM, index=index, capacity=64, num_shards=4, top_k=4)
  mem.add(*_entries(rng, 50))
  q = rng.standard_normal((7, DIM))
  before = mem.search(q)
  mem.save(str(tmp_path / "m"))
  back = HostMemory.load(str(tmp_path / "m"))
  after = back.search(q)
  np.testing.assert_array_equal(before[1], after[1])
  np.testing.assert_allclose(before[0], after[0])
  for a, b in zip(mem.gather(before[1])[:2], back.gather(after[1])[:2]):
    np.testing.assert_array_equal(a, b)
  assert back.cfg == mem.cfg and back.next_id == 50
  back.add(*_entries(rng, 3))                  # keeps numbering after a restore
  assert back.next_id == 53
  with pytest.raises(ValueError, match="memory.json"):
    HostMemory.load(str(tmp_path / "nothing"))


def test_bank_streams_are_isolated_and_reset(tmp_path):
  rng = np.random.default_rng(4)
  bank = MemoryBank(2, DIM, index="flat", top_k=2)
  sk = rng.standard_normal((2, 6, DIM))
  kv = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
  bank.add(sk, kv, kv + 1000)
  keys, vals, valid, _ = bank.retrieve(sk[:, :1], key_shape=(3,))
  assert valid.all()
  np.testing.assert_array_equal(keys[0, 0, 0], kv[0, 0])   # own stream's entry, never the other's
  np.testing.assert_array_equal(keys[1, 0, 0], kv[1, 0])
  assert (keys[0] < 18).all() and (keys[1] >= 18).all()
  bank.save(str(tmp_path / "bank"))
  bank.reset([0])                                           # document boundary in stream 0 only
  keys, _, valid, _ = bank.retrieve(sk[:, :1], key_shape=(3,))
  assert not valid[0].any() and valid[1].all() and (keys[0] == 0).all()
  back = MemoryBank.load(str(tmp_path / "bank"), 2)
  assert [len(m) for m in back.memories] == [6, 6]


def test_config_errors_name_the_key():
  for key, bad in [("index", "ivf"), ("top_k", 0), ("capacity", 2), ("search_threads", -1)]:
    with pytest.raises(ValueError, match=key):
      resolve_config(None, **{key: bad})
  with pytest.raises(ValueError, match="search_keys"):
    HostMemory(DIM).add(np.zeros((3, DIM + 1)), np.zeros((3, 1)), np.zeros((3, 1)))


# ---------------------------------------------------------------- the model with memory

SEG = 8


@functools.lru_cache(maxsize=None)
def _runner():
  """A one-graph-layer model (window = one segment), its params and jitted applies; built once."""
  from sosm_jax.memory.segments import SegmentRunner
  from sosm_jax.models import build_model
  from sosm_jax.models.config import default_model_config
  c = default_model_config("sosm")
  c.update(dict(pattern=("graph",), num_layers=1, d_model=32, vocab_size=32, mlp_dim=64,
                attn_num_heads=2, attn_num_kv_heads=1, attn_head_dim=16, dtype="float32",
                scan_layers=False))
  c.graph.update(dict(window=SEG, semantic_dim=16, temporal_dim=8, block_weights=(0.5, 0.0, 0.3, 0.2),
                      k_max=2, k_min=1, select_block_size=4, select_num_blocks=1, query_chunk=SEG,
                      key_chunk=SEG))
  runner = SegmentRunner(c, None, num_streams=2, index="flat", top_k=4)
  params = runner.init(jax.random.PRNGKey(0), 2, SEG)
  # a non-zero gate so memory visibly matters
  params["layer_0"]["mixer"]["memory_gate"] = jnp.full((2,), 2.0)
  model = build_model(c)
  return runner, params, jax.jit(runner.apply), jax.jit(model.apply)


def test_empty_memory_equals_model_without_memory():
  runner, params, apply, model_apply = _runner()
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 32, (2, SEG)))
  plain = model_apply(params, tokens)                        # sosm_jax.models HybridLM, no memory
  masked = apply(params, tokens, runner.empty_memory(2, SEG))
  np.testing.assert_allclose(masked, plain, atol=1e-5)
  # a full memory whose mask is all False changes nothing either
  probed = runner.probe(params, tokens)
  runner.reset()
  runner.add(probed)
  mem = runner.retrieve(probed)
  assert mem[0][2].any()
  assert all(isinstance(a, np.ndarray) for a in mem[0])   # stored entries: host constants, no grad
  off = {0: (mem[0][0], mem[0][1], np.zeros_like(mem[0][2]))}
  np.testing.assert_allclose(apply(params, tokens, off), plain, atol=1e-5)
  assert np.abs(np.asarray(apply(params, tokens, mem)) - np.asarray(plain)).max() > 1e-3


def test_document_streams_use_only_their_own_memory():
  runner, params, apply, _ = _runner()
  rng = np.random.default_rng(6)
  doc = rng.integers(0, 32, (2, 3 * SEG))
  other = doc.copy()
  other[0, :2 * SEG] = rng.integers(0, 32, 2 * SEG)         # stream 0's earlier segments change
  a = np.asarray(runner.run_document(params, doc, SEG, apply_fn=apply))
  b = np.asarray(runner.run_document(params, other, SEG, apply_fn=apply))
  np.testing.assert_array_equal(a[1], b[1])                   # stream 1 unaffected
  assert np.abs(a[0, 2 * SEG:] - b[0, 2 * SEG:]).max() > 1e-4  # stream 0's last segment read memory
  assert all(len(m) == 3 * SEG for m in runner.banks[0].memories)   # every segment stored
  # without memory the last segment would not depend on earlier segments at all
  last = apply(params, jnp.asarray(doc[:, 2 * SEG:]), runner.empty_memory(2, SEG))
  assert np.abs(np.asarray(last) - a[:, 2 * SEG:]).max() > 1e-4



def test_generate_beyond_the_window_matches_scoring_and_reads_memory():
  """Cached decoding over 4 windows = the segment-by-segment forward on the generated text."""
  runner, params, apply, _ = _runner()
  rng = np.random.default_rng(8)
  n = 2 * SEG + 3
  prompt = rng.integers(0, 32, (2, n))
  out = runner.generate(params, prompt, SEG, 4 * SEG - n)          # crosses a window boundary
  assert out.shape == (2, 4 * SEG)
  np.testing.assert_array_equal(out[:, :n], prompt)
  scored = np.asarray(runner.run_document(params, out, SEG, apply_fn=apply))
  agree = np.mean(np.argmax(scored[:, n - 1:-1], -1) == out[:, n:])
  assert agree >= 0.95, agree
  other = prompt.copy()
  other[:, :SEG] = rng.integers(0, 32, (2, SEG))                    # only memory differs
  assert (runner.generate(params, other, SEG, 4 * SEG - n)[:, n:] != out[:, n:]).any()


def test_layer_scan_takes_memory_stacked_like_the_unrolled_model():
  from sosm_jax.models import build_model  # pylint: disable=import-outside-toplevel
  runner, params, _, _ = _runner()
  cfg = runner.cfg.as_configdict()
  cfg.update(dict(pattern=("graph",), num_layers=2))
  loop_model = build_model(cfg)
  cfg.scan_layers = True
  scan_model = build_model(cfg)
  # jitted here and below: op by op, each primitive is compiled alone (most of the time on the CPU)
  p_loop = jax.tree.map(np.asarray, nn.unbox(
      jax.jit(loop_model.init, static_argnums=(1, 2))(jax.random.PRNGKey(1), 2, SEG)))
  for i in range(2):
    p_loop[f"layer_{i}"]["mixer"]["memory_gate"] = np.full((2,), 1.0 + i, np.float32)
  blocks = [p_loop[f"layer_{i}"] for i in range(2)]
  p_scan = {k: v for k, v in p_loop.items() if not k.startswith("layer_")}
  p_scan["layers"] = {"block_0": jax.tree.map(lambda *a: np.stack(a), *blocks)}
  rng = np.random.default_rng(9)
  tokens = jnp.asarray(rng.integers(0, 32, (2, SEG)))
  mem = {1: (rng.standard_normal((2, SEG, 4, 1, 16)).astype(np.float32),
             rng.standard_normal((2, SEG, 4, 1, 16)).astype(np.float32),
             rng.random((2, SEG, 4)) < 0.7)}
  a = np.asarray(jax.jit(loop_model.apply)(p_loop, tokens, memory=mem))
  b = np.asarray(jax.jit(scan_model.apply)(p_scan, tokens, memory=mem))   # layer 0: an empty entry
  np.testing.assert_allclose(a, b, atol=1e-4)
  assert np.abs(a - np.asarray(jax.jit(loop_model.apply)(p_loop, tokens))).max() > 1e-3
  probe = jax.jit(scan_model.memory_probe)(p_scan, tokens)
  want = jax.jit(loop_model.memory_probe)(p_loop, tokens)
  assert sorted(probe) == [0, 1]
  for i in (0, 1):
    for x, y in zip(probe[i], want[i]):
      np.testing.assert_allclose(x, y, atol=1e-5)
  with pytest.raises(ValueError, match="only 'graph'"):
    build_model(runner.cfg.as_configdict()).apply(params, tokens, memory={3: mem[1]})

"""Tests for the causal graph builder (sosm_jax/ops/graph_build.py): top-K, filters, shortcuts, memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sosm_jax.ops import graph_attention as ga
from sosm_jax.ops import graph_build as gb


def _feats(seed, b, t, f):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((b, t, f)), jnp.float32)


def _segments(b, t):
  seg = np.ones((b, t), np.int32)
  seg[1, t // 3:] = 2
  seg[1, 2 * t // 3:] = 3
  return jnp.asarray(seg)


def _assert_same_topk(got, ref):
  sims, idx, valid = got
  rs, ri, rv = ref
  np.testing.assert_array_equal(np.asarray(valid), np.asarray(rv))
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(ri))
  np.testing.assert_allclose(np.where(rv, sims, 0), np.where(rv, rs, 0), atol=1e-5)


@pytest.mark.parametrize("segmented", [False, True])
def test_streaming_and_full_block_topk_match_dense(segmented):
  b, t = 2, 70
  fq, fk = gb.similarity_features(_feats(0, b, t, 16), similarity="full")
  seg = _segments(b, t) if segmented else None

  @jax.jit
  def all_three(fq, fk):
    return (gb.topk_dense_reference(fq, fk, k=5, exclude=3, segment_ids=seg),
            gb.topk_streaming(fq, fk, k=5, exclude=3, q_seg=seg, k_seg=seg, key_chunk=16),
            # every block selectable: exact too (query chunks and padding exercised)
            gb.topk_block_select(fq, fk, k=5, exclude=3, block_size=8, num_blocks=16, q_seg=seg,
                                 k_seg=seg, query_chunk=32))

  ref, streamed, blocked = all_three(fq, fk)
  assert bool(ref[2][:, 10:].all()) or segmented  # enough candidates: the test compares real lists
  _assert_same_topk(streamed, ref)
  _assert_same_topk(blocked, ref)


def _block_select_numpy(fq, fk, *, k, exclude, bs, nsel):
  """The block-selection definition, one query at a time."""
  fq, fk = np.asarray(fq), np.asarray(fk)
  b, t, _ = fq.shape
  nblk = -(-t // bs)
  out = np.full((b, t, k), -np.inf, np.float32), np.zeros((b, t, k), np.int64)
  for bi in range(b):
    pooled = np.stack([np.concatenate([fk[bi, m * bs:(m + 1) * bs],
                                       np.zeros((max(0, (m + 1) * bs - t), fk.shape[-1]))]).mean(0)
                       for m in range(nblk)])
    for p in range(t):
      cur = (p - exclude) // bs
      if cur < 0:
        continue
      scores = pooled[:cur] @ fq[bi, p]
      chosen = list(np.argsort(-scores, kind="stable")[:nsel]) + [cur]
      cands = [j for m in chosen for j in range(m * bs, (m + 1) * bs) if j <= p - exclude]
      s = np.array([fq[bi, p] @ fk[bi, j] for j in cands])
      order = np.argsort(-s, kind="stable")[:k]
      out[0][bi, p, :len(order)] = s[order]
      out[1][bi, p, :len(order)] = np.array(cands)[order]
  return out


def test_block_select_matches_its_definition():
  b, t, bs = 2, 72, 8
  fq, fk = gb.similarity_features(_feats(1, b, t, 12), similarity="projection", proj_dim=6)
  sims, idx, valid = jax.jit(lambda fq, fk: gb.topk_block_select(
      fq, fk, k=4, exclude=2, block_size=bs, num_blocks=2, query_chunk=24))(fq, fk)
  rs, ri = _block_select_numpy(fq, fk, k=4, exclude=2, bs=bs, nsel=2)
  np.testing.assert_array_equal(np.asarray(valid), np.isfinite(rs))
  np.testing.assert_array_equal(np.where(valid, idx, 0), np.where(np.isfinite(rs), ri, 0))
  np.testing.assert_allclose(np.where(valid, sims, 0), np.where(np.isfinite(rs), rs, 0), atol=1e-5)
  # fewer candidates than exact top-k would see: it really selects (late queries differ from exact)
  exact = gb.topk_dense_reference(fq, fk, k=4, exclude=2)
  assert not np.array_equal(np.asarray(exact[1]), np.asarray(idx))


def test_similarity_features():
  sem = _feats(2, 1, 5, 16)
  fq, fk = gb.similarity_features(sem, similarity="blockwise", block_size=4,
                                  block_weights=(0.5, 0.0, 0.3, 0.2))
  s = np.asarray(sem)[0].reshape(5, 4, 4)
  n = s / np.linalg.norm(s, axis=-1, keepdims=True)
  want = sum(w * n[:, bi] @ n[:, bi].T for bi, w in [(0, 0.5), (2, 0.3), (3, 0.2)])
  np.testing.assert_allclose(np.asarray(fq[0] @ fk[0].T), want, atol=1e-5)
  fq, fk = gb.similarity_features(sem, similarity="full")
  full = np.asarray(sem)[0] / np.linalg.norm(np.asarray(sem)[0], axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(fq[0] @ fk[0].T), full @ full.T, atol=1e-5)
  p = gb.random_orthonormal(16, 6, seed=3)
  np.testing.assert_allclose(p.T @ p, np.eye(6), atol=1e-5)
  np.testing.assert_array_equal(p, gb.random_orthonormal(16, 6, seed=3))  # fixed, reproducible
  with pytest.raises(ValueError, match="block_weights"):
    gb.similarity_features(sem, similarity="blockwise", block_size=4, block_weights=(1.0, 0.0))


def test_adaptive_k_follows_entropy_causally():
  # flat block norms = high entropy (ambiguous) -> large K; one dominant block -> small K
  t, nb, bs = 40, 4, 2
  rng = np.random.default_rng(3)
  sem = np.ones((1, t, nb * bs), np.float32) + 0.05 * rng.standard_normal((1, t, nb * bs))
  peaked = np.arange(t) % 3 == 0
  sem[0, peaked, :bs] *= 6.0
  @jax.jit
  def k_and_stats(sem):
    d = gb.block_entropy_deficit(sem, bs)
    stats = gb.segment_cumsum(jnp.stack([jnp.ones_like(d), d, d * d], -1), gb.segment_starts(None, 1, t))
    k = gb.adaptive_k(d, stats[..., 0], stats[..., 1], stats[..., 2], k_min=2, k_max=9, k_base=5.0,
                      alpha=1.5)
    return k, stats

  k_t, stats = k_and_stats(jnp.asarray(sem))
  k_t = np.asarray(k_t)[0]
  assert k_t[0] == 5  # first token: z = 0 -> k_base
  assert (k_t[10:][peaked[10:]] <= 3).all() and (k_t[10:][~peaked[10:]] >= 5).all()
  # running statistics only look back: changing later tokens leaves earlier K alone
  sem2 = sem.copy()
  sem2[0, 25:] = rng.standard_normal((t - 25, nb * bs))
  _, stats2 = k_and_stats(jnp.asarray(sem2))
  np.testing.assert_array_equal(np.asarray(stats2)[0, :25], np.asarray(stats)[0, :25])


def test_segment_cumsum_restarts():
  seg = _segments(2, 30)
  x = _feats(4, 2, 30, 3)
  got = np.asarray(jax.jit(lambda x: gb.segment_cumsum(x, gb.segment_starts(seg, 2, 30)))(x))
  xs, ss = np.asarray(x), np.asarray(seg)
  for bi in range(2):
    acc = np.zeros(3)
    for t in range(30):
      acc = xs[bi, t] if t == 0 or ss[bi, t] != ss[bi, t - 1] else acc + xs[bi, t]
      np.testing.assert_allclose(got[bi, t], acc, rtol=1e-5, atol=1e-5)


def _angles(deg):
  a = np.deg2rad(np.asarray(deg, np.float32))
  return jnp.asarray(np.stack([np.cos(a), np.sin(a)], -1)[None])


def _build(f, gfeat, sem, **opts):
  """build_graph under jit (eager op-by-op dispatch is slow on CPU)."""
  o = gb.default_opts(**opts)
  return jax.jit(lambda f, gfeat, sem: gb.build_graph(f, f, gfeat, sem, opts=o))(f, gfeat, sem)


_PLAIN = dict(adaptive_k=False, mutual_knn=False, temporal_gate=False, num_shortcuts=0, window=2,
              k_max=1, mode="token", key_chunk=4)


def test_mutual_knn_on_constructed_graph():
  # token: 0@0°, 1@90°, 2@5°, 3@92°, 4@40°. Top-1 (exclude 2): 2->0, 3->1, 4->2.
  # Thresholds: tokens 0 and 1 have no candidates (-inf: accept); token 2's best is 0 at 5°.
  # 4->2 has cos 35° < cos 5°: 4 would not enter 2's list, so it is not mutual and is dropped.
  f = _angles([0, 90, 5, 92, 40])
  sem = jnp.ones((1, 5, 4))
  gfeat = jnp.zeros((1, 5, 2))
  plain = _build(f, gfeat, sem, **_PLAIN)
  mutual = _build(f, gfeat, sem, **dict(_PLAIN, mutual_knn=True))
  np.testing.assert_array_equal(np.asarray(plain.idx[0, :, 0]), [0, 1, 0, 1, 2])  # empty: self
  np.testing.assert_array_equal(np.asarray(plain.mask[0, :, 0]), [0, 0, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(mutual.mask[0, :, 0]), [0, 0, 1, 1, 0])


def test_mutual_knn_matches_brute_force_definition():
  b, t, k = 1, 40, 3
  fq, fk = gb.similarity_features(_feats(5, b, t, 6), similarity="full")
  g = _build(fq, jnp.zeros((b, t, 2)), jnp.ones((b, t, 4)), **dict(_PLAIN, k_max=k, mutual_knn=True))
  s = np.asarray(fq[0] @ fk[0].T)
  lists = [sorted(range(0, p - 1), key=lambda j: -s[p, j])[:k] for p in range(t)]  # exclude 2
  for p in range(t):
    kept = {j for j in lists[p] if len(lists[j]) < k or s[p, j] >= s[j, lists[j][k - 1]]}
    got = {int(j) for j, m in zip(g.idx[0, p], g.mask[0, p]) if m}
    assert got == kept, p


def test_temporal_gate_rule_and_build():
  sims = jnp.array([0.1, 0.2, 0.2, 0.7, 0.7])
  gate = jnp.array([0.9, 0.2, 0.5, 0.0, 0.9])
  keep = gb.temporal_gate_keep(sims, gate, tau_mu=0.15, tau_temp=0.3, tau_high=0.6)
  np.testing.assert_array_equal(np.asarray(keep), [False, False, True, True, True])
  # end to end: 2->0 (sim 0.996) passes on tau_high; 3->1 has sim ~1 but so does 4->2 (cos 35°,
  # below tau_high) whose temporal features are opposite (gate ~ 0): only that edge goes.
  f = _angles([0, 90, 5, 92, 40])
  gfeat = jnp.asarray(np.array([[[3, 0], [3, 0], [-3, 0], [3, 0], [3, 0]]], np.float32))
  g = _build(f, gfeat, jnp.ones((1, 5, 4)), **dict(_PLAIN, temporal_gate=True, tau_high=0.9))
  np.testing.assert_array_equal(np.asarray(g.mask[0, :, 0]), [0, 0, 1, 1, 0])
  np.testing.assert_allclose(gb.temporal_gate(gfeat[:, 4], gfeat[:, 2][:, None])[0, 0],
                             1 / (1 + np.exp(9 / np.sqrt(2))), rtol=1e-5)


def test_shortcut_edges_constructed():
  t, w = 40, 4
  hub = np.zeros((1, t), bool)
  hub[0, [0, 5, 13, 30, 38]] = True
  pos = jnp.arange(t)[None]
  last = jax.lax.cummax(jnp.where(hub, pos, -1), axis=1)
  sem_idx = jnp.zeros((1, t, 1), jnp.int32).at[0, 38, 0].set(30)
  sem_mask = jnp.zeros((1, t, 1), bool).at[0, 38, 0].set(True)
  idx, mask = gb.shortcut_edges(jnp.asarray(hub), pos, jnp.zeros((1, t), jnp.int32),
                                lambda p: jnp.take_along_axis(last, p, 1), window=w,
                                num_shortcuts=3, sem_idx=sem_idx, sem_mask=sem_mask)
  edges = {(p, int(j)) for p in range(t) for j, m in zip(idx[0, p], mask[0, p]) if m}
  # hub 13 -> latest hubs <= 9, 5, <0: {5, 5(dup)}; hub 30 -> <=26: 13, <=22: 13 (dup), <=14: 13 (dup)
  # hub 38 -> <=34: 30 (already a semantic edge: dropped), <=30: 30 (dup), <=22: 13; 5 -> <=1: 0
  assert edges == {(5, 0), (13, 5), (30, 13), (38, 13)}
  assert not bool(mask[0, ~hub[0]].any())  # only hubs get shortcuts


def test_hub_flags_causal_centroid():
  sem = _feats(6, 1, 20, 8)
  hub = jax.jit(lambda s: gb.hub_flags(s, gb.segment_cumsum(s, gb.segment_starts(None, 1, 20)), 0.5))(sem)
  assert bool(hub[0, 0])  # the first token is its own centroid
  s = np.asarray(sem)[0]
  c = np.cumsum(s, 0)
  cos = (s * c).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(c, axis=-1)
  np.testing.assert_array_equal(np.asarray(hub[0]), cos >= 0.5)


def _temp_bytes(fn, *shapes):
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_block_mode_graph_and_attention_memory_is_linear_in_length():
  """Compiled temp memory at T and 4T grows ~4x (linear), far from 16x (a T×T matrix)."""
  opts = gb.default_opts(mode="block", window=16, k_max=8, select_block_size=32, select_num_blocks=4,
                         query_chunk=256)

  def layer_ops(sem, gfeat, q):
    fq, fk = gb.similarity_features(sem, similarity="projection", proj_dim=8)
    g = gb.build_graph(fq, fk, gfeat, sem, opts=opts)
    return ga.graph_attention(q, q, q, g.idx, g.mask, window=16)

  temps = [_temp_bytes(layer_ops, (1, t, 16), (1, t, 4), (1, t, 2, 8)) for t in (1024, 4096)]
  assert temps[1] / temps[0] < 6.0, temps
  assert temps[1] < 4096 * 4096 * 4 / 4  # a [T, T] float32 matrix alone would be 64 MiB


def test_streaming_topk_memory_is_linear_in_length():
  fn = lambda fq: gb.topk_streaming(fq, fq, k=8, exclude=16, key_chunk=128)
  temps = [_temp_bytes(fn, (1, t, 8)) for t in (1024, 4096)]
  assert temps[1] / temps[0] < 6.0, temps
  assert temps[1] < 4096 * 4096 * 4 / 4

"""MemoryBank.retrieve against a plain numpy brute force: top-k, same-document rule, eviction."""
import numpy as np
import pytest

from sosm_jax.memory import MemoryBank, l2_normalize, search_vectors

DIM, K = 16, 5


def _reference(entries, queries, query_docs, k, first_live):
  """Brute force of one stream: top-k of the live entries by inner product of normalised vectors,
  then valid only where the entry's document is the query's. -> keys, values, valid, scores."""
  sk, keys, values, docs = (a[first_live:] for a in entries)
  nq = len(queries)
  out_k = np.zeros((nq, k) + keys.shape[1:], keys.dtype)
  out_v = np.zeros((nq, k) + values.shape[1:], values.dtype)
  valid = np.zeros((nq, k), bool)
  scores = np.full((nq, k), -np.inf, np.float32)
  if len(sk):
    exact = l2_normalize(queries) @ l2_normalize(sk).T
    top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    n = top.shape[1]
    out_k[:, :n], out_v[:, :n] = keys[top], values[top]
    valid[:, :n] = docs[top] == query_docs[:, None]
    scores[:, :n] = np.take_along_axis(exact, top, 1)
  return out_k, out_v, valid, scores


def _documents(n, boundaries):
  """Document ids `[n]` that change at the given positions (1, 2, ...)."""
  docs = np.ones(n, np.int32)
  for b in boundaries:
    docs[b:] += 1
  return docs


@pytest.mark.parametrize("stream_threads", [1, 2])
def test_retrieve_matches_bruteforce_with_documents_eviction_and_empty_streams(stream_threads):
  rng = np.random.default_rng(3)
  bank = MemoryBank(3, DIM, index="flat", top_k=K, capacity=240, num_shards=3,
                    stream_threads=stream_threads)         # shards of 80 entries
  adds = [90, 60, 130]
  total = sum(adds)
  # stream 0: one shard, three documents, a gap of unstored tokens (padding);
  # stream 1: 280 > 240 entries: the oldest shard is evicted and several are searched and
  #           merged; its documents change where that shard ends and where the second add ends;
  # stream 2: never stored anything (an empty memory in a non-empty bank)
  stored = np.zeros((3, total), bool)
  stored[0, :75] = True
  stored[0, 10:15] = False
  stored[1] = True
  boundaries = [[30, 60], [80, 150], []]
  entries = []
  for b in range(3):
    sk = rng.standard_normal((total, DIM)).astype(np.float32)
    keys = rng.standard_normal((total, 2, 4)).astype(np.float32)
    values = rng.standard_normal((total, 2, 4)).astype(np.float32)
    for a in (sk, keys, values):
      a[41] = a[40]                           # a duplicate entry: tied scores
    entries.append([sk, keys, values, _documents(total, boundaries[b])])
  start = 0
  for n in adds:
    sl = slice(start, start + n)
    bank.add(np.stack([e[0][sl] for e in entries]), np.stack([e[1][sl] for e in entries]),
             np.stack([e[2][sl] for e in entries]), {"doc": np.stack([e[3][sl] for e in entries])},
             where=stored[:, sl])
    start += n
  assert [len(m) for m in bank.memories] == [70, total - 80, 0]
  assert [len(m.shards) for m in bank.memories] == [1, 3, 0]
  nq = 64
  queries = rng.standard_normal((3, nq, DIM)).astype(np.float32)
  queries[0, 0] = entries[0][0][40]           # finds both duplicates first
  query_docs = rng.integers(1, 4, (3, nq)).astype(np.int32)
  keys, values, valid, scores = bank.retrieve(queries, K, match={"doc": query_docs})
  assert keys.dtype == np.float32 and keys.shape == (3, nq, K, 2, 4)
  for b in (0, 1):
    assert valid[b].any() and not valid[b].all()
  assert not valid[2].any() and not keys[2].any() and np.isneginf(scores[2]).all()
  for b in range(3):
    kept = [e[stored[b]] for e in entries[b]]
    want = _reference(kept, queries[b], query_docs[b], K, first_live=80 if b == 1 else 0)
    np.testing.assert_array_equal(keys[b], want[0])
    np.testing.assert_array_equal(values[b], want[1])
    np.testing.assert_array_equal(valid[b], want[2])
    np.testing.assert_allclose(scores[b], want[3], atol=1e-5)
  np.testing.assert_array_equal(keys[0, 0, 0], keys[0, 0, 1])   # the tied duplicates


def test_retrieve_of_empty_bank_and_fewer_entries_than_k():
  rng = np.random.default_rng(4)
  bank = MemoryBank(2, DIM, index="flat", top_k=K, stream_threads=2)
  with pytest.raises(ValueError, match="key_shape"):
    bank.retrieve(rng.standard_normal((2, 3, DIM)))
  keys, values, valid, scores = bank.retrieve(rng.standard_normal((2, 3, DIM)), key_shape=(2, 4))
  assert keys.shape == values.shape == (2, 3, K, 2, 4) and not keys.any() and not values.any()
  assert not valid.any() and np.isneginf(scores).all()
  sk = rng.standard_normal((2, 3, DIM)).astype(np.float32)
  kv = rng.standard_normal((2, 3, 2, 4)).astype(np.float32)
  bank.add(sk, kv, kv, {"doc": np.ones((2, 3), np.int32)})
  keys, _, valid, scores = bank.retrieve(sk, match={"doc": np.ones((2, 3), np.int32)})
  assert valid[:, :, :3].all() and not valid[:, :, 3:].any()
  assert not keys[:, :, 3:].any() and np.isneginf(scores[:, :, 3:]).all()
  np.testing.assert_array_equal(keys[:, :, 0], kv)              # each entry finds itself first


def test_search_vectors_per_stream_equal_the_batch():
  """retrieve computes search vectors one stream at a time; they must equal the batch's bits."""
  q = np.random.default_rng(5).standard_normal((3, 50, 8, 16)).astype(np.float32)
  whole = search_vectors(q, 2)
  for b in range(3):
    np.testing.assert_array_equal(search_vectors(q[b:b + 1], 2)[0], whole[b])

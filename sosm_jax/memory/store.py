"""Host memory of one document stream (FAISS): add, top-k search, reset, eviction, save/load.

An entry is (search key, stored key, stored value, metadata). The search key is L2-normalised
here, so inner-product search is cosine search. Stored keys/values are whatever the caller wants
back (e.g. a layer's per-head keys/values `[kv_heads, head_dim]`); metadata is a dict of scalars
per entry (position, segment, ...). Everything is numpy: nothing stored carries a gradient.

Eviction. HNSW (`faiss.IndexHNSWFlat`) cannot delete entries, so the memory is a ring of
`num_shards` shards, each its own index holding at most `capacity // num_shards` entries. Adds go
to the newest shard; when it is full a new one starts, and when there are more than `num_shards`
the oldest shard is dropped whole (its index and values). The memory therefore holds between
capacity − capacity/num_shards and capacity entries and always forgets the oldest first. The exact
flat index ('flat', `IndexFlatIP`, the reference) uses the same shards so both behave alike.
Search queries every shard and merges the per-shard top-k by score.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faiss
import numpy as np

INDEX_TYPES = ("hnsw", "flat")

MEMORY_DEFAULTS = dict(
    index="hnsw",          # 'hnsw' (IndexHNSWFlat) | 'flat' (exact inner product, the reference)
    top_k=16,              # entries retrieved per query
    capacity=65536,        # most entries per stream (oldest shard evicted beyond it)
    num_shards=4,          # eviction granularity: capacity // num_shards entries per shard
    # HNSW: chosen from benchmarks/memory_recall.py on keys of a trained model (128-dim search
    # vectors, 20k entries, k=16, one thread): M=32, efC=200, efS=64 gave recall@16 0.93 at 10k
    # queries/s, 2.7x the exact flat search (3.7k/s); M=16 was 2 points lower (1.4x faster),
    # efC=40/80 2-8 points lower, efS=128 2 points higher at half the speed.
    hnsw_m=32,
    hnsw_ef_construction=200,
    hnsw_ef_search=64,
    search_threads=1,      # FAISS OpenMP threads (0 = FAISS default). Per-stream searches are
                           # small; on 2 shared cores 1 thread was 15x faster (0.037 s vs 0.58 s
                           # per 32-stream add+search step): OpenMP start-up/spinning dominates.
    stream_threads=0,      # host threads over streams for search/add (FAISS releases the GIL):
                           # 0 = one per CPU core (at most one per stream), 1 = serial. On 2
                           # cores, 8 streams x 128 queries: HNSW search 86 -> 47 ms, add 241 ->
                           # 128 ms; flat search 41 -> 24 ms.
)


def default_memory_config():
  """Memory keys (a ConfigDict, e.g. `config.memory`); values in `MEMORY_DEFAULTS`."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict(dict(MEMORY_DEFAULTS))


def _get(cfg, key):
  if cfg is None:
    return MEMORY_DEFAULTS[key]
  try:
    return cfg[key] if hasattr(cfg, "__getitem__") else getattr(cfg, key)
  except (KeyError, AttributeError):
    return MEMORY_DEFAULTS[key]


def resolve_config(cfg=None, **over) -> dict:
  """Plain dict of all memory keys (defaults for missing ones, `over` on top); validated."""
  out = {k: _get(cfg, k) for k in MEMORY_DEFAULTS}
  out.update(over)
  validate_memory_config(out)
  return out


def validate_memory_config(c) -> None:
  """Raises ValueError naming the bad memory key."""
  def fail(key, msg):
    raise ValueError(f"memory.{key}: {msg}")
  if c["index"] not in INDEX_TYPES:
    fail("index", f"choose one of {INDEX_TYPES}")
  if int(c["search_threads"]) < 0:
    fail("search_threads", "must be >= 0 (0 = FAISS default)")
  if int(c["stream_threads"]) < 0:
    fail("stream_threads", "must be >= 0 (0 = one per CPU core, 1 = serial)")
  for key in ("top_k", "capacity", "num_shards", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"):
    if int(c[key]) < 1:
      fail(key, "must be >= 1")
  if c["capacity"] < c["num_shards"]:
    fail("capacity", f"must be >= num_shards ({c['num_shards']})")


def l2_normalize(x, eps: float = 1e-6) -> np.ndarray:
  """Rows of x `[..., dim]` scaled to unit L2 norm (float32)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def make_index(dim: int, cfg) -> Any:
  """An empty FAISS inner-product index of the configured type."""
  if cfg["index"] == "flat":
    return faiss.IndexFlatIP(dim)
  index = faiss.IndexHNSWFlat(dim, int(cfg["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
  index.hnsw.efConstruction = int(cfg["hnsw_ef_construction"])
  index.hnsw.efSearch = int(cfg["hnsw_ef_search"])
  return index


class _Shard:
  """One index plus its stored arrays; entry i of the index is row i of the arrays."""

  def __init__(self, index, first_id: int):
    self.index = index
    self.first_id = first_id        # global id of row 0
    self.keys, self.values, self.meta = [], [], []   # lists of chunks until `arrays()`

  @property
  def size(self) -> int:
    return self.index.ntotal

  def append(self, search_keys, keys, values, meta):
    self.index.add(np.ascontiguousarray(search_keys, np.float32))
    self.keys.append(keys)
    self.values.append(values)
    self.meta.append(meta)

  def compact(self):
    """Concatenates the stored chunks (done lazily before reads)."""
    if len(self.keys) > 1:
      self.keys = [np.concatenate(self.keys)]
      self.values = [np.concatenate(self.values)]
      self.meta = [{k: np.concatenate([m[k] for m in self.meta]) for k in self.meta[0]}]
    return self.keys[0], self.values[0], self.meta[0]


class HostMemory:
  """Memory of one document stream.

  dim: search-key width. Stored keys/values may have any trailing shape (fixed per memory).
  """

  def __init__(self, dim: int, cfg=None, **over):
    self.dim = int(dim)
    self.cfg = resolve_config(cfg, **over)
    self.shard_capacity = self.cfg["capacity"] // self.cfg["num_shards"]
    if self.cfg["search_threads"]:
      faiss.omp_set_num_threads(int(self.cfg["search_threads"]))   # process-wide FAISS setting
    self.reset()

  # ------------------------------------------------------------------ state

  def reset(self) -> None:
    """Forgets everything (call at a document boundary)."""
    self.shards: list[_Shard] = []
    self.next_id = 0

  def __len__(self) -> int:
    return sum(s.size for s in self.shards)

  def _filled_shards(self) -> list:
    return [s for s in self.shards if s.size]

  def _new_shard(self):
    self.shards.append(_Shard(make_index(self.dim, self.cfg), self.next_id))
    if len(self.shards) > self.cfg["num_shards"]:
      self.shards.pop(0)   # evict the oldest shard whole: HNSW cannot delete single entries

  def add(self, search_keys, keys, values, metadata: dict | None = None) -> np.ndarray:
    """Adds n entries -> their global ids `[n]` (int64, increasing).

    search_keys `[n, dim]` (normalised here); keys/values `[n, ...]`; metadata {name: `[n]`}.
    """
    sk = l2_normalize(search_keys)
    n = sk.shape[0]
    if sk.ndim != 2 or sk.shape[1] != self.dim:
      raise ValueError(f"search_keys must be [n, {self.dim}]; got {sk.shape}.")
    keys, values = np.asarray(keys), np.asarray(values)
    if keys.shape[0] != n or values.shape[0] != n:
      raise ValueError(f"keys/values need {n} rows like search_keys; got {keys.shape}, {values.shape}.")
    meta = {k: np.asarray(v).reshape(n) for k, v in (metadata or {}).items()}
    ids = self.next_id + np.arange(n, dtype=np.int64)
    start = 0
    while start < n:
      if not self.shards or self.shards[-1].size >= self.shard_capacity:
        self._new_shard()
      shard = self.shards[-1]
      m = min(n - start, self.shard_capacity - shard.size)
      sl = slice(start, start + m)
      shard.append(sk[sl], keys[sl], values[sl], {k: v[sl] for k, v in meta.items()})
      start += m
      self.next_id += m
    return ids

  # ------------------------------------------------------------------ search

  def search(self, queries, k: int | None = None):
    """Top-k by inner product with normalised queries `[q, dim]`.

    Returns (scores `[q, k]` float32, ids `[q, k]` int64); missing entries have id -1 and
    score -inf (fewer than k stored).
    """
    k = int(k or self.cfg["top_k"])
    qn = np.ascontiguousarray(l2_normalize(queries))
    nq = qn.shape[0]
    scores = np.full((nq, k), -np.inf, np.float32)
    ids = np.full((nq, k), -1, np.int64)
    filled = self._filled_shards()
    if len(filled) == 1:   # one shard (e.g. all of training): its own top-k order, no merge
      shard = filled[0]
      n = min(k, shard.size)
      s, i = shard.index.search(qn, n)
      scores[:, :n] = np.where(i >= 0, s, -np.inf)
      ids[:, :n] = np.where(i >= 0, i + shard.first_id, -1)
      return scores, ids
    for shard in filled:
      s, i = shard.index.search(qn, min(k, shard.size))
      gid = np.where(i >= 0, i + shard.first_id, -1)
      s = np.where(i >= 0, s, -np.inf).astype(np.float32)
      scores, ids = _merge_topk(scores, ids, s, gid, k)
    return scores, ids

  def stored_layout(self):
    """((key shape, dtype), (value shape, dtype)) of one stored entry; None while empty."""
    filled = self._filled_shards()
    if not filled:
      return None
    keys, values = filled[-1].keys[0], filled[-1].values[0]
    return (keys.shape[1:], keys.dtype), (values.shape[1:], values.dtype)

  def gather(self, ids):
    """Stored (keys, values, metadata, valid) for ids `[...]` (−1 or evicted -> zeros, invalid)."""
    ids = np.asarray(ids, np.int64)
    layout = self.stored_layout()
    if layout is None:
      return None, None, {}, np.zeros(ids.shape, bool)
    (ks, kd), (vs, vd) = layout
    keys, values = np.empty(ids.shape + ks, kd), np.empty(ids.shape + vs, vd)
    meta, valid = self.gather_into(ids, keys, values)
    return keys, values, meta, valid

  def gather_into(self, ids, keys_out, values_out, names=None):
    """Writes the stored keys/values of ids `[...]` into keys_out/values_out `[..., *entry]`
    (zeros where invalid) -> (metadata {name: `[...]`}, valid `[...]`).

    names: the metadata to gather (default all). One fancy index per shard, straight into the
    caller's arrays (no per-query loops, no intermediate copies).
    """
    ids = np.asarray(ids, np.int64)
    flat = ids.reshape(-1)
    keys = keys_out.reshape((flat.size,) + keys_out.shape[ids.ndim:])
    values = values_out.reshape((flat.size,) + values_out.shape[ids.ndim:])
    filled = self._filled_shards()
    stored_meta = filled[0].compact()[2] if filled else {}
    wanted = [n for n in (stored_meta if names is None else names) if n in stored_meta]
    valid = np.zeros(flat.shape, bool)
    if len(filled) == 1:   # the common case: one take per array, then zero the invalid rows
      sk, sv, sm = filled[0].compact()
      row = flat - filled[0].first_id
      valid = (flat >= 0) & (row >= 0) & (row < filled[0].size)
      row = np.where(valid, row, 0)   # in range, so mode='clip' (unbuffered) changes nothing
      np.take(sk, row, axis=0, out=keys, mode="clip")
      np.take(sv, row, axis=0, out=values, mode="clip")
      meta = {n: np.where(valid, sm[n][row], 0).astype(sm[n].dtype) for n in wanted}
      if not valid.all():
        keys[~valid] = 0
        values[~valid] = 0
      return {n: a.reshape(ids.shape) for n, a in meta.items()}, valid.reshape(ids.shape)
    keys[...] = 0
    values[...] = 0
    meta = {n: np.zeros(flat.size, stored_meta[n].dtype) for n in wanted}
    for shard in filled:
      sk, sv, sm = shard.compact()
      row = flat - shard.first_id
      hit = (flat >= 0) & (row >= 0) & (row < shard.size)
      r = row[hit]
      keys[hit], values[hit] = sk[r], sv[r]
      for name in meta:
        meta[name][hit] = sm[name][r]
      valid |= hit
    return {n: a.reshape(ids.shape) for n, a in meta.items()}, valid.reshape(ids.shape)

  # ------------------------------------------------------------------ persistence

  def save(self, directory: str) -> None:
    """Writes `memory.json`, `shard_<i>.faiss` (the index) and `shard_<i>.npz` (stored arrays)."""
    os.makedirs(directory, exist_ok=True)
    info = dict(dim=self.dim, cfg=self.cfg, next_id=int(self.next_id), shards=[])
    for i, shard in enumerate(self.shards):
      faiss.write_index(shard.index, os.path.join(directory, f"shard_{i}.faiss"))
      if shard.size:
        sk, sv, sm = shard.compact()
        np.savez(os.path.join(directory, f"shard_{i}.npz"), keys=sk, values=sv,
                 **{f"meta_{n}": a for n, a in sm.items()})
      info["shards"].append(dict(first_id=int(shard.first_id), size=int(shard.size)))
    with open(os.path.join(directory, "memory.json"), "w", encoding="utf-8") as f:
      json.dump(info, f)

  @classmethod
  def load(cls, directory: str) -> "HostMemory":
    """Inverse of `save`: the same entries, ids, config and search results, and the same future.

    HNSW draws a random level per added entry from a generator that the index file does not
    hold; it is advanced past the entries already added, so adds after a load build the same
    graph as they would have without the save (an exact resume). A missing or damaged file
    raises ValueError naming it.
    """
    path = os.path.join(directory, "memory.json")
    if not os.path.exists(path):
      raise ValueError(f"no memory at {directory!r} (missing memory.json); save one with HostMemory.save.")
    info = _read(path, _json)
    try:
      mem = cls(info["dim"], info["cfg"])
      mem.next_id = int(info["next_id"])
      shards = [(int(s["first_id"]), int(s["size"])) for s in info["shards"]]
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: not a host memory description ({type(e).__name__}: {e})") from None
    for i, (first_id, size) in enumerate(shards):
      index_path = os.path.join(directory, f"shard_{i}.faiss")
      shard = _Shard(_read(index_path, faiss.read_index), first_id)
      if size:
        arrays_path = os.path.join(directory, f"shard_{i}.npz")
        z = _read(arrays_path, lambda p: dict(np.load(p)))
        if "keys" not in z or "values" not in z or len(z["keys"]) != size:
          raise ValueError(f"{arrays_path}: unreadable host memory arrays (expected {size} keys and "
                           f"values)")
        shard.keys, shard.values = [z["keys"]], [z["values"]]
        shard.meta = [{n[5:]: z[n] for n in z if n.startswith("meta_")}]
      if shard.size != size:
        raise ValueError(f"{index_path}: index has {shard.size} entries, expected {size}.")
      if mem.cfg["index"] == "hnsw":
        shard.index.hnsw.efSearch = int(mem.cfg["hnsw_ef_search"])
        for _ in range(shard.size):   # the level generator as it was after these adds
          shard.index.hnsw.random_level()
      mem.shards.append(shard)
    return mem


def _json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _read(path: str, reader):
  """reader(path), with any failure turned into a ValueError naming the file."""
  if not os.path.exists(path):
    raise ValueError(f"{path}: host memory file is missing")
  try:
    return reader(path)
  except Exception as e:  # pylint: disable=broad-except  (json, zip, FAISS errors alike)
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise ValueError(f"{path}: unreadable host memory file ({type(e).__name__}: {first})") from None


def _merge_topk(s1, i1, s2, i2, k):
  """Best k of two candidate lists `[q, *]` by score (descending)."""
  s = np.concatenate([s1, s2], 1)
  i = np.concatenate([i1, i2], 1)
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(workers: int, omp_threads: int) -> ThreadPoolExecutor:
  """A process-wide pool of `workers` threads whose FAISS uses `omp_threads` (0 = its default).

  OpenMP's thread count is per calling thread, so each worker sets its own.
  """
  key = (workers, omp_threads)
  if key not in _POOLS:
    init = (lambda: faiss.omp_set_num_threads(omp_threads)) if omp_threads else None
    _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="host-memory", initializer=init)
  return _POOLS[key]


class MemoryBank:
  """One `HostMemory` per document stream (batch row), searched and filled together.

  Streams are independent, so searches and adds run on `stream_threads` host threads.
  """

  def __init__(self, num_streams: int, dim: int, cfg=None, **over):
    self.memories = [HostMemory(dim, cfg, **over) for _ in range(num_streams)]

  def __len__(self) -> int:
    return len(self.memories)

  def _map(self, fn, streams=None) -> list:
    """[fn(b) for every stream b (or those given)], on the bank's threads when there are several."""
    streams = range(len(self.memories)) if streams is None else streams
    cfg = self.memories[0].cfg if self.memories else {}
    want = int(cfg.get("stream_threads", 1))
    workers = min(len(streams), want or (os.cpu_count() or 1))
    if workers <= 1:
      return [fn(b) for b in streams]
    return list(_pool(workers, int(cfg.get("search_threads", 0))).map(fn, streams))

  def reset(self, streams=None) -> None:
    """Resets the given streams (all when None), e.g. those whose document ended."""
    for i in (range(len(self.memories)) if streams is None else streams):
      self.memories[i].reset()

  def add(self, search_keys, keys, values, metadata=None, where=None) -> None:
    """search_keys `[streams, n, dim]`, keys/values `[streams, n, ...]`, metadata {name: `[streams, n]`}.

    where: optional bool `[streams, n]`: only those entries are stored (e.g. no padding).
    """
    def one(b):
      sel = slice(None) if where is None else np.asarray(where[b], bool)
      if where is not None and not sel.any():
        return
      self.memories[b].add(np.asarray(search_keys[b])[sel], np.asarray(keys[b])[sel],
                           np.asarray(values[b])[sel],
                           {k: np.asarray(v)[b][sel] for k, v in (metadata or {}).items()})
    self._map(one)

  def retrieve(self, queries, k: int | None = None, key_shape=None, dtype=np.float32, match=None,
               to_search=None):
    """Top-k stored entries per query.

    queries `[streams, q, dim]` -> keys, values `[streams, q, k, ...]`, valid `[streams, q, k]`,
    scores `[streams, q, k]`. key_shape (trailing shape of stored keys) is needed only while
    every memory is empty. match: optional {metadata name: `[streams, q]`}: an entry is valid for
    a query only where its metadata equals the query's (e.g. the same document).
    to_search: optional function of one stream's queries `[q, ...]` -> its search vectors
    `[q, dim]` (e.g. `search_vectors`), run on the bank's threads; never for an empty memory.

    Keys/values are the stored dtype (`dtype` while every memory is empty). Each stream's thread
    writes its results straight into the outputs (no per-stream arrays stacked afterwards).
    """
    k = int(k or self.memories[0].cfg["top_k"])
    nq = np.shape(queries)[1]
    layout = next((lay for lay in (m.stored_layout() for m in self.memories) if lay is not None),
                  None)
    if layout is None:
      if key_shape is None:
        raise ValueError("all memories are empty: pass key_shape to get zero-filled keys/values.")
      layout = ((tuple(key_shape), np.dtype(dtype)),) * 2
    (ks, kd), (vs, vd) = layout
    lead = (len(self.memories), nq, k)
    # zeros cost nothing until written (fresh pages): empty memories' rows stay as allocated
    keys, values = np.zeros(lead + tuple(ks), kd), np.zeros(lead + tuple(vs), vd)
    valid, scores = np.zeros(lead, bool), np.full(lead, -np.inf, np.float32)
    match = {name: np.asarray(want) for name, want in (match or {}).items()}

    def one(b):
      mem = self.memories[b]
      q = queries[b] if to_search is None else to_search(queries[b])
      s, ids = mem.search(q, k)
      meta, ok = mem.gather_into(ids, keys[b], values[b], names=list(match))
      for name, want in match.items():
        ok &= meta[name] == want[b][:, None] if name in meta else False
      valid[b], scores[b] = ok, s

    filled = [b for b, mem in enumerate(self.memories) if len(mem)]
    if filled:
      self._map(one, filled)
    return keys, values, valid, scores

  def save(self, directory: str) -> None:
    """One sub-folder `stream_<i>` per stream (see `HostMemory.save`)."""
    for i, mem in enumerate(self.memories):
      mem.save(os.path.join(directory, f"stream_{i}"))

  @classmethod
  def load(cls, directory: str, num_streams: int) -> "MemoryBank":
    bank = cls.__new__(cls)
    bank.memories = [HostMemory.load(os.path.join(directory, f"stream_{i}")) for i in range(num_streams)]
    return bank

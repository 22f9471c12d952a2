"""Host memory path of one training step at long_memory's shapes, on random data (no device, no model).

Per step the trainer (`memory_train.SegmentFeeder`) takes the probed q/k/v of a window, searches
every stream's FAISS memory with the queries' search vectors, gathers the top-k stored
keys/values under the same-document rule and, after dispatching the step, adds the window to the
memory. This times those host phases with the real code (`SegmentRunner.retrieve` / `add`, the
feeder's `next_batch` / `after_dispatch`) but a stand-in probe that returns pre-drawn random
q/k/v (numpy), so neither a trained model nor a device is needed. The host-to-device copy of the
memory inputs and the probe's device-to-host copy are not included (no device here).

Rows: `--windows` windows of `--window` tokens per stream (memory of up to (windows-1) x window
entries a stream); document ids as in training, a row mostly one document: one stream has a
document boundary inside a window, one starts a new document with a window (its memory is
reset), one ends in padding (id 0, never stored). Reported per window index (0 = empty memory)
and as the mean over a row's windows (the per-step host time of training), medians over
`--rows` rows after one warm-up row.

  python benchmarks/memory_host_path.py --output=/tmp/memory_host_path.json
  python benchmarks/memory_host_path.py --profile --rows=1      # cProfile of the feeder steps
  python benchmarks/memory_host_path.py --busy_threads=1        # with a Python thread holding the GIL

`thread_scaling_ms` (with `cpu_budget`: affinity and any cgroup CPU quota) times one stream's
last-window work run by 1, 2, 4, 8, 16 threads at once: whether the host runs the stream threads
in parallel at all, apart from the memory code.

--busy_threads runs that many threads of pure Python loops while timing (as any busy Python
thread of the trainer would): a thread that released the GIL (in FAISS, in a large numpy op)
then waits up to the interpreter's switch interval (5 ms) to get it back, so the host path's cost
grows with the number of GIL hand-offs it makes, not only with its arithmetic.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import faiss  # pylint: disable=g-import-not-at-top
import numpy as np

from sosm_jax.memory.segments import search_vectors
from sosm_jax.models.config import default_model_config
from sosm_jax.train import memory_train


def long_memory_model(heads: int, kv_heads: int, head_dim: int):
  """A model config whose graph layer has long_memory's memory shapes (built, never run)."""
  c = default_model_config("sosm")
  c.update(dict(pattern=("hgrn2", "graph"), num_layers=2, d_model=heads * head_dim,
                vocab_size=260, mlp_dim=256, attn_num_heads=heads, attn_num_kv_heads=kv_heads,
                attn_head_dim=head_dim, dtype="float32", scan_layers=False))
  c.graph.update(dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim))
  return c


def document_ids(streams: int, windows: int, window: int) -> np.ndarray:
  """`[streams, windows * window]` ids, a row mostly one document (see module doc)."""
  n = windows * window
  doc = np.tile(np.arange(1, streams + 1, dtype=np.int32)[:, None], (1, n))
  if streams > 1:
    doc[1, window + window // 3:] = 100      # a new document inside window 1
  if streams > 2 and windows > 2:
    doc[2, 2 * window:] = 200                # a new document with window 2 (memory reset)
  if streams > 3:
    doc[3, n - window // 7:] = 0             # padding at the end of the row
  return doc


class _Rows:
  """A stand-in data pipeline: the same row of windows every time (duck-types `Pipeline`)."""

  def __init__(self, row):
    self.row, self.n = row, 0

  def __next__(self):
    self.n += 1
    return self.row

  def get_state(self):
    return self.n

  def stats(self):
    return {}

  def close(self):
    pass


class _RandomProbe:
  """Stands in for the jitted probe: pre-drawn random q/k/v per window, cycled."""

  def __init__(self, layer, draws):
    self.layer, self.draws, self.i = layer, draws, 0

  def __call__(self, params, tokens, positions=None, segment_ids=None):
    del params, tokens, positions, segment_ids
    out = self.draws[self.i % len(self.draws)]
    self.i += 1
    return {self.layer: out}


def make_feeder(args):
  shape = (args.streams, args.windows * args.window)
  doc = document_ids(args.streams, args.windows, args.window)
  toks = np.zeros(shape, np.int32)
  row = {"inputs": toks, "targets": toks, "loss_mask": (doc > 0).astype(np.float32),
         "segment_ids": doc, "positions": np.tile(np.arange(shape[1], dtype=np.int32), (shape[0], 1))}
  cfg = memory_train.default_config()
  cfg.update(enabled=True, segments=args.windows, index="flat", top_k=args.top_k,
             capacity=args.capacity, num_shards=args.num_shards, prefetch=False,
             stream_threads=args.stream_threads, search_threads=args.search_threads)
  feeder = memory_train.SegmentFeeder(
      long_memory_model(args.heads, args.kv_heads, args.head_dim), cfg, seq_len=args.window,
      batch_size=args.streams, make_pipeline=lambda length, st: _Rows(row))
  rng = np.random.default_rng(args.seed)
  b, t, h, kv, d = args.streams, args.window, args.heads, args.kv_heads, args.head_dim
  draws = [tuple(rng.standard_normal(s, dtype=np.float32) for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d)))
           for _ in range(args.windows)]
  feeder.runner.probe = _RandomProbe(feeder.runner.layers[0], draws)
  return feeder, draws


def time_phases(feeder, draws, args):
  """Per window: seconds of each host phase called on its own (same memory as the feeder's).

  search_vectors: of the whole batch; search_only: the FAISS searches (HostMemory.search) of
  those vectors on the bank's threads, the floor of retrieve; retrieve: SegmentRunner.retrieve
  (search vectors, search, gather, same-document rule); add: SegmentRunner.add.
  """
  runner = feeder.runner
  layer = runner.layers[0]
  doc = document_ids(args.streams, args.windows, args.window)
  runner.reset()
  rows = []
  for s in range(args.windows):
    q, k, v = draws[s]
    win = doc[:, s * args.window:(s + 1) * args.window]
    probed = {layer: (q, k, v)}
    t0 = time.perf_counter()
    sv = search_vectors(q, runner.kv)
    t1 = time.perf_counter()
    bank = runner.banks[layer]   # FAISS search alone (HostMemory.search) on the bank's threads
    filled = [b for b, mem in enumerate(bank.memories) if len(mem)]
    if filled:
      bank._map(lambda b: bank.memories[b].search(sv[b], runner.top_k), filled)  # pylint: disable=protected-access,cell-var-from-loop
    t2 = time.perf_counter()
    runner.retrieve(probed, match={"doc": win})
    t3 = time.perf_counter()
    runner.add(probed, segment=s, metadata={"doc": win}, where=win > 0)
    t4 = time.perf_counter()
    rows.append(dict(search_vectors=t1 - t0, search_only=t2 - t1, retrieve=t3 - t2, add=t4 - t3))
  return rows


def time_feeder_steps(feeder):
  """One row through the feeder: per window (next_batch, after_dispatch) seconds."""
  out = []
  for _ in range(feeder.n):
    t0 = time.perf_counter()
    batch = feeder.next_batch(None)
    t1 = time.perf_counter()
    feeder.after_dispatch()
    t2 = time.perf_counter()
    out.append(dict(next_batch=t1 - t0, after_dispatch=t2 - t1, host_total=t2 - t0))
    del batch
  return out


def medians(per_row):
  """[[{phase: s} per window] per row] -> ({phase: [median ms per window]}, {phase: mean ms})."""
  names = per_row[0][0].keys()
  by_window = {n: [float(np.median([r[w][n] for r in per_row]) * 1e3) for w in range(len(per_row[0]))]
               for n in names}
  return by_window, {n: float(np.mean(v)) for n, v in by_window.items()}


class _BusyPython:
  """Threads spinning in pure Python (holding the GIL in turns) while the context is open."""

  def __init__(self, n: int):
    self.n, self.stop = n, threading.Event()

  def _spin(self):
    x = 0
    while not self.stop.is_set():
      for i in range(1000):
        x += i

  def __enter__(self):
    for _ in range(self.n):
      threading.Thread(target=self._spin, daemon=True).start()
    return self

  def __exit__(self, *exc):
    self.stop.set()


def cpu_budget() -> dict:
  """CPUs this process may use: affinity and any cgroup quota (nproc shows only the first)."""
  out = {"affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
  for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
    try:
      with open(path, encoding="utf-8") as f:
        out[path] = f.read().strip()
    except OSError:
      pass
  return out


def thread_scaling(args, counts) -> dict:
  """ms for n threads each running one stream's last-window work at once, n in `counts`.

  The work: search vectors of one stream's queries (numpy) and a FAISS flat search of them over
  (windows - 1) x window entries (one OpenMP thread per search, as the trainer's pool). On a host
  whose threads run in parallel the time stays flat up to its core count; if it grows with n the
  host (a CPU quota, a shared machine) or the library serialises them, not the memory code.
  """
  from concurrent.futures import ThreadPoolExecutor  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(args.seed)
  d = args.kv_heads * args.head_dim
  entries = max(args.windows - 1, 1) * args.window
  q = rng.standard_normal((1, args.window, args.heads, args.head_dim), dtype=np.float32)
  keys = search_vectors(rng.standard_normal((1, entries, args.kv_heads, args.head_dim),
                                            dtype=np.float32), args.kv_heads)[0]
  indexes = []
  for _ in range(max(counts)):
    index = faiss.IndexFlatIP(d)
    index.add(keys)
    indexes.append(index)

  def work(i):
    return indexes[i].search(search_vectors(q, args.kv_heads)[0], args.top_k)

  out = {}
  with ThreadPoolExecutor(max(counts), initializer=lambda: faiss.omp_set_num_threads(1)) as pool:
    list(pool.map(work, range(max(counts))))                    # start the threads
    for n in counts:
      times = []
      for _ in range(3):
        t0 = time.perf_counter()
        list(pool.map(work, range(n)))
        times.append(time.perf_counter() - t0)
      out[str(n)] = float(np.median(times) * 1e3)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--streams", type=int, default=8)
  ap.add_argument("--window", type=int, default=2048)
  ap.add_argument("--windows", type=int, default=4)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv_heads", type=int, default=1)
  ap.add_argument("--head_dim", type=int, default=64)
  ap.add_argument("--top_k", type=int, default=8)
  ap.add_argument("--capacity", type=int, default=131072)
  ap.add_argument("--num_shards", type=int, default=4)
  ap.add_argument("--stream_threads", type=int, default=0, help="memory.stream_threads (0 = per core)")
  ap.add_argument("--search_threads", type=int, default=1,
                  help="memory.search_threads (FAISS OpenMP threads per search; 0 = its default)")
  ap.add_argument("--busy_threads", type=int, default=0,
                  help="threads of pure Python running while timing (GIL contention)")
  ap.add_argument("--rows", type=int, default=3, help="timed rows (after one warm-up row)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--profile", action="store_true", help="print a cProfile of the feeder steps")
  ap.add_argument("--thread_counts", default="1,2,4,8,16",
                  help="thread_scaling's counts ('' = skip): n threads each run one stream's work")
  ap.add_argument("--output", default="")
  args = ap.parse_args(argv)
  counts = [int(n) for n in args.thread_counts.split(",") if n]
  feeder, draws = make_feeder(args)
  time_feeder_steps(feeder)                                     # warm-up row (pools, compiles)
  with _BusyPython(args.busy_threads):
    steps = [time_feeder_steps(feeder) for _ in range(args.rows)]
    phases = [time_phases(feeder, draws, args) for _ in range(args.rows)]
  step_w, step_mean = medians(steps)
  phase_w, phase_mean = medians(phases)
  result = dict(
      platform=platform.processor() or platform.machine(), cpus=os.cpu_count(),
      faiss=faiss.__version__, numpy=np.__version__, args=vars(args),
      shapes=dict(queries=[args.streams, args.window, args.heads, args.head_dim],
                  search_vectors=[args.streams, args.window, args.kv_heads * args.head_dim],
                  memory_keys=[args.streams, args.window, args.top_k, args.kv_heads, args.head_dim],
                  entries_per_stream_by_window=[s * args.window for s in range(args.windows)]),
      feeder_step_ms_by_window=step_w, feeder_step_ms_mean=step_mean,
      phase_ms_by_window=phase_w, phase_ms_mean=phase_mean,
      memory_valid_fraction=feeder.stats().get("memory_valid_fraction"),
      cpu_budget=cpu_budget(),
      thread_scaling_ms=thread_scaling(args, counts) if counts else None)
  print(json.dumps(result, indent=1))
  if args.profile:
    prof = cProfile.Profile()
    prof.enable()
    time_feeder_steps(feeder)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)

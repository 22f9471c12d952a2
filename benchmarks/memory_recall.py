"""Memory benchmark: HNSW recall@k vs exact search on keys of a trained model, QPS, train-step overhead.

1. Trains a small byte-level LM (attn + graph layer, `LanguageModel` without memory) on the stdlib
   text source for --train_steps, so its graph-layer keys are those of a trained model.
2. Keys: the graph layer's normalised search vectors (what the memory stores) over --num_keys
   held-out tokens; queries: the normalised q search vectors of other held-out tokens. Ground
   truth: exact inner-product search (IndexFlatIP). For each (M, efConstruction) an HNSW index
   is built once and searched at several efSearch: recall@k (fraction of the exact top-k found),
   QPS (one thread, all queries in one call, median of --repeat), build time. The same grid on
   random Gaussian vectors of the same width (the worst case for HNSW) for comparison.
3. Train-step overhead, the trainer's integrated path: tokens/s of the train step (`model.loss`
   on the batch, with batch['memory'] filled by `memory_train.SegmentFeeder`: probe, host
   retrieval, step, host add) against the same step without memory, same model and windows of
   --seq_len; every stream reads one row of --overhead_steps + 2 windows, so its memory grows
   through the run.

  python benchmarks/memory_recall.py --output=/tmp/memory.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import faiss
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sosm_jax.data import make_pipeline, make_tokenizer
from sosm_jax.data.config import default_data_config
from sosm_jax.memory.segments import SegmentRunner, search_vectors
from sosm_jax.memory.store import make_index, resolve_config
from sosm_jax.models import build_model
from sosm_jax.models.config import default_model_config
from sosm_jax.train import memory_train

_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def model_cfg(seq_len):
  c = default_model_config("sosm")
  c.update(dict(pattern=("attn", "graph"), num_layers=2, d_model=128, vocab_size=260, mlp_dim=256,
                attn_num_heads=4, attn_num_kv_heads=2, attn_head_dim=64, dtype="float32",
                scan_layers=False))
  c.graph.update(dict(window=seq_len // 2, select_block_size=16, select_num_blocks=2,
                      query_chunk=seq_len, key_chunk=64))
  return c


def batches(seq_len, batch, seed, split="train", start_state=None):
  d = default_data_config()
  tok = make_tokenizer(d)
  return make_pipeline(d, tok, seq_len=seq_len, batch_size=batch, seed=seed, split=split,
                       start_state=start_state)


def make_step(model):
  """The train step on `model.loss` (batch['memory'] optional, as in the trainer)."""
  opt = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, b):
    (loss, _), g = jax.value_and_grad(model.loss, has_aux=True)(params, b)
    u, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state, loss
  return opt, step


def train(model, args):
  opt, step = make_step(model)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), args.batch, args.seq_len))
  opt_state = opt.init(params)
  it = iter(batches(args.seq_len, args.batch, 0))
  losses = []
  for _ in range(args.train_steps):
    b = {k: jnp.asarray(v) for k, v in next(it).items() if k in _KEYS}
    params, opt_state, loss = step(params, opt_state, b)
    losses.append(float(loss))
  return params, opt_state, step, losses


def trained_vectors(runner, params, args):
  """(keys [n, dim], queries [q, dim]) normalised search vectors from held-out text."""
  it = iter(batches(args.seq_len, args.batch, 1, split="validation"))
  layer = runner.layers[0]
  keys, queries = [], []
  while sum(len(k) for k in keys) < args.num_keys + args.num_queries:
    probed = runner.probe(params, jnp.asarray(next(it)["inputs"]))[layer]
    keys.append(search_vectors(probed[1], runner.kv).reshape(-1, runner.kv * runner.head_dim))
    queries.append(search_vectors(probed[0], runner.kv).reshape(-1, runner.kv * runner.head_dim))
  k = np.concatenate(keys)
  q = np.concatenate(queries)
  rng = np.random.default_rng(0)
  # queries from tokens not in the index (the index holds the first num_keys tokens)
  qi = args.num_keys + rng.permutation(len(q) - args.num_keys)[:args.num_queries]
  return np.ascontiguousarray(k[:args.num_keys]), np.ascontiguousarray(q[qi])


def recall_grid(keys, queries, args):
  k = args.k
  exact = faiss.IndexFlatIP(keys.shape[1])
  exact.add(keys)
  t = time.perf_counter()
  _, truth = exact.search(queries, k)
  flat_qps = len(queries) / (time.perf_counter() - t)
  rows = []
  for m in args.m:
    for efc in args.ef_construction:
      cfg = resolve_config(None, index="hnsw", hnsw_m=m, hnsw_ef_construction=efc)
      index = make_index(keys.shape[1], cfg)
      t = time.perf_counter()
      index.add(keys)
      build = time.perf_counter() - t
      for efs in args.ef_search:
        index.hnsw.efSearch = efs
        times = []
        for _ in range(args.repeat):
          t = time.perf_counter()
          _, got = index.search(queries, k)
          times.append(time.perf_counter() - t)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)])
        rows.append(dict(M=m, efConstruction=efc, efSearch=efs, recall=float(recall),
                         qps=float(len(queries) / np.median(times)), build_s=build))
        print(json.dumps(rows[-1]), flush=True)
  return dict(flat_qps=flat_qps, rows=rows)


def _timed(fn, sink):
  """fn wrapped to add its (blocking) seconds to sink[0]."""
  def wrapped(*a, **k):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*a, **k))
    sink[0] += time.perf_counter() - t
    return out
  return wrapped


def overhead(model, params, opt_state, step, args, index="hnsw", mode="overlap"):
  """Median tokens/s of the train step without memory and with the trainer's memory path.

  mode: 'serial' (probe, search, step, then add), 'overlap' (add while the step runs: the
  trainer's default), 'prefetch' (add and the next window's search while the step runs:
  memory.prefetch=True; probe/retrieve times are then not on the step's critical path).
  """
  n = args.overhead_steps + 2
  overlap = mode != "serial"
  mem_cfg = memory_train.default_config()
  mem_cfg.update(enabled=True, segments=n, index=index, prefetch=mode == "prefetch")
  feeder = memory_train.SegmentFeeder(
      model, mem_cfg, seq_len=args.seq_len, batch_size=args.batch,
      make_pipeline=lambda length, st: batches(length, args.batch, 2, start_state=st))
  probe_s, retrieve_s = [0.0], [0.0]
  if mode != "prefetch":   # timing the probe blocks on it, which prefetching must not do
    feeder.runner.probe = _timed(feeder.runner.probe, probe_s)
  feeder.runner.retrieve = _timed(feeder.runner.retrieve, retrieve_s)
  toks = args.batch * args.seq_len
  out = {}
  ts, parts = [], []
  p, o = params, opt_state
  windows = []
  for _ in range(n):
    probe_s[0] = retrieve_s[0] = 0.0
    t0 = time.perf_counter()
    b = feeder.next_batch(p)
    t1 = time.perf_counter()
    before = (probe_s[0], retrieve_s[0])                     # spent before the step's dispatch
    p, o, loss = step(p, o, jax.tree.map(jnp.asarray, b))   # dispatched asynchronously
    if overlap:
      feeder.after_dispatch()                                # host work while the device computes
    t2 = time.perf_counter()
    loss.block_until_ready()
    if not overlap:
      feeder.after_dispatch()
    t3 = time.perf_counter()
    ts.append(t3 - t0)
    parts.append((before[0], before[1], retrieve_s[0] - before[1], t1 - t0, t2 - t1, t3 - t2))
    windows.append({k: v for k, v in b.items() if k != "memory"})
  out["tokens_per_s_with_memory"] = toks / float(np.median(ts[2:]))
  med = np.median(np.array(parts[2:]), 0)
  # probe/retrieve_before_step: inside next_batch (the probe is not timed under prefetch);
  # retrieve_during_step: prefetch's search for the next window, inside after_dispatch
  out["median_s"] = dict(probe=med[0], retrieve_before_step=med[1], retrieve_during_step=med[2],
                         next_batch=med[3], dispatch_and_host_work=med[4], wait_step=med[5])
  out["memory_entries_per_stream_at_end"] = feeder.runner.entries()[0]
  out["memory_valid_fraction"] = feeder.stats().get("memory_valid_fraction")
  feeder.close()
  # the same windows through the same step without memory (its own compiled program)
  ts = []
  p, o = params, opt_state
  for b in windows:
    t = time.perf_counter()
    p, o, loss = step(p, o, jax.tree.map(jnp.asarray, b))
    loss.block_until_ready()
    ts.append(time.perf_counter() - t)
  out["tokens_per_s_without_memory"] = toks / float(np.median(ts[2:]))
  out["slowdown"] = 1.0 - out["tokens_per_s_with_memory"] / out["tokens_per_s_without_memory"]
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--train_steps", type=int, default=300)
  ap.add_argument("--num_keys", type=int, default=20000)
  ap.add_argument("--num_queries", type=int, default=1000)
  ap.add_argument("--k", type=int, default=16)
  ap.add_argument("--m", type=int, nargs="+", default=[16, 32])
  ap.add_argument("--ef_construction", type=int, nargs="+", default=[40, 80])
  ap.add_argument("--ef_search", type=int, nargs="+", default=[16, 32, 64, 128])
  ap.add_argument("--repeat", type=int, default=3)
  ap.add_argument("--overhead_steps", type=int, default=10)
  ap.add_argument("--overhead_only", action="store_true", help="skip the recall grids")
  ap.add_argument("--overhead_index", nargs="+", default=["hnsw", "flat"])
  ap.add_argument("--overhead_modes", nargs="+", default=["serial", "overlap", "prefetch"])
  ap.add_argument("--output", default="")
  args = ap.parse_args(argv)
  faiss.omp_set_num_threads(1)
  cfg = model_cfg(args.seq_len)
  mem_cfg = resolve_config(None)
  model = build_model(cfg)
  runner = SegmentRunner(model, mem_cfg, num_streams=args.batch)
  t = time.perf_counter()
  params, opt_state, step, losses = train(model, args)
  result = dict(device=str(jax.devices()[0]), platform=platform.processor() or platform.machine(),
                jax=jax.__version__, faiss=faiss.__version__, args=vars(args), memory_defaults=mem_cfg,
                train=dict(seconds=time.perf_counter() - t, first_loss=losses[0],
                           last_loss=float(np.mean(losses[-10:]))))
  print(json.dumps(result["train"]), flush=True)
  if not args.overhead_only:
    keys, queries = trained_vectors(runner, params, args)
    result["search_dim"] = int(keys.shape[1])
    result["trained"] = recall_grid(keys, queries, args)
    rng = np.random.default_rng(1)
    rand = lambda n: np.ascontiguousarray(
        (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(rng.standard_normal((n, keys.shape[1]))),
        dtype=np.float32)
    result["random"] = recall_grid(rand(len(keys)), rand(len(queries)), args)
  for index in args.overhead_index:
    for mode in args.overhead_modes:
      name = f"overhead_{index}_{mode}"
      result[name] = overhead(model, params, opt_state, step, args, index, mode)
      print(name, json.dumps(result[name], default=float), flush=True)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1, default=float)
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)

"""Graph-routing layer vs full causal attention: forward+backward time and memory by context length.

    PYTHONPATH=. python benchmarks/graph.py [--lengths=4096,16384,65536] [--tokens=65536]
        [--modes=block,token] [--repeat=10] [--budget=420] [--output=FILE.json]

Each length T runs batch = tokens // T (constant tokens per step, as in the curriculum). Layers:
'full_attention' (q/k/v/o projections, RoPE, `jax.nn.dot_product_attention` causal, cuDNN on
GPU) and 'graph_<mode>' (`sosm_jax.layers.graph.GraphMixer`, defaults of `GRAPH_DEFAULTS`), both
d_model 768, 12 query / 4 kv heads of 64, bfloat16 activations. Timed: jit(grad of mean(y²)
w.r.t. params and input), median over --repeat runs after two warm-ups. Memory: the compiled
step's temp + argument + output bytes (XLA memory analysis) and the device's peak after it.
At the largest length it also times the block-mode pieces: graph build (forward only) and the
sparse attention (forward+backward). Writes JSON (device, versions, rows) and prints a table.
Needs only jax, flax and numpy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sosm_jax.layers import graph as graph_layer  # noqa: E402
from sosm_jax.ops import attention as attn_ops  # noqa: E402
from sosm_jax.ops import graph_attention as ga  # noqa: E402
from sosm_jax.ops import graph_build as gb  # noqa: E402

D_MODEL, HEADS, KV_HEADS, HEAD_DIM = 768, 12, 4, 64


def model_cfg(mode: str, dtype: str = "bfloat16", **graph_overrides):
  g = dict(graph_layer.GRAPH_DEFAULTS, mode=mode, **graph_overrides)
  return SimpleNamespace(d_model=D_MODEL, attn_num_heads=HEADS, attn_num_kv_heads=KV_HEADS,
                         attn_head_dim=HEAD_DIM, rope_base=10000.0, dtype=dtype,
                         param_dtype="float32", graph=SimpleNamespace(**g))


def full_attention_layer(params, x):
  """The baseline: projections + RoPE + causal dot_product_attention (cuDNN on GPU)."""
  b, t, _ = x.shape
  cast = lambda w: w.astype(x.dtype)
  q = jnp.einsum("btd,dhk->bthk", x, cast(params["wq"]))
  k = jnp.einsum("btd,dhk->bthk", x, cast(params["wk"]))
  v = jnp.einsum("btd,dhk->bthk", x, cast(params["wv"]))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  q, k = attn_ops.apply_rope(q, pos), attn_ops.apply_rope(k, pos)
  impl = "cudnn" if jax.default_backend() == "gpu" else None
  o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
  return jnp.einsum("bthk,hkd->btd", o, cast(params["wo"]))


def init_full(key):
  ks = jax.random.split(key, 4)
  n = lambda k, s, fan: jax.random.normal(k, s, jnp.float32) * fan ** -0.5
  return {"wq": n(ks[0], (D_MODEL, HEADS, HEAD_DIM), D_MODEL),
          "wk": n(ks[1], (D_MODEL, KV_HEADS, HEAD_DIM), D_MODEL),
          "wv": n(ks[2], (D_MODEL, KV_HEADS, HEAD_DIM), D_MODEL),
          "wo": n(ks[3], (HEADS, HEAD_DIM, D_MODEL), HEADS * HEAD_DIM)}


def memory_of(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
    return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes)}
  except Exception as e:  # pylint: disable=broad-except  (not every backend reports it)
    return {"memory_analysis_error": repr(e)}


def device_peak() -> int | None:
  try:
    return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
  except Exception:  # pylint: disable=broad-except
    return None


def time_fn(fn, args, repeat: int) -> dict:
  """Compile, warm up twice, then the median wall time of `repeat` synchronised calls."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  out = None
  for _ in range(2):
    out = compiled(*args)
    jax.block_until_ready(out)
  times = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  finite = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(out))
  return dict(median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times),
              compile_s=compile_s, finite=finite, device_peak_bytes=device_peak(),
              **memory_of(compiled))


def loss_grad(apply):
  def loss(p, x):
    return jnp.mean(jnp.square(apply(p, x).astype(jnp.float32)))
  return jax.grad(loss, argnums=(0, 1))


def bench_layer(variant: str, t: int, batch: int, repeat: int) -> dict:
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (batch, t, D_MODEL), jnp.float32).astype(jnp.bfloat16)
  if variant == "full_attention":
    params = init_full(key)
    fn = loss_grad(full_attention_layer)
  else:
    mode = variant.split("_")[1]
    mixer = graph_layer.GraphMixer(model_cfg(mode), 0)
    params = jax.jit(mixer.init)(key, x)
    fn = loss_grad(lambda p, xx: mixer.apply(p, xx)[0])
    if variant.endswith("_fwd"):
      fn = lambda p, xx: mixer.apply(p, xx)[0]
  return time_fn(fn, (params, x), repeat)


def bench_pieces(t: int, batch: int, repeat: int, mode: str) -> list[dict]:
  """Block/token-mode graph build alone (forward) and the sparse attention alone (fwd+bwd)."""
  cfg = model_cfg(mode)
  opts = graph_layer.graph_opts(cfg.graph)
  key = jax.random.split(jax.random.PRNGKey(1), 6)
  sem = jax.random.normal(key[0], (batch, t, 64), jnp.float32)
  gfeat = jax.random.normal(key[1], (batch, t, 32), jnp.float32)
  g = cfg.graph

  def build(sem, gfeat):
    fq, fk = gb.similarity_features(sem, similarity=g.similarity, block_size=g.semantic_block_size,
                                    block_weights=g.block_weights, proj_dim=g.proj_dim)
    gr = gb.build_graph(fq, fk, gfeat, sem, opts=opts)
    return gr.idx, gr.mask

  rows = [dict(variant=f"build_{mode}", **time_fn(build, (sem, gfeat), repeat))]
  if mode == "block":
    idx, mask = jax.jit(build)(sem, gfeat)
    q = jax.random.normal(key[2], (batch, t, HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(key[3], (batch, t, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(key[4], (batch, t, KV_HEADS, HEAD_DIM), jnp.bfloat16)

    def attn(q, k, v):
      o = ga.graph_attention(q, k, v, idx, mask, window=opts["window"])
      return jnp.mean(jnp.square(o.astype(jnp.float32)))

    rows.append(dict(variant="sparse_attention", **time_fn(jax.grad(attn, argnums=(0, 1, 2)),
                                                           (q, k, v), repeat)))
    rows[-1]["mean_edges_per_token"] = float(jnp.mean(jnp.sum(mask, -1)))
    saved = ga.EDGE_CONTRACTION
    ga.EDGE_CONTRACTION = "einsum"  # the batched-dot form of the per-edge contractions
    try:
      rows.append(dict(variant="sparse_attn_einsum", **time_fn(jax.grad(attn, argnums=(0, 1, 2)),
                                                               (q, k, v), repeat)))
    finally:
      ga.EDGE_CONTRACTION = saved

    def attn2(q, k, v):  # two edge slots: about the cost of the local window alone
      o = ga.graph_attention(q, k, v, idx[..., :2], mask[..., :2], window=opts["window"])
      return jnp.mean(jnp.square(o.astype(jnp.float32)))

    rows.append(dict(variant="sparse_attn_2edges", **time_fn(jax.grad(attn2, argnums=(0, 1, 2)),
                                                             (q, k, v), repeat)))

    def cudnn(q, k, v):
      impl = "cudnn" if jax.default_backend() == "gpu" else None
      o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
      return jnp.mean(jnp.square(o.astype(jnp.float32)))

    rows.append(dict(variant="cudnn_attention_op", **time_fn(jax.grad(cudnn, argnums=(0, 1, 2)),
                                                             (q, k, v), repeat)))
  return rows


def check_gpu_correctness() -> float:
  """Sparse attention vs its dense reference on this device (float32, small): max abs error."""
  rng = np.random.default_rng(0)
  b, t, h, hk, d, kk, w = 2, 96, 4, 2, 16, 6, 8
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, t, hk, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, t, hk, d)), jnp.float32)
  fq = jnp.asarray(rng.standard_normal((b, t, 8)), jnp.float32)
  _, idx, mask = gb.topk_streaming(fq, fq, k=kk, exclude=w)
  with jax.default_matmul_precision("highest"):
    out = ga.graph_attention(q, k, v, idx, mask, window=w)
    ref = ga.graph_attention_reference(q, k, v, idx, mask, window=w)
  return float(jnp.max(jnp.abs(out - ref)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lengths", default="4096,16384,65536")
  ap.add_argument("--tokens", type=int, default=65536)
  ap.add_argument("--modes", default="block,token")
  ap.add_argument("--repeat", type=int, default=10)
  ap.add_argument("--budget", type=float, default=420.0, help="seconds; later rows are skipped")
  ap.add_argument("--no_pieces", action="store_true")
  ap.add_argument("--output", default="")
  args = ap.parse_args()
  start = time.perf_counter()
  dev = jax.devices()[0]
  result = {"device": dev.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "d_model": D_MODEL, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
            "dtype": "bfloat16", "graph_config": dict(graph_layer.GRAPH_DEFAULTS),
            "tokens_per_step": args.tokens, "rows": [], "skipped": []}
  result["gpu_check_max_abs_err"] = check_gpu_correctness()
  lengths = [int(s) for s in args.lengths.split(",")]
  plan = []
  for t in lengths:
    plan += [(t, "full_attention")] + [(t, f"graph_{m}") for m in args.modes.split(",") if m]
    plan += [(t, "graph_block_fwd")] if "block" in args.modes else []
  if not args.no_pieces:
    plan += [(max(lengths), "pieces_block"), (max(lengths), "pieces_token")]
  for t, variant in plan:
    batch = max(1, args.tokens // t)
    if time.perf_counter() - start > args.budget:
      result["skipped"].append(f"{variant}@{t}")
      continue
    try:
      if variant.startswith("pieces_"):
        if variant.split("_")[1] not in args.modes.split(","):
          continue
        rows = bench_pieces(t, batch, args.repeat, variant.split("_")[1])
      else:
        rows = [dict(variant=variant, **bench_layer(variant, t, batch, args.repeat))]
    except Exception as e:  # pylint: disable=broad-except  (report and go on: OOM at one size)
      rows = [dict(variant=variant, error=repr(e)[:500])]
    for r in rows:
      r.update(seq_len=t, batch=batch)
      result["rows"].append(r)
      print(json.dumps(r), flush=True)
    if args.output:
      with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
  print(f"\ndevice {result['device']}  jax {result['jax']}  gpu check err "
        f"{result['gpu_check_max_abs_err']:.2e}")
  print(f"{'T':>6} {'B':>3} {'variant':<20} {'ms':>11} {'temp MiB':>9} {'vs full':>8}"
        "   (ms: forward+backward; *_fwd and build_*: forward only)")
  full = {r["seq_len"]: r.get("median_ms") for r in result["rows"] if r["variant"] == "full_attention"}
  for r in result["rows"]:
    ms = r.get("median_ms")
    ratio = full.get(r["seq_len"]) / ms if ms and full.get(r["seq_len"]) else float("nan")
    temp = r.get("temp_bytes", 0) / 2 ** 20
    print(f"{r['seq_len']:>6} {r['batch']:>3} {r['variant']:<20} "
          f"{ms if ms else float('nan'):>11.2f} {temp:>9.0f} {ratio:>8.2f}" + (
              f"  {r['error'][:80]}" if "error" in r else ""))
  if result["skipped"]:
    print("skipped (budget):", result["skipped"])


if __name__ == "__main__":
  main()

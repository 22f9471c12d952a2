"""Causal attention over packed documents on GPU: cuDNN packed layout vs blockwise vs no masking.

The model's attention layers see segment ids (packed documents). This times forward+backward of
`sosm_jax.ops.attention.causal_attention` per implementation at a constant number of tokens,
checks the cuDNN packed path against the float32 reference (forward and gradients) on a small
shape, and writes JSON (device, shapes, medians).

  python benchmarks/attention.py --rows=4096x8,16384x2,65536x1 --out=/tmp/attention.json
  python benchmarks/attention.py --rows=4096x8,16384x2 --mean_doc=0 --max_segments=0,1,8 \\
    --impls=cudnn_packed,cudnn_nomask --out=/tmp/segment_bound.json   # the packed layout's M
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from sosm_jax.ops import attention as att


def packed_ids(batch: int, seq_len: int, mean_doc: int, seed: int = 0) -> np.ndarray:
  """`[batch, seq_len]` segment ids: documents of random length (mean `mean_doc`), ids 1, 2, …

  `mean_doc=0`: one document per row (what `benchmarks/scaling.py` feeds the model).
  """
  if mean_doc == 0:
    return np.ones((batch, seq_len), np.int32)
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(batch):
    lens = rng.integers(mean_doc // 2, 3 * mean_doc // 2 + 1, size=2 * seq_len // mean_doc + 2)
    ids = np.repeat(np.arange(1, len(lens) + 1), lens)[:seq_len]
    rows.append(ids)
  return np.stack(rows).astype(np.int32)


def qkv(batch, seq_len, heads, kv_heads, dim, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, seq_len, heads, dim), dtype)
  k = jax.random.normal(ks[1], (batch, seq_len, kv_heads, dim), dtype)
  v = jax.random.normal(ks[2], (batch, seq_len, kv_heads, dim), dtype)
  do = jax.random.normal(ks[3], (batch, seq_len, heads, dim), dtype)
  return q, k, v, do


def fwd_bwd(impl: str, segments: bool, max_segments: int = 0):
  def f(q, k, v, ids, do):
    fn = lambda q, k, v: att.causal_attention(
        q, k, v, segment_ids=ids if segments else None, implementation=impl,
        max_segments=max_segments)
    o, vjp = jax.vjp(fn, q, k, v)
    return o, vjp(do)
  return jax.jit(f)


def check_against_reference(args) -> dict:
  """Max error of cuDNN packed (bf16) against the float32 reference, on non-padding tokens."""
  b, t = 2, 512
  q, k, v, do = qkv(b, t, args.heads, args.kv_heads, args.dim, jnp.bfloat16, seed=1)
  ids = jnp.asarray(packed_ids(b, t, 96, seed=1))
  o, grads = fwd_bwd("cudnn", True, 16)(q, k, v, ids, do)
  f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
  o_ref, grads_ref = fwd_bwd("reference", True)(*f32[:3], ids, f32[3])
  rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b)
                           / jnp.linalg.norm(b))
  return {"shape": [b, t], "o": rel(o, o_ref),
          **{f"d{n}": rel(g, r) for n, g, r in zip("qkv", grads, grads_ref)}}


def temp_gib(fn, inputs) -> float | None:
  """Compiled temporary memory of the call (GiB), where the backend reports it."""
  analysis = fn.lower(*inputs).compile().memory_analysis()
  return getattr(analysis, "temp_size_in_bytes", 0) / 2**30 if analysis else None


def time_call(fn, inputs, iters: int) -> float:
  jax.block_until_ready(fn(*inputs))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", default="4096x8,16384x2,65536x1")
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--mean_doc", type=int, default=1024,
                 help="mean document length (tokens); 0: one document per row")
  p.add_argument("--max_segments", default="0",
                 help="cudnn_packed's segment bounds M to time, comma-separated (0: the default "
                      "bound for the length, `default_packed_segments`)")
  p.add_argument("--impls", default="cudnn_packed,cudnn_nomask,blockwise")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--out", default="")
  args = p.parse_args()
  report = {"benchmark": "attention", "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "heads": args.heads, "kv_heads": args.kv_heads,
            "head_dim": args.dim, "mean_doc": args.mean_doc, "command": " ".join(sys.argv),
            "rows": []}
  if jax.default_backend() == "gpu":
    report["error_vs_reference"] = check_against_reference(args)
    print("relative error vs float32 reference:", report["error_vs_reference"], flush=True)
  impls = {"cudnn_packed": ("cudnn", True), "cudnn_nomask": ("cudnn", False),
           "blockwise": ("blockwise", True), "xla": ("xla", True)}
  for row in args.rows.split(","):
    t, b = (int(x) for x in row.split("x"))
    q, k, v, do = qkv(b, t, args.heads, args.kv_heads, args.dim, jnp.bfloat16)
    ids = jnp.asarray(packed_ids(b, t, args.mean_doc))
    runs = [(name, m) for name in args.impls.split(",")
            for m in ([int(x) for x in args.max_segments.split(",")]
                      if name == "cudnn_packed" else [0])]
    for name, max_segments in runs:
      impl, segments = impls[name]
      fn, inputs = fwd_bwd(impl, segments, max_segments), (q, k, v, ids, do)
      try:
        ms, temp = time_call(fn, inputs, args.iters), temp_gib(fn, inputs)
      except Exception as e:  # pylint: disable=broad-except
        ms, temp, err = None, None, f"{type(e).__name__}: {str(e)[:200]}"
      else:
        err = None
      rec = {"seq_len": t, "batch": b, "impl": name, "fwd_bwd_ms": ms, "temp_gib": temp, "error": err,
             "max_segments": (max_segments or att.default_packed_segments(t))
                             if name == "cudnn_packed" else None}
      report["rows"].append(rec)
      print(json.dumps(rec), flush=True)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()

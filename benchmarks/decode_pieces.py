"""Prefill pieces that continue a KV cache: the Pallas kernel's piece grid against the XLA form.

For each case (cache positions, filled to, piece tokens, int8 cache, sliding window, read_len)
a random heads-first cache (ops/attention.init_kv_cache) and a piece of queries at the recipe's
head layout (12 query heads over 4 kv heads of 64, bf16, one row): the largest difference of
`cached_attention(implementation='pallas')` from the XLA form, and the median time of each.
--sweep also times the piece grid's launch settings (rows a program, warps, stages) at one case.
On a CPU, --interpret runs the kernel in interpret mode at small shapes (a check, no timing
worth reading).

  python benchmarks/decode_pieces.py --out=/tmp/pieces.json              # GPU
  python benchmarks/decode_pieces.py --sweep --out=/tmp/pieces.json
  JAX_PLATFORMS=cpu python benchmarks/decode_pieces.py --interpret --repeats=1   # CPU check
"""
import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sosm_jax.ops import attention as att
from sosm_jax.ops import decode_attention

_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median).")
_SWEEP = flags.DEFINE_bool("sweep", False, "Also time the piece grid's rows / warps / stages.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "The kernel in interpret mode, small shapes.")

HEADS, KV_HEADS, HEAD_DIM = 12, 4, 64
# (cache positions, filled to, piece tokens, int8, window, read_len)
GPU_CASES = ((131072, 8192, 4096, False, 0, 0), (131072, 65536, 4096, False, 0, 0),
             (131072, 131072, 4096, False, 0, 0), (131072, 65536, 4096, True, 0, 0),
             (102408, 70001, 300, False, 0, 0), (8192, 6000, 512, False, 1000, 0),
             (16384, 9000, 2048, False, 0, 12288))
CPU_CASES = ((1024, 700, 64, False, 0, 0), (1032, 1032, 100, True, 0, 0),
             (1024, 900, 48, False, 200, 0))
SWEEP_CASE = (131072, 65536, 4096, False, 0, 0)


def make_case(max_len, index, tq, quantized, seed=0):
  """A random cache of max_len positions filled to `index`, and a piece of tq queries."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  cache = att.init_kv_cache(1, max_len, KV_HEADS, HEAD_DIM, jnp.bfloat16, quantized=quantized)
  k = (jax.random.normal(ks[0], (1, max_len, KV_HEADS, HEAD_DIM)) * 2).astype(jnp.bfloat16)
  v = jax.random.normal(ks[1], (1, max_len, KV_HEADS, HEAD_DIM)).astype(jnp.bfloat16)
  cache = jax.jit(att.update_kv_cache)(cache, k, v)
  cache["index"] = jnp.asarray(index, jnp.int32)
  q = jax.random.normal(ks[2], (1, tq, HEADS, HEAD_DIM)).astype(jnp.bfloat16)
  return q, cache


def attention_fn(implementation, window, read_len):
  return jax.jit(lambda q, c: att.cached_attention(q, c, window=window, read_len=read_len,
                                                   implementation=implementation))


def median_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def check_case(case, kernel, repeats):
  max_len, index, tq, quantized, window, read_len = case
  q, cache = make_case(max_len, index, tq, quantized)
  if att.decode_implementation(kernel, q.shape, cache, read_len) != kernel:
    raise ValueError(f"case {case}: the kernel does not take it (decode_attention.supports)")
  xla, pallas = attention_fn("xla", window, read_len), attention_fn(kernel, window, read_len)
  diff = float(np.max(np.abs(np.asarray(pallas(q, cache), np.float32)
                             - np.asarray(xla(q, cache), np.float32))))
  return {"max_len": max_len, "index": index, "tq": tq, "int8": quantized, "window": window,
          "read_len": read_len, "max_abs_difference": diff,
          "xla_ms": median_ms(xla, (q, cache), repeats),
          "kernel_ms": median_ms(pallas, (q, cache), repeats)}


def sweep(repeats):
  """The piece grid's launch settings at SWEEP_CASE: rows a program x warps x stages."""
  max_len, index, tq, quantized, window, read_len = SWEEP_CASE
  q, cache = make_case(max_len, index, tq, quantized)
  shipped = (decode_attention._PIECE_ROWS, decode_attention.compiler_params)  # pylint: disable=protected-access
  rows = []
  try:
    for piece_rows, warps, stages in itertools.product((64, 128, 256), (4, 8), (1, 2, 3)):
      decode_attention._PIECE_ROWS = piece_rows  # pylint: disable=protected-access
      decode_attention.compiler_params = (
          lambda interpret, num_warps, num_stages=1, w=warps, s=stages:
          shipped[1](interpret, num_warps=w, num_stages=s))
      ms = median_ms(attention_fn("pallas", window, read_len), (q, cache), repeats)
      rows.append({"rows": piece_rows, "warps": warps, "stages": stages, "ms": ms})
      print(json.dumps(rows[-1]), flush=True)
  finally:
    decode_attention._PIECE_ROWS, decode_attention.compiler_params = shipped  # pylint: disable=protected-access
  return rows


def main(argv):
  del argv
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not _INTERPRET.value:
    raise app.UsageError("the kernel compiles for a GPU; on this backend add --interpret")
  kernel = "pallas_interpret" if _INTERPRET.value else "pallas"
  cases = CPU_CASES if _INTERPRET.value else GPU_CASES
  results = []
  for case in cases:
    results.append(check_case(case, kernel, _REPEATS.value))
    print(json.dumps(results[-1]), flush=True)
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16",
            "implementation": kernel, "repeats": _REPEATS.value, "cases": results}
  if _SWEEP.value and on_gpu:
    report["sweep"] = {"case": SWEEP_CASE, "rows": sweep(_REPEATS.value)}
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)

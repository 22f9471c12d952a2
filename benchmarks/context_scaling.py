"""Context-length scaling: prefill time, per-token decode time and memory, 1K -> 128K tokens.

For the transformer baseline and the 3:1 HGRN-2 hybrid at the same parameter count (the
transformer's MLP is widened to match), at every length L:
  prefill_s        median time of one jitted prefill of L tokens (batch 1), cache sized L + decode
  decode_ms        median per-token time of a jitted scan of --decode_steps greedy decode steps
                   from that cache (the cost of generating at context L)
  request_s        prefill_s + --gen_tokens x decode time: one request of L prompt tokens that
                   generates --gen_tokens tokens, the quantity the earlier baseline timed
  *_ratio          the value divided by its value at 1K (or at the first length without 1K)
  compiled_gib     the compiled prefill's memory analysis (arguments + outputs + temporaries)
  peak_gib         the device's peak bytes in use so far (monotone over the run; GPU only)
--layout=serving runs both in the serving layout (sosm_jax/serve/layout.py: bfloat16 matmul
weights, unrolled layers) with the batch-1 projections on two rows (`layout.decode_step`);
--layout=onerow decodes that layout through sosm_jax/serve/onerow.py instead, what the engine runs
with one slot (prefill stays the serving layout's model in both).
--profile_prefill=N prints and stores the N kernels with the most GPU time in one prefill
(CUPTI through torch.profiler, benchmarks/kernel_profile.py), to see what a long prefill spends.
A length whose prefill fails (out of memory) or takes longer than --max_seconds is marked and
longer lengths are skipped for that model.

  python benchmarks/context_scaling.py --quick --out=/tmp/ctx_quick          # CPU, 512..4K
  python benchmarks/context_scaling.py --out=/tmp/ctx                        # GPU, 1K..128K
  python benchmarks/context_scaling.py --out=/tmp/ctx --models=hybrid --lengths=65536,131072

Per-model results go to OUT/<model>.json (merged by length with earlier runs into the same OUT),
the table to OUT/context_scaling.md and OUT/context_scaling.json, the plot to
OUT/context_scaling.png.
"""
import functools
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from sosm_jax import models
from sosm_jax.eval import report as report_lib
from sosm_jax.eval.sizing import count_params, match_mlp_dim
from sosm_jax.models.config import default_model_config
from sosm_jax.serve import layout, onerow
from kernel_profile import profile_kernels

# The earlier baseline (background/sam2_baseline_limits.md): an 8B transformer served by Ollama,
# seconds per request by prompt length; 32K timed out (>120 s). Its target: 64K with < 2x the
# 1K time, and no failure below 100K.
EARLIER_BASELINE = {1024: 22.42, 2048: 13.11, 4096: 26.29, 8192: 37.86, 16384: 81.86,
                    32768: "timeout (>120 s)"}

_FULL_MODEL = dict(num_layers=12, d_model=768, mlp_dim=2048, vocab_size=32000, attn_num_heads=12,
                   attn_num_kv_heads=4, attn_head_dim=64, hgrn2_head_dim=128, chunk_size=64)
_QUICK_MODEL = dict(num_layers=4, d_model=64, mlp_dim=128, vocab_size=260, attn_num_heads=4,
                    attn_num_kv_heads=2, attn_head_dim=16, hgrn2_head_dim=16, chunk_size=64)
_FULL_LENGTHS = tuple(1024 * 2 ** i for i in range(8))      # 1K .. 128K
_QUICK_LENGTHS = (512, 1024, 2048, 4096)


FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import it)."""
  flags.DEFINE_string("out", "", "Output directory (default /tmp/context_scaling[_quick]).")
  flags.DEFINE_bool("quick", False, "A small model at 512..4K tokens (runs on a CPU).")
  flags.DEFINE_list("models", ["transformer", "hybrid"], "Which of transformer, hybrid.")
  flags.DEFINE_list("lengths", [], "Context lengths (default: 1K..128K, quick 512..4K).")
  flags.DEFINE_integer("decode_steps", 32, "Decode steps per timed scan.")
  flags.DEFINE_integer("gen_tokens", 256, "Generated tokens of the request estimate.")
  flags.DEFINE_integer("repeats", 3, "Timed repetitions (after one warm-up).")
  flags.DEFINE_float("max_seconds", 120.0, "A prefill slower than this is a timeout.")
  flags.DEFINE_string("dtype", "", "'' = bfloat16 on accelerators, float32 on CPU.")
  flags.DEFINE_enum("kv_cache_dtype", "", ["", "int8"], "The attention layers' KV cache "
                    "(model.attn_kv_cache_dtype): '' = the activations' dtype, 'int8'.")
  flags.DEFINE_enum("layout", "checkpoint", ["checkpoint", "serving", "onerow"],
                    "checkpoint: parameters as trained (float32, layer scan); serving: "
                    "sosm_jax/serve/layout.py (bfloat16 matmul weights, unrolled layers, batch-1 "
                    "projections on two rows); onerow: serving, decoded through "
                    "sosm_jax/serve/onerow.py (the engine's batch-1 step).")
  flags.DEFINE_integer("profile_prefill", 0, "GPU: print and store the N costliest kernels of "
                       "one prefill at every length (needs torch with CUDA).")


def model_configs(quick: bool, dtype: str):
  """{'hybrid', 'transformer'} model configs of equal size (the transformer's MLP widened)."""
  sizes = _QUICK_MODEL if quick else _FULL_MODEL
  hybrid = default_model_config("hybrid")
  hybrid.update(dtype=dtype, **sizes)
  transformer = default_model_config("transformer")
  transformer.update(dtype=dtype, **sizes)
  target = count_params(hybrid)
  transformer.mlp_dim, _ = match_mlp_dim(transformer, target, multiple=64 if not quick else 8)
  return {"hybrid": hybrid, "transformer": transformer}


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _compiled_gib(compiled) -> float | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  need = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  return need / 2**30


def _peak_gib() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return peak / 2**30 if peak else None


def greedy_decode(step, params, first, cache, num_steps: int):
  """`num_steps` greedy tokens from `first` in one scan (a timed decode loop) -> the last token."""
  def body(carry, _):
    token, cache = carry
    logits, cache = step(params, token, cache)
    return (jnp.argmax(logits, -1).astype(jnp.int32), cache), None
  (token, _), _ = jax.lax.scan(body, (first, cache), None, length=num_steps)
  return token


def measure_length(model, params, length: int, decode_steps: int, repeats: int,
                   step=None, step_params=None, profile_prefill: int = 0) -> dict:
  """Prefill and decode timings of one model at one context length (batch 1).

  Prefill: `model.prefill` with params; decode: step(step_params, token, cache) (default
  `model.decode_step` with params).
  """
  max_len = length + decode_steps
  step = model.decode_step if step is None else step
  step_params = params if step_params is None else step_params

  def prefill(p, tokens):
    logits, cache = model.prefill(p, tokens, max_len, last_only=True)
    return logits[:, -1], cache  # only the last position is needed to continue

  def decode(p, first, cache):
    return greedy_decode(step, p, first, cache, decode_steps)

  tokens = jnp.asarray(np.random.default_rng(length).integers(
      0, model.cfg.vocab_size, (1, length)), jnp.int32)
  start = time.perf_counter()
  prefill_c = jax.jit(prefill).lower(params, tokens).compile()
  compile_s = time.perf_counter() - start
  row = {"length": length, "compiled_gib": _compiled_gib(prefill_c), "compile_s": compile_s}
  logits, cache = prefill_c(params, tokens)   # warm-up, and the cache the decode starts from
  jax.block_until_ready(cache)
  row["prefill_s"] = _median_time(lambda: prefill_c(params, tokens), repeats)
  if profile_prefill:
    row["prefill_profile"] = profile_kernels(lambda: prefill_c(params, tokens), 1,
                                             profile_prefill)
  first = jnp.argmax(logits, -1).astype(jnp.int32)
  decode_c = jax.jit(decode).lower(step_params, first, cache).compile()
  jax.block_until_ready(decode_c(step_params, first, cache))
  row["decode_ms"] = 1e3 * _median_time(lambda: decode_c(step_params, first, cache),
                                        repeats) / decode_steps
  row["peak_gib"] = _peak_gib()
  row["status"] = "ok"
  return row


def run_model(name: str, cfg, lengths, flags_) -> dict:
  """All lengths of one model, stopping at the first failure; ratios to the first length."""
  model = models.build_model(cfg)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), 1, cfg.chunk_size)))()
  kind = flags_.get("layout", "checkpoint")
  step, step_params = None, None
  if kind in ("serving", "onerow"):
    model, params = layout.serving_layout(model, params)
  if kind == "serving":
    step = functools.partial(layout.decode_step, model)
  elif kind == "onerow":   # refuses a model onerow does not run (no silent fallback)
    step_params = onerow.fold_params(model.cfg, params)
    step = functools.partial(onerow.decode_step, model.cfg)
  rows = []
  for length in lengths:
    print(f"{name} @ {length} tokens", flush=True)
    try:
      row = measure_length(model, params, length, flags_["decode_steps"], flags_["repeats"],
                           step=step, step_params=step_params,
                           profile_prefill=flags_.get("profile_prefill", 0))
      if row["prefill_s"] > flags_["max_seconds"]:
        row["status"] = f"timeout (prefill {row['prefill_s']:.1f} s > {flags_['max_seconds']} s)"
    except Exception as e:  # pylint: disable=broad-except
      text = str(e).splitlines()[0] if str(e) else type(e).__name__
      oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
      row = {"length": length, "status": ("out of memory: " if oom else "failed: ") + text[:200]}
      traceback.print_exc()
    rows.append(row)
    print(json.dumps(row), flush=True)
    if row["status"] != "ok":
      break
  return {"model": name, "params": count_params(cfg), "config": cfg.to_dict(),
          "layout": flags_.get("layout", "checkpoint"),
          "kv_cache_dtype": cfg.get("attn_kv_cache_dtype", ""), "rows": rows}


def add_ratios(result: dict, gen_tokens: int) -> None:
  ok = [r for r in result["rows"] if r["status"] == "ok"]
  for r in ok:
    r["request_s"] = r["prefill_s"] + gen_tokens * r["decode_ms"] / 1e3
  if not ok:
    return
  base = next((r for r in ok if r["length"] == 1024), ok[0])  # 1K, as the baseline's table
  for r in ok:
    for key in ("prefill_s", "decode_ms", "request_s"):
      r[key.split("_")[0] + "_ratio"] = r[key] / base[key]


def merge(path: str, new: dict) -> dict:
  """New rows replace the old rows of the same length in an earlier result of the same model."""
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    if (old.get("config") == json.loads(json.dumps(new["config"], default=str))
        and old.get("layout", "checkpoint") == new.get("layout", "checkpoint")):
      fresh = {r["length"] for r in new["rows"]}
      new["rows"] = sorted([r for r in old["rows"] if r["length"] not in fresh] + new["rows"],
                           key=lambda r: r["length"])
  return new


def table(results: list[dict]) -> str:
  header = ["model", "params", "tokens", "prefill s", "prefill ×1K", "decode ms/token",
            "decode ×1K", "request s", "request ×1K", "compiled GiB", "status"]
  body = []
  f = report_lib.fmt
  for res in results:
    for r in res["rows"]:
      body.append([res["model"], f"{res['params'] / 1e6:.1f}M", str(r["length"]),
                   f(r.get("prefill_s")), f(r.get("prefill_ratio")), f(r.get("decode_ms")),
                   f(r.get("decode_ratio")), f(r.get("request_s")), f(r.get("request_ratio")),
                   f(r.get("compiled_gib")), r["status"]])
  base = EARLIER_BASELINE[1024]
  for length, t in EARLIER_BASELINE.items():
    ratio = f"{t / base:.2f}" if isinstance(t, float) else "–"
    body.append(["earlier 8B baseline", "8B", str(length), "", "", "", "",
                 f(t) if isinstance(t, float) else t, ratio, "", ""])
  return report_lib.markdown_table(header, body)


def plot(results: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for res in results:
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    x = [r["length"] for r in ok]
    axes[0].plot(x, [r["prefill_s"] for r in ok], marker="o", label=res["model"])
    axes[1].plot(x, [r["decode_ms"] for r in ok], marker="o", label=res["model"])
    axes[2].plot(x, [r["request_ratio"] for r in ok], marker="o", label=res["model"])
    failed = [r for r in res["rows"] if r["status"] != "ok"]
    for r in failed:
      axes[2].axvline(r["length"], ls=":", color="gray")
      axes[2].text(r["length"], 1.0, f" {res['model']}: {r['status'].split(':')[0]}",
                   rotation=90, fontsize=7, va="bottom")
  base = EARLIER_BASELINE[1024]
  pts = [(k, v / base) for k, v in EARLIER_BASELINE.items() if isinstance(v, float)]
  axes[2].plot(*zip(*pts), marker="x", ls="--", color="gray", label="earlier 8B baseline")
  axes[2].axhline(2.0, color="red", lw=0.8, label="target: < 2x at 64K")
  titles = ("prefill time (s)", "decode time per token (ms)", "request time / request at 1K")
  for ax, title in zip(axes, titles):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_yscale("log")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  unknown = [m for m in FLAGS.models if m not in ("transformer", "hybrid")]
  if unknown:
    raise app.UsageError(f"unknown models {unknown}; use transformer and/or hybrid")
  quick = FLAGS.quick
  out = os.path.abspath(FLAGS.out or ("/tmp/context_scaling_quick" if quick
                                       else "/tmp/context_scaling"))
  os.makedirs(out, exist_ok=True)
  dtype = FLAGS.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  lengths = tuple(int(x) for x in FLAGS.lengths) or (_QUICK_LENGTHS if quick else _FULL_LENGTHS)
  configs = model_configs(quick, dtype)
  for cfg in configs.values():
    cfg.attn_kv_cache_dtype = FLAGS.kv_cache_dtype
  settings = {"decode_steps": FLAGS.decode_steps, "repeats": FLAGS.repeats,
              "max_seconds": FLAGS.max_seconds, "layout": FLAGS.layout,
              "profile_prefill": FLAGS.profile_prefill}
  for name in FLAGS.models:
    result = run_model(name, configs[name], lengths, settings)
    result = merge(os.path.join(out, f"{name}.json"), result)
    add_ratios(result, FLAGS.gen_tokens)
    with open(os.path.join(out, f"{name}.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2, default=str)
  results = []
  for name in ("transformer", "hybrid"):
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        results.append(json.load(f))
  summary = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
             "jax": jax.__version__, "dtype": dtype, "command": " ".join(sys.argv),
             "gen_tokens": FLAGS.gen_tokens, **settings,
             "earlier_baseline_s": EARLIER_BASELINE, "results": results}
  with open(os.path.join(out, "context_scaling.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, default=str)
  md = table(results)
  with open(os.path.join(out, "context_scaling.md"), "w", encoding="utf-8") as f:
    f.write(f"Device: {summary['device']}, dtype {dtype}, batch 1, request = prefill + "
            f"{FLAGS.gen_tokens} decoded tokens.\n\n" + md + "\n")
  plot(results, os.path.join(out, "context_scaling.png"))
  print(md, flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)

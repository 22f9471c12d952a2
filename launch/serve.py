"""HTTP server: python launch/serve.py --workdir=DIR [--fallback_workdir=DIR2] [--host] [--port].

Loads the newest checkpoint of each work directory, one generation engine per model (slots of
per-request caches, continuous batching; sosm_jax/serve/engine.py; a checkpoint trained with host
memory is served with it, one request at a time: serve/memory.py, --memory), and serves with uvicorn
  POST /v1/completions   OpenAI-compatible (stream=true: server-sent events)
  GET  /v1/models        the loaded models, the default, fallbacks and A/B weights
  GET  /health           200 when the default model (or any) is healthy, else 503
  GET  /metrics          Prometheus text format
The --workdir model is the default; the --fallback_workdir model takes its requests when it
fails (an exception, a failed health check, --deadline_s passed) and, with --ab_fraction > 0,
that share of the default route (an A/B split).

  python launch/serve.py --workdir=workdir/curriculum-smoke --port=8000
  curl -s localhost:8000/v1/completions -H 'content-type: application/json' \
      -d '{"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0}'
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import uvicorn

from sosm_jax.serve import app as app_lib
from sosm_jax.serve import engine as engine_lib
from sosm_jax.serve import loading
from sosm_jax.serve import metrics as metrics_lib
from sosm_jax.serve import registry as registry_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of the default model.")
_NAME = flags.DEFINE_string("name", "", "Its model name (default: the directory's base name).")
_FALLBACK = flags.DEFINE_string("fallback_workdir", "", "Work directory of the fallback model.")
_FALLBACK_NAME = flags.DEFINE_string("fallback_name", "", "Its model name.")
_AB = flags.DEFINE_float("ab_fraction", 0.0, "Share of default-routed requests sent to the "
                         "fallback model (A/B split); 0 = only on failure.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port.")
_SLOTS = flags.DEFINE_integer("num_slots", 8, "Requests decoded together per model.")
_MAX_LEN = flags.DEFINE_integer("max_len", 4096, "Prompt + generated tokens per request.")
_CHUNK = flags.DEFINE_integer("prefill_chunk", 512, "Longest prefill piece (power of two).")
_DEADLINE = flags.DEFINE_float("deadline_s", 300.0, "A request not finished this many seconds "
                               "after it reached its model moves to the fallback model (once).")
_COOLDOWN = flags.DEFINE_float("cooldown_s", 30.0, "A model that failed is unhealthy this long.")
_STALL = flags.DEFINE_float("stall_s", 60.0, "A model whose engine finished no step for this long "
                            "while it had requests is unhealthy.")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile every shape before listening.")
_KV_CACHE = flags.DEFINE_enum("kv_cache_dtype", "", ["", "int8"], "Attention KV cache: '' = as "
                              "the checkpoint's model config, 'int8' = half a bf16 cache's bytes.")
_KV_READ = flags.DEFINE_integer("kv_read_bucket", 1024, "Decode reads the KV cache in power-of-"
                               "two multiples of this many positions (0 = the whole --max_len).")
_MEMORY = flags.DEFINE_enum("memory", "auto", ["auto", "on", "off"], "Host memory beyond the "
                            "window: 'auto' = as the checkpoint trained (then one request at a "
                            "time), 'off' = the batching engine within --max_len.")


def build_registry():
  """The started registry of the flags' models, with metrics."""
  config = engine_lib.EngineConfig(num_slots=_SLOTS.value, max_len=_MAX_LEN.value,
                                   prefill_chunk=_CHUNK.value, kv_cache_dtype=_KV_CACHE.value,
                                   kv_read_bucket=_KV_READ.value)
  entries = []
  try:
    main_engine, info = loading.engine_from_workdir(_WORKDIR.value, config, memory=_MEMORY.value,
                                                    name=_NAME.value or None)
    fallback = None
    if _FALLBACK.value:
      fb_engine, fb_info = loading.engine_from_workdir(_FALLBACK.value, config,
                                                       memory=_MEMORY.value,
                                                       name=_FALLBACK_NAME.value or None)
  except ValueError as e:   # --memory=on for a model without graph layers, int8 with memory
    raise app.UsageError(str(e)) from None
  if _FALLBACK.value:
    if fb_engine.name == main_engine.name:
      raise app.UsageError(f"both models are named {main_engine.name!r}; pass --name or "
                           f"--fallback_name")
    fallback = fb_engine.name
    weight = _AB.value
    entries.append(registry_lib.ModelEntry(fb_engine.name, fb_engine, weight=weight, info=fb_info))
  main = registry_lib.ModelEntry(main_engine.name, main_engine, fallback=fallback,
                                 weight=(1.0 - _AB.value) if _AB.value > 0 else 0.0, info=info)
  entries.insert(0, main)
  for e in entries:
    if _WARMUP.value:
      print(f"compiling {e.name} ...", file=sys.stderr, flush=True)
      e.engine.warmup()
  metrics = metrics_lib.ServeMetrics()
  return registry_lib.ModelRegistry(entries, default=main.name, deadline_s=_DEADLINE.value,
                                    cooldown_s=_COOLDOWN.value, stall_s=_STALL.value,
                                    metrics=metrics).start()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax's restore is chatty at INFO
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (the work directory of a training run)")
  if not 0.0 <= _AB.value < 1.0:
    raise app.UsageError(f"--ab_fraction must be in [0, 1), got {_AB.value}")
  if _AB.value > 0 and not _FALLBACK.value:
    raise app.UsageError("--ab_fraction needs --fallback_workdir (the B model)")
  registry = build_registry()
  try:
    uvicorn.run(app_lib.create_app(registry), host=_HOST.value, port=_PORT.value,
                log_level="info")
  finally:
    registry.stop()


if __name__ == "__main__":
  app.run(main)

"""Bounded serving load test: a fixed number of requests, fixed concurrency, latency percentiles.

Transports:
  http    requests stream from /v1/completions of a server: --url, or one started here on
          127.0.0.1 over --workdir (a checkpoint) or a random-weight --model
  engine  requests go straight to a generation engine in this process (no HTTP): what the
          engine itself sustains, e.g. on a GPU where the HTTP stack is not installed
Every request has a prompt of --prompt_tokens tokens (BOS included; random printable bytes for
the byte tokenizer) and generates exactly --max_tokens tokens (ignore_eos). Reported: requests/s,
generated tokens/s, time to first token and request latency (p50, p99), mean batch occupancy.
Time to first token is the engine's first token event (engine transport; one per sampled token)
or the first streamed chunk with text (HTTP transport: the server streams text only).
The run is bounded by --requests and by --timeout_s.

  python benchmarks/serve_load.py --model=tiny --requests=32 --concurrency=8          # CPU, HTTP
  python benchmarks/serve_load.py --transport=engine --model=recipe --requests=64 \
      --concurrency=64 --num_slots=64 --prompt_tokens=1024 --max_tokens=256             # GPU
With --max_len above prompt + max_tokens the engine's caches are that long (a long-context
server's); --kv_read_bucket=0 makes its decode read the whole cache (no read-length buckets).

With --breakdown (engine transport) the engine's decode program is first timed on its own, every
slot live and decoding greedily, in milliseconds a decode step (a dispatch / --decode_steps):
  step        one slot only: the engine's decode step (onerow, two rows or the model's) in a scan
              of --decode_steps greedy steps, without the dispatch's vmap and sampling
  dispatch    the decode program called back to back (each call queued before the previous one
              ends): its device time
  sync        the same, each call's tokens read to the host before the next is queued (what an
              unpipelined loop pays)
and with --profile=N its N costliest GPU kernels (benchmarks/kernel_profile.py), --hlo_dir its
compiled HLO. The load that follows gives the engine end to end (latency / --max_tokens).
"""
import asyncio
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app, flags

_URL = flags.DEFINE_string("url", "", "A running server (default: start one here).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Checkpoint to serve (default: random --model).")
_MODEL = flags.DEFINE_enum("model", "tiny", ["tiny", "smoke", "recipe"],
                           "Random-weight model when no --workdir: tiny (CPU), smoke, recipe "
                           "(the 107M hybrid of benchmarks/context_scaling.py).")
_TRANSPORT = flags.DEFINE_enum("transport", "http", ["http", "engine"], "See the module doc.")
_REQUESTS = flags.DEFINE_integer("requests", 32, "Requests sent in all.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 8, "Requests in flight at once.")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 64, "Prompt tokens per request (with BOS).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Generated tokens per request.")
_SLOTS = flags.DEFINE_integer("num_slots", 8, "Engine slots (a server started here).")
_CHUNK = flags.DEFINE_integer("prefill_chunk", 512, "Longest prefill piece.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 8, "Engine tokens decoded per dispatch.")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "Engine cache length per request (0: "
                                "--prompt_tokens + --max_tokens); e.g. 131072 for a long-context "
                                "server's price.")
_KV_READ = flags.DEFINE_integer("kv_read_bucket", 1024, "Engine decode reads the KV cache in "
                                "power-of-two multiples of this many positions (0 = all).")
_LAYOUT = flags.DEFINE_bool("serving_layout", True, "Engine runs the model in the serving "
                            "layout (sosm_jax/serve/layout.py); False: parameters as trained.")
_DECODE_IMPL = flags.DEFINE_enum("attn_decode_impl", "", ["", "xla", "pallas"], "Random --model: "
                                  "its model.attn_decode_impl ('' = auto).")
_TIMEOUT = flags.DEFINE_float("timeout_s", 300.0, "Upper bound on the whole load.")
_OUT = flags.DEFINE_string("out", "", "Write the result JSON here.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Engine transport: time the decode program "
                               "alone first (module doc).")
_BREAKDOWN_REPEATS = flags.DEFINE_integer("breakdown_repeats", 20, "Dispatches per breakdown row.")
_PROFILE = flags.DEFINE_integer("profile", 0, "With --breakdown on a GPU: the N costliest kernels "
                                "of the decode program.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", "", "With --breakdown: write the decode program's "
                               "compiled HLO text here.")


def _random_model(name: str):
  """(model, params, tokenizer) with random weights."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from sosm_jax import models  # pylint: disable=import-outside-toplevel
  from sosm_jax.data.tokenizers import ByteTokenizer  # pylint: disable=import-outside-toplevel
  from sosm_jax.models.config import default_model_config  # pylint: disable=import-outside-toplevel
  on_cpu = jax.default_backend() == "cpu"
  cfg = default_model_config("hybrid")
  if name == "recipe":
    import context_scaling  # pylint: disable=import-outside-toplevel
    cfg = context_scaling.model_configs(False, "float32" if on_cpu else "bfloat16")["hybrid"]
  elif name == "smoke":
    cfg.update(num_layers=4, d_model=128, mlp_dim=384, vocab_size=260, attn_num_heads=4,
               attn_num_kv_heads=2, attn_head_dim=32, hgrn2_head_dim=32, dtype="float32")
  else:
    cfg.update(num_layers=2, d_model=32, mlp_dim=64, vocab_size=260, attn_num_heads=2,
               attn_num_kv_heads=1, attn_head_dim=16, hgrn2_head_dim=16, chunk_size=16,
               pattern=("hgrn2", "attn"), dtype="float32")
  cfg.attn_decode_impl = _DECODE_IMPL.value
  model = models.build_model(cfg)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), 1, cfg.chunk_size)))()
  return model, params, ByteTokenizer()


def _engine(max_len: int):
  from sosm_jax.serve import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from sosm_jax.serve import loading  # pylint: disable=import-outside-toplevel
  config = engine_lib.EngineConfig(num_slots=_SLOTS.value, max_len=max_len,
                                   prefill_chunk=_CHUNK.value, decode_steps=_DECODE_STEPS.value,
                                   serving_layout=_LAYOUT.value, kv_read_bucket=_KV_READ.value)
  if _WORKDIR.value:
    return loading.engine_from_workdir(_WORKDIR.value, config, name="load")[0]
  model, params, tokenizer = _random_model(_MODEL.value)
  return engine_lib.Engine(model, params, tokenizer, config, name=_MODEL.value)


def dispatch_breakdown(engine, repeats: int, profile: int, hlo_dir: str) -> dict:
  """The module doc's breakdown rows (ms a decode step) of the engine's greedy decode program."""
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import context_scaling  # pylint: disable=import-outside-toplevel
  from sosm_jax.serve import engine as engine_lib  # pylint: disable=import-outside-toplevel
  s, n = engine.config.num_slots, engine.config.decode_steps
  read_len = engine_lib.pick_read_length(_PROMPT.value + n * (3 * repeats + 8),
                                         engine.read_lengths)
  zeros, prev_out = np.zeros((s,), np.int32), np.zeros((s, n), np.int32)
  rest = (zeros, zeros, np.zeros((s,), np.float32), zeros, np.ones((s,), np.float32),
          np.full((s,), 1 << 30, np.int32), np.zeros((s,), bool), read_len, False)

  def dispatch(slots):   # -> (tokens, slots); the slots are donated
    return engine._decode(engine._step_params, zeros, prev_out, np.ones((s,), bool), slots,
                          *rest)

  def per_step(run) -> float:
    start = time.perf_counter()
    run()
    return 1e3 * (time.perf_counter() - start) / (repeats * n)

  state = {"slots": engine._slots}

  def queued(sync: bool):
    for _ in range(repeats):
      tokens, state["slots"] = dispatch(state["slots"])
      if sync:
        np.asarray(tokens)
    jax.block_until_ready(tokens)

  _, state["slots"] = dispatch(state["slots"])   # compiled by warmup(); this one warms the device
  jax.block_until_ready(state["slots"])
  row = {"read_len": read_len, "dispatch_ms": per_step(lambda: queued(False)),
         "sync_ms": per_step(lambda: queued(True))}
  if s == 1:
    one = jax.tree.map(lambda a: a[0], state["slots"])
    scan = jax.jit(functools.partial(context_scaling.greedy_decode,
                                     engine.decode_step_fn(read_len), num_steps=n))
    first = np.zeros((1,), np.int32)
    jax.block_until_ready(scan(engine._step_params, first, one))

    def steps():
      for _ in range(repeats):
        out = scan(engine._step_params, first, one)
      jax.block_until_ready(out)
    row["step_ms"] = per_step(steps)
  if profile:
    from kernel_profile import profile_kernels  # pylint: disable=import-outside-toplevel

    def one_dispatch():
      tokens, state["slots"] = dispatch(state["slots"])
      return tokens
    try:   # the timings stand without it (no torch, no CUPTI)
      row["profile"] = profile_kernels(one_dispatch, n, profile)
    except Exception as e:  # pylint: disable=broad-except
      row["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    text = engine._decode.lower(engine._step_params, zeros, prev_out, np.ones((s,), bool),
                                state["slots"], *rest).compile().as_text()
    name = f"decode_{s}slots_{engine.config.max_len}_read{read_len}.hlo.txt"
    with open(os.path.join(hlo_dir, name), "w", encoding="utf-8") as f:
      f.write(text)
  engine._slots = state["slots"]
  print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
  return row


def _prompts(n: int, tokens: int) -> list[str]:
  rng = np.random.default_rng(0)
  return ["".join(chr(c) for c in rng.integers(32, 127, tokens - 1)) for _ in range(n)]


def _summary(rows: list[dict], wall: float) -> dict:
  done = [r for r in rows if r.get("ok")]
  pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None
  lat = [r["latency_s"] for r in done]
  ttft = [r["ttft_s"] for r in done if r.get("ttft_s") is not None]
  tokens = sum(r["tokens"] for r in done)
  return {"requests": len(rows), "completed": len(done), "wall_s": wall,
          "requests_per_s": len(done) / wall, "tokens_per_s": tokens / wall,
          "generated_tokens": tokens, "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
          "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
          "latency_mean_s": statistics.fmean(lat) if lat else None}


def run_engine(engine, prompts: list[str]) -> dict:
  """All requests straight to the engine, at most --concurrency in flight."""
  from sosm_jax.serve.engine import SamplingParams  # pylint: disable=import-outside-toplevel
  params = SamplingParams(max_tokens=_MAX_TOKENS.value, temperature=0.0, ignore_eos=True)
  rows = [dict() for _ in prompts]
  free = threading.Semaphore(_CONCURRENCY.value)
  finished = threading.Event()
  left = [len(prompts)]
  lock = threading.Lock()

  def listener(row):
    def on_event(event):
      now = time.perf_counter()
      if event.kind == "token" and "ttft_s" not in row:
        row["ttft_s"] = now - row["start"]
      if event.kind in ("done", "error"):
        row.update(ok=event.kind == "done", latency_s=now - row["start"],
                   tokens=event.completion_tokens)
        free.release()
        with lock:
          left[0] -= 1
          if not left[0]:
            finished.set()
    return on_event

  start = time.perf_counter()
  for row, prompt in zip(rows, prompts):
    free.acquire()
    row["start"] = time.perf_counter()
    engine.submit(prompt, params, listener(row))
  finished.wait(timeout=max(1.0, _TIMEOUT.value - (time.perf_counter() - start)))
  return _summary(rows, time.perf_counter() - start)


async def _http_load(url: str, prompts: list[str]) -> dict:
  import httpx  # pylint: disable=import-outside-toplevel
  rows = [dict() for _ in prompts]
  gate = asyncio.Semaphore(_CONCURRENCY.value)

  async def one(client, row, prompt):
    async with gate:
      row["start"] = time.perf_counter()
      body = {"prompt": prompt, "max_tokens": _MAX_TOKENS.value, "temperature": 0,
              "ignore_eos": True, "stream": True}
      try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
          async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
              continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
              raise RuntimeError(chunk["error"]["message"])
            if "ttft_s" not in row and chunk["choices"][0]["text"]:
              row["ttft_s"] = time.perf_counter() - row["start"]
            if "usage" in chunk:
              row["tokens"] = chunk["usage"]["completion_tokens"]
        row.update(ok=r.status_code == 200 and "tokens" in row,
                   latency_s=time.perf_counter() - row["start"])
      except Exception as e:  # pylint: disable=broad-except
        row.update(ok=False, error=str(e))

  limits = httpx.Limits(max_connections=_CONCURRENCY.value + 4)
  async with httpx.AsyncClient(timeout=_TIMEOUT.value, limits=limits) as client:
    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one(client, r, p) for r, p in zip(rows, prompts))),
                           _TIMEOUT.value)
    return _summary(rows, time.perf_counter() - start)


def _local_server(engine):
  """(url, stop) of a server on 127.0.0.1 over one engine."""
  import socket  # pylint: disable=import-outside-toplevel
  import uvicorn  # pylint: disable=import-outside-toplevel
  # the HTTP stack is imported only here: --transport=engine runs without it
  from sosm_jax.serve import app as app_lib  # pylint: disable=import-outside-toplevel
  from sosm_jax.serve import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from sosm_jax.serve import registry as registry_lib  # pylint: disable=import-outside-toplevel
  registry = registry_lib.ModelRegistry([registry_lib.ModelEntry(engine.name, engine)],
                                        metrics=metrics_lib.ServeMetrics()).start()
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app_lib.create_app(registry), host="127.0.0.1",
                                         port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)

  def stop():
    server.should_exit = True
    thread.join(timeout=10)
    registry.stop()
  return f"http://127.0.0.1:{port}", stop


def main(argv):
  del argv
  import logging  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  logging.getLogger("httpx").setLevel(logging.WARNING)
  prompts = _prompts(_REQUESTS.value, _PROMPT.value)
  max_len = _MAX_LEN.value or _PROMPT.value + _MAX_TOKENS.value
  engine, stop = None, lambda: None
  if not _URL.value:
    engine = _engine(max_len)
    start = time.perf_counter()
    engine.warmup([_PROMPT.value])
    print(f"compiled in {time.perf_counter() - start:.1f} s", flush=True)
  if _TRANSPORT.value == "engine":
    if engine is None:
      raise app.UsageError("--transport=engine runs an engine here; drop --url")
    breakdown = (dispatch_breakdown(engine, _BREAKDOWN_REPEATS.value, _PROFILE.value,
                                    _HLO_DIR.value) if _BREAKDOWN.value else None)
    engine.start()
    result = run_engine(engine, prompts)
  else:
    url = _URL.value
    if not url:
      url, stop = _local_server(engine)
    result = asyncio.run(_http_load(url, prompts))
  if engine is not None:
    result["mean_batch_occupancy"] = engine.stats()["mean_occupancy"]
    result["decode_steps"] = engine.stats()["steps"]
    result["decode_dispatches_by_kv_read_length"] = {
        str(n): c for n, c in sorted(getattr(engine, "dispatches_by_read_length", {}).items())}
    engine.stop()
  stop()
  result.update(transport=_TRANSPORT.value, model=_WORKDIR.value or _URL.value or _MODEL.value,
                concurrency=_CONCURRENCY.value, num_slots=_SLOTS.value,
                engine_decode_steps=_DECODE_STEPS.value, serving_layout=_LAYOUT.value,
                prompt_tokens=_PROMPT.value, max_tokens=_MAX_TOKENS.value, max_len=max_len,
                kv_read_bucket=_KV_READ.value,
                breakdown=breakdown if _TRANSPORT.value == "engine" else None,
                device=jax.devices()[0].device_kind, command=" ".join(sys.argv))
  print(json.dumps(result, indent=2))
  f = lambda x, d=3: "–" if x is None else f"{x:.{d}f}"
  print(f"| {result['transport']} | {result['model']} | {result['device']} | "
        f"{result['requests']} | {result['concurrency']} | {result['prompt_tokens']} | "
        f"{result['max_tokens']} | {f(result['requests_per_s'], 2)} | "
        f"{f(result['tokens_per_s'], 1)} | {f(result['ttft_p50_s'])} | {f(result['ttft_p99_s'])} | "
        f"{f(result['latency_p50_s'])} | {f(result['latency_p99_s'])} | "
        f"{f(result.get('mean_batch_occupancy'), 2)} |")
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as fh:
      json.dump(result, fh, indent=2)


if __name__ == "__main__":
  app.run(main)

"""Generate text from a checkpoint: python launch/generate.py --workdir=DIR --prompt='...'.

Streams the continuation to the terminal as it is generated (the serving engine at one slot;
BOS is added, generation stops at EOS, a --stop string, or --max_tokens).

A checkpoint trained with host memory (config.memory.enabled) generates with it
(sosm_jax/serve/memory.py): prompts of any length, windows of the trained length, the earlier
windows read through the host FAISS memory; --memory=off uses the engine without it (within
--max_len), --memory=on forces it for a model with 'graph' layers. With memory, top_k is refused.

  python launch/generate.py --workdir=workdir/curriculum-smoke --prompt='Once upon a time' \
      --max_tokens=200 --temperature=0.8 --top_p=0.95 --seed=1
"""
import os
import queue
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of a training run.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text ('-' reads standard input).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 256, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "Keep generating past EOS.")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "Cache length (0: prompt + max_tokens).")
_CHUNK = flags.DEFINE_integer("prefill_chunk", 512, "Longest prefill piece (power of two).")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 8, "Tokens decoded (and streamed) per call.")
_KV_CACHE = flags.DEFINE_enum("kv_cache_dtype", "", ["", "int8"], "Attention KV cache: '' = as "
                              "the checkpoint's model config, 'int8' = half a bf16 cache's bytes.")
_KV_READ = flags.DEFINE_integer("kv_read_bucket", 1024, "Decode reads the KV cache in power-of-"
                               "two multiples of this many positions (0 = the whole --max_len).")
_MEMORY = flags.DEFINE_enum("memory", "auto", ["auto", "on", "off"],
                            "Host memory beyond the window: 'auto' = as the checkpoint trained.")


def _memory_events(loaded, prompt, params):
  """Events of generation with host memory (batch 1); UsageError for bad parameters."""
  from sosm_jax.serve import memory as memory_gen  # pylint: disable=import-outside-toplevel
  gen = memory_gen.MemoryGenerator(loaded)
  try:
    gen.check(params)
  except ValueError as e:
    raise app.UsageError(str(e))
  sys.stderr.write(f"[host memory: windows of {gen.window} tokens]\n")
  return gen.events(prompt, params)


def _engine_events(loaded, prompt, params):
  """Events of the serving engine at one slot (no host memory)."""
  from sosm_jax.serve import engine as engine_lib  # pylint: disable=import-outside-toplevel
  prompt_len = len(loaded.tokenizer.encode(prompt)) + 1
  max_len = _MAX_LEN.value or prompt_len + _MAX_TOKENS.value
  engine = engine_lib.Engine(loaded.model, loaded.params, loaded.tokenizer,
                             engine_lib.EngineConfig(num_slots=1, max_len=max_len,
                                                     prefill_chunk=_CHUNK.value,
                                                     decode_steps=_DECODE_STEPS.value,
                                                     kv_cache_dtype=_KV_CACHE.value,
                                                     kv_read_bucket=_KV_READ.value)).start()
  events = queue.Queue()
  try:
    engine.submit(prompt, params, events.put)
  except ValueError as e:
    engine.stop()
    raise app.UsageError(str(e))
  try:
    while True:
      event = events.get()
      yield event
      if event.kind in ("done", "error"):
        return
  finally:
    engine.stop()


def main(argv):
  del argv
  if not _WORKDIR.value or _PROMPT.value is None:
    raise app.UsageError("--workdir and --prompt are required")
  from sosm_jax.eval import loading  # pylint: disable=import-outside-toplevel
  from sosm_jax.eval import memory as memory_lib  # pylint: disable=import-outside-toplevel
  from sosm_jax.serve import engine as engine_lib  # pylint: disable=import-outside-toplevel
  prompt = sys.stdin.read() if _PROMPT.value == "-" else _PROMPT.value
  loaded = loading.load_for_eval(_WORKDIR.value, step=_STEP.value)
  try:
    use_memory = memory_lib.resolve_memory(loaded.config, _MEMORY.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  if use_memory and _KV_CACHE.value:
    raise app.UsageError("--kv_cache_dtype is for generation without host memory; this checkpoint "
                         "generates with its memory: pass --memory=off, or drop --kv_cache_dtype")
  params = engine_lib.SamplingParams(max_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value,
                                     top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                                     stop=tuple(_STOP.value), ignore_eos=_IGNORE_EOS.value)
  events = (_memory_events if use_memory else _engine_events)(loaded, prompt, params)
  sys.stdout.write(prompt)
  for event in events:
    if event.kind == "error":
      raise event.error
    sys.stdout.write(event.text)
    sys.stdout.flush()
    if event.kind == "done":
      break
  sys.stdout.write("\n")
  sys.stderr.write(f"[{event.completion_tokens} tokens, {event.finish_reason}]\n")


if __name__ == "__main__":
  app.run(main)

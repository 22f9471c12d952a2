"""An engine from a training work directory (checkpoint, config and tokenizer)."""
from __future__ import annotations

import os

from sosm_jax.eval import loading
from sosm_jax.eval.memory import memory_window, resolve_memory, trained_with_memory
from sosm_jax.serve.engine import Engine, EngineConfig
from sosm_jax.serve.memory import MemoryEngine

HOST_MEMORY_NOT_SERVED = (
    "trained with host memory, served without it (memory 'off'): each request runs as one "
    "sequence of at most max_len tokens")


def engine_from_workdir(workdir: str, config: EngineConfig, *, name: str | None = None,
                        step: int | None = None, memory: str = "auto"):
  """(engine, info for /v1/models) of checkpoint `step` (default newest) in workdir.

  name defaults to the work directory's base name. memory ('auto' | 'on' | 'off', as
  launch/generate.py's --memory): with host memory the engine is a `MemoryEngine` (windows of the
  trained length, the earlier ones read through the memory; one request at a time), else the
  continuous-batching `Engine`; info['host_memory'] says which for a model that can read memory.
  """
  loaded = loading.load_for_eval(workdir, step=step)
  name = name or os.path.basename(os.path.normpath(workdir))
  info = {"architecture": loaded.config.model.architecture, "step": loaded.step,
          "workdir": loaded.workdir}
  if resolve_memory(loaded.config, memory):
    engine = MemoryEngine(loaded, config, name=name)
    info["host_memory"] = (f"on: windows of {memory_window(loaded.config)} tokens, the earlier "
                           f"ones read through a host FAISS memory; one request at a time")
    return engine, info
  engine = Engine(loaded.model, loaded.params, loaded.tokenizer, config, name=name)
  if trained_with_memory(loaded.config):
    info["host_memory"] = HOST_MEMORY_NOT_SERVED   # say so rather than serve it silently
  return engine, info

"""An engine from a training work directory (checkpoint, config and tokenizer)."""
from __future__ import annotations

import os

from sosm_jax.eval import loading
from sosm_jax.eval.memory import trained_with_memory
from sosm_jax.serve.engine import Engine, EngineConfig

HOST_MEMORY_NOT_SERVED = (
    "trained with host memory, served without it: this server runs each request as one "
    "sequence of at most max_len tokens; launch/generate.py generates with the memory (batch 1)")


def engine_from_workdir(workdir: str, config: EngineConfig, *, name: str | None = None,
                        step: int | None = None) -> tuple[Engine, dict]:
  """(Engine, info for /v1/models) of checkpoint `step` (default newest) in workdir.

  name defaults to the work directory's base name. A checkpoint trained with host memory
  (config.memory.enabled) is served without it (the continuous-batching engine runs each request
  as one sequence), which info['host_memory'] states and /v1/models shows; launch/generate.py and
  launch/evaluate.py use the memory (serve/memory.py, eval/memory.py).
  """
  loaded = loading.load_for_eval(workdir, step=step)
  name = name or os.path.basename(os.path.normpath(workdir))
  engine = Engine(loaded.model, loaded.params, loaded.tokenizer, config, name=name)
  info = {"architecture": loaded.config.model.architecture, "step": loaded.step,
          "workdir": loaded.workdir}
  if trained_with_memory(loaded.config):
    # the engine reads no host memory; say so rather than serve it silently
    info["host_memory"] = HOST_MEMORY_NOT_SERVED
  return engine, info

"""An engine from a training work directory (checkpoint, config and tokenizer)."""
from __future__ import annotations

import os

from sosm_jax.eval import loading
from sosm_jax.serve.engine import Engine, EngineConfig


def engine_from_workdir(workdir: str, config: EngineConfig, *, name: str | None = None,
                        step: int | None = None) -> tuple[Engine, dict]:
  """(Engine, info for /v1/models) of checkpoint `step` (default newest) in workdir.

  name defaults to the work directory's base name. A checkpoint trained with host memory
  (config.memory.enabled) is served without it, which info['host_memory'] states.
  """
  loaded = loading.load_for_eval(workdir, step=step)
  name = name or os.path.basename(os.path.normpath(workdir))
  engine = Engine(loaded.model, loaded.params, loaded.tokenizer, config, name=name)
  info = {"architecture": loaded.config.model.architecture, "step": loaded.step,
          "workdir": loaded.workdir}
  if loaded.config.get("memory") is not None and loaded.config.memory.get("enabled"):
    # the engine decodes within the window only; say so rather than serve it silently
    info["host_memory"] = "trained with host memory; not used by this server"
  return engine, info

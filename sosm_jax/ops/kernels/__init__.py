"""GPU fast paths for the linear-attention ops, looked up by name: `get(name) -> callable | None`.

Names: 'gated_delta_rule' and 'gla'. A returned function has exactly the contract signature of
the chunked form, `(q, k, v, g[, beta], *, scale, initial_state, chunk_size) -> (o, final_state)`
(see `sosm_jax/ops/gated_delta.py`, `hgrn2.py`). `get` returns None where the platform cannot run
the kernel (not a GPU, no Pallas Triton backend) or when `SOSM_DISABLE_KERNELS=1`; callers then
use the portable XLA chunked form.

Fast paths (`xla_fast.py`), chunked like the portable form but arranged for speed. On GPU
(backend 'pallas', Pallas Triton kernels): gated delta rule = one custom VJP
(`pallas_gdn_core.py`) over the WY preparation and output-stage kernels (`pallas_gdn.py`) and the
chunk-state recurrence (`pallas_recurrence.py`, state kept on chip), with a fused post kernel for
the backward; GLA = `pallas_gla.PATH` ('split': the kernels of `pallas_gla_split.py`, [B, T, H, D]
layout throughout, no XLA transposes; older paths remain selectable for comparison).
With backend 'xla' the same module is a pure-XLA formulation for any platform (intra-chunk work
batched, recurrence by lax.scan).
Speeds and what bounds them: `NOTES.md` beside this file; `benchmarks/kernels.py` measures.
"""
from __future__ import annotations

import functools
import os

import jax

from sosm_jax.ops.kernels.xla_fast import gated_delta_rule_fast, gla_fast

NAMES = ("gated_delta_rule", "gla")
_FUNCTIONS = {"gated_delta_rule": gated_delta_rule_fast, "gla": gla_fast}


@functools.lru_cache(maxsize=None)
def _pallas_triton_available() -> bool:
  try:
    from jax.experimental.pallas import triton as _  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return True


def fast_path(name: str, backend: str = "pallas", **options):
  """The fast formulation of op `name` with its recurrence on `backend` ('pallas' or 'xla').

  `options`: `interpret` (Pallas on CPU), `block_v`. The result keeps the contract signature.
  """
  if name not in _FUNCTIONS:
    raise ValueError(f"sosm_jax.ops.kernels: unknown op {name!r}; choose one of {NAMES}.")
  return functools.wraps(_FUNCTIONS[name])(
      functools.partial(_FUNCTIONS[name], backend=backend, **options))


def get(name: str):
  """The GPU kernel registered under `name` for the current platform, or None."""
  if name not in _FUNCTIONS:
    raise ValueError(f"sosm_jax.ops.kernels.get: unknown op {name!r}; choose one of {NAMES}.")
  if os.environ.get("SOSM_DISABLE_KERNELS", "") not in ("", "0"):
    return None
  if jax.default_backend() != "gpu" or not _pallas_triton_available():
    return None
  return fast_path(name, backend="pallas")

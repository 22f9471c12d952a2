"""The implementation names of the linear-attention ops and how 'auto' resolves.

'auto'             'pallas' on a GPU for the ops whose kernels were last verified on a GPU
                   (AUTO_PALLAS_ON_GPU), 'xla' otherwise and on any other platform
'xla'              the chunked form in plain XLA (any platform)
'pallas'           the Pallas kernels compiled with Triton (GPU only)
'pallas_interpret' the same Pallas kernels in interpret mode (any platform; CPU tests)
'reference'        the sequential recurrence (ground truth; slow)
The choice is made from this argument and the platform only, never from the shapes: a shape the
kernels cannot take is padded to one they can, or refused with an error naming it.
"""
from __future__ import annotations

import functools

import jax

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret", "reference")
# Ops that 'auto' sends to their Pallas kernels on a GPU: both, verified on an H200 (ops/NOTES.md;
# the gated delta rule's kernels 6.0x / 4.9x faster than its XLA form, forward / forward+backward,
# bf16 at 4096 x 16; fp32 at head dim 128 compiles in ~20 s since its products run on tensor
# cores, where IEEE fp32 products had taken over 100 s: the earlier runs that seemed to hang).
AUTO_PALLAS_ON_GPU = frozenset({"gla", "gated_delta_rule"})


@functools.lru_cache(maxsize=None)
def _pallas_triton_available() -> bool:
  try:
    from jax.experimental.pallas import triton as _  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return True


def resolve(op_name: str, implementation) -> str:
  """'xla' | 'pallas' | 'pallas_interpret' | 'reference' for `implementation` (None = 'auto')."""
  impl = "auto" if implementation is None else implementation
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"{op_name}: unknown implementation {implementation!r}; choose one of "
                     f"{IMPLEMENTATIONS} (config key model.linear_impl).")
  backend = jax.default_backend()
  if impl == "auto":
    on_gpu = backend == "gpu" and _pallas_triton_available()
    return "pallas" if on_gpu and op_name in AUTO_PALLAS_ON_GPU else "xla"
  if impl == "pallas" and backend != "gpu":
    raise ValueError(f"{op_name}: implementation 'pallas' compiles Triton kernels, which need a "
                     f"GPU; the backend is {backend!r}. Use 'xla' (or 'pallas_interpret' to run "
                     f"the kernels in interpret mode).")
  return impl

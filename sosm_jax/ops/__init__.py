"""sosm_jax.ops: pure jnp functions without parameters (the math and the kernels).

One folder per linear-attention op, each with the sequential reference (ground truth), the
one-token step (decode), the chunked XLA form and the Pallas form behind one signature:
`gla/` (gated linear attention; HGRN-2 is GLA with k = 1 - f) and `gated_delta/`; `common/` holds
what they share (chunk layout, padding and dtype helpers, the chunk-state recurrence, Pallas
helpers, the implementation names). `gla` and `gated_delta_rule` take
`implementation='auto' | 'xla' | 'pallas' | 'pallas_interpret' | 'reference'`.
attention.py, graph*.py and conv.py are imported by their module path.
Note: `sosm_jax.ops.gla` is the function; reach the folder's modules with
`from sosm_jax.ops.gla.pallas import ...` (not `import sosm_jax.ops.gla as ...`).
"""
from sosm_jax.ops.common.implementation import IMPLEMENTATIONS
from sosm_jax.ops.conv import causal_conv1d, causal_conv1d_step
from sosm_jax.ops.gated_delta import (gated_delta_rule, gated_delta_rule_chunked,
                                      gated_delta_rule_reference, gated_delta_rule_step)
from sosm_jax.ops.gla import gla, gla_chunked, gla_reference, gla_step

__all__ = [
    "IMPLEMENTATIONS", "causal_conv1d", "causal_conv1d_step",
    "gated_delta_rule", "gated_delta_rule_chunked", "gated_delta_rule_reference",
    "gated_delta_rule_step",
    "gla", "gla_chunked", "gla_reference", "gla_step",
]

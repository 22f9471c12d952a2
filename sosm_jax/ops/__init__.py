"""sosm_jax.ops: pure jnp functions without parameters (the math and the kernels).

Linear-attention ops exported here; attention.py and graph.py are imported by their module path.
Each recurrent op has a sequential `*_reference` (ground truth), a one-token `*_step` (decode)
and a `*_chunked` form (training/prefill); the dispatchers `gated_delta_rule` and `gla` pick an
implementation ('xla' chunked, 'reference', or 'kernel' from `sosm_jax.ops.kernels.get(name)`,
a GPU fast path with the chunked form's signature).
"""
from sosm_jax.ops.conv import causal_conv1d, causal_conv1d_step
from sosm_jax.ops.gated_delta import (gated_delta_rule, gated_delta_rule_chunked,
                                      gated_delta_rule_reference, gated_delta_rule_step)
from sosm_jax.ops.hgrn2 import gla, gla_chunked, gla_reference, gla_step

__all__ = [
    "causal_conv1d", "causal_conv1d_step",
    "gated_delta_rule", "gated_delta_rule_chunked", "gated_delta_rule_reference",
    "gated_delta_rule_step",
    "gla", "gla_chunked", "gla_reference", "gla_step",
]

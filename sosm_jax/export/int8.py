"""INT8 weight-only quantization of the dense projections through Qwix (post-training, per channel).

Which weights: the kernels of every `Dense` whose module name ends in '_proj' (q/k/v/o/f/i/gate/
a/b projections of every mixer) or is an MLP matrix (wi_gate, wi_up, wo): `DENSE_MODULES`.
Embeddings, the output head, norms, convs and gates' biases stay in their dtype.
How: Qwix's PTQ provider (`qwix.PtqProvider`) with int8 weights, absmax calibration (scale =
absmax / 127.5, `fake_quantize_kernel` is the reference), one scale per output channel (Qwix picks the non-contracted axes of each einsum's kernel as channel axes);
activations are not quantized. Qwix intercepts the einsums of the model's Dense modules, so the
model code is unchanged.
Layout: Qwix derives each kernel's channel axes inside the layer scan's body, but
`qwix.quantize_params` applies them to the stacked `[groups, ...]` array (the scale would then run
along the wrong axes and be shared across layers), so quantized models always use the per-layer
layout (`layout.unrolled`, scan_layers=False).

Use (generation and serving):
    qmodel = int8_model(cfg)                       # a models.LanguageModel
    qparams = quantize_params(params, cfg)         # params of build_model(cfg), any layout
    qmodel.generate(qparams, prompt, rng, 32)      # prefill / decode_step / apply / loss as usual
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sosm_jax import models
from sosm_jax.export import layout

# Module paths (regex, Qwix's `module_path`) of the quantized projections.
DENSE_MODULES = r".*(_proj|wi_gate|wi_up|wo)$"


def _rules():
  import qwix  # pylint: disable=import-outside-toplevel
  return [qwix.QuantizationRule(module_path=DENSE_MODULES, weight_qtype=jnp.int8)]


def int8_config(cfg):
  """The model config a quantized model runs with (per-layer layout; see the module doc)."""
  cfg = layout.copy_config(cfg)
  cfg.scan_layers = False
  return cfg


class Int8LanguageModel(models.LanguageModel):
  """`LanguageModel` whose Dense projections read int8 weights made by `quantize_params`."""

  def __init__(self, cfg):
    import qwix  # pylint: disable=import-outside-toplevel
    super().__init__(int8_config(cfg))
    self.module = qwix.quantize_model(self.module, qwix.PtqProvider(_rules()))


def int8_model(cfg) -> Int8LanguageModel:
  """The quantized model for `config.model` cfg (validated like `build_model`)."""
  return Int8LanguageModel(cfg)


def quantize_params(params, cfg):
  """Float params of `build_model(cfg)` -> the same tree, per-layer, with int8 dense kernels.

  Quantized leaves are Qwix `WithAux(QArray(qvalue int8 [kernel shape], scale float32
  [kernel shape with contracted axes of size 1]))`, pytrees that jit and device_put like arrays.
  """
  import qwix  # pylint: disable=import-outside-toplevel
  params, cfg = layout.unrolled(jax.tree.map(np.asarray, params), cfg)
  qmodel = int8_model(cfg)
  tokens = jax.ShapeDtypeStruct((1, qmodel.cfg.chunk_size), jnp.int32)
  abstract = jax.eval_shape(qmodel.module.init, jax.random.key(0), tokens)["params"]
  return qwix.quantize_params(jax.tree.map(jnp.asarray, params), abstract)


def fake_quantize_kernel(kernel: np.ndarray, in_dims: int) -> np.ndarray:
  """The reference: absmax int8 per output channel, dequantized (float, kernel's shape).

  kernel `[*in_shape, *out_shape]` with the first `in_dims` axes contracted. Qwix's symmetric
  int8 grid: scale = absmax / 127.5, q = clip(round_half_even(w / scale), -128, 127).
  """
  # In jnp, as Qwix computes it: w / scale of an absmax element is +-127.5 in XLA's division
  # (rounds to -128 or 128 -> 127) where numpy's gives 127.49999.
  k = jnp.asarray(kernel, jnp.float32)
  scale = jnp.max(jnp.abs(k), axis=tuple(range(in_dims)), keepdims=True) / 127.5
  scale = jnp.where(scale == 0, 1.0, scale)
  return np.asarray(jnp.clip(jnp.round(k / scale), -128, 127) * scale).astype(kernel.dtype)


def size_bytes(params) -> int:
  """Bytes held by a (possibly quantized) parameter tree."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))

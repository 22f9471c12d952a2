"""The serving layout of a model: matmul weights stored in the compute dtype, layers unrolled.

A trained checkpoint keeps parameters in `param_dtype` (float32) and, with `scan_layers`, the
layers stacked under one `nn.scan`. Both cost time in batch-1 decoding, where every step reads
every weight once: each step cast the float32 matmul weights to bfloat16 again (reading 4 bytes
and writing 2 per weight, then the matmul reads the 2), and the layer scan is a loop whose
per-layer cache slices are copied in and out of the stacked cache. `serving_layout` returns the
same function in a faster form:
  - every weight that the model only ever uses cast to the compute dtype (Dense kernels, the
    embedding table, the factorized projection and the untied head: `CAST_ON_USE`) is stored in
    that dtype, so the cast inside the model is the identity and results are bit-for-bit those
    of the original parameters; norm scales, gates and the lower-bound table stay as they are;
  - with `scan_layers`, the stacked layers are split into one module per layer
    (`scan_layers=False`; caches are then a tuple over layers, built by the same model).
The returned model and parameters go together (prefill and decode both through them).

`decode_step` is `LanguageModel.decode_step` for such a model; with one row (batch 1, one
token) it runs every projection (`Dense`) on that row twice and keeps the first result. XLA:GPU
rewrites a product of a single row with a weight matrix into an elementwise multiply and a
reduction (its dot strength reduction, taken for matrices under ~10M elements) and, for most of
this model's projections, does not fuse the two: each step wrote and read back a product as large
as the weight (measured on an H200: RESULTS.md, Serving). Two rows are a real matrix product that
reads the weight once. The row's result is the same product (up to summation order).
"""
from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import ml_collections
import jax
import jax.numpy as jnp

from sosm_jax import models
from sosm_jax.layers.common import Dense, compute_dtype
from sosm_jax.models.config import resolved_pattern

# parameter names that the layers read only as jnp.asarray(param, compute dtype)
# (layers/common.py Dense; layers/embed.py Embedder)
CAST_ON_USE = ("kernel", "embedding", "embed_proj", "head")


def cast_matmul_weights(params, dtype) -> dict:
  """params with every leaf named in `CAST_ON_USE` cast to dtype; other leaves unchanged."""
  def cast(path, leaf):
    name = getattr(path[-1], "key", None)
    return jnp.asarray(leaf, dtype) if name in CAST_ON_USE else leaf
  return jax.tree_util.tree_map_with_path(cast, params)


def unstack_layers(cfg, params) -> dict:
  """Params of a `scan_layers` model -> those of the same model with `scan_layers=False`.

  params['layers']['block_{p}'] (leaves `[groups, ...]`) -> params['layer_{g * P + p}'].
  """
  if "layers" not in params:
    raise ValueError(f"unstack_layers: no 'layers' in params (keys {sorted(params)}); the "
                     f"parameters are not those of a scan_layers model.")
  pattern = resolved_pattern(cfg)
  groups = cfg.num_layers // len(pattern)
  out = {k: v for k, v in params.items() if k != "layers"}
  for p in range(len(pattern)):
    block = params["layers"][f"block_{p}"]
    for g in range(groups):
      out[f"layer_{g * len(pattern) + p}"] = jax.tree.map(lambda a, g=g: a[g], block)
  return out


def _with_model_key(model, key: str, value, default):
  """The same model (same parameters) with config key `model.<key>` set to value."""
  if model.cfg.get(key, default) == value:
    return model
  cfg = ml_collections.ConfigDict(model.cfg.to_dict())
  cfg[key] = value
  return models.build_model(cfg)


def with_kv_cache_dtype(model, dtype: str):
  """The same model (same parameters) with its attention layers' decode cache in `dtype`
  ('' or 'int8', config key `model.attn_kv_cache_dtype`)."""
  return _with_model_key(model, "attn_kv_cache_dtype", dtype, "")


def with_decode_read_len(model, n: int):
  """The same model (same parameters) with its attention decode reading only the first n cache
  positions (0 = all; config key `model.attn_decode_read_len`)."""
  return _with_model_key(model, "attn_decode_read_len", n, 0)


def with_decode_impl(model, implementation: str):
  """The same model (same parameters) with its attention decode computed by `implementation`
  ('' auto, 'xla', 'pallas' or 'pallas_interpret'; config key `model.attn_decode_impl`)."""
  return _with_model_key(model, "attn_decode_impl", implementation, "")


def serving_layout(model, params):
  """(model, params) -> (model, params) in the serving layout (module doc); same outputs.

  params: unboxed (no `nn.LogicallyPartitioned` leaves).
  """
  cfg = model.cfg
  if cfg.scan_layers:
    params = unstack_layers(cfg, params)
    unrolled = ml_collections.ConfigDict(cfg.to_dict())
    unrolled.scan_layers = False
    model = models.build_model(unrolled)
    cfg = model.cfg
    want = jax.tree.structure(nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), 1,
                                                                          cfg.chunk_size))))
    if jax.tree.structure(params) != want:
      raise ValueError("serving_layout: the unstacked parameters do not match the unrolled "
                       "model's tree; the checkpoint's layer layout is not the one of "
                       "models/hybrid.py.")
  return model, cast_matmul_weights(params, compute_dtype(cfg))


def _two_rows(next_fun, args, kwargs, context):
  """flax method interceptor: a `Dense` call on one row runs on the row twice (module doc)."""
  module = context.module
  if not (isinstance(module, Dense) and context.method_name == "__call__"):
    return next_fun(*args, **kwargs)
  x = args[0]
  if math.prod(x.shape[:x.ndim - module.in_dims]) != 1:
    return next_fun(*args, **kwargs)
  return next_fun(jnp.concatenate([x, x], axis=0), *args[1:], **kwargs)[:1]


@contextlib.contextmanager
def one_row_matmuls_as_two():
  """Within it (while tracing), `Dense` calls on a single row run on two rows (module doc)."""
  with nn.intercept_methods(_two_rows):
    yield


def decode_step(model, params, token, cache):
  """`model.decode_step(params, token, cache)`; with token `[1]`, projections on two rows."""
  if token.shape[0] != 1:
    return model.decode_step(params, token, cache)
  with one_row_matmuls_as_two():
    return model.decode_step(params, token, cache)

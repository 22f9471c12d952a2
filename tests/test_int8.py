"""INT8 weight-only quantization (Qwix): per-channel reference, perplexity change, generation."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sosm_jax import models
from sosm_jax.export import int8, layout
from test_export import random_params, tiny_config

pytestmark = [pytest.mark.usefixtures("fast_compiles"),
              # Qwix 0.1.8 checks flax's removed nnx.VariableState alias on every parameter
              pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")]


def _fake_quantized(params, cfg):
  """Per-layer params with every dense kernel replaced by its int8 per-channel dequantization."""
  params, cfg = layout.unrolled(jax.tree.map(np.asarray, params), cfg)

  def walk(tree, path):
    if not isinstance(tree, dict):
      return tree
    out = {}
    for k, v in tree.items():
      if k == "kernel" and re.fullmatch(int8.DENSE_MODULES, path):
        out[k] = int8.fake_quantize_kernel(v, 2 if path.endswith("o_proj") else 1)
      else:
        out[k] = walk(v, f"{path}/{k}" if path else k)
    return out

  return walk(params, ""), cfg


def test_int8_model_equals_the_per_channel_reference():
  config = tiny_config()   # layer scan on: quantize_params re-lays the parameters out per layer
  params = random_params(config)
  qparams = int8.quantize_params(params, config.model)
  q = qparams["layer_0"]["mixer"]["q_proj"]["kernel"].array
  assert q.qvalue.dtype == jnp.int8 and q.qvalue.shape == (32, 2, 16)
  assert q.scale.shape == (1, 2, 16)              # one scale per output channel
  assert int8.size_bytes(qparams) < 0.5 * int8.size_bytes(params)
  ref_params, ref_cfg = _fake_quantized(params, config.model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
  # jitted: op by op, each primitive would be compiled alone (most of the time on the CPU)
  got = jax.jit(int8.int8_model(config.model).apply)(qparams, tokens)
  want = jax.jit(models.build_model(ref_cfg).apply)(ref_params, tokens)
  fp32 = jax.jit(models.build_model(config.model).apply)(params, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  assert float(jnp.max(jnp.abs(got - fp32))) > 1e-3   # the weights really are quantized


def _structured_batch(rng, batch, length, vocab=64):
  """Sequences a tiny model learns in a few steps: random-offset arithmetic progressions."""
  start = rng.integers(0, vocab, (batch, 1))
  step = rng.integers(1, 4, (batch, 1))
  seq = (start + step * np.arange(length + 1)) % vocab
  return {"inputs": jnp.asarray(seq[:, :-1], jnp.int32), "targets": jnp.asarray(seq[:, 1:], jnp.int32),
          "loss_mask": jnp.ones((batch, length), jnp.float32)}


def test_int8_perplexity_stays_within_one_percent_of_float32():
  config = tiny_config()
  model = models.build_model(config.model)
  params = jax.tree.map(jnp.asarray, random_params(config))
  params = jax.tree.map(lambda p: 0.3 * p, params)
  opt = optax.adam(1e-2)

  @jax.jit
  def step(params, state, batch):
    (loss, _), grads = jax.value_and_grad(model.loss, has_aux=True)(params, batch)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(0)
  state = opt.init(params)
  for _ in range(60):
    params, state, loss = step(params, state, _structured_batch(rng, 8, 32))
  held_out = _structured_batch(np.random.default_rng(99), 16, 32)
  fp32_loss = float(jax.jit(model.loss)(params, held_out)[0])
  assert fp32_loss < 0.7 * np.log(64)   # it learned something, so the comparison means something
  qmodel = int8.int8_model(config.model)
  qparams = int8.quantize_params(params, config.model)
  int8_loss = float(jax.jit(qmodel.loss)(qparams, held_out)[0])
  ratio = np.exp(int8_loss - fp32_loss)   # perplexity ratio
  print(f"held-out perplexity float32 {np.exp(fp32_loss):.4f}, int8 {np.exp(int8_loss):.4f}")
  assert abs(ratio - 1.0) < 0.01, (fp32_loss, int8_loss)


def test_int8_generation_decodes_like_the_prefill():
  config = tiny_config()
  params = random_params(config)
  qmodel = int8.int8_model(config.model)
  qparams = int8.quantize_params(params, config.model)
  prompt = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 8)), jnp.int32)
  out = qmodel.generate(qparams, prompt, jax.random.key(0), 4)
  assert out.shape == (2, 12)
  # Greedy decode steps pick the argmax of the full forward pass over the generated prefix.
  logits = jax.jit(qmodel.apply)(qparams, out[:, :-1])
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 7:], -1)), np.asarray(out[:, 8:]))

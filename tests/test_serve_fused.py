"""Fused projections (serve/layout.py fuse_params: the kernels serve/onerow.py folds, and the tree
of the model's serving_params layout): the model with serving_params over fused parameters is the
checkpoint model's function (float32 logits within rounding, the same greedy tokens) for the
hybrid, the transformer and Gated DeltaNet layers; the fused kernels hold their members side by
side. (Through the model's own modules the fused decode step was slower on an H200 than the
unfused one, so the serving layout no longer fuses: RESULTS.md, "Decode speed".)"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sosm_jax import models
from sosm_jax.models.config import default_model_config
from sosm_jax.serve import layout

pytestmark = pytest.mark.usefixtures("fast_compiles")

_SMALL = dict(num_layers=4, d_model=32, mlp_dim=64, vocab_size=260, attn_num_heads=4,
              attn_num_kv_heads=2, attn_head_dim=8, hgrn2_head_dim=16, gdn_num_heads=2,
              gdn_head_dim=16, chunk_size=8, dtype="float32")
_CASES = {
    "hybrid": dict(pattern=("hgrn2", "attn")),
    "transformer": dict(scan_layers=False),
    "gdn": dict(pattern=("gdn", "attn")),
    "gdn_no_gate": dict(pattern=("gdn", "gdn", "hgrn2", "attn"), gdn_output_gate="none"),
}


def _model(case):
  cfg = default_model_config("transformer" if case == "transformer" else "hybrid")
  cfg.update(**_SMALL, **_CASES[case])
  model = models.build_model(cfg)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), 1, 8)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                        shapes)
  return model, params


_PROMPT = jnp.asarray(np.random.default_rng(1).integers(0, 260, (1, 11)), jnp.int32)


def _greedy(model, params, step, n=6):
  """(prefill logits, the decode steps' logits `[n, V]`, their greedy tokens)."""
  logits, cache = jax.jit(model.prefill, static_argnums=2)(params, _PROMPT, 24)
  step = jax.jit(step)
  token, out = jnp.argmax(logits[:, -1], -1), []
  for _ in range(n):
    step_logits, cache = step(params, token, cache)
    out.append(step_logits[0])
    token = jnp.argmax(step_logits, -1)
  out = np.stack([np.asarray(x) for x in out])
  return np.asarray(logits), out, out.argmax(-1)


def _fused(model, params):
  """The serving layout with fused projections: (model with serving_params, its parameters)."""
  fast, fast_params = layout.serving_layout(model, params)
  assert not fast.cfg.serving_params and "wi_gate" in fast_params["layer_0"]["mlp"]
  cfg = ml_collections.ConfigDict(fast.cfg.to_dict())
  cfg.serving_params = True
  return models.build_model(cfg), layout.fuse_params(fast.cfg, fast_params)


@pytest.mark.parametrize("case", sorted(_CASES))
def test_fused_params_are_the_checkpoint_model(case):
  model, params = _model(case)
  fast, fast_params = _fused(model, params)
  assert fast.cfg.serving_params and not fast.cfg.scan_layers
  mixer = fast_params["layer_0"]["mixer"]
  assert "q_proj" not in mixer and "wi_gate" not in fast_params["layer_0"]["mlp"]
  assert fast_params["layer_0"]["mlp"]["wi"]["kernel"].shape == (32, 128)
  want_prefill, want, want_tokens = _greedy(model, params, model.decode_step)
  got_prefill, got, got_tokens = _greedy(
      fast, fast_params, lambda p, t, c: layout.decode_step(fast, p, t, c))
  np.testing.assert_allclose(got_prefill, want_prefill, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got_tokens, want_tokens)


def test_fused_kernels_hold_the_members_side_by_side():
  model, params = _model("gdn")
  fast, fast_params = _fused(model, params)
  unrolled = layout.unstack_layers(model.cfg, params)
  mixer = unrolled["layer_0"]["mixer"]          # gdn: q, k, v, a, b, gate
  fused = np.asarray(fast_params["layer_0"]["mixer"]["in_proj"]["kernel"])
  assert fused.shape == (32, 3 * 32 + 2 * 2 + 32)
  np.testing.assert_array_equal(fused[:, 32:64], np.asarray(mixer["k_proj"]["kernel"]).reshape(32, 32))
  np.testing.assert_array_equal(fused[:, 96:98], np.asarray(mixer["a_proj"]["kernel"]))
  np.testing.assert_array_equal(fused[:, 100:], np.asarray(mixer["gate_proj"]["kernel"]).reshape(32, 32))
  attn = fast_params["layer_1"]["mixer"]["qkv_proj"]["kernel"]
  assert attn.shape == (32, (4 + 2 + 2) * 8)
  assert "hgrn2_cumulative_lower_bounds" not in fast_params   # no HGRN-2 layer
  model, params = _model("hybrid")
  _, fast_params = _fused(model, params)
  np.testing.assert_allclose(fast_params["hgrn2_cumulative_lower_bounds"],
                             layout.cumulative_lower_bounds(params["hgrn2_lower_bounds"]),
                             rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="unrolled model as trained"):
    layout.fuse_params(fast.cfg, fast_params)


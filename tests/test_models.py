"""Tests for sosm_jax/models: decode == full forward per architecture, causality, documents,
parameter counts, FLOPs, config validation, overfitting, generation.

Compiled functions are shared through one cached setup per architecture (tiny dims, fp32).
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sosm_jax.layers import MIXERS
from sosm_jax.models import build_model, default_model_config, model_config_for
from sosm_jax.models.config import validate_model_config
from sosm_jax.models.sampling import sample_token, top_p_filter

B, T, V, PROMPT = 2, 16, 64, 5
TINY = dict(num_layers=2, d_model=32, vocab_size=V, mlp_dim=64, attn_num_heads=4,
            attn_num_kv_heads=2, attn_head_dim=8, hgrn2_head_dim=8, gdn_num_heads=2,
            gdn_head_dim=8, conv_width=3, chunk_size=8, dtype="float32")
GRAPH_TINY = dict(window=4, k_max=3, k_min=1, semantic_dim=16, semantic_block_size=4,
                  block_weights=(0.5, 0.3, 0.2, 0.0), temporal_dim=8, select_block_size=4,
                  select_num_blocks=2)
ARCHS = {
    # no layer scan, factorized untied embeddings, sliding-window attention
    "transformer": dict(architecture="transformer", scan_layers=False, embed_dim=16,
                        tie_embeddings=False, attn_window=6),
    # both linear mixers, layer scan over two repetitions of the pattern
    "hybrid": dict(pattern=("hgrn2", "gdn", "attn"), num_layers=6),
}
HAS_GRAPH = "graph" in MIXERS
if HAS_GRAPH:   # runs as soon as sosm_jax/layers/graph.py registers the 'graph' mixer
  ARCHS["sosm"] = dict(architecture="sosm", pattern=("hgrn2", "graph"))


def _key(seed):
  # unsafe_rbg: the same statistics for tests, a third of threefry's XLA:CPU compile time
  return jax.random.key(seed, impl="unsafe_rbg")


def tiny_config(arch="hybrid", **kw):
  cfg = default_model_config(ARCHS[arch].get("architecture", "hybrid"))
  cfg.update(TINY)
  cfg.update(ARCHS[arch])
  if "graph" in cfg.pattern:
    cfg.graph.update(GRAPH_TINY)
  cfg.update(kw)
  return cfg


class Setup:
  """One model, its params and jitted functions, shared by the tests of an architecture."""

  def __init__(self, arch):
    self.model = build_model(tiny_config(arch))
    self.params = nn.unbox(jax.jit(self.model.init, static_argnums=(1, 2))(_key(0), B, T))
    self.full = jax.jit(self.model.apply)
    self.tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, V)


@functools.lru_cache(maxsize=None)
def setup(arch) -> Setup:
  return Setup(arch)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefill_then_decode_matches_full_forward(arch):
  s = setup(arch)
  full = s.full(s.params, s.tokens)
  logits, cache = s.model._jit_prefill(s.params, s.tokens[:, :PROMPT], T)
  steps = [logits]
  for t in range(PROMPT, T):
    step_logits, cache = s.model._jit_decode(s.params, s.tokens[:, t], cache)
    steps.append(step_logits[:, None])
  assert int(cache["index"]) == T
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_prefill_last_only_is_the_last_row_of_the_full_prefill():
  """last_only skips the head on all but the last position: same last logits, same cache."""
  s = setup("hybrid")
  full_logits, full_cache = s.model._jit_prefill(s.params, s.tokens[:, :PROMPT], T)
  last = jax.jit(functools.partial(s.model.prefill, last_only=True), static_argnums=(2,))
  logits, cache = last(s.params, s.tokens[:, :PROMPT], T)
  assert logits.shape == (B, 1, V)
  np.testing.assert_array_equal(logits[:, 0], full_logits[:, -1])
  jax.tree.map(np.testing.assert_array_equal, cache, full_cache)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_future_tokens_do_not_change_past_logits(arch):
  s = setup(arch)
  cut = 9
  other = s.tokens.at[:, cut:].set((s.tokens[:, cut:] + 7) % V)
  a, b = s.full(s.params, s.tokens), s.full(s.params, other)
  np.testing.assert_allclose(a[:, :cut], b[:, :cut], rtol=1e-6, atol=1e-6)
  assert float(jnp.max(jnp.abs(a[:, cut:] - b[:, cut:]))) > 1e-3


@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_documents_do_not_see_each_other(arch):
  """A document packed after another gives the logits it gives alone at the start of a row."""
  s = setup(arch)
  split = 7
  doc_b = s.tokens[0, split:]
  tokens = jnp.stack([s.tokens[0], jnp.concatenate([doc_b, jnp.zeros(split, jnp.int32)])])
  seg = jnp.array([[1] * split + [2] * (T - split), [1] * (T - split) + [0] * split])
  pos = jnp.array([list(range(split)) + list(range(T - split)), list(range(T))])
  logits = jax.jit(s.model.apply)(s.params, tokens, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(logits[0, split:], logits[1, :T - split], rtol=1e-4, atol=1e-4)


PARAM_CONFIGS = {
    "transformer": dict(arch="transformer"),
    "transformer_tied_scan": dict(arch="transformer", scan_layers=True, tie_embeddings=True),
    "hybrid": dict(arch="hybrid"),
    "hybrid_factorized_untied": dict(arch="hybrid", embed_dim=12, tie_embeddings=False),
    "gdn_noscan_factorized_tied": dict(arch="hybrid", pattern=("gdn", "attn"), num_layers=2,
                                       scan_layers=False, embed_dim=8),
    "gdn_no_output_gate": dict(arch="hybrid", pattern=("gdn",), num_layers=1, scan_layers=False,
                               gdn_output_gate="none"),
}
if HAS_GRAPH:
  PARAM_CONFIGS["sosm"] = dict(arch="sosm")


@pytest.mark.parametrize("name", list(PARAM_CONFIGS))
def test_param_count_matches_formula(name):
  kw = dict(PARAM_CONFIGS[name])
  model = build_model(tiny_config(kw.pop("arch"), **kw))
  shapes = jax.eval_shape(functools.partial(model.init, batch_size=1, seq_len=8), _key(0))
  counted = sum(math.prod(a.shape) for a in jax.tree.leaves(nn.unbox(shapes)))
  assert counted == model.num_params_formula()


def test_presets_size():
  n = build_model(model_config_for("150m")).num_params_formula()
  assert 120e6 < n < 180e6
  assert build_model(model_config_for("tiny")).num_params_formula() < 1e6


def test_flops_per_token():
  cfg = tiny_config("transformer", num_layers=4, embed_dim=0, tie_embeddings=True,
                    attn_window=0)
  model = build_model(cfg)
  d, m, h, kv, dh, L = 32, 64, 4, 2, 8, 4
  matmul = L * (3 * d * m + 2 * d * h * dh + 2 * d * kv * dh) + d * V
  for t in (16, 256):
    attn = L * 4 * h * dh * (t + 1) / 2      # causal: on average (T+1)/2 keys per query
    assert model.flops_per_token(t) == pytest.approx(3 * (2 * matmul + attn), rel=1e-9)
  # linear-attention layers cost the same per token at any length beyond a chunk
  lin = build_model(tiny_config("hybrid", pattern=("hgrn2", "gdn"), num_layers=2))
  assert lin.flops_per_token(1024) == lin.flops_per_token(8192)
  assert lin.flops_per_token(4) < lin.flops_per_token(1024)


@pytest.mark.parametrize("override,key", [
    (dict(architecture="rnn"), "architecture"),
    (dict(num_layers=4), "num_layers"),
    (dict(pattern=("hgrn2", "mamba")), "pattern"),
    (dict(architecture="sosm", pattern=("hgrn2", "attn")), "pattern"),
    (dict(attn_num_kv_heads=3), "attn_num_kv_heads"),
    (dict(attn_head_dim=7), "attn_head_dim"),
    (dict(hgrn2_head_dim=12), "hgrn2_head_dim"),
    (dict(d_model=0), "d_model"),
    (dict(remat="some"), "remat"),
    (dict(dtype="fp8"), "dtype"),
    (dict(embed_dim=-1), "embed_dim"),
    (dict(attn_impl="flash"), "attn_impl"),
])
def test_config_errors_name_the_key(override, key):
  cfg = tiny_config("hybrid")
  cfg.update(override)
  with pytest.raises(ValueError, match=f"model.{key}"):
    validate_model_config(cfg)
  with pytest.raises(ValueError, match=f"model.{key}"):
    build_model(cfg)
  with pytest.raises(ValueError, match="model size"):
    model_config_for("huge")


def _batch(tokens):
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": jnp.ones((tokens.shape[0], tokens.shape[1] - 1), jnp.float32)}


def test_tiny_hybrid_overfits_one_batch_with_remat_under_scan():
  s = setup("hybrid")
  batch = _batch(s.tokens)
  model = build_model(tiny_config("hybrid", remat="dots"))   # same params as s.model
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    (_, metrics), grads = jax.value_and_grad(model.loss, has_aux=True)(params, batch)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, metrics

  params, opt_state = s.params, opt.init(s.params)
  losses = []
  for _ in range(50):
    params, opt_state, metrics = step(params, opt_state)
    losses.append(float(metrics["loss"]))
  assert metrics["tokens"] == B * (T - 1)
  assert losses[-1] < 0.3 * losses[0], losses
  assert float(metrics["accuracy"]) > 0.8


def test_remat_changes_memory_not_gradients():
  s = setup("transformer")
  batch = _batch(s.tokens)
  grad = lambda m: jax.jit(jax.value_and_grad(m.loss, has_aux=True))(s.params, batch)
  (l0, _), g0 = grad(s.model)
  (l1, _), g1 = grad(build_model(tiny_config("transformer", remat="dots")))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), g0, g1)


def test_bf16_compute_is_close_to_fp32():
  s = setup("hybrid")
  model = build_model(tiny_config("hybrid", dtype="bfloat16"))
  logits = jax.jit(model.apply)(s.params, s.tokens)
  assert logits.dtype == jnp.float32
  ref = s.full(s.params, s.tokens)
  assert float(jnp.max(jnp.abs(logits - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("arch", ["transformer"])
def test_greedy_generate_is_deterministic_argmax_decoding(arch):
  s = setup(arch)
  prompt = s.tokens[:, :PROMPT]
  new = T - PROMPT
  out = s.model.generate(s.params, prompt, jax.random.PRNGKey(0), new)
  again = s.model.generate(s.params, prompt, jax.random.PRNGKey(5), new)
  assert out.shape == (B, T)
  np.testing.assert_array_equal(out, again)
  np.testing.assert_array_equal(out[:, :PROMPT], prompt)
  # by hand: prefill, argmax, decode_step
  logits, cache = s.model._jit_prefill(s.params, prompt, T)
  token = jnp.argmax(logits[:, -1], -1)
  by_hand = [token]
  for _ in range(new - 1):
    step_logits, cache = s.model._jit_decode(s.params, token, cache)
    token = jnp.argmax(step_logits, -1)
    by_hand.append(token)
  np.testing.assert_array_equal(out[:, PROMPT:], jnp.stack(by_hand, 1))
  # and each generated token is the argmax of the full forward over the generated sequence
  full = s.full(s.params, out)
  np.testing.assert_array_equal(jnp.argmax(full[:, PROMPT - 1:-1], -1), out[:, PROMPT:])


def test_sampling_temperature_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  assert np.isfinite(np.asarray(top_p_filter(logits, 1.0))).all()
  assert int(sample_token(logits, None, 0.0, 1.0)[0]) == 0
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  draw = jax.jit(jax.vmap(lambda k, t: sample_token(logits, k, t, 0.7)[0], (0, None)),
                 static_argnums=1)
  draws = np.asarray(draw(keys, 1.0))
  assert set(draws.tolist()) == {0, 1}
  assert 0.5 < np.mean(draws == 0) < 0.75        # 0.5 / 0.8 = 0.625 after renormalising
  hot = np.asarray(draw(keys, 100.0))           # flat distribution, still only the top-p set
  assert set(hot.tolist()) == {0, 1, 2}   # temperature first, then top-p: a flatter set


def _plain_masked_sums(logits, targets, mask):
  x = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
  return (jnp.sum((jax.nn.logsumexp(x, axis=-1) - picked) * mask),
          jnp.sum((jnp.argmax(x, axis=-1) == targets) * mask))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_masked_sums_and_its_gradient_equal_plain_autodiff(dtype, tol):
  """The cross-entropy sums with the hand-written backward == logsumexp autodiff, argmax too."""
  from sosm_jax.layers.embed import masked_sums  # pylint: disable=import-outside-toplevel
  logits = (3 * jax.random.normal(_key(0), (3, 7, 61))).astype(dtype)
  targets = jax.random.randint(_key(1), (3, 7), 0, 61)
  targets = targets.at[0, :4].set(jnp.argmax(logits[0, :4], axis=-1))   # some correct
  mask = (jax.random.uniform(_key(2), (3, 7)) > 0.3).astype(jnp.float32)
  got, want = masked_sums(logits, targets, mask), _plain_masked_sums(logits, targets, mask)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  assert float(got[1]) == float(want[1]) >= 1
  g_got = jax.grad(lambda x: 2.0 * masked_sums(x, targets, mask)[0])(logits)
  g_want = jax.grad(lambda x: 2.0 * _plain_masked_sums(x.astype(jnp.float32), targets, mask)[0])(
      logits)
  assert g_got.dtype == dtype
  np.testing.assert_allclose(np.asarray(g_got, np.float32), np.asarray(g_want, np.float32),
                             atol=tol, rtol=tol)
  ties = jnp.zeros((2, 5))   # every logit equal: argmax is the first index, as jnp.argmax
  assert float(masked_sums(ties, jnp.array([0, 3]), jnp.ones(2))[1]) == 1.0


def test_bfloat16_logits_loss_is_close_to_float32():
  """logits_dtype='bfloat16' changes the loss and gradients only by logit rounding."""
  cfg = dict(num_layers=1, pattern=("attn",), dtype="bfloat16")
  f32, b16 = (build_model(tiny_config("hybrid", logits_dtype=d, **cfg))
              for d in ("float32", "bfloat16"))
  params = nn.unbox(jax.jit(f32.init, static_argnums=(1, 2))(_key(0), 2, 16))
  tokens = jax.random.randint(_key(1), (2, 16), 0, f32.cfg.vocab_size)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "loss_mask": jnp.ones((2, 16), jnp.float32)}
  assert jax.eval_shape(b16.apply, params, tokens).dtype == jnp.bfloat16
  (a, _), ga = jax.jit(jax.value_and_grad(f32.loss, has_aux=True))(params, batch)
  (b, _), gb = jax.jit(jax.value_and_grad(b16.loss, has_aux=True))(params, batch)
  np.testing.assert_allclose(a, b, rtol=1e-2)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    assert float(jnp.linalg.norm(x - y)) <= 0.05 * float(jnp.linalg.norm(x)) + 1e-6
  with pytest.raises(ValueError, match="logits_dtype"):
    build_model(tiny_config("hybrid", logits_dtype="float16"))


def test_chunked_loss_equals_plain_loss():
  """loss_chunk_size > 0 (logits per time chunk, recomputed in backward) == the plain loss."""
  plain = build_model(tiny_config("hybrid", num_layers=2, pattern=("hgrn2", "attn")))
  chunked = build_model(tiny_config("hybrid", num_layers=2, pattern=("hgrn2", "attn"),
                                    loss_chunk_size=5))
  params = nn.unbox(jax.jit(plain.init, static_argnums=(1, 2))(_key(0), 2, 12))
  tokens = jax.random.randint(_key(1), (2, 12), 0, plain.cfg.vocab_size)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "loss_mask": (jax.random.uniform(_key(2), (2, 12)) > 0.2).astype(jnp.float32)}
  # jitted: op-by-op dispatch of the backward's chunk loop is most of the time on the CPU
  (a, ma), ga = jax.jit(jax.value_and_grad(plain.loss, has_aux=True))(params, batch)
  (b, mb), gb = jax.jit(jax.value_and_grad(chunked.loss, has_aux=True))(params, batch)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  np.testing.assert_allclose(ma["accuracy"], mb["accuracy"])
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="loss_chunk_size"):
    build_model(tiny_config("hybrid", loss_chunk_size=-1))

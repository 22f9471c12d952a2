"""Context parallelism (mesh axis 'context') on 8 simulated CPU devices equals one device.

Op level: GLA and the gated delta rule across context=2, 4, 8 and data=2 x context=4, with
document resets and an initial state (outputs, final state, and gradients of all inputs); causal
attention (all-to-all to heads) with packed documents, grouped KV heads that split or not, heads
that need padding, and a sliding window, against one device. Layer level: the HGRN-2, Gated DeltaNet and
attention mixers with packed documents (and a cache holding an initial state for the recurrent
ones). Model level: a train step's loss and gradients with context=2 equal one device's.
Tolerances: float32 throughout; relative 1e-4 of each array's largest value (the split changes
the order of float32 sums only).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import helpers
from sosm_jax import models
from sosm_jax.layers.attention import Attention
from sosm_jax.layers.gated_deltanet import GatedDeltaNet
from sosm_jax.layers.hgrn2 import HGRN2
from sosm_jax.models.config import default_model_config, freeze
from sosm_jax.ops import gated_delta_rule, gla
from sosm_jax.ops import attention as attn_ops
from sosm_jax.parallel import LOGICAL_AXIS_RULES, batch_sharding, make_mesh
from sosm_jax.parallel import mesh as mesh_lib
from sosm_jax.parallel.context import (attention_across_context, cumsum_time,
                                      delta_rule_across_context, gla_across_context)
from sosm_jax.train import state as state_lib
from sosm_jax.train import step as step_lib

pytestmark = pytest.mark.usefixtures("fast_compiles")

MESHES = [(1, 2), (1, 4), (1, 8), (2, 4)]   # (data, context)
MESH_IDS = ["context2", "context4", "context8", "data2xcontext4"]
B, T = 2, 64


def _mesh(data, context):
  cfg = ml_collections.ConfigDict(dict(data=data, fsdp=1, tensor=1, context=context))
  return make_mesh(cfg, jax.devices()[:data * context])


def _on_mesh(mesh, fn, *args):
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    return jax.jit(fn)(*args)


def _close(got, want, what):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(np.max(np.abs(w))) + 1e-6
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-4 * scale,
                               err_msg=what)


def _segments(rng, b, t):
  """[b, t] segment ids of 3 packed documents per row (cuts not on device boundaries) and the
  positions within each document."""
  ids, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(3, t - 3), 2, replace=False))
    ids[r] = 1 + (np.arange(t)[:, None] >= cuts[None, :]).sum(1)
    starts = np.concatenate([[0], cuts])[ids[r] - 1]
    pos[r] = np.arange(t) - starts
  return jnp.asarray(ids), jnp.asarray(pos)


def _resets(segment_ids):
  """[b, t] True at document starts (where the layers set the log-decay to -30)."""
  return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool),
                          segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def _loss(out):
  """A scalar that weighs every output element differently (so gradients are informative)."""
  return sum(jnp.sum(jnp.sin(x.astype(jnp.float32) * (1.0 + i))) for i, x in
             enumerate(jax.tree.leaves(out)))


@pytest.fixture(scope="module")
def op_inputs():
  rng = np.random.default_rng(0)
  h, k = 2, 8
  n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  keys = n(B, T, h, k)
  keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
  resets = _resets(_segments(rng, B, T)[0])
  log_f = jnp.where(resets[..., None, None], -30.0,
                    -jnp.asarray(rng.uniform(0.01, 0.5, (B, T, h, k)), jnp.float32))
  g = jnp.where(resets[..., None], -30.0, -jnp.asarray(rng.uniform(0.01, 0.5, (B, T, h)),
                                                       jnp.float32))
  beta = jnp.asarray(rng.uniform(0.1, 0.9, (B, T, h)), jnp.float32)
  gla_args = (n(B, T, h, k), keys, n(B, T, h, k), log_f, n(B, h, k, k))
  delta_args = (n(B, T, h, k), keys, n(B, T, h, k), g, beta, n(B, h, k, k))
  return gla_args, delta_args


def _gla(*a):
  return gla(*a[:4], initial_state=a[4], chunk_size=16, implementation="xla")


def _delta(*a):
  return gated_delta_rule(*a[:5], initial_state=a[5], chunk_size=16, implementation="xla")


@pytest.mark.parametrize("data, context", MESHES, ids=MESH_IDS)
def test_linear_ops_across_context_equal_one_device(op_inputs, data, context):
  mesh = _mesh(data, context)
  for name, op, wrapped, args in (
      ("gla", _gla, lambda *a: gla_across_context(_gla, *a), op_inputs[0]),
      ("delta", _delta, lambda *a: delta_rule_across_context(_delta, *a), op_inputs[1])):
    f = lambda fn: jax.value_and_grad(lambda a: _loss(fn(*a)))
    want_out, (want_loss, want_grads) = jax.jit(lambda a: (op(*a), f(op)(a)))(args)
    got_out, (got_loss, got_grads) = _on_mesh(mesh, lambda a: (wrapped(*a), f(wrapped)(a)), args)
    _close(got_out, want_out, f"{name} outputs and final state")
    np.testing.assert_allclose(got_loss, want_loss, atol=1e-3)   # a sum of ~10^3 sines
    _close(got_grads, want_grads, f"{name} gradients (all inputs, initial state included)")


def test_pallas_kernels_and_bfloat16_across_context(op_inputs):
  """The ops' Pallas kernels (interpret mode) inside the context split, and bfloat16 inputs
  (the transition and q~ then come out of the op at its bf16-operand matmul precision; the
  combination is float32): context=4 against one device at the same implementation and dtype."""
  mesh = _mesh(1, 4)
  for impl, dtype, tol in (("pallas_interpret", jnp.float32, 1e-4), ("xla", jnp.bfloat16, 3e-2)):
    cast = lambda a: tuple(x.astype(dtype) if i < 3 else x for i, x in enumerate(a))
    run_gla = lambda *a: gla(*a[:4], initial_state=a[4], chunk_size=16, implementation=impl)
    run_delta = lambda *a: gated_delta_rule(*a[:5], initial_state=a[5], chunk_size=16,
                                            implementation=impl)
    for name, op, wrapped, args in (
        ("gla", run_gla, lambda *a: gla_across_context(run_gla, *a), cast(op_inputs[0])),
        ("delta", run_delta, lambda *a: delta_rule_across_context(run_delta, *a),
         cast(op_inputs[1]))):
      want = jax.jit(lambda a: op(*a))(args)
      got = _on_mesh(mesh, lambda a: wrapped(*a), args)
      for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * np.max(np.abs(w)),
                                   err_msg=f"{name} {impl} {jnp.dtype(dtype).name}")


# (query heads, KV heads, window): KV heads that split over context=2 (GQA kept) or not (repeated
# per query head), 6 heads that pad to 8 over context=4 and 8, a sliding window
_ATTN_SHAPES = [(4, 2, 0), (6, 2, 0), (4, 4, 24)]


@pytest.mark.parametrize("data, context", MESHES, ids=MESH_IDS)
def test_attention_across_context_equals_one_device(data, context):
  rng = np.random.default_rng(1)
  n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  seg = _segments(rng, B, T)[0]
  mesh = _mesh(data, context)
  for heads, kv_heads, window in _ATTN_SHAPES:
    q, k, v = n(B, T, heads, 8), n(B, T, kv_heads, 8), n(B, T, kv_heads, 8)
    attend = lambda q, k, v, s, w=window: attn_ops.causal_attention(
        q, k, v, segment_ids=s, window=w, implementation="xla")
    f = lambda fn: lambda *a: (fn(*a), jax.grad(lambda *a: _loss(fn(*a)), argnums=(0, 1, 2))(*a))
    want = jax.jit(f(lambda q, k, v: attend(q, k, v, seg)))(q, k, v)
    split = lambda q, k, v: attention_across_context(attend, q, k, v, seg)
    got = _on_mesh(mesh, f(split), q, k, v)
    what = f"{heads} heads, {kv_heads} KV heads, window {window}"
    _close(got[0], want[0], f"outputs ({what})")
    _close(got[1], want[1], f"gradients of q, k, v ({what})")


def test_attention_across_context_is_balanced_head_split():
  """The compiled program exchanges q, k, v, o by all-to-all (no all-gather of K/V), and each
  device's attention runs over all T tokens of H/N heads: the same work on every device."""
  rng = np.random.default_rng(2)
  n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  q, k, v = n(B, T, 4, 8), n(B, T, 4, 8), n(B, T, 4, 8)
  seen = []

  def attend(q, k, v, s):
    seen.append((q.shape, k.shape))
    return attn_ops.causal_attention(q, k, v, segment_ids=s, implementation="xla")

  fn = lambda q, k, v: attention_across_context(attend, q, k, v, None)
  with jax.set_mesh(_mesh(1, 4)), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    hlo = jax.jit(fn).lower(q, k, v).compile().as_text()
  assert seen == [((B, T, 1, 8), (B, T, 1, 8))]
  assert hlo.count("all-to-all") >= 4 and "all-gather" not in hlo


def _layer_cfg(**kw):
  c = default_model_config()
  c.update(dict(dict(d_model=32, mlp_dim=64, num_layers=4, attn_num_heads=4, attn_num_kv_heads=2,
                     attn_head_dim=8, hgrn2_head_dim=8, gdn_num_heads=2, gdn_head_dim=8,
                     chunk_size=16, dtype="float32", linear_impl="xla", attn_impl="xla"), **kw))
  return freeze(c)


def _random_cache(module, rng):
  cache = module.init_cache(B, T)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype) * 0.5, cache)


@pytest.fixture(scope="module")
def layer_inputs():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(B, T, 32)), jnp.float32)
  seg, pos = _segments(rng, B, T)
  return x, seg, pos


_MIXERS = {"hgrn2": (HGRN2, {}), "gdn": (GatedDeltaNet, {}), "attn": (Attention, {}),
           "attn_blockwise": (Attention, dict(attn_impl="blockwise", attn_block_size=16)),
           # a Pallas kernel (interpret mode) inside the context split
           "attn_splash": (Attention, dict(attn_impl="splash_interpret", attn_block_size=128))}


class _MixerCase:
  """A mixer with its params, inputs and the single-device outputs and gradients (computed once
  per mixer, shared by the meshes)."""

  def __init__(self, mixer, layer_inputs):
    cls, overrides = _MIXERS[mixer]
    module = cls(cfg=_layer_cfg(**overrides), layer_index=1)
    x, seg, pos = layer_inputs
    # the recurrent mixers continue a stream: their cache (state, conv tails) is the initial state
    cache = None if cls is Attention else _random_cache(module, np.random.default_rng(3))
    params = nn.unbox(jax.jit(module.init)(jax.random.key(0), x, positions=pos,
                                          segment_ids=seg)["params"])

    def run(params, x, cache):
      return module.apply({"params": params}, x, positions=pos, segment_ids=seg, cache=cache)

    grads = jax.grad(lambda *a: _loss(run(*a)), argnums=(0, 1, 2))
    self.fn = lambda *a: (run(*a), grads(*a))
    self.args = (params, x, cache)
    self.want = jax.jit(self.fn)(*self.args)


_CASES = {}


@pytest.mark.parametrize("data, context", MESHES, ids=MESH_IDS)
@pytest.mark.parametrize("mixer", list(_MIXERS))
def test_mixer_across_context_equals_one_device(layer_inputs, mixer, data, context):
  if mixer not in _CASES:
    _CASES[mixer] = _MixerCase(mixer, layer_inputs)
  case = _CASES[mixer]
  got = _on_mesh(_mesh(data, context), case.fn, *case.args)
  _close(got[0], case.want[0], f"{mixer}: outputs and cache")
  _close(got[1], case.want[1], f"{mixer}: gradients of params, input and initial state")


def test_train_step_with_context_equals_one_device():
  from configs.curriculum import get_config  # pylint: disable=import-outside-toplevel
  cfg = get_config("tiny").model
  cfg.update(pattern=("hgrn2", "gdn", "attn"), num_layers=3, loss_chunk_size=16)
  model = models.build_model(cfg)
  rng = np.random.default_rng(4)
  seg, pos = _segments(rng, 4, T)
  batch = {"inputs": rng.integers(0, 256, (4, T), dtype=np.int32),
           "targets": rng.integers(0, 256, (4, T), dtype=np.int32),
           "loss_mask": (rng.random((4, T)) > 0.1).astype(np.float32),
           "segment_ids": np.asarray(seg), "positions": np.asarray(pos)}
  # plain SGD: Adam's first step is ~lr * sign(g), which turns rounding noise in near-zero
  # gradients into full-size differences
  optimizer = optax.sgd(1e-2)
  step = step_lib.make_train_step(model.loss, optimizer, optax.constant_schedule(1e-2))
  init = lambda: model.init(jax.random.key(0), 1, 16)
  # random parameters on the host (no init compiled), placed with each mesh's state shardings
  params = helpers.random_model_params(model)
  zero = np.zeros((), np.int32)
  initial = state_lib.TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                                 nonfinite_streak=zero, nonfinite_total=zero)

  def one_step(mesh):
    """(loss, grad norm, new params) of one step on `mesh` from `initial`, placed with the
    trainer's state shardings."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
      state = jax.device_put(initial, state_lib.state_shardings(init, optimizer, mesh))
      placed = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
      new, metrics = jax.jit(step)(state, placed)
      return float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(new.params)

  want = one_step(_mesh(1, 1))
  got = one_step(_mesh(2, 2))
  assert got[0] == pytest.approx(want[0], rel=1e-5)
  assert got[1] == pytest.approx(want[1], rel=1e-4)
  _close(got[2], want[2], "parameters after one step")


def test_mesh_context_axis_and_errors():
  mesh = _mesh(2, 4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
  assert batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"), "context")
  default = make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  assert default.shape["context"] == 1 and default.shape["data"] == 8
  with pytest.raises(ValueError, match="mesh.context=0"):
    mesh_lib.mesh_sizes(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, context=0)))
  with pytest.raises(ValueError, match="has 16 devices but 8 are present"):
    make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=1, tensor=1, context=4)))


def test_chunked_cumsum_equals_cumsum():
  x = -jnp.asarray(np.random.default_rng(5).uniform(0, 1, (2, 256, 3)), jnp.float32)
  np.testing.assert_allclose(cumsum_time(x, chunk=16), jnp.cumsum(x, axis=1), rtol=1e-5)
  np.testing.assert_allclose(cumsum_time(x[:, :40], chunk=16), jnp.cumsum(x[:, :40], axis=1))

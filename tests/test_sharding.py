"""The sharded train step on 8 simulated CPU devices equals one device; restore onto other meshes.

A two-layer version of the tiny hybrid (one HGRN-2 and one attention layer; d_model 32, so
'fsdp'=8 really splits it) takes the trainer's own compiled step (`loop.compile_stage_step`: jit
with explicit in/out shardings, donated state) on each mesh, over the same fixed random batches;
losses and parameters must match the single-device run.
"""
import contextlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers
import sosm_jax.ops as ops
from sosm_jax import models
from sosm_jax.parallel import (LOGICAL_AXIS_RULES, batch_sharding, distributed_init_args,
                               logical_shardings, make_mesh, per_shard, process_batch_shard)
from sosm_jax.parallel import mesh as mesh_lib
from sosm_jax.parallel.per_shard import shard_axes
from sosm_jax.train import checkpoint as ckpt_lib
from sosm_jax.train import curriculum
from sosm_jax.train import loop
from sosm_jax.train import optimizer as optimizer_lib
from sosm_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, BATCH, STEPS = 32, 8, 2


def tiny_config():
  """The tiny config with two layers (one HGRN-2, one attention) to keep compilation short."""
  from configs.curriculum import get_config  # pylint: disable=g-import-not-at-top
  cfg = get_config("tiny")
  cfg.model.update(pattern=("hgrn2", "attn"), num_layers=2)
  # A constant rate from the first step (which must move the parameters), and an epsilon well
  # above the rounding noise of near-zero gradients, which Adam would otherwise blow up to ±lr.
  cfg.optimizer.update(learning_rate=1e-2, warmup_steps=0, schedule="constant", eps=1e-4)
  return cfg


def _random_batches(n, seed=0):
  """n batches of `[BATCH, SEQ_LEN]` with two packed documents per row and some masked targets."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    cut = rng.integers(4, SEQ_LEN - 4, size=(BATCH, 1))
    t = np.arange(SEQ_LEN)[None, :]
    segment = np.where(t < cut, 1, 2).astype(np.int32)
    positions = np.where(t < cut, t, t - cut).astype(np.int32)
    out.append({"inputs": rng.integers(0, 256, (BATCH, SEQ_LEN), dtype=np.int32),
                "targets": rng.integers(0, 256, (BATCH, SEQ_LEN), dtype=np.int32),
                "loss_mask": (rng.random((BATCH, SEQ_LEN)) > 0.1).astype(np.float32),
                "segment_ids": segment, "positions": positions})
  return out


class Trainer:
  """The trainer's pieces on one mesh: state shardings, initial state, compiled step."""

  def __init__(self, cfg, mesh, grad_accum=1):
    self.mesh = mesh
    self.model = models.build_model(cfg.model)
    self.optimizer, self.schedule = optimizer_lib.make_optimizer(cfg.optimizer, 10)
    self.init_params = lambda: self.model.init(jax.random.key(cfg.seed), 1, cfg.model.chunk_size)
    stage = curriculum.Stage(index=0, seq_len=SEQ_LEN, steps=10, global_batch=BATCH,
                             grad_accum=grad_accum, remat="none", rope_base=1e4, first_step=0)
    with self.context():
      self.state_sh = state_lib.state_shardings(self.init_params, self.optimizer, mesh)
      self.abstract = state_lib.abstract_train_state(self.state_sh, self.init_params,
                                                     self.optimizer)
      self.step_fn, _ = loop.compile_stage_step(self.model, self.optimizer, self.schedule, stage,
                                                self.abstract, self.state_sh, mesh, None)

  def context(self):
    return _Both(jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES))

  def init(self):
    with self.context():
      return state_lib.create_train_state(self.init_params, self.optimizer, self.state_sh)

  def step(self, state, batch):
    with self.context():
      global_batch = {k: jax.make_array_from_process_local_data(batch_sharding(self.mesh), v)
                      for k, v in batch.items()}
      state, metrics = self.step_fn(state, global_batch)
    return state, float(metrics["loss"])


class _Both:
  def __init__(self, *managers):
    self.managers = managers

  def __enter__(self):
    for m in self.managers:
      m.__enter__()

  def __exit__(self, *exc):
    for m in reversed(self.managers):
      m.__exit__(*exc)


def _mesh(data, fsdp, tensor, devices=None):
  return make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)), devices)


_TRAINERS = {}


def trainer_for(cfg, shape, grad_accum=1, devices=None):
  """Trainers are cached by mesh: each one compiles the step once for the whole module."""
  key = (shape, grad_accum, None if devices is None else len(devices))
  if key not in _TRAINERS:
    _TRAINERS[key] = Trainer(cfg, _mesh(*shape, devices), grad_accum)
  return _TRAINERS[key]


def run_steps(trainer, initial, batches):
  """STEPS steps from the host copy `initial` of the state, placed with the trainer's shardings."""
  state = jax.device_put(initial, trainer.state_sh)
  losses = []
  for batch in batches:
    state, loss = trainer.step(state, batch)
    losses.append(loss)
  return state, losses


@contextlib.contextmanager
def quick_compile_context():
  """XLA without most optimizations (3x faster compiles): these tests time nothing."""
  before = jax.config.values.get("jax_disable_most_optimizations", False)
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module", autouse=True)
def quick_compiles():
  with quick_compile_context():
    yield


@pytest.fixture(scope="module")
def cfg():
  return tiny_config()


@pytest.fixture(scope="module")
def batches():
  return _random_batches(STEPS + 1)


@pytest.fixture(scope="module")
def reference(cfg, batches):
  """One device: its trainer, the initial state (host), and (params, losses) after STEPS steps."""
  trainer = trainer_for(cfg, (1, 1, 1), devices=jax.devices()[:1])
  initial = jax.device_get(trainer.init())
  state, losses = run_steps(trainer, initial, batches[:STEPS])
  return trainer, initial, jax.device_get(state.params), losses


def _close(a, b, what):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=what),
               a, b)


def _shard_shape(array):
  return array.addressable_shards[0].data.shape


@pytest.mark.parametrize("shape, grad_accum", [((8, 1, 1), 1), ((1, 8, 1), 1), ((1, 4, 2), 1),
                                               ((2, 2, 2), 2)],
                         ids=["data8", "fsdp8", "fsdp4xtensor2", "data2xfsdp2xtensor2_accum2"])
def test_sharded_step_equals_one_device(cfg, batches, reference, shape, grad_accum):
  _, initial, ref_params, ref_losses = reference
  state, losses = run_steps(trainer_for(cfg, shape, grad_accum), initial, batches[:STEPS])
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  _close(jax.device_get(state.params), ref_params, f"mesh {shape}")
  # The parameters, and their Adam moments alike, really are split as the rules say.
  data, fsdp, tensor = shape
  mlp_in = state.params["layers"]["block_0"]["mlp"]["wi_up"]["kernel"]  # (layers, embed, mlp)
  assert mlp_in.shape == (1, 32, 64)
  assert _shard_shape(mlp_in) == (1, 32 // fsdp, 64 // tensor)
  embedding = state.params["embed"]["embedding"]  # (vocab, embed)
  assert _shard_shape(embedding) == (260 // tensor, 32 // fsdp)
  adam = state.opt_state[1][0]
  assert adam.mu["embed"]["embedding"].sharding == embedding.sharding
  assert adam.nu["layers"]["block_0"]["mlp"]["wi_up"]["kernel"].sharding == mlp_in.sharding
  assert not np.allclose(jax.device_get(mlp_in), 0.0)


def test_restore_onto_other_meshes(cfg, batches, reference, tmp_path):
  """Saved from fsdp=8 on 8 devices; restored on 4 as data=2 x fsdp=2, and on 1, where the next
  step continues exactly as it would have on 8."""
  ref_trainer, initial = reference[:2]
  trainer8 = trainer_for(cfg, (1, 8, 1))
  state8, _ = run_steps(trainer8, initial, batches[:STEPS])
  saved = jax.device_get(state8)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(STEPS, state8, {"note": "fsdp=8"}, wait=True)
  next8, loss8 = trainer8.step(state8, batches[STEPS])
  next8 = jax.device_get(next8)

  mesh4 = _mesh(2, 2, 1, jax.devices()[:4])
  with jax.set_mesh(mesh4), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    sh4 = state_lib.state_shardings(ref_trainer.init_params, ref_trainer.optimizer, mesh4)
    target4 = state_lib.abstract_train_state(sh4, ref_trainer.init_params, ref_trainer.optimizer)
  state4, meta, step = ckpt.restore_latest(target4)
  assert step == STEPS and meta == {"note": "fsdp=8"}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state4), saved)
  kernel4 = state4.params["layers"]["block_0"]["mlp"]["wi_up"]["kernel"]
  assert kernel4.sharding.mesh.devices.size == 4 and _shard_shape(kernel4) == (1, 16, 64)
  assert kernel4.sharding == sh4.params["layers"]["block_0"]["mlp"]["wi_up"]["kernel"]

  state1, _, _ = ckpt.restore_latest(ref_trainer.abstract)
  ckpt.close()
  assert int(state1.step) == STEPS
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state1), saved)
  next1, loss1 = ref_trainer.step(state1, batches[STEPS])
  assert loss1 == pytest.approx(loss8, rel=1e-5)
  _close(jax.device_get(next1.params), next8.params, "continued on 1 device")
  _close(jax.device_get(next1.opt_state), next8.opt_state, "optimizer state on 1 device")


def test_batch_shard_of_a_single_process():
  assert process_batch_shard(_mesh(2, 2, 2), 8) == (0, 1)
  assert process_batch_shard(_mesh(1, 8, 1), 16) == (0, 1)


def test_multi_slice_mesh_keeps_fsdp_and_tensor_inside_a_slice():
  assert mesh_lib.split_over_slices((4, 8, 2), 2) == ((2, 8, 2), (2, 1, 1))
  with pytest.raises(ValueError, match="mesh.data=1 is not a multiple"):
    mesh_lib.split_over_slices((1, 16, 1), 2)


def _dist(address="", count=0, pid=-1):
  return ml_collections.ConfigDict(dict(coordinator_address=address, num_processes=count,
                                        process_id=pid))


def test_distributed_init_arguments():
  assert distributed_init_args(_dist(), {}) is None
  assert distributed_init_args(_dist(count=1), {}) is None
  assert distributed_init_args(_dist("10.0.0.1:1234", 4, 2), {}) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
  assert distributed_init_args(_dist(count=-1), {}) == {}  # JAX discovers the cluster
  assert distributed_init_args(_dist(count=8), {}) == {"num_processes": 8}
  assert distributed_init_args(_dist(), {"TPU_WORKER_HOSTNAMES": "h0,h1"}) == {}
  assert distributed_init_args(_dist(), {"MEGASCALE_NUM_SLICES": "2"}) == {}
  assert distributed_init_args(_dist(), {"TPU_WORKER_HOSTNAMES": "h0"}) is None
  with pytest.raises(ValueError, match="distributed.process_id in"):
    distributed_init_args(_dist("10.0.0.1:1234", 2, 2), {})
  with pytest.raises(ValueError, match="distributed.num_processes"):
    distributed_init_args(_dist("10.0.0.1:1234", 0, 0), {})


# --------------------------------------------------------------------------- linear-attention kernels
# The Pallas kernels (in interpret mode on CPU, the same kernel code as on a GPU) run inside
# `jax.shard_map` (`sosm_jax.parallel.per_shard`): each device computes only its batch rows and
# heads, and the result equals one device's.

KERNEL_MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]


def _kernel_config():
  """Two layers, one HGRN-2 (GLA kernels) and one Gated DeltaNet, on the Pallas kernels."""
  cfg = tiny_config()
  cfg.model.update(pattern=("hgrn2", "gdn"), num_layers=2, linear_impl="pallas_interpret")
  return cfg


def _loss_and_grads_on(mesh, model, params, batch):
  """jit(value_and_grad(model.loss)) with the trainer's parameter and batch shardings."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), 1, 16))
    param_sh = logical_shardings(abstract, mesh)
    fn = jax.jit(jax.value_and_grad(model.loss, has_aux=True),
                 in_shardings=(param_sh, batch_sharding(mesh)))
    placed = jax.device_put(params, param_sh)
    arrays = {k: jax.make_array_from_process_local_data(batch_sharding(mesh), v)
              for k, v in batch.items()}
    (loss, _), grads = fn(placed, arrays)
  return float(loss), jax.device_get(grads)


@pytest.fixture(scope="module")
def kernel_reference(batches):
  """One device: the kernel model, its initial parameters (host) and (loss, grads)."""
  model = models.build_model(_kernel_config().model)
  params = helpers.random_model_params(model)   # on the host, no init compiled
  loss, grads = _loss_and_grads_on(_mesh(1, 1, 1, jax.devices()[:1]), model, params, batches[0])
  return model, params, loss, grads


@pytest.mark.parametrize("shape", KERNEL_MESHES, ids=["data8", "fsdp8", "data2xfsdp2xtensor2"])
def test_kernel_step_on_a_mesh_equals_one_device(kernel_reference, batches, shape):
  """Loss and every gradient on the mesh equal one device's: loss to rtol 1e-5, gradients to
  rtol 1e-4 / atol 1e-6 (fp32; only the order of the sums over the batch and fsdp shards
  differs)."""
  model, params, ref_loss, ref_grads = kernel_reference
  loss, grads = _loss_and_grads_on(_mesh(*shape), model, params, batches[0])
  assert np.isfinite(loss) and loss == pytest.approx(ref_loss, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6,
                                                       err_msg=f"mesh {shape}"), grads, ref_grads)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def _op_call(op, sharded):
  """(fn, args, in shardings) of a forward+backward of one op on [B=4, T=40, H=2, 16] inputs:
  through `per_shard` (as the layers call it) when `sharded`, else the bare op."""
  rng = np.random.default_rng(0)
  b, t, h, d = 4, 40, 2, 16
  x = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  blhd = ("activation_batch", "activation_length", "activation_heads", None)
  state = ("activation_batch", "activation_heads", None, None)
  if op == "gla":
    args = (x(b, t, h, d), jax.nn.sigmoid(x(b, t, h, d)), x(b, t, h, d),
            -jax.nn.softplus(x(b, t, h, d)), x(b, h, d, d))
    names = (blhd,) * 4 + (state,)
    run = lambda q, k, v, f, s: ops.gla(q, k, v, f, initial_state=s, chunk_size=16,
                                        implementation="pallas_interpret")
  else:
    args = (unit(x(b, t, h, d)), unit(x(b, t, h, d)), x(b, t, h, d),
            -jax.nn.softplus(x(b, t, h)), jax.nn.sigmoid(x(b, t, h)), x(b, h, d, d))
    names = (blhd,) * 3 + (blhd[:3],) * 2 + (state,)
    run = lambda q, k, v, g, beta, s: ops.gated_delta_rule(
        q, k, v, g, beta, initial_state=s, chunk_size=16, implementation="pallas_interpret")
  call = (lambda *a: per_shard(run, a, names, (blhd, state))) if sharded else run

  def loss(*a):
    o, s = call(*a)
    return jnp.sum(o * o) + jnp.sum(s)

  return jax.value_and_grad(loss, argnums=tuple(range(len(args)))), args, names


@pytest.mark.parametrize("op", ["gla", "gated_delta_rule"])
def test_sharded_kernel_call_has_no_all_gather(op):
  """data=2 x fsdp=2 x tensor=2: the compiled forward+backward of a kernel call through
  `per_shard` holds no all-gather (nor any other collective but the loss's sum), every gradient
  keeps its input's sharding, and the values equal the unsharded call's. Called bare, the same
  kernels are all-gathered (the failure this guards against)."""
  mesh = _mesh(2, 2, 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    fn, args, names = _op_call(op, sharded=True)
    shardings = [jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(n)) for n in names]
    placed = [jax.device_put(a, s) for a, s in zip(args, shardings)]
    assert "pallas_call" in str(jax.make_jaxpr(fn)(*placed))
    compiled = jax.jit(fn).lower(*placed).compile()
    hlo = compiled.as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    value, grads = compiled(*placed)
    for g, s in zip(grads, shardings):
      assert g.sharding.is_equivalent_to(s, g.ndim), (g.sharding, s)
    bare_fn, _, _ = _op_call(op, sharded=False)
    assert "all-gather" in jax.jit(bare_fn).lower(*placed).compile().as_text()
  want_value, want_grads = jax.jit(bare_fn)(*args)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_per_shard_splits_only_what_divides():
  """Heads that the tensor axis does not divide stay whole on every device (batch still split);
  without a mesh per_shard is a plain call."""
  x = jnp.arange(4 * 5 * 3 * 2, dtype=jnp.float32).reshape(4, 5, 3, 2)
  blhd = ("activation_batch", "activation_length", "activation_heads", None)
  fn = lambda a, s: (a * 2.0, s)
  assert per_shard(fn, (x, None), (blhd, None), (blhd, None))[0].sum() == 2 * x.sum()
  mesh = _mesh(2, 2, 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    assert shard_axes((x,), (blhd,), jax.sharding.get_abstract_mesh()) == {
        "activation_batch": ("data", "fsdp"), "activation_length": (), "activation_heads": ()}
    out, none = jax.jit(lambda a: per_shard(fn, (a, None), (blhd, None), (blhd, None)))(x)
  assert none is None
  np.testing.assert_array_equal(out, 2 * x)


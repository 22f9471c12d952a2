"""optimizer.fused: the flat-buffer AdamW against the per-leaf optax chain, in the train step, on
meshes (equal where parameters are replicated, refused where they are split) and in checkpoints."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import curriculum as recipe
from sosm_jax import models
from sosm_jax.parallel import LOGICAL_AXIS_RULES, make_mesh
from sosm_jax.train import checkpoint as ckpt_lib
from sosm_jax.train import config as config_lib
from sosm_jax.train import optimizer as optimizer_lib
from sosm_jax.train import resume as resume_lib
from sosm_jax.train import state as state_lib
from sosm_jax.train import step as step_lib

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _opt_cfg(**kw):
  cfg = ml_collections.ConfigDict(config_lib.base_config().optimizer.to_dict())
  cfg.update({"warmup_steps": 2, "learning_rate": 1e-2, **kw})
  return cfg


def _params(mixed: bool):
  """Leaves decayed and not (norm, bias, embedding, A_log) of odd shapes; `mixed`: 2 in bf16."""
  rng = np.random.default_rng(0)
  low = jnp.bfloat16 if mixed else jnp.float32
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return {"embed": {"embedding": jnp.asarray(normal(50, 16))},
          "block_0": {"mlp": {"kernel": jnp.asarray(normal(16, 33))},
                      "norm": {"scale": jnp.ones((16,))},
                      "proj": {"kernel": jnp.asarray(normal(8, 5), low),
                               "bias": jnp.full((5,), 0.5, low)}},
          "A_log": jnp.asarray(normal(3)),
          "head": {"kernel": jnp.asarray(normal(16, 7) * 0.1)}}


def _grads(params, i):
  """Random gradients; odd steps large (the global-norm clip acts), even ones small (it doesn't)."""
  rng = np.random.default_rng(100 + i)
  scale = 30.0 if i % 2 else 0.01
  return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape).astype(np.float32) * scale, p.dtype),
      params)


def _assert_close(ref, got, rtol32=2e-6):
  """float32 leaves to a few ulps of their largest value; bfloat16 ones to one ulp (2**-7)."""
  for path, a in jax.tree_util.tree_leaves_with_path(ref):
    b = got
    for key in path:
      b = b[key.key]
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    tol = (rtol32 if a.dtype == jnp.float32 else 2.0 ** -7) * max(np.abs(a32).max(), 1e-30)
    np.testing.assert_allclose(b32, a32, rtol=0, atol=tol, err_msg=jax.tree_util.keystr(path))


# float32 with the clip acting on odd steps; mixed dtypes without the clip, as optax sums the
# squares of bfloat16 leaves in bfloat16 for the global norm (~1e-3 off, the fused sum is float32)
@pytest.mark.parametrize("mixed,clip_norm", [(False, 1.0), (True, 0.0)])
def test_fused_adamw_equals_the_per_leaf_optax_chain_over_steps(mixed, clip_norm):
  ref, _ = optimizer_lib.make_optimizer(_opt_cfg(clip_norm=clip_norm), 20)
  fused, _ = optimizer_lib.make_optimizer(_opt_cfg(clip_norm=clip_norm, fused=True), 20)
  assert isinstance(fused, optimizer_lib.FusedAdamW)
  params = _params(mixed)
  ref_state, fused_state = ref.init(params), fused.init(params)
  if mixed:
    assert sorted(fused_state.mu) == ["bfloat16_decay", "bfloat16_no_decay", "float32_decay",
                                      "float32_no_decay"]
    assert fused_state.mu["bfloat16_no_decay"].shape == (5,)     # proj/bias
  else:
    assert sorted(fused_state.mu) == ["float32_decay", "float32_no_decay"]
  ref_update = jax.jit(ref.update)
  fused_step = jax.jit(lambda g, s, p: fused.guarded_update(g, s, p, lambda *_: jnp.bool_(True)))
  fused_update = jax.jit(fused.update)
  p_ref = p_fused = params
  for i in range(6):
    grads = _grads(params, i)
    updates, ref_state = ref_update(grads, ref_state, p_ref)
    if i == 1:   # the optax interface gives the chain's updates
      _assert_close(updates, fused_update(grads, fused_state, p_fused)[0], rtol32=1e-5)
    p_ref = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), p_ref, updates)
    p_fused, fused_state, grad_norm, update_norm, param_norm, ok = fused_step(
        grads, fused_state, p_fused)
    assert bool(ok)
    np.testing.assert_allclose(grad_norm, optax.tree.norm(grads), rtol=1e-2 if mixed else 1e-6)
    _assert_close(p_ref, p_fused)
  assert int(fused_state.count) == 6
  # the moments are the chain's, in their leaves' order within each group
  ref_mu = ref_state[-1][0].mu     # chain(clip, adamw = chain(scale_by_adam, ...))
  groups, treedef = optimizer_lib._layout(params, False)  # pylint: disable=protected-access
  split = optimizer_lib._split  # pylint: disable=protected-access
  _assert_close(ref_mu, split(fused_state.mu, groups, treedef, params))
  # the update moved every parameter by more than the tolerance (the check is not vacuous)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) -
                                                          b.astype(jnp.float32)))), params, p_ref)
  assert min(jax.tree.leaves(moved)) > 1e-3


def test_fused_guard_rejects_whole_update():
  fused, _ = optimizer_lib.make_optimizer(_opt_cfg(fused=True, warmup_steps=0), 20)
  params = _params(mixed=True)
  state = fused.init(params)
  new_params, new_state, *_, ok = jax.jit(
      lambda g, s, p: fused.guarded_update(g, s, p, lambda *_: jnp.bool_(False)))(
          _grads(params, 1), state, params)
  assert not bool(ok) and int(new_state.count) == 0
  jax.tree.map(np.testing.assert_array_equal, new_params, params)
  jax.tree.map(np.testing.assert_array_equal, new_state, state)


def test_train_step_guard_with_the_fused_optimizer():
  """A non-finite loss leaves parameters and the flat moments as they were; a finite one not."""
  def loss_fn(params, batch):
    loss = jnp.sum((batch["inputs"] * params["w"] - 1.0) ** 2) + jnp.sum(params["norm"]["scale"])
    return loss, {"accuracy": jnp.float32(0), "tokens": jnp.float32(1)}

  fused, schedule = optimizer_lib.make_optimizer(_opt_cfg(fused=True, warmup_steps=0), 10)
  params = {"w": jnp.ones((3,)), "norm": {"scale": jnp.ones((2,))}}
  zero = jnp.zeros((), jnp.int32)
  state = state_lib.TrainState(step=zero, params=params, opt_state=fused.init(params),
                               nonfinite_streak=zero, nonfinite_total=zero)
  step = jax.jit(step_lib.make_train_step(loss_fn, fused, schedule))
  bad, out = step(state, {"inputs": jnp.array([1.0, jnp.nan, 2.0])})
  assert not bool(out["finite"]) and int(bad.nonfinite_streak) == 1 and int(bad.step) == 1
  jax.tree.map(np.testing.assert_array_equal, (bad.params, bad.opt_state),
               (state.params, state.opt_state))
  good, out = step(bad, {"inputs": jnp.array([1.0, 3.0, 2.0])})
  assert bool(out["finite"]) and int(good.opt_state.count) == 1 and int(good.nonfinite_streak) == 0
  assert float(out["grad_norm"]) > 0 and not np.allclose(good.params["w"], 1.0)


def _tiny_runs(mesh_shape, steps: int = 3):
  """{fused: (losses, params)} of `steps` train steps of the tiny recipe (2 layers) on a mesh of
  the CPU devices, from the same initial parameters."""
  cfg = recipe.get_config("tiny")
  # one HGRN-2 and one attention layer (of the tiny recipe's four): the same parameter kinds,
  # half the compile time
  cfg.model.update(num_layers=2, pattern=("hgrn2", "attn"))
  model = models.build_model(cfg.model)
  mesh = make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), mesh_shape))),
                   jax.devices()[:int(np.prod(mesh_shape))])
  init_params = lambda: model.init(jax.random.key(0), 1, cfg.model.chunk_size)
  runs, params0 = {}, None
  for fused in (False, True):
    optimizer, schedule = optimizer_lib.make_optimizer(
        ml_collections.ConfigDict({**cfg.optimizer.to_dict(), "fused": fused, "warmup_steps": 1}),
        100)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
      state_sh = state_lib.state_shardings(init_params, optimizer, mesh)
      if params0 is None:   # one compile of the model's init for both runs
        params0 = state_lib.create_train_state(init_params, optimizer, state_sh).params

      def fresh(params, opt=optimizer):
        zero = jnp.zeros((), jnp.int32)
        return state_lib.TrainState(step=zero, params=params, opt_state=opt.init(params),
                                    nonfinite_streak=zero, nonfinite_total=zero)

      state = jax.jit(fresh, out_shardings=state_sh)(params0)
      step, batch_sh = step_lib.jit_train_step(model.loss, optimizer, schedule, 1, 1.0, state_sh,
                                               mesh)
      losses = []
      for _ in range(steps):
        tokens = rng.integers(0, cfg.model.vocab_size, size=(8, 33), dtype=np.int32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                 "loss_mask": np.ones((8, 32), np.float32),
                 "segment_ids": np.ones((8, 32), np.int32),
                 "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32))}
        state, out = step(state, jax.device_put(batch, batch_sh))
        assert bool(out["finite"])
        losses.append(float(out["loss"]))
    runs[fused] = losses, jax.device_get(state.params)
  return runs


def test_train_step_fused_equals_default_on_a_data_parallel_mesh():
  """Tiny recipe, 8 devices of pure data parallelism (parameters replicated), 3 steps."""
  runs = _tiny_runs((8, 1, 1))
  (losses, params), (fused_losses, fused_params) = runs[False], runs[True]
  np.testing.assert_allclose(fused_losses, losses, rtol=1e-5)
  assert losses[2] != losses[0]
  _assert_close(params, fused_params, rtol32=1e-5)


@pytest.mark.parametrize("mesh_shape", [(4, 2, 1), (4, 1, 2)])
def test_fused_refuses_split_parameters(mesh_shape):
  cfg = recipe.get_config("tiny")
  model = models.build_model(cfg.model)
  optimizer, _ = optimizer_lib.make_optimizer(_opt_cfg(fused=True), 10)
  mesh = make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), mesh_shape))))
  init_params = lambda: model.init(jax.random.key(0), 1, cfg.model.chunk_size)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    with pytest.raises(ValueError, match=r"optimizer.fused=True .* splits \d+ parameters .*"
                                         r"fsdp=1 and tensor=1"):
      state_lib.state_shardings(init_params, optimizer, mesh)
  bad = recipe.get_config("tiny")
  bad.optimizer.fused = True
  bad.mesh.update(fsdp=mesh_shape[1], tensor=mesh_shape[2])
  with pytest.raises(ValueError, match=r"config.optimizer.fused: needs replicated parameters"):
    config_lib.validate_config(bad)


def test_fused_state_checkpoints_and_a_changed_key_is_refused_by_name(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3), "norm": {"scale": jnp.ones((3,))}}
  fused, _ = optimizer_lib.make_optimizer(_opt_cfg(fused=True, warmup_steps=0), 10)
  plain, _ = optimizer_lib.make_optimizer(_opt_cfg(warmup_steps=0), 10)
  state = fused.init(params)
  _, state = jax.jit(fused.update)(jax.tree.map(jnp.ones_like, params), state, params)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
  ckpt.save(1, {"params": params, "opt_state": state},
            {"config": {"model": {}, "optimizer": {"fused": True}}})
  abstract = lambda opt: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
      {"params": params, "opt_state": jax.eval_shape(opt.init, params)})
  got = resume_lib.decide(ckpt, abstract(fused), workdir=str(tmp_path), model={}, tokenizer={},
                          restart=False, optimizer={"fused": True})
  assert got.step == 1 and int(got.state["opt_state"].count) == 1
  jax.tree.map(np.testing.assert_array_equal, got.state["opt_state"], state)
  with pytest.raises(resume_lib.ResumeRefused,
                     match=r"(?s)optimizer layout.*optimizer.fused: saved True, now False.*"
                           r"--config.optimizer.fused=true") as refused:
    resume_lib.decide(ckpt, abstract(plain), workdir=str(tmp_path), model={}, tokenizer={},
                      restart=False, optimizer={"fused": False})
  assert "opt_state/" not in str(refused.value) and "more arrays" not in str(refused.value)
  ckpt.close()

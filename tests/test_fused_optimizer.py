"""optimizer.fused: the flat-buffer AdamW against the per-leaf optax chain, in the train step, on
meshes (replicated and split parameters: equal, and no data moved for the split ones), in
checkpoints and across a resume that changes optimizer.fused."""
import contextlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import curriculum as recipe
from sosm_jax import models
from sosm_jax.parallel import LOGICAL_AXIS_RULES, make_mesh, unbox_values
from sosm_jax.train import checkpoint as ckpt_lib
from sosm_jax.train import config as config_lib
from sosm_jax.train import hlo_stats as hlo_lib
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


@pytest.fixture(scope="module")
def tiny():
  """(config, model, init_params, its parameters on the host) of the tiny recipe with one HGRN-2
  and one attention layer (of its four: the same parameter kinds, half the compile time); the
  model's init compiled once for every mesh of the module."""
  cfg = recipe.get_config("tiny")
  cfg.model.update(num_layers=2, pattern=("hgrn2", "attn"))
  model = models.build_model(cfg.model)
  init_params = lambda: model.init(jax.random.key(0), 1, cfg.model.chunk_size)
  return cfg, model, init_params, jax.device_get(jax.jit(lambda: unbox_values(init_params()))())


def _mesh(mesh_shape):
  return make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), mesh_shape))))


def _tiny_runs(tiny, mesh_shape, steps: int = 3):
  """{fused: (losses, params, the step's collectives)} of `steps` train steps of the tiny model
  on a mesh of the CPU devices, from the same initial parameters."""
  cfg, model, init_params, host_params = tiny
  mesh = _mesh(mesh_shape)
  runs = {}
  for fused in (False, True):
    optimizer, schedule = optimizer_lib.make_optimizer(
        ml_collections.ConfigDict({**cfg.optimizer.to_dict(), "fused": fused, "warmup_steps": 1}),
        100)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
      optimizer = state_lib.place_optimizer(init_params, optimizer, mesh)
      state_sh = state_lib.state_shardings(init_params, optimizer, mesh)
      params0 = jax.device_put(host_params, state_sh.params)

      def fresh(params, opt=optimizer):
        zero = jnp.zeros((), jnp.int32)
        return state_lib.TrainState(step=zero, params=params, opt_state=opt.init(params),
                                    nonfinite_streak=zero, nonfinite_total=zero)

      state = jax.jit(fresh, out_shardings=state_sh)(params0)
      step, batch_sh = step_lib.jit_train_step(model.loss, optimizer, schedule, 1, 1.0, state_sh,
                                               mesh)
      losses, compiled = [], None
      for _ in range(steps):
        tokens = rng.integers(0, cfg.model.vocab_size, size=(8, 33), dtype=np.int32)
        batch = jax.device_put(
            {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((8, 32), np.float32),
             "segment_ids": np.ones((8, 32), np.int32),
             "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32))}, batch_sh)
        compiled = compiled or step.lower(state, batch).compile()
        state, out = compiled(state, batch)
        assert bool(out["finite"])
        losses.append(float(out["loss"]))
    runs[fused] = (losses, jax.device_get(state.params),
                   hlo_lib.hlo_stats(compiled.as_text()).collectives)
  return runs


# data parallelism (parameters replicated: the 1-D buffers) and fsdp (split: sharded buffers)
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1)])
def test_train_step_fused_equals_default_on_a_mesh(tiny, mesh_shape):
  """Tiny recipe (2 layers) on 8 devices, 3 steps: the same losses and parameters, and the
  fused step moves no more data between devices than the per-leaf one (the same gathers of the
  parameters for the model; all-reduces of no more bytes)."""
  runs = _tiny_runs(tiny, mesh_shape)
  (losses, params, collectives), (fused_losses, fused_params, fused_collectives) = (
      runs[False], runs[True])
  np.testing.assert_allclose(fused_losses, losses, rtol=1e-5)
  assert losses[2] != losses[0]
  _assert_close(params, fused_params, rtol32=1e-5)
  assert set(fused_collectives) == set(collectives)
  for kind, (count, payload) in collectives.items():
    if kind == "all-reduce":
      assert fused_collectives[kind][1] <= payload
    else:
      assert fused_collectives[kind] == [count, payload], kind
  if mesh_shape[1] > 1:    # the parameters are gathered for the model (the check has something)
    assert collectives["all-gather"][0] > 0


def test_split_layout_keeps_each_devices_blocks_on_it():
  """Leaves split in several ways (two mesh axes on one dimension, in the spec's and against the
  mesh's order; a dimension not first): each device's shard of a group buffer is its own blocks
  of the group's leaves, flattened and concatenated; gathering and splitting move nothing and
  give the leaves back exactly."""
  mesh = _mesh((2, 2, 2))
  specs = {"a": P(None, ("fsdp", "tensor"), None), "b": P("tensor", "fsdp"),
           "c": P(("tensor", "fsdp")), "d": P(None, "fsdp"), "e_bias": P()}
  shapes = {"a": (3, 8, 5), "b": (4, 6), "c": (8,), "d": (3, 4), "e_bias": (3, 5)}
  sh = {k: jax.sharding.NamedSharding(mesh, spec) for k, spec in specs.items()}
  rng = np.random.default_rng(0)
  params = jax.device_put({k: rng.standard_normal(v).astype(np.float32)
                           for k, v in shapes.items()}, sh)
  groups, treedef = optimizer_lib._layout(params, False, sh)  # pylint: disable=protected-access
  assert {g.name: (g.axes, g.shape) for g in groups} == {
      "float32_decay_by_fsdp": (("fsdp",), (2, 6)),
      "float32_decay_by_fsdp_tensor": (("fsdp", "tensor"), (2, 2, 3 * 2 * 5 + 2 * 3 + 2)),
      "float32_no_decay": ((), (15,))}
  concat = optimizer_lib._concat  # pylint: disable=protected-access
  split = optimizer_lib._split  # pylint: disable=protected-access
  gather = jax.jit(lambda p: {g.name: concat(treedef.flatten_up_to(p), g) for g in groups},
                   in_shardings=(sh,))
  flat = gather(params)
  back = jax.jit(lambda f: split(f, groups, treedef, params), out_shardings=sh)
  for program in (gather.lower(params).compile(), back.lower(flat).compile()):
    assert not hlo_lib.hlo_stats(program.as_text()).collectives
  jax.tree.map(np.testing.assert_array_equal, back(flat), params)
  leaves = treedef.flatten_up_to(params)
  for g in groups:
    assert_sharding(flat[g.name], jax.sharding.NamedSharding(mesh, P(*g.axes, None)))
    for shard in flat[g.name].addressable_shards:
      own = [next(s.data for s in leaves[leaf.index].addressable_shards
                  if s.device == shard.device) for leaf in g.leaves]
      np.testing.assert_array_equal(np.asarray(shard.data).reshape(-1),
                                    np.concatenate([np.asarray(o).reshape(-1) for o in own]))


_SPLIT_MESHES = {"fsdp": (2, 4, 1), "fsdp_tensor": (2, 2, 2)}


@pytest.mark.parametrize("mesh_name", sorted(_SPLIT_MESHES))
def test_fused_on_split_parameters_is_local_and_equals_one_device_and_per_leaf(tiny, mesh_name):
  """fsdp (and tensor) split parameters: the fused update keeps each device's shards in place
  (no all-gather / all-to-all / permute in the compiled update: only the norms' all-reduces) and
  gives the one-device fused update and the per-leaf chain over steps, clip acting or not."""
  _, _, init_params, host_params = tiny
  mesh = _mesh(_SPLIT_MESHES[mesh_name])
  opt_cfg = _opt_cfg(fused=True)
  fused, _ = optimizer_lib.make_optimizer(opt_cfg, 20)
  ref, _ = optimizer_lib.make_optimizer(_opt_cfg(), 20)
  accept = lambda *_: jnp.bool_(True)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    placed = state_lib.place_optimizer(init_params, fused, mesh)
    state_sh = state_lib.state_shardings(init_params, placed, mesh)
    param_sh, opt_sh = state_sh.params, state_sh.opt_state
    params = jax.device_put(host_params, param_sh)
    state = jax.jit(placed.init, out_shardings=opt_sh)(params)
    step = jax.jit(lambda g, s, p: placed.guarded_update(g, s, p, accept),
                   in_shardings=(param_sh, opt_sh, param_sh),
                   out_shardings=(param_sh, opt_sh) + (None,) * 4)
    grads0 = jax.device_put(_grads(params, 0), param_sh)
    compiled = step.lower(grads0, state, params).compile()
  # the layout: groups split over the mesh axes of their leaves, the buffers sharded so
  layout = optimizer_lib._layout  # pylint: disable=protected-access
  groups, treedef = layout(params, False, param_sh)
  split_axes = {g.axes for g in groups}
  assert ("fsdp",) in split_axes and () in split_axes
  if mesh_name == "fsdp_tensor":
    assert ("fsdp", "tensor") in split_axes and ("tensor",) in split_axes
  for g in groups:
    assert state.mu[g.name].shape == g.shape == tuple(mesh.shape[a] for a in g.axes) + (
        g.shape[-1],)
    assert state.mu[g.name].sharding.spec == P(*g.axes, None)
    assert state.nu[g.name].sharding.spec == P(*g.axes, None)
  assert state.mu["float32_no_decay"].ndim == 1    # the replicated leaves: the 1-D layout
  # no data moves in the update: only all-reduces (of the three norms' partial sums)
  collectives = hlo_lib.hlo_stats(compiled.as_text()).collectives
  assert set(collectives) == {"all-reduce"}, collectives
  count, payload = collectives["all-reduce"]
  assert payload <= 64 * count, collectives     # scalars, not buffers
  for kind in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
    assert f" {kind}(" not in compiled.as_text() and f" {kind}-start(" not in compiled.as_text()

  host = jax.device_get(params)
  one, ref_step = jax.jit(lambda g, s, p: fused.guarded_update(g, s, p, accept)), jax.jit(
      ref.update)
  p_one = p_ref = p_split = host
  s_one, s_ref, s_split = fused.init(host), ref.init(host), state
  for i in range(4):
    grads = _grads(host, i)
    p_split, s_split, grad_norm, *_, ok = step(jax.device_put(grads, param_sh), s_split, p_split)
    assert bool(ok)
    p_one, s_one, one_norm, *_ = one(grads, s_one, p_one)
    np.testing.assert_allclose(grad_norm, one_norm, rtol=1e-6)
    updates, s_ref = ref_step(grads, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, updates)
    got = jax.device_get(p_split)
    _assert_close(p_one, got)
    _assert_close(p_ref, got)
  jax.tree.map(lambda a, s: assert_sharding(a, s), p_split, param_sh)
  # the moments are the chain's, leaf by leaf
  split = optimizer_lib._split  # pylint: disable=protected-access
  _assert_close(s_ref[-1][0].mu, split(jax.device_get(s_split.mu), groups, treedef, host))
  _assert_close(s_ref[-1][0].nu, split(jax.device_get(s_split.nu), groups, treedef, host))
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), host, p_ref)
  assert min(jax.tree.leaves(moved)) > 1e-3


def assert_sharding(array, sharding):
  assert array.sharding.is_equivalent_to(sharding, array.ndim), (array.sharding, sharding)


def _placed_state(tiny, mesh, fused):
  """(placed optimizer, state shardings, abstract TrainState) of the tiny model on `mesh`."""
  init_params = tiny[2]
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    placed = state_lib.place_optimizer(init_params, fused, mesh)
    state_sh = state_lib.state_shardings(init_params, placed, mesh)
    return placed, state_sh, state_lib.abstract_train_state(state_sh, init_params, placed)


def _resume(ckpt, abstract, mesh, tmp_path):
  with jax.set_mesh(mesh):
    return resume_lib.decide(ckpt, abstract, workdir=str(tmp_path), model={}, tokenizer={},
                             restart=False).state


def test_fused_checkpoint_resumes_on_other_meshes(tiny, tmp_path):
  """Saved on data=2 x fsdp=4: the moments are stored per parameter, so the checkpoint resumes
  there bit for bit and on data=4 x fsdp=2 and data=8 (other buffers) with the moments equal
  element for element and the next update equal to continuing on the first mesh."""
  host_params = tiny[3]
  fused, _ = optimizer_lib.make_optimizer(_opt_cfg(fused=True), 20)
  accept = lambda *_: jnp.bool_(True)
  rng = np.random.default_rng(0)
  # distinct random moments per element (nu > 0), as trees like the parameters
  moments = {
      "mu": jax.tree.map(lambda p: (rng.standard_normal(p.shape) * 1e-2).astype(p.dtype),
                         host_params),
      "nu": jax.tree.map(lambda p: (np.abs(rng.standard_normal(p.shape)) * 1e-4 + 1e-6).astype(
          p.dtype), host_params)}
  grads = _grads(host_params, 1)   # the clip acts
  from_tree = optimizer_lib.fused_state_from_tree
  runs = {}
  for mesh_shape in ((2, 4, 1), (4, 2, 1), (8, 1, 1)):
    mesh = _mesh(mesh_shape)
    placed, state_sh, abstract = _placed_state(tiny, mesh, fused)
    param_sh, opt_sh = state_sh.params, state_sh.opt_state
    # as a run on this mesh saves and resumes: its own optimizer, placed here, gives the form
    form = state_lib.checkpoint_form(placed)
    if mesh_shape == (2, 4, 1):   # the saved state, its buffers packed from the moments
      opt = jax.jit(lambda t, o=placed: from_tree(o, t, host_params), out_shardings=opt_sh)(
          optimizer_lib.FusedAdamWState(jnp.int32(3), moments["mu"], moments["nu"]))
      assert any(b.ndim == 2 for b in opt.mu.values())    # buffers split by fsdp
      zero = jnp.zeros((), jnp.int32)
      saved = state_lib.TrainState(step=zero + 3, params=jax.device_put(host_params, param_sh),
                                   opt_state=opt, nonfinite_streak=zero, nonfinite_total=zero)
      config = {"model": {}, "optimizer": {"fused": True}, "mesh": {"fsdp": 4, "tensor": 1}}
      with contextlib.closing(ckpt_lib.Checkpointer(str(tmp_path), async_save=False,
                                                    form=form)) as ckpt:
        ckpt.save(3, saved, {"config": config})
        shapes = ckpt.read_shapes(3)   # the moments under the parameters' own paths and shapes
      saved_form = form
      assert {k[len("opt_state/mu/"):]: v for k, v in shapes.items()
              if k.startswith("opt_state/mu/")} == {
                  k[len("params/"):]: v for k, v in shapes.items() if k.startswith("params/")}
    with contextlib.closing(ckpt_lib.Checkpointer(str(tmp_path), async_save=False,
                                                  form=form)) as ckpt:
      got = _resume(ckpt, abstract, mesh, tmp_path)
    jax.tree.map(assert_sharding, got, jax.tree.map(lambda a: a.sharding, abstract))
    if mesh_shape == (2, 4, 1):   # the same mesh: every array bit for bit
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                   got, saved)
    else:
      assert {k: b.shape for k, b in got.opt_state.mu.items()} != {
          k: b.shape for k, b in saved.opt_state.mu.items()}
      with pytest.raises(ValueError, match=r"lays its buffers out as .*checkpoint_form of the "
                                           r"optimizer placed on the target's mesh"):
        saved_form.from_saved(None, abstract)   # the saving mesh's form: the wrong buffers
    as_trees = jax.device_get(form.to_saved(got).opt_state)    # jitted fused_state_to_tree
    assert int(as_trees.count) == 3
    for name in ("mu", "nu"):
      jax.tree.map(np.testing.assert_array_equal, getattr(as_trees, name), moments[name])
    step = jax.jit(lambda g, s, p, o=placed: o.guarded_update(g, s, p, accept)[:2],
                   in_shardings=(param_sh, opt_sh, param_sh), out_shardings=(param_sh, opt_sh))
    new_params, new_opt = step(jax.device_put(grads, param_sh), got.opt_state, got.params)
    runs[mesh_shape] = jax.device_get(form.to_saved(got.replace(params=new_params,
                                                                opt_state=new_opt)))
  first = runs[(2, 4, 1)]
  for mesh_shape in ((4, 2, 1), (8, 1, 1)):
    _assert_close(first.params, runs[mesh_shape].params)
    for name in ("mu", "nu"):
      _assert_close(getattr(first.opt_state, name), getattr(runs[mesh_shape].opt_state, name))
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), host_params, first.params)
  assert min(jax.tree.leaves(moved)) > 1e-4


def test_fused_optimizer_not_placed_on_a_splitting_mesh_is_refused(tiny):
  init_params = tiny[2]
  mesh = _mesh((2, 2, 2))
  fused, _ = optimizer_lib.make_optimizer(_opt_cfg(fused=True), 20)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    with pytest.raises(ValueError, match=r"optimizer.fused=True lays its buffers out .* "
                                         r"\d+ parameters .*place_optimizer"):
      state_lib.state_shardings(init_params, fused, mesh)   # not placed on this mesh


def _apply(optimizer, grads, opt_state, params):
  """(params, opt_state) after one accepted update, as the train step applies it."""
  if isinstance(optimizer, optimizer_lib.FusedAdamW):
    return optimizer.guarded_update(grads, opt_state, params, lambda *_: jnp.bool_(True))[:2]
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _as_trees(optimizer, opt_state, params):
  """(count(s), mu, nu) of either optimizer's state, the moments as trees like the parameters."""
  if isinstance(optimizer, optimizer_lib.FusedAdamW):
    tree = optimizer_lib.fused_state_to_tree(optimizer, opt_state, params)
    return (int(tree.count),), tree.mu, tree.nu
  tree = optimizer_lib.chain_state_to_fused_tree(opt_state)
  return tuple(int(c) for c in optimizer_lib.chain_counts(opt_state)), tree.mu, tree.nu


def _train_state(params, opt_state, step):
  zero = jnp.zeros((), jnp.int32)
  return state_lib.TrainState(step=zero + step, params=params, opt_state=opt_state,
                              nonfinite_streak=zero, nonfinite_total=zero)


def _sharded_abstract(optimizer, params, mesh):
  """(the optimizer placed on `mesh`, the abstract TrainState with shardings) for `params` with
  each matrix split over fsdp along its first dimension divisible by 4 (the rest replicated)."""
  def spec(p):
    dims = [d for d in range(p.ndim) if p.ndim == 2 and p.shape[d] % 4 == 0][:1]
    return NamedSharding(mesh, P(*(("fsdp" if d in dims else None) for d in range(p.ndim))))

  param_sh = jax.tree.map(spec, params)
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(optimizer.init, params)
  if isinstance(optimizer, optimizer_lib.FusedAdamW):
    optimizer = optimizer.on_shardings(param_sh)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    opt_sh = optimizer.state_shardings(params)
  else:
    opt_sh = optax.tree_utils.tree_map_params(optimizer, lambda _, sh: sh, abstract_opt, param_sh,
                                              transform_non_params=lambda _: replicated)
  shardings = state_lib.TrainState(replicated, param_sh, opt_sh, replicated, replicated)
  abstract = _train_state(params, abstract_opt, 0)
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          jax.eval_shape(lambda: abstract), shardings)
  return optimizer, abstract


# one device, and saved on data2 x fsdp4 and resumed on data4 x fsdp2 (other fused buffers)
@pytest.mark.parametrize("meshes", [None, ((2, 4, 1), (4, 2, 1))], ids=["one_device", "meshes"])
@pytest.mark.parametrize("saved_fused", [False, True], ids=["per_leaf_to_fused",
                                                             "fused_to_per_leaf"])
def test_resume_across_a_changed_fused_continues_exactly(saved_fused, meshes, tmp_path):
  """A state of one optimizer after 3 updates (the clip acting on odd steps), saved through its
  checkpoint form and resumed through the other's by resume.decide (the trainer's path): the
  moments come back bit for bit as the other optimizer's state (its counts 3: the chain's two
  and the fused one), placed as the target says, and 3 more updates with the other optimizer
  give what the saving one gives continuing, to fp32 rounding."""
  params = _params(mixed=False)
  opts = {f: optimizer_lib.make_optimizer(_opt_cfg(fused=f), 20)[0] for f in (False, True)}
  saver, resumer = opts[saved_fused], opts[not saved_fused]
  p_saved, s_saved = params, saver.init(params)
  saver_step = jax.jit(lambda g, s, p: _apply(saver, g, s, p))
  for i in range(3):
    p_saved, s_saved = saver_step(_grads(params, i), s_saved, p_saved)
  saved, saving = _train_state(p_saved, s_saved, 3), saver
  config = {"model": {}, "optimizer": {"fused": saved_fused}}
  if meshes is None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), jax.eval_shape(
        lambda: _train_state(params, resumer.init(params), 0)))
    mesh = contextlib.nullcontext()
  else:
    placed_saver, saved_abstract = _sharded_abstract(saver, params, _mesh(meshes[0]))
    if saved_fused:   # the same state in the buffers of the saving mesh's layout
      saved = saved.replace(opt_state=optimizer_lib.fused_state_from_tree(
          placed_saver, optimizer_lib.fused_state_to_tree(saver, s_saved, params), params))
    saved = jax.device_put(jax.device_get(saved),
                           jax.tree.map(lambda a: a.sharding, saved_abstract))
    saving = placed_saver   # its form is the one of the mesh it saves on
    mesh = _mesh(meshes[1])
    resumer, abstract = _sharded_abstract(resumer, params, mesh)
    mesh = jax.set_mesh(mesh)
  with contextlib.closing(ckpt_lib.Checkpointer(str(tmp_path), async_save=False,
                                                form=state_lib.checkpoint_form(saving))) as ckpt:
    ckpt.save(3, saved, {"config": config})
  with mesh, contextlib.closing(ckpt_lib.Checkpointer(
      str(tmp_path), async_save=False, form=state_lib.checkpoint_form(resumer))) as ckpt:
    got = resume_lib.decide(ckpt, abstract, workdir=str(tmp_path), model={}, tokenizer={},
                            restart=False).state
  assert jax.tree.structure(got) == jax.tree.structure(abstract)
  if meshes is not None:
    jax.tree.map(assert_sharding, got, jax.tree.map(lambda a: a.sharding, abstract))
  host = jax.device_get(got)
  counts, mu, nu = _as_trees(resumer, host.opt_state, params)
  saved_counts, saved_mu, saved_nu = _as_trees(saver, jax.device_get(s_saved), params)
  assert set(counts) == set(saved_counts) == {3} and int(host.step) == 3
  for want, have in ((p_saved, host.params), (saved_mu, mu), (saved_nu, nu)):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(b), np.asarray(a)),
                 want, have)
  # every leaf its own buffer (the chain's two counts too): a donating step takes it
  got = jax.jit(lambda s: jax.tree.map(lambda x: x + 0, s), donate_argnums=0)(got)
  resumer_step = jax.jit(lambda g, s, p: _apply(resumer, g, s, p))
  place = ((lambda tree: tree) if meshes is None else
           lambda tree: jax.device_put(tree, jax.tree.map(lambda a: a.sharding, abstract.params)))
  p_ref, s_ref, p_got, s_got = p_saved, s_saved, got.params, got.opt_state
  for i in range(3, 6):
    grads = _grads(params, i)
    p_ref, s_ref = saver_step(grads, s_ref, p_ref)
    p_got, s_got = resumer_step(place(grads), s_got, p_got)
  _assert_close(jax.device_get(p_ref), jax.device_get(p_got))
  _, ref_mu, ref_nu = _as_trees(saver, jax.device_get(s_ref), params)
  counts, got_mu, got_nu = _as_trees(resumer, jax.device_get(s_got), params)
  assert set(counts) == {6}
  _assert_close(ref_mu, got_mu)
  _assert_close(ref_nu, got_nu)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       jax.device_get(p_ref), p_saved)
  assert min(jax.tree.leaves(moved)) > 1e-3


def test_chain_state_conversions_are_inverse_and_name_other_states():
  """The two pure conversions: the chain's exact structure for either clip setting (built by
  hand from optax's classes), inverse of each other, and a clear error for another state."""
  params = _params(mixed=True)
  fused, _ = optimizer_lib.make_optimizer(_opt_cfg(fused=True), 20)
  for clip_norm in (1.0, 0.0):
    chain, _ = optimizer_lib.make_optimizer(_opt_cfg(clip_norm=clip_norm), 20)
    state = chain.init(params)
    tree = optimizer_lib.chain_state_to_fused_tree(state)
    assert jax.tree.structure(tree) == jax.tree.structure(
        optimizer_lib.fused_state_to_tree(fused, fused.init(params), params))
    back = optimizer_lib.fused_tree_to_chain_state(tree)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    assert optimizer_lib.is_chain_state(state) and not optimizer_lib.is_chain_state(tree)
  with pytest.raises(ValueError, match=r"not a state of make_optimizer's per-leaf chain"):
    optimizer_lib.chain_state_to_fused_tree(optax.adam(1e-3).init(params))
  # counts that differ have no fused equivalent (one count for the moments and the schedule)
  clip, (adam, masked, _) = state
  with pytest.raises(ValueError, match=r"counts 0 adam updates but 2 schedule steps"):
    state_lib._checked_counts(  # pylint: disable=protected-access
        (clip, (adam, masked, optax.ScaleByScheduleState(jnp.int32(2)))))

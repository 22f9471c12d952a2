"""The train state and its creation directly in its sharded layout."""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from sosm_jax.parallel import logical_shardings, replicated_sharding, unbox_values
from sosm_jax.train import optimizer as optimizer_lib


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to continue training bit-for-bit (data position aside)."""
  step: jax.Array              # int32 scalar: optimizer steps taken (skipped updates included)
  params: Any
  opt_state: Any
  nonfinite_streak: jax.Array  # int32: consecutive steps whose update was skipped
  nonfinite_total: jax.Array   # int32: all skipped steps so far


def place_optimizer(init_params: Callable[[], Any], optimizer: optax.GradientTransformation,
                    mesh: Mesh) -> optax.GradientTransformation:
  """The optimizer as it runs on `mesh`: a `FusedAdamW` laid out after the parameters' shardings
  there (its buffers keep each device's blocks where they are: no data moves in the update); any
  other optimizer as it is. Call it before `state_shardings` and use the result everywhere."""
  if not isinstance(optimizer, optimizer_lib.FusedAdamW):
    return optimizer
  return optimizer.on_shardings(logical_shardings(jax.eval_shape(init_params), mesh))


def state_shardings(init_params: Callable[[], Any], optimizer: optax.GradientTransformation,
                    mesh: Mesh):
  """Shardings of the TrainState, derived from the logical axis names on the parameters.

  `init_params()` returns boxed parameters; it is only traced (eval_shape), never run.
  Optimizer moments get their parameter's sharding; counters are replicated. The fused
  optimizer's buffers get the shardings of its layout (`place_optimizer` makes it for `mesh`;
  without it only replicated parameters are accepted).
  """
  boxed = jax.eval_shape(init_params)
  param_sh = logical_shardings(boxed, mesh)
  abstract_opt = jax.eval_shape(optimizer.init, unbox_values(boxed))
  replicated = replicated_sharding(mesh)
  if isinstance(optimizer, optimizer_lib.FusedAdamW):   # buffers laid out after param_sh
    optimizer_lib.check_fused_shardings(optimizer, param_sh)
    if optimizer.param_shardings is None:   # replicated parameters: replicated buffers
      opt_sh = jax.tree.map(lambda _: replicated, abstract_opt)
    else:
      opt_sh = optimizer.state_shardings(unbox_values(boxed))
  else:
    opt_sh = optax.tree_utils.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_opt, param_sh,
        transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                    nonfinite_streak=replicated, nonfinite_total=replicated)


def create_train_state(init_params: Callable[[], Any], optimizer: optax.GradientTransformation,
                       shardings: TrainState) -> TrainState:
  """Initialises parameters and optimizer state on the devices, already sharded."""

  def init() -> TrainState:
    params = nn.unbox(init_params())
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                      nonfinite_streak=zero, nonfinite_total=zero)

  return jax.jit(init, out_shardings=shardings)()


def abstract_train_state(shardings: TrainState, init_params: Callable[[], Any],
                         optimizer: optax.GradientTransformation) -> TrainState:
  """ShapeDtypeStructs with shardings: the target a checkpoint is restored onto (any mesh)."""
  params = unbox_values(jax.eval_shape(init_params))
  zero = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = TrainState(step=zero, params=params, opt_state=jax.eval_shape(optimizer.init, params),
                        nonfinite_streak=zero, nonfinite_total=zero)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                      shardings)


def checkpoint_form(optimizer) -> FusedCheckpointForm | ChainCheckpointForm:
  """How `ckpt_lib.Checkpointer` stores and restores a TrainState of `optimizer` (its `form`):
  a `FusedAdamW`'s mesh-dependent buffers as per-parameter trees; any other optimizer's state as
  it is. Either form also restores the other's checkpoints of `make_optimizer`'s AdamW (a run
  resumes across a change of `optimizer.fused`)."""
  if isinstance(optimizer, optimizer_lib.FusedAdamW):
    return FusedCheckpointForm(optimizer)
  return ChainCheckpointForm()


def _jit_placed(fn, like):
  """jax.jit(fn) with its outputs in the shardings of `like`'s leaves (arrays or abstract
  arrays shaped as fn's outputs), where every leaf has one (else XLA places them)."""
  shardings = jax.tree.map(lambda a: getattr(a, "sharding", None), like)
  placed = all(s is not None for s in jax.tree.leaves(shardings, is_leaf=lambda x: x is None))
  return jax.jit(fn, out_shardings=shardings) if placed else jax.jit(fn)


def _checked_counts(chain_state):
  """`chain_state` after checking that its adam and schedule counts agree (the fused optimizer
  has one count for both; a chain whose counts differ was not written by `make_optimizer`'s
  training)."""
  # one device's copy of the replicated scalars (every process holds one)
  adam, schedule = (int(np.asarray(c.addressable_data(0)) if hasattr(c, "addressable_data")
                        else c) for c in optimizer_lib.chain_counts(chain_state))
  if adam != schedule:
    raise ValueError(f"the checkpoint's optimizer state counts {adam} adam updates but "
                     f"{schedule} schedule steps; the fused AdamW keeps one count for both: "
                     f"resume it with --config.optimizer.fused=false")
  return chain_state


class ChainCheckpointForm:
  """A TrainState of an optax optimizer is checkpointed as it is; where the state is
  `make_optimizer`'s per-leaf chain this form also restores a fused optimizer's checkpoint (the
  moments as trees like the parameters, in their shardings: any mesh) into the chain's state
  (`optimizer.fused_tree_to_chain_state`, exact, under jit: separate count buffers)."""

  def to_saved(self, state: TrainState) -> TrainState:
    return state

  def sources(self, abstract_state: TrainState) -> list[tuple[Any, Callable | None]]:
    """See `ckpt_lib.Checkpointer.sources`: as it is; a fused checkpoint where the chain is."""
    out = [(abstract_state, None)]
    opt_state = getattr(abstract_state, "opt_state", None)
    if optimizer_lib.is_chain_state(opt_state):
      tree = optimizer_lib.chain_state_to_fused_tree(opt_state)

      def from_fused(saved):
        convert = _jit_placed(optimizer_lib.fused_tree_to_chain_state, opt_state)
        return saved.replace(opt_state=convert(saved.opt_state))

      out.append((abstract_state.replace(opt_state=tree), from_fused))
    return out


class FusedCheckpointForm:
  """A TrainState with a `FusedAdamW` state as it is checkpointed: its moments as trees like the
  parameters (`optimizer.fused_state_to_tree`), each array in its parameter's sharding. The
  checkpoint is then mesh-independent, as the per-leaf optimizer's: orbax reshards the moments
  on restore as it does the parameters, and `from_saved` packs them into the buffers of the
  optimizer placed on the resuming mesh. Both ways are exact data movement, local to each
  device; a save holds one more copy of the moments on the devices until orbax has read it.
  """

  def __init__(self, optimizer: optimizer_lib.FusedAdamW):
    self.optimizer = optimizer
    self._programs = {}   # jitted conversions by (direction, the parameters' avals + shardings)

  def abstract(self, abstract_state: TrainState) -> TrainState:
    """The checkpoint's form of `abstract_state` (ShapeDtypeStructs with shardings)."""
    params = abstract_state.params
    tree = lambda: jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=getattr(p, "sharding", None)),
        params)
    return abstract_state.replace(opt_state=optimizer_lib.FusedAdamWState(
        abstract_state.opt_state.count, tree(), tree()))

  def to_saved(self, state: TrainState) -> TrainState:
    convert = self._program("to_tree", state.params, state.opt_state)
    return state.replace(opt_state=convert(state.opt_state))

  def sources(self, abstract_state: TrainState) -> list[tuple[Any, Callable | None]]:
    """See `ckpt_lib.Checkpointer.sources`: this form's trees; the per-leaf chain's state (the
    same moment trees and count: `optimizer.chain_state_to_fused_tree`, then packed as this
    form's)."""
    tree = self.abstract(abstract_state)
    chain = abstract_state.replace(
        opt_state=optimizer_lib.fused_tree_to_chain_state(tree.opt_state))
    from_tree = lambda saved: self.from_saved(saved, abstract_state)
    from_chain = lambda saved: from_tree(saved.replace(
        opt_state=optimizer_lib.chain_state_to_fused_tree(_checked_counts(saved.opt_state))))
    return [(tree, from_tree), (chain, from_chain)]

  def from_saved(self, saved: TrainState, abstract_state: TrainState) -> TrainState:
    groups, _ = self.optimizer.layout(abstract_state.params)
    laid_out = {g.name: g.shape for g in groups}
    wanted = {k: tuple(b.shape) for k, b in abstract_state.opt_state.mu.items()}
    if laid_out != wanted:   # else the buffers would come out in another mesh's layout
      raise ValueError(f"the checkpoint form's optimizer lays its buffers out as {laid_out}, "
                       f"the restore target as {wanted}: make the Checkpointer's form with "
                       f"state.checkpoint_form of the optimizer placed on the target's mesh")
    convert = self._program("from_tree", abstract_state.params, abstract_state.opt_state)
    return saved.replace(opt_state=convert(saved.opt_state))

  def _program(self, direction: str, params, opt_state):
    """The jitted conversion for parameters of these shapes and shardings (compiled once a run,
    not at every save); outputs in the parameters' shardings (to_tree) or the buffers' own."""
    like = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    param_sh = jax.tree.map(lambda p: getattr(p, "sharding", None), params)
    key = (direction, jax.tree.structure(like), tuple(jax.tree.leaves(like)),
           tuple(jax.tree.leaves(param_sh)))
    if key not in self._programs:
      if direction == "to_tree":   # out: the moments as trees like (and placed as) the params
        fn = lambda s: optimizer_lib.fused_state_to_tree(self.optimizer, s, like)
        out_like = optimizer_lib.FusedAdamWState(opt_state.count, params, params)
      else:                        # out: the buffers as the restore target holds them
        fn = lambda s: optimizer_lib.fused_state_from_tree(self.optimizer, s, like)
        out_like = opt_state
      self._programs[key] = _jit_placed(fn, out_like)
    return self._programs[key]

"""The train state and its creation directly in its sharded layout."""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
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

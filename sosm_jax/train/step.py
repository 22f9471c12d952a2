"""The train step (gradient accumulation, non-finite guard) and the eval step, as pure functions."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from sosm_jax.parallel import batch_sharding, replicated_sharding
from sosm_jax.train import optimizer as optimizer_lib
from sosm_jax.train.state import TrainState

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch], tuple[jax.Array, dict]]


def split_micro_batches(batch: Batch, grad_accum: int) -> Batch:
  """`[batch, ...]` -> `[grad_accum, batch/grad_accum, ...]`, row r going to micro-batch r % accum.

  Interleaving keeps each micro-batch spread over the same devices as the full batch (a plain
  reshape would put whole micro-batches on a subset of the data-parallel devices).
  """
  def split(x):
    x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _loss_and_grads(loss_fn: LossFn, params, batch: Batch, grad_accum: int):
  """Token-weighted mean loss and its gradients, summed over micro-batches in a scan."""
  if grad_accum == 1:
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    return loss, metrics, grads

  micro = split_micro_batches(batch, grad_accum)
  total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

  def weighted(p, mb):
    loss, metrics = loss_fn(p, mb)
    weight = jnp.sum(mb["loss_mask"]) / total_tokens
    return loss * weight, (metrics, weight)

  def body(carry, mb):
    grads_acc, loss_acc, acc_acc = carry
    (loss, (metrics, weight)), grads = jax.value_and_grad(weighted, has_aux=True)(params, mb)
    grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
    return (grads_acc, loss_acc + loss, acc_acc + metrics["accuracy"] * weight), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (grads, loss, accuracy), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return loss, {"loss": loss, "accuracy": accuracy, "tokens": total_tokens}, grads


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum: int = 1, max_update_ratio: float = 0.0):
  """Returns `train_step(state, batch) -> (state, metrics)`.

  The update is kept only if the loss, the gradient norm and the update's norm are finite and,
  with `max_update_ratio > 0`, the update's norm is at most that fraction of the parameters' norm
  (an exploding learning rate gives finite but useless parameters). A step that fails this leaves
  parameters and optimizer state unchanged (the step counter still advances: its batch was consumed)
  and increments the non-finite streak; metrics['finite'] says which.
  """

  def train_step(state: TrainState, batch: Batch):
    loss, metrics, grads = _loss_and_grads(loss_fn, state.params, batch, grad_accum)

    def accept(grad_norm, update_norm, param_norm):
      # finite parameters plus a finite update give finite new parameters: no pass over them
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
      if max_update_ratio > 0:
        ok &= update_norm <= max_update_ratio * param_norm
      return ok

    if isinstance(optimizer, optimizer_lib.FusedAdamW):   # norms and selects on flat buffers
      params, opt_state, grad_norm, update_norm, param_norm, finite = optimizer.guarded_update(
          grads, state.opt_state, state.params, accept)
    else:
      grad_norm = optax.tree.norm(grads)
      updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
      new_params = optax.apply_updates(state.params, updates)
      update_norm = optax.tree.norm(updates)
      param_norm = optax.tree.norm(state.params)
      finite = accept(grad_norm, update_norm, param_norm)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state = keep(new_params, state.params), keep(new_opt_state, state.opt_state)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        nonfinite_streak=streak.astype(jnp.int32),
        nonfinite_total=(state.nonfinite_total + (~finite).astype(jnp.int32)),
    )
    out = {"loss": loss, "accuracy": metrics["accuracy"], "grad_norm": grad_norm,
           "learning_rate": schedule(state.step), "finite": finite,
           "update_ratio": update_norm / jnp.maximum(param_norm, 1e-30),
           "loss_tokens": metrics["tokens"]}
    return new_state, out

  return train_step


def make_eval_step(loss_fn: LossFn):
  """Returns `eval_step(params, batch) -> metrics` with summed loss and token counts."""

  def eval_step(params, batch: Batch):
    loss, metrics = loss_fn(params, batch)
    tokens = metrics["tokens"]
    return {"loss_sum": loss * tokens, "correct": metrics["accuracy"] * tokens, "tokens": tokens}

  return eval_step


def abstract_batch(stage, sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The `[global_batch, seq_len]` batch of a curriculum stage as ShapeDtypeStructs (the loader's
  keys), for compiling its step ahead of time."""
  shape = (stage.global_batch, stage.seq_len)
  dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32,
            "segment_ids": jnp.int32, "positions": jnp.int32}
  return {k: jax.ShapeDtypeStruct(shape, d, sharding=sharding) for k, d in dtypes.items()}


def jit_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                   schedule: optax.Schedule, grad_accum: int, max_update_ratio: float,
                   state_sh, mesh):
  """(the jitted `make_train_step` with the state donated and sharded as `state_sh`, the batch
  sharding it takes): the one step the trainer runs and `aot` compiles for a topology."""
  batch_sh = batch_sharding(mesh)
  train_step = make_train_step(loss_fn, optimizer, schedule, grad_accum, max_update_ratio)
  jitted = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, replicated_sharding(mesh)), donate_argnums=0)
  return jitted, batch_sh

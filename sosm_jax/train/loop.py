"""The training loop: curriculum stages, one compiled step each, checkpoints, metrics, resume."""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from tqdm.auto import tqdm

from sosm_jax import data as data_lib
from sosm_jax import models
from sosm_jax.parallel import (LOGICAL_AXIS_RULES, batch_sharding, data_parallel_size, make_mesh,
                               maybe_initialize_distributed, process_batch_shard)
from sosm_jax.train import aot
from sosm_jax.train import checkpoint as ckpt_lib
from sosm_jax.train import config as config_lib
from sosm_jax.train import curriculum as curriculum_lib
from sosm_jax.train import finetune as finetune_lib
from sosm_jax.train import memory_train
from sosm_jax.train import metrics as metrics_lib
from sosm_jax.train import optimizer as optimizer_lib
from sosm_jax.train import resume as resume_lib
from sosm_jax.train import startup_checks
from sosm_jax.train import state as state_lib
from sosm_jax.train import step as step_lib


StageDoesNotFit = startup_checks.StageDoesNotFit  # named here for launch/train.py and tests


class NonFiniteLoss(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class RunResult:
  step: int
  status: str                 # 'finished' | 'interrupted'
  last_metrics: dict[str, Any]
  workdir: str


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (then it checkpoints)."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _stage_model(config, stage, ft):
  """The stage's model, wrapped for fine-tuning when `ft` (finetune.Setup) is set."""
  model = models.build_model(aot.stage_model_config(config, stage))
  return model if ft is None else ft.wrap(model)


def _global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's rows (nested inputs such as memory too)."""
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)),
                      local_batch)


def compile_stage_step(model, optimizer, schedule, stage, abstract_state, state_sh, mesh,
                       memory_limit_bytes: int | None, memory=None, max_update_ratio: float = 0.0):
  """Compiles the stage's train step ahead of time and checks its memory analysis fits.

  memory: a `memory_train.MemoryTraining` (the batch then also holds the retrieved memory).
  max_update_ratio: see `step.make_train_step`.
  """
  jitted, batch_sh = step_lib.jit_train_step(model.loss, optimizer, schedule, stage.grad_accum,
                                             max_update_ratio, state_sh, mesh)
  start = time.time()
  abstract_batch = step_lib.abstract_batch(stage, batch_sh)
  if memory is not None:
    abstract_batch.update(memory.abstract_inputs(model, stage, batch_sh))
  compiled = jitted.lower(abstract_state, abstract_batch).compile()
  info = {"compile_seconds": time.time() - start,
          **startup_checks.check_memory(compiled, stage, mesh, memory_limit_bytes)}
  logging.info("%s compiled in %.1fs: %s", stage.name, info["compile_seconds"], info)
  return compiled, info


def _make_pipeline(config, tokenizer, mesh, seq_len: int, global_batch: int, split: str,
                   start_state=None):
  """This process's share of `[global_batch, seq_len]` batches (see process_batch_shard)."""
  shard, shards = process_batch_shard(mesh, global_batch)
  return data_lib.make_pipeline(config.data, tokenizer, seq_len=seq_len,
                                batch_size=global_batch // shards, seed=config.seed, split=split,
                                process_index=shard, process_count=shards, start_state=start_state)


def evaluate_stage(model, params, config, tokenizer, stage, mesh) -> dict[str, float]:
  """Validation loss at the stage's length, and the passkey check at that length."""
  out = {}
  eval_step = jax.jit(step_lib.make_eval_step(model.loss))
  batch_size = _eval_batch_size(config, stage, mesh)
  if config.train.eval_batches > 0:
    pipeline = _make_pipeline(config, tokenizer, mesh, stage.seq_len, batch_size, "validation")
    sums = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    for _, batch in zip(range(config.train.eval_batches), pipeline):
      result = jax.device_get(eval_step(params, _global_batch(batch, batch_sharding(mesh))))
      sums = {k: sums[k] + float(result[k]) for k in sums}
    pipeline.close()
    if sums["tokens"]:
      out["val_loss"] = sums["loss_sum"] / sums["tokens"]
      out["val_accuracy"] = sums["correct"] / sums["tokens"]
  if config.train.passkey_examples > 0:
    out["passkey_accuracy"] = passkey_accuracy(model, params, tokenizer, stage.seq_len,
                                               config.train.passkey_examples, config.seed)
  return out


def passkey_accuracy(model, params, tokenizer, seq_len: int, num_examples: int, seed: int) -> float:
  """Fraction of passkey prompts whose answer digits are all predicted (teacher-forced argmax)."""
  batch = data_lib.tasks.passkey_eval_batch(tokenizer, seq_len=seq_len, num_examples=num_examples,
                                            seed=seed)
  logits_fn = jax.jit(lambda p, b: model.module.apply(
      {"params": p}, b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"]))
  logits = logits_fn(params, {k: jnp.asarray(v) for k, v in batch.items()})
  correct = (jnp.argmax(logits, -1) == batch["targets"]) | (batch["loss_mask"] == 0)
  return float(jnp.mean(jnp.all(correct, axis=-1)))


def _log_line(step: int, rec: dict[str, Any]) -> str:
  keys = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu")
  return f"step {step}: " + ", ".join(f"{k}={rec[k]:.4g}" for k in keys if rec.get(k) is not None)


def setup_compile_cache(setting: str, workdir: str) -> str | None:
  """Turns on JAX's persistent compilation cache (`config.train.compile_cache`); returns its dir.

  A resume (or a second run of the same stages) then loads each stage's step instead of
  compiling it again. A cache directory already configured for this process (e.g. by
  JAX_COMPILATION_CACHE_DIR) is kept; 'off' leaves JAX's setting as it is.
  """
  if setting == "off":
    return None
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = {"workdir": os.path.join(workdir, "compile_cache"),
          "user": os.path.join(os.path.expanduser("~"), ".cache", "sosm_jax", "xla")}.get(setting,
                                                                                        setting)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def _eval_batch_size(config, stage, mesh) -> int:
  dp = data_parallel_size(mesh)
  size = max(dp, min(stage.global_batch, config.train.eval_batch_size))
  return size - size % dp


def _write_config(config, workdir: str) -> None:
  """config.json of the run as it is run (its real workdir), once the resume is decided; an
  earlier run's different config.json is kept as config.<n>.json, never overwritten."""
  record = ml_collections.ConfigDict(config.to_dict())
  record.workdir = workdir
  text = record.to_json_best_effort(indent=2)
  path = epath.Path(workdir) / "config.json"
  if path.exists() and path.read_text() != text:
    n = 1
    while (path.parent / f"config.{n}.json").exists():
      n += 1
    path.rename(path.parent / f"config.{n}.json")
  path.write_text(text)


def train(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Runs (or resumes) the curriculum in `config`, writing everything under `workdir`.

  Before anything is compiled: the config is validated and every stage's data is read once;
  then (config.train.preflight) the steps of the stages the run reaches are compiled and checked
  to fit the devices' memory before the workdir is touched (compile-cache entries aside); then
  the checkpoints in `workdir` are examined (`resume.decide`: a run of another model is
  refused, not overwritten). A checkpoint whose save has started is committed before any exit,
  errors included.
  """
  config_lib.validate_config(config)
  setup_compile_cache(config.train.compile_cache, workdir)   # before anything is compiled
  maybe_initialize_distributed(config.distributed)
  is_writer = jax.process_index() == 0
  mesh = make_mesh(config.mesh)
  stages = curriculum_lib.build_stages(
      config.curriculum, data_parallel=data_parallel_size(mesh),
      default_remat=config.model.remat, default_rope_base=config.model.rope_base)
  n_steps = curriculum_lib.total_steps(stages)
  tokenizer = data_lib.make_tokenizer(config.data)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                     f"vocabulary ({tokenizer.vocab_size}); set --config.model.vocab_size="
                     f"{tokenizer.vocab_size} or larger")
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, n_steps)
  base_model = models.build_model(config.model)
  init_params = lambda: base_model.init(jax.random.key(config.seed), 1, config.model.chunk_size)
  ft = finetune_lib.setup(config, base_model, init_params, optimizer)   # None: no fine-tuning
  if ft is not None:
    init_params, optimizer = ft.init_params, ft.optimizer
  startup_checks.check_stage_inputs(
      config, stages, 0,
      lambda n, b, split: _make_pipeline(config, tokenizer, mesh, n, b, split),
      lambda stage: _eval_batch_size(config, stage, mesh))
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  memory = (memory_train.MemoryTraining(config, checkpoint_dir)
            if config.memory.enabled else None)   # streams read segment by segment
  memory_limit = (int(config.train.memory_limit_gib * 2**30) if config.train.memory_limit_gib > 0
                  else metrics_lib.device_memory_limit_bytes())
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    optimizer = state_lib.place_optimizer(init_params, optimizer, mesh)   # fused: its layout
    state_sh = (ft or state_lib).state_shardings(init_params, optimizer, mesh)
    abstract_state = state_lib.abstract_train_state(state_sh, init_params, optimizer)
    # config.train.preflight: the steps of the stages this run reaches, compiled and checked
    # against the memory limit before the workdir is touched; the loop runs them
    def compile_stage(stage):   # curriculum.remat 'auto': the lightest policy that fits
      return startup_checks.compile_fitting_remat(stage, lambda s: compile_stage_step(
          _stage_model(config, s, ft), optimizer, schedule, s, abstract_state, state_sh, mesh,
          memory_limit, memory, config.train.max_update_ratio))

    ahead = startup_checks.preflight_stages(
        config.train.preflight, stages, startup_checks.newest_checkpoint_step(checkpoint_dir),
        config.train.stop_at_step, memory_limit, compile_stage,
        say=(lambda line: print(line, flush=True)) if is_writer else None)

  if is_writer:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a local folder or gs://BUCKET/PATH
  checkpoint_form = state_lib.checkpoint_form(optimizer)   # one per run: its compiled converts
  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, keep=config.train.keep_checkpoints,
                                        form=checkpoint_form)

  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES), _StopSignal() as stop:
    try:
      resumed = resume_lib.decide(checkpointer, abstract_state, workdir=workdir,
                                  model=config.model.to_dict(), tokenizer=tokenizer.identity(),
                                  restart=config.train.restart,
                                  verify=memory.verify if memory is not None else None)
    except BaseException:
      checkpointer.close()
      raise
    if resumed is not None and resumed.moved_to is not None:   # restart: a fresh directory
      checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, keep=config.train.keep_checkpoints,
                                        form=checkpoint_form)
      resumed = None
    redo_eval = None
    if resumed is not None:
      state, data_state = resumed.state, resumed.meta.get("data_state")
      redo_eval = resumed.meta.get("pending_eval")
      if memory is not None:
        memory.resume_step = resumed.step
      logging.info("resumed from checkpoint %d in %s", resumed.step, checkpointer.directory)
    else:
      state, data_state = state_lib.create_train_state(init_params, optimizer, state_sh), None
      if ft is not None:   # the init_from / teacher weights
        state = ft.load(state)
    if memory is not None:
      checkpointer.on_save.append(memory.save)
    if is_writer:
      _write_config(config, workdir)
      # records after the checkpoint resumed (all of them when no checkpoint was ever written)
      # are written again by this run: the old ones move to metrics.replayed.jsonl, so no step
      # is recorded twice in metrics.jsonl and none is lost
      dropped = metrics_lib.drop_replayed(workdir, 0 if resumed is None else resumed.step,
                                          redo_eval)
      if resumed is not None:
        print(f"Resuming from step {resumed.step} ({checkpointer.directory})" +
              (f"; {dropped} metric records after it will be written again" if dropped else ""),
              flush=True)
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_writer)
    try:
      result = _run_stages(config, workdir, stages, n_steps, state, data_state, redo_eval,
                           tokenizer, mesh, memory, checkpointer, writer, stop, is_writer, ft,
                           ahead, compile_stage)
    except BaseException:
      _commit_pending(checkpointer)
      writer.close()
      raise
    checkpointer.close()
  writer.close()
  if result.status == "interrupted" and is_writer:
    print(f"Stopped at step {result.step} ({'signal' if stop.received else 'train.stop_at_step'}); "
          f"checkpoint saved. Run the same command to resume.", flush=True)
  return result


def _commit_pending(checkpointer) -> None:
  """On an error: lets a checkpoint whose save started finish (reporting, not raising, its own
  failure, so that the original error is the one raised)."""
  try:
    checkpointer.close()
  except Exception as e:  # pylint: disable=broad-except
    logging.error("while stopping on an error: %s", e)
    print(f"While stopping: {e}", file=sys.stderr, flush=True)


def _run_stages(config, workdir, stages, n_steps, state, data_state, redo_eval, tokenizer,
                mesh, memory, checkpointer, writer, stop, is_writer, ft, ahead,
                compile_stage) -> RunResult:
  """The curriculum from `state`'s step to the end (or a stop); see `train`. ahead: {stage
  index: (compiled, info)} of the stages the preflight compiled; compile_stage(stage) compiles
  the others (with the memory check and curriculum.remat 'auto' resolved)."""
  step = int(jax.device_get(state.step))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  writer.write(step, {"num_params": num_params, "devices": jax.device_count(),
                      "resumed": step > 0}, kind="run")
  peak_flops = metrics_lib.peak_flops_per_device()

  def meta_for(data_state_now, stage):
    return {"data_state": data_state_now, "stage": stage.index,
            "pending_eval": stage.index if step == stage.end_step else None,
            "tokenizer": tokenizer.identity(), "config": config.to_dict()}

  def end_of_stage_eval(stage, model):
    evals = evaluate_stage(model, state.params, config, tokenizer, stage, mesh)
    writer.write(step, {"stage": stage.index, "seq_len": stage.seq_len, **evals}, kind="eval")
    if is_writer:
      bar.write(f"{stage.name} done at step {step}: " +
                ", ".join(f"{k}={v:.4g}" for k, v in evals.items()))
    return evals

  bar = tqdm(total=n_steps, initial=step, disable=not (is_writer and sys.stderr.isatty()),
             unit="step", dynamic_ncols=True)
  last: dict[str, Any] = {}
  status = "finished"
  if redo_eval is not None and redo_eval < len(stages) and step == stages[redo_eval].end_step:
    # the stage-end evaluation was interrupted (or failed): it is done now
    stage = stages[redo_eval]
    last.update(end_of_stage_eval(stage, _stage_model(config, stage, ft)))
  for stage in stages:
    if step >= stage.end_step:
      continue
    model = _stage_model(config, stage, ft)
    compiled, compile_info = (ahead or {}).pop(stage.index, None) or compile_stage(stage)
    writer.write(step, {"stage": stage.index, "seq_len": stage.seq_len,
                        "global_batch": stage.global_batch, **compile_info}, kind="stage")
    if is_writer:
      bar.write(f"{stage.name}: {stage.global_batch} sequences per step in {stage.grad_accum} "
                f"micro-batch(es), remat '{compile_info['remat']}'; compiled in "
                f"{compile_info['compile_seconds']:.1f}s" +
                (f", {compile_info['compiled_memory_gib']:.2f} GiB per device"
                 if "compiled_memory_gib" in compile_info else ""))
    bar.set_description(f"stage {stage.index} · {stage.seq_len} tokens")
    if memory is None:
      pipeline = _make_pipeline(config, tokenizer, mesh, stage.seq_len, stage.global_batch,
                                "train", start_state=data_state)
    else:
      pipeline = memory.stage_feeder(model, stage, lambda n, b, st: _make_pipeline(
          config, tokenizer, mesh, n, b, "train", start_state=st), data_state)
    flops_per_step = model.flops_per_token(stage.seq_len) * stage.tokens_per_step
    # Metrics are read one step late so the host never waits for the step it just dispatched;
    # before a checkpoint they are all written (a resume never writes a step's record twice).
    pending, streak = None, 0
    window_start, window_steps = time.perf_counter(), 0
    if stop.received is not None:   # a signal while compiling: stop before the first step
      checkpointer.save(step, state, meta_for(data_state, stage), wait=True)
      status = "interrupted"
    while step < stage.end_step and status != "interrupted":
      local = next(pipeline) if memory is None else pipeline.next_batch(state.params)
      batch = _global_batch(local, batch_sharding(mesh))
      data_state = pipeline.get_state()
      state, metrics = compiled(state, batch)
      if memory is not None:
        pipeline.after_dispatch()  # the host memory add overlaps the step
      checkpointer.check()         # a failed async save stops training now
      step += 1
      window_steps += 1
      if pending is not None:
        last, streak = _consume(pending, streak, step - 1, writer, bar, stage)
      pending = metrics
      if streak >= config.train.max_nonfinite_steps:
        kept = step - int(jax.device_get(state.nonfinite_streak))
        checkpointer.save(step, state, meta_for(data_state, stage), wait=True)
        raise NonFiniteLoss(
            f"{streak} consecutive updates were rejected (a non-finite loss, gradient or "
            f"parameters, or an update larger than train.max_update_ratio="
            f"{config.train.max_update_ratio} x the parameters' norm; last at step {step - 1}). "
            f"No rejected update was applied: checkpoint {step} in {checkpointer.directory} holds "
            f"the parameters after step {kept}. Lower optimizer.learning_rate or raise "
            f"optimizer.warmup_steps, then run again to resume from it.")
      saving = ((config.train.checkpoint_every and step % config.train.checkpoint_every == 0)
                or stop.received is not None or step == config.train.stop_at_step)
      if step % config.train.log_every == 0 or step == stage.end_step or saving:
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - window_start
        rate = {"step_time": elapsed / window_steps,
                "tokens_per_second": window_steps * stage.tokens_per_step / elapsed}
        if peak_flops:
          rate["mfu"] = flops_per_step * window_steps / elapsed / (peak_flops * jax.device_count())
        rate.update(metrics_lib.device_memory())
        last, streak = _consume(pending, streak, step, writer, bar, stage, rate=rate)
        pending = None
        window_start, window_steps = time.perf_counter(), 0
      if config.train.checkpoint_every and step % config.train.checkpoint_every == 0:
        checkpointer.save(step, state, meta_for(data_state, stage))
      if stop.received is not None or step == config.train.stop_at_step:
        checkpointer.save(step, state, meta_for(data_state, stage), wait=True)
        status = "interrupted"
    if pending is not None:
      last, streak = _consume(pending, streak, step, writer, bar, stage)
    writer.write(step, {"stage": stage.index, **pipeline.stats()}, kind="data")
    pipeline.close()
    if status == "interrupted":
      break
    checkpointer.save(step, state, meta_for(data_state, stage))
    last.update(end_of_stage_eval(stage, model))
  bar.close()
  return RunResult(step=step, status=status, last_metrics=last, workdir=workdir)


def _consume(metrics, streak: int, step: int, writer, bar, stage, rate=None):
  """Writes one step's metrics; returns them and the updated non-finite streak."""
  rec = {k: float(v) for k, v in jax.device_get(metrics).items()}
  streak = 0 if rec.pop("finite") else streak + 1
  rec.update(rate or {}, stage=stage.index)
  writer.write(step, rec)
  bar.update(step - bar.n)
  bar.set_postfix(loss=f"{rec['loss']:.3f}", refresh=False)
  if rate is not None and bar.disable and writer.enabled:  # no terminal: a plain log line
    print(_log_line(step, rec), flush=True)
  return rec, streak

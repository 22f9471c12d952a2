"""Unit tests of the trainer's pieces that need no model: stages, schedule, step, mesh, checkpoints."""
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sosm_jax.parallel import mesh as mesh_lib
from sosm_jax.parallel import rules as rules_lib
from sosm_jax.train import checkpoint as ckpt_lib
from sosm_jax.train import curriculum
from sosm_jax.train import optimizer as optimizer_lib
from sosm_jax.train import resume as resume_lib
from sosm_jax.train import step as step_lib
from sosm_jax.train.state import TrainState


def _cur(**kw):
  base = dict(seq_lens=(256, 512, 1024), steps=(10, 5, 3), steps_per_stage=0, tokens_per_step=4096,
              global_batch=(), grad_accum=(), remat=(), rope_base=())
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _stages(cur, dp=1):
  return curriculum.build_stages(cur, data_parallel=dp, default_remat="none",
                                 default_rope_base=1e4)


def test_stages_keep_tokens_per_step_constant_and_chain_steps():
  stages = _stages(_cur())
  assert [s.global_batch for s in stages] == [16, 8, 4]
  assert [s.tokens_per_step for s in stages] == [4096] * 3
  assert [(s.first_step, s.end_step) for s in stages] == [(0, 10), (10, 15), (15, 18)]
  assert curriculum.total_steps(stages) == 18
  assert curriculum.stage_at_step(stages, 9).index == 0
  assert curriculum.stage_at_step(stages, 10).index == 1
  assert curriculum.stage_at_step(stages, 18) is None


def test_stage_overrides_expand_per_stage():
  stages = _stages(_cur(grad_accum=(1, 2, 4), remat=("full",), rope_base=(1e4, 2e4, 4e4),
                        steps_per_stage=7, global_batch=(0, 0, 8)))
  assert [s.grad_accum for s in stages] == [1, 2, 4]
  assert [s.remat for s in stages] == ["full"] * 3
  assert [s.rope_base for s in stages] == [1e4, 2e4, 4e4]
  assert [s.steps for s in stages] == [7, 7, 7]
  assert stages[2].global_batch == 8


@pytest.mark.parametrize("cur, dp, message", [
    (_cur(tokens_per_step=1000), 1, "stage 0 (seq_len 256): tokens_per_step 1000 is not a multiple"),
    (_cur(), 8, "stage 2 (seq_len 1024): micro-batch 4"),
    (_cur(grad_accum=(1, 3, 1)), 1, "stage 1 (seq_len 512): global batch 8 does not split"),
    (_cur(steps=(1, 2)), 1, "curriculum.steps has 2 entries but there are 3 stages"),
    (_cur(steps=(1, 0, 1)), 1, "stage 1 (seq_len 512): steps must be positive"),
])
def test_stage_errors_name_the_stage(cur, dp, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    _stages(cur, dp)


def _opt_cfg(**kw):
  base = dict(learning_rate=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1,
              decay_fraction=0.2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
              decay_embeddings=False, clip_norm=1.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_learning_rate_is_continuous_across_stage_boundaries(schedule):
  stages = _stages(_cur(steps=(40, 30, 30)))
  lr = optimizer_lib.learning_rate_schedule(_opt_cfg(schedule=schedule), 100)
  values = np.array([float(lr(s)) for s in range(100)])
  assert values[10] == pytest.approx(1e-3, rel=1e-5)          # warmup reaches the peak
  steps_per_change = np.abs(np.diff(values[10:]))
  for stage in stages[1:]:  # no jump at a boundary larger than the largest jump elsewhere
    jump = abs(values[stage.first_step] - values[stage.first_step - 1])
    assert jump <= steps_per_change.max() + 1e-12
  if schedule != "constant":
    assert values[-1] < values[50]
    assert values[-1] >= 1e-4 * (1 - 1e-4)


def test_weight_decay_mask_spares_norms_biases_and_embeddings():
  params = {"embed": {"embedding": 1}, "layer": {"norm": {"scale": 1}, "dense": {"kernel": 1,
                                                                                  "bias": 1}}}
  mask = optimizer_lib.weight_decay_mask(params, decay_embeddings=False)
  assert mask == {"embed": {"embedding": False},
                  "layer": {"norm": {"scale": False}, "dense": {"kernel": True, "bias": False}}}
  assert optimizer_lib.weight_decay_mask(params, True)["embed"]["embedding"] is True


def _toy_loss(params, batch):
  pred = batch["inputs"].astype(jnp.float32) * params["w"]
  err = (pred - batch["targets"].astype(jnp.float32)) ** 2 * batch["loss_mask"]
  tokens = jnp.sum(batch["loss_mask"])
  loss = jnp.sum(err) / tokens
  return loss, {"loss": loss, "accuracy": jnp.float32(0.5), "tokens": tokens}


def _toy_state(optimizer):
  params = {"w": jnp.ones((3,), jnp.float32)}
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                    nonfinite_streak=zero, nonfinite_total=zero)


def _toy_batch(rng, n=8):
  x = rng.integers(1, 5, size=(n, 3)).astype(np.int32)
  mask = (rng.random((n, 3)) > 0.3).astype(np.float32)
  return {"inputs": jnp.asarray(x), "targets": jnp.asarray(2 * x), "loss_mask": jnp.asarray(mask)}


def test_grad_accumulation_equals_one_big_batch():
  optimizer = optax.sgd(0.01)
  batch = _toy_batch(np.random.default_rng(0))
  one = step_lib.make_train_step(_toy_loss, optimizer, lambda s: 0.01, grad_accum=1)
  four = step_lib.make_train_step(_toy_loss, optimizer, lambda s: 0.01, grad_accum=4)
  s1, m1 = jax.jit(one)(_toy_state(optimizer), batch)
  s4, m4 = jax.jit(four)(_toy_state(optimizer), batch)
  np.testing.assert_allclose(s1.params["w"], s4.params["w"], rtol=1e-6)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  assert not np.allclose(s1.params["w"], 1.0)


def test_micro_batches_interleave_rows():
  batch = {"x": jnp.arange(8)}
  np.testing.assert_array_equal(step_lib.split_micro_batches(batch, 2)["x"],
                                [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_non_finite_step_skips_update_and_counts():
  optimizer = optax.adam(0.1)
  step = jax.jit(step_lib.make_train_step(_toy_loss, optimizer, lambda s: 0.1))
  state = _toy_state(optimizer)
  good = _toy_batch(np.random.default_rng(1))
  bad = dict(good, targets=good["targets"], loss_mask=good["loss_mask"] * jnp.nan)
  state, m = step(state, good)
  assert bool(m["finite"]) and int(state.nonfinite_streak) == 0
  before = state
  for i in range(2):
    state, m = step(state, bad)
    assert not bool(m["finite"])
    assert int(state.nonfinite_streak) == i + 1
    np.testing.assert_array_equal(state.params["w"], before.params["w"])
  assert int(state.step) == 3 and int(state.nonfinite_total) == 2
  state, m = step(state, good)
  assert int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 2


def test_exploding_update_is_rejected_by_the_ratio_bound():
  optimizer = optax.adam(1e6)   # finite loss and gradients, parameters ~1e6 after the update
  batch = _toy_batch(np.random.default_rng(1))
  guarded = jax.jit(step_lib.make_train_step(_toy_loss, optimizer, lambda s: 1e6,
                                             max_update_ratio=1.0))
  state, m = guarded(_toy_state(optimizer), batch)
  assert np.isfinite(float(m["loss"])) and float(m["update_ratio"]) > 1e5
  assert not bool(m["finite"]) and int(state.nonfinite_streak) == 1
  np.testing.assert_array_equal(state.params["w"], np.ones(3))
  unguarded = jax.jit(step_lib.make_train_step(_toy_loss, optimizer, lambda s: 1e6))
  state, m = unguarded(_toy_state(optimizer), batch)
  assert bool(m["finite"]) and np.abs(np.asarray(state.params["w"])).max() > 1e5


def test_mesh_shape_resolution_and_errors():
  assert mesh_lib.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  assert mesh_lib.resolve_mesh_shape((2, 2, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="has 6 devices but 8 are present"):
    mesh_lib.resolve_mesh_shape((3, 2, 1), 8)
  with pytest.raises(ValueError, match="multiply to 3, which does not divide the 8 devices"):
    mesh_lib.resolve_mesh_shape((-1, 3, 1), 8)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    mesh_lib.resolve_mesh_shape((-1, -1, 1), 8)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=-1, tensor=2)))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
  assert mesh_lib.data_parallel_size(mesh) == 4


def test_logical_shardings_follow_rules_and_replicate_odd_dims():
  import flax.linen as nn
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)))
  tree = {"kernel": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 32), jnp.float32),
                                            ("embed", "mlp")),
          "odd": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 3), jnp.float32),
                                         ("embed", "mlp")),
          "plain": jax.ShapeDtypeStruct((5,), jnp.float32)}
  sh = rules_lib.logical_shardings(tree, mesh)
  assert tuple(sh["kernel"].spec) == ("fsdp", "tensor")
  assert tuple(sh["odd"].spec) == (None, None)
  assert all(axis is None for axis in sh["plain"].spec)


def _damage(step_dir):
  """Removes a checkpoint's array data (as a disk fault or a half-copied directory would)."""
  for root, _, files in os.walk(step_dir / "state"):
    for f in files:
      os.remove(os.path.join(root, f))


def test_unreadable_latest_is_moved_aside_and_its_step_saved_again(tmp_path, capsys):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=3, async_save=False)
  ckpt.save(1, {"w": jnp.arange(4.0)}, {"data_state": {"i": 1}})
  ckpt.save(2, {"w": jnp.arange(4.0) * 2}, {"data_state": {"i": 2}})
  target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
  decide = lambda: resume_lib.decide(ckpt, target, workdir=str(tmp_path), model={},
                                     tokenizer={}, restart=False)
  got = decide()
  assert got.step == 2 and got.meta["data_state"] == {"i": 2}
  np.testing.assert_array_equal(got.state["w"], np.arange(4.0) * 2)
  _damage(tmp_path / "2")
  got = decide()
  assert got.step == 1 and got.skipped == [2] and got.meta["data_state"] == {"i": 1}
  np.testing.assert_array_equal(got.state["w"], np.arange(4.0))
  out = capsys.readouterr().out
  assert out.count("Checkpoint 2 is unreadable") == 1 and len(out.splitlines()) == 1
  assert os.path.isdir(tmp_path / "corrupt" / "2") and ckpt.all_steps() == [1]
  assert ckpt.save(2, {"w": jnp.arange(4.0) * 3}, {"data_state": {"i": 3}})   # not skipped
  assert decide().meta["data_state"] == {"i": 3}
  ckpt.close()


def test_no_readable_checkpoint_refuses_unless_restart(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3, async_save=False)
  ckpt.save(1, {"w": jnp.arange(4.0)}, {})
  _damage(tmp_path / "checkpoints" / "1")
  target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
  with pytest.raises(resume_lib.ResumeRefused,
                     match=r"(?s)no checkpoint .* can be read.*checkpoint 1:.*--workdir.*restart=true"):
    resume_lib.decide(ckpt, target, workdir=str(tmp_path), model={}, tokenizer={}, restart=False)
  assert ckpt.all_steps() == [1]          # a refused run moves nothing
  got = resume_lib.decide(ckpt, target, workdir=str(tmp_path), model={}, tokenizer={},
                          restart=True)
  assert got.moved_to and os.path.isdir(os.path.join(got.moved_to, "checkpoints", "1"))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_other_model_or_tokenizer_is_refused_naming_the_keys(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=3, async_save=False)
  tok = {"kind": "byte", "vocab_size": 260}
  model = {"d_model": 32, "remat": "none", "graph": {"window": 8, "query_chunk": 64}}
  ckpt.save(1, {"w": jnp.zeros((4, 32))}, {"config": {"model": model}, "tokenizer": tok})
  target = {"w": jax.ShapeDtypeStruct((4, 32), jnp.float32)}
  decide = lambda **kw: resume_lib.decide(
      ckpt, kw.get("target", target), workdir=str(tmp_path), restart=False,
      model=kw.get("model", model), tokenizer=kw.get("tok", tok))
  # execution-only keys may change
  assert decide(model={**model, "remat": "full", "graph": {"window": 8, "query_chunk": 32}}).step == 1
  assert decide(model={**model, "added_since": 1}).step == 1   # a key newer than the checkpoint
  with pytest.raises(resume_lib.ResumeRefused, match=r"model.d_model: saved 32, now 48"):
    decide(model={**model, "d_model": 48})
  with pytest.raises(resume_lib.ResumeRefused, match=r"model.graph.window: saved 8, now 16"):
    decide(model={**model, "graph": {"window": 16, "query_chunk": 64}})
  with pytest.raises(resume_lib.ResumeRefused, match=r"tokenizer vocab_size: saved 260, now 512"):
    decide(tok={**tok, "vocab_size": 512})
  with pytest.raises(resume_lib.ResumeRefused, match=r"w: saved \(4, 32\) float32, now \(4, 48\)"):
    decide(target={"w": jax.ShapeDtypeStruct((4, 48), jnp.float32)})
  assert ckpt.all_steps() == [1]
  ckpt.close()


def test_failed_save_raises_at_once_naming_the_directory(tmp_path, monkeypatch):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=3, async_save=False)
  ckpt.save(1, {"w": jnp.arange(4.0)}, {})

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ckpt._manager, "save", full_disk)  # pylint: disable=protected-access
  with pytest.raises(ckpt_lib.SaveFailed, match=r"checkpoint 2 could not be written.*No space "
                     r"left.*newest complete checkpoint is step 1"):
    ckpt.save(2, {"w": jnp.arange(4.0)}, {})
  ckpt.close()


def test_failed_async_save_surfaces_on_the_next_check(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  real = ocp.StandardCheckpointHandler.async_save

  class FullDisk:   # a commit future whose write fails in orbax's background thread
    def result(self, timeout=None):
      del timeout
      raise OSError(28, "No space left on device")

  async def failing(self, *args, **kwargs):
    return list(await real(self, *args, **kwargs) or []) + [FullDisk()]

  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  ckpt.save(1, {"w": jnp.arange(4.0)}, {}, wait=True)
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing)
  ckpt.save(2, {"w": jnp.arange(4.0)}, {})
  with pytest.raises(ckpt_lib.SaveFailed, match=r"checkpoint 2 could not be written.*No space "
                     r"left.*newest complete checkpoint is step 1"):
    for _ in range(200):   # the loop calls check() after every step
      ckpt.check()
      time.sleep(0.01)
  ckpt.close()


@pytest.mark.parametrize("kind, peak", [("TPU v5", 459e12), ("TPU v5 lite", 197e12),
                                        ("TPU v6 lite", 918e12), ("NVIDIA H200", 989e12),
                                        ("cpu", None)])
def test_peak_flops_by_device_kind_as_the_runtimes_name_them(kind, peak):
  from sosm_jax.train import metrics  # pylint: disable=import-outside-toplevel

  class Device:
    device_kind = kind

  assert metrics.peak_flops_per_device(Device()) == peak


def test_resume_moves_replayed_metric_records_aside_and_loses_none(tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  from sosm_jax.train import metrics  # pylint: disable=import-outside-toplevel
  records = [{"step": 1, "loss": 3.0}, {"step": 2, "kind": "stage"}, {"step": 2, "loss": 2.5},
             {"step": 3, "loss": 2.0}]
  lines = [json.dumps(r) + "\n" for r in records]
  (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 4, "lo')  # cut by a kill
  assert metrics.drop_replayed(str(tmp_path), step=2) == 3
  assert (tmp_path / "metrics.jsonl").read_text() == lines[0] + lines[2]
  archived = (tmp_path / "metrics.replayed.jsonl").read_text().splitlines()
  assert archived == [lines[1].strip(), lines[3].strip(), '{"step": 4, "lo']


def test_a_resumed_run_keeps_the_earlier_config_json(tmp_path):
  from sosm_jax.train import loop  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({"optimizer": {"learning_rate": 1e-3}})
  loop._write_config(config, str(tmp_path))  # pylint: disable=protected-access
  first = (tmp_path / "config.json").read_text()
  loop._write_config(config, str(tmp_path))  # pylint: disable=protected-access
  assert not (tmp_path / "config.1.json").exists()   # the same config: nothing to keep
  config.optimizer.learning_rate = 3e-4
  loop._write_config(config, str(tmp_path))  # pylint: disable=protected-access
  assert (tmp_path / "config.1.json").read_text() == first
  assert "0.0003" in (tmp_path / "config.json").read_text()

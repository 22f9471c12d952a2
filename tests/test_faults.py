"""Faults a user meets, each reproduced and held: nothing is lost, refused runs touch nothing.

Changed model / unreadable checkpoints, an error right after a save, bad inputs caught before
the first compile, exploding updates, damaged host memory, and kill -9 at random points of a
plain and a memory run (resumed runs end bit-identical to uninterrupted ones).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import faiss
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from ml_collections import config_flags

import helpers
from sosm_jax.memory.store import HostMemory
from sosm_jax.train import checkpoint as ckpt_lib
from sosm_jax.train import config as config_lib
from sosm_jax.train import loop
from sosm_jax.train import resume as resume_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "curriculum.py")

# trainer behaviour, not XLA's optimisations, is tested here: compile ~3x faster
pytestmark = pytest.mark.usefixtures("fast_compiles")

# One small run for every test here, in-process and in subprocesses, so that each stage's step
# is compiled once and then loaded from the test session's persistent compilation cache.
_SMALL = {**helpers.TINY_RUN, "train.checkpoint_every": 2, "train.log_every": 1,
          "train.eval_batches": 1, "train.passkey_examples": 0}


def _config(variant="tiny", **updates):
  argv = ["train.py", f"--config={CONFIG}:{variant}"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False,
                                  sys_argv=argv)
  fv(argv)
  return helpers.update_config(fv.config, updates)


def _records(workdir, kind="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def _final(workdir):
  """(step, params as numpy) of the newest checkpoint."""
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return step, jax.tree.map(np.asarray, state["state"]["params"])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  """The _SMALL run trained straight, once for the module: tests read it, or copy it to change it.
  Trained in this process, it also fills the compile cache for the subprocesses of the kill -9
  test."""
  workdir = str(tmp_path_factory.mktemp("small") / "run")
  result = loop.train(_config(**_SMALL), workdir)
  assert result.status == "finished" and result.step == 10
  return workdir


def _copy_run(workdir, to):
  shutil.copytree(workdir, to)
  return str(to)


def _assert_identical(a, b):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert np.array_equal(x, y), jax.tree_util.keystr(path)


# ---------------------------------------------------------------- resume is a decision

def test_changed_model_is_refused_and_restart_moves_the_run_aside(small_run, tmp_path):
  with open(os.path.join(small_run, "config.json")) as f:
    assert json.load(f)["workdir"] == small_run                   # the real workdir
  workdir = _copy_run(small_run, tmp_path / "run")
  config_json = (tmp_path / "run" / "config.json").read_text()
  checkpoints = tmp_path / "run" / "checkpoints"
  before = sorted(os.listdir(checkpoints))
  with pytest.raises(resume_lib.ResumeRefused,
                     match=r"(?s)model.d_model: saved 32, now 48.*--workdir.*restart=true"):
    loop.train(_config(**_SMALL, **{"model.d_model": 48}), workdir)
  assert (tmp_path / "run" / "config.json").read_text() == config_json   # untouched
  assert sorted(os.listdir(checkpoints)) == before
  for step in ("6", "8", "10"):      # every checkpoint damaged: refused too, nothing moved
    for root, _, files in os.walk(checkpoints / step / "state"):
      for f in files:
        os.remove(os.path.join(root, f))
  with pytest.raises(resume_lib.ResumeRefused, match=r"(?s)no checkpoint .* can be read"):
    loop.train(_config(**_SMALL), workdir)
  assert sorted(os.listdir(checkpoints)) == before
  # the fresh run only has to start: 2 steps show it began at step 0 with a new metrics file
  restarted = loop.train(_config(**_SMALL, **{"train.restart": True, "train.stop_at_step": 2}),
                         workdir)
  assert restarted.status == "interrupted" and restarted.step == 2
  (previous,) = os.listdir(tmp_path / "run" / "previous")
  moved = tmp_path / "run" / "previous" / previous
  assert {"6", "8", "10"} <= set(os.listdir(moved / "checkpoints"))   # nothing deleted
  assert json.loads((moved / "config.json").read_text()) == json.loads(config_json)
  assert [r["step"] for r in _records(workdir)] == [1, 2]   # a fresh metrics file


def test_error_right_after_the_stage_end_save_keeps_it_and_the_eval_is_redone(tmp_path,
                                                                               monkeypatch):
  workdir = str(tmp_path / "run")
  real = loop.evaluate_stage

  def crash(*args, **kwargs):
    raise RuntimeError("evaluation crashed")

  monkeypatch.setattr(loop, "evaluate_stage", crash)
  with pytest.raises(RuntimeError, match="evaluation crashed"):
    loop.train(_config(**_SMALL), workdir)
  names = os.listdir(tmp_path / "run" / "checkpoints")
  assert "6" in names and not [n for n in names if "tmp" in n]   # committed, not half-written
  assert _records(workdir, "eval") == []
  monkeypatch.setattr(loop, "evaluate_stage", real)
  result = loop.train(_config(**_SMALL), workdir)   # redoes the evaluation, then stage 1
  assert result.status == "finished" and result.step == 10 and "val_loss" in result.last_metrics
  assert [(r["step"], r["stage"]) for r in _records(workdir, "eval")] == [(6, 0), (10, 1)]
  assert [r["step"] for r in _records(workdir)] == list(range(1, 11))   # nothing written twice


def test_failed_save_stops_training_at_once(tmp_path, monkeypatch):
  real = ocp.StandardCheckpointHandler.async_save

  class FullDisk:   # the write fails in orbax's background thread, as on a full disk
    def result(self, timeout=None):
      del timeout
      raise OSError(28, "No space left on device")

  async def failing(self, *args, **kwargs):
    return list(await real(self, *args, **kwargs) or []) + [FullDisk()]

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing)
  start = time.time()
  with pytest.raises(ckpt_lib.SaveFailed, match=r"checkpoint 2 could not be written .*No space"):
    loop.train(_config(**_SMALL), str(tmp_path / "run"))
  assert time.time() - start < 120                                # no hang
  assert max(r["step"] for r in _records(str(tmp_path / "run"))) < 6   # stopped within stage 0


# ---------------------------------------------------------------- checked before compiling

def _one_document(tmp_path):
  path = tmp_path / "one.txt"
  path.write_text("a single document\n" * 50)
  return f"text:{path}"


@pytest.mark.parametrize("updates, message", [
    ({"data.eval_source": "text:/nonexistent/val"}, r"config.data.eval_source: .*does not exist"),
    ({"data.source": "ONE_DOC"}, r"config.data.source: .*single document"),
    ({"data.source": "synthetic:mqar", "data.task_length": 64}, r"config.data.task_length=64"),
    ({"data.source": "synthetic:mqar", "data.mqar_num_pairs": 64},
     r"config.data.source: .*mqar.*stage 0"),
    ({"data.tokenizer": "sentencepiece:/nonexistent.model"}, r"does not exist"),
    ({"seed": -1}, r"config.seed: -1"),
    ({"train.eval_batch_size": 0}, r"config.train.eval_batch_size"),
    ({"curriculum.global_batch": (-4,)}, r"config.curriculum.global_batch: entry -4"),
    ({"curriculum.steps": ("ten",)}, r"config.curriculum.steps: entry 'ten'"),
])
def test_bad_inputs_fail_before_the_first_compile(tmp_path, monkeypatch, updates, message):
  def no_compile(*args, **kwargs):
    raise AssertionError("compiled before the inputs were checked")

  monkeypatch.setattr(loop, "compile_stage_step", no_compile)
  updates = {k: _one_document(tmp_path) if v == "ONE_DOC" else v for k, v in updates.items()}
  start = time.time()
  with pytest.raises(ValueError, match=message):
    loop.train(_config(**{**_SMALL, **updates}), str(tmp_path / "run"))
  assert time.time() - start < 30
  assert not os.path.exists(tmp_path / "run")                    # nothing written


def test_unknown_or_repeated_override_is_named():
  cfg = _config()
  with pytest.raises(ValueError, match=r"config.optimizer has no key 'lr'.*learning_rate"):
    config_lib.check_override_flags(["x", "--config.optimizer.lr=0.1"], cfg)
  with pytest.raises(ValueError, match=r"did you mean --config.train\?"):
    config_lib.check_override_flags(["x", "--config.traim.seed=1"], cfg)
  with pytest.raises(ValueError, match=r"--config.curriculum.seq_lens is given twice"):
    config_lib.check_override_flags(["x", "--config.curriculum.seq_lens=(32,)",
                                     "--config.curriculum.seq_lens=(64,)"], cfg)
  config_lib.check_override_flags(["x", "--config=c.py:tiny", "--noconfig.train.restart",
                                   "--config.model.graph.window=8", "--workdir=w"], cfg)


def test_compile_cache_setting(tmp_path):
  before = jax.config.jax_compilation_cache_dir   # this test session's cache (conftest)
  assert before and loop.setup_compile_cache("workdir", str(tmp_path)) == before   # kept
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert loop.setup_compile_cache("off", str(tmp_path)) is None
    assert jax.config.jax_compilation_cache_dir is None
    assert loop.setup_compile_cache("workdir", str(tmp_path)) == str(tmp_path / "compile_cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "compile_cache")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


# ---------------------------------------------------------------- the non-finite guard

def test_exploding_updates_are_never_applied_or_saved(tmp_path):
  workdir = str(tmp_path / "run")
  boom = {**_SMALL, "optimizer.learning_rate": 1e6, "train.max_nonfinite_steps": 3}
  # warmup: step 1 has learning rate 0 (kept); from step 2 every update explodes (rejected)
  with pytest.raises(loop.NonFiniteLoss, match=r"No rejected update was applied: checkpoint "
                     r"5 .* holds the parameters after step 1\b"):
    loop.train(_config(**boom), workdir)
  step, params = _final(workdir)
  leaves = jax.tree.leaves(params)
  assert step == 5 and all(np.all(np.isfinite(p)) for p in leaves)
  assert max(float(np.abs(p).max()) for p in leaves) < 10       # not 1e5-sized
  # a sane learning rate resumes from it (a step is enough: stage 1 is not compiled)
  result = loop.train(_config(**_SMALL, **{"train.stop_at_step": 6}), workdir)
  assert result.status == "interrupted" and result.step == 6
  assert np.isfinite(result.last_metrics["loss"])
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(_final(workdir)[1]))


# ---------------------------------------------------------------- host memory

def _vectors(n, seed):
  return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def test_hnsw_memory_resumes_exactly(tmp_path):
  cfg = dict(index="hnsw", capacity=400, num_shards=2, hnsw_m=8, hnsw_ef_construction=40,
             hnsw_ef_search=16, top_k=5)
  batches = [_vectors(70, s) for s in range(5)]
  straight = HostMemory(16, cfg)
  for b in batches:
    straight.add(b, b, b)
  resumed = HostMemory(16, cfg)
  for b in batches[:2]:
    resumed.add(b, b, b)
  resumed.save(str(tmp_path / "m"))
  resumed = HostMemory.load(str(tmp_path / "m"))
  for b in batches[2:]:
    resumed.add(b, b, b)
  for a, b in zip(straight.shards, resumed.shards):
    assert np.array_equal(faiss.serialize_index(a.index), faiss.serialize_index(b.index))
  queries = _vectors(30, 99)
  for x, y in zip(straight.search(queries), resumed.search(queries)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", ["memory.json", "shard_0.npz", "shard_0.faiss"])
def test_damaged_memory_file_is_named(tmp_path, name):
  mem = HostMemory(16, dict(index="hnsw", capacity=64, num_shards=1))
  mem.add(_vectors(10, 0), _vectors(10, 0), _vectors(10, 0))
  mem.save(str(tmp_path))
  (tmp_path / name).write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match=rf"{tmp_path / name}: unreadable host memory"):
    HostMemory.load(str(tmp_path))


def _memory_updates(**extra):
  """helpers.MEMORY_RUN: a smaller memory run than the 'memory' variant."""
  return {**helpers.MEMORY_RUN, "train.log_every": 1, "train.checkpoint_every": 3,
          "train.eval_batches": 0, "train.passkey_examples": 0, **extra}


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory):
  """The memory run of _memory_updates() trained straight (10 steps; checkpoints 6, 9 and 10
  kept), once for the module; as small_run, it fills the compile cache for the subprocesses."""
  workdir = str(tmp_path_factory.mktemp("memory") / "run")
  result = loop.train(_config("memory", **_memory_updates()), workdir)
  assert result.status == "finished" and result.step == 10
  return workdir


def test_damaged_memory_falls_back_to_an_older_checkpoint(memory_run, tmp_path, capsys):
  workdir = _copy_run(memory_run, tmp_path / "run")
  # checkpoint 9 ends window 1 of row 3 (4 windows per row): step 10, window 2, reads the memory
  # saved with it
  stream = tmp_path / "run" / "checkpoints" / "memory" / "10" / "layer_1" / "stream_0"
  (stream / "shard_0.npz").write_bytes(b"damaged")
  result = loop.train(_config("memory", **_memory_updates()), workdir)
  assert result.status == "finished" and result.step == 10
  out = capsys.readouterr().out
  assert f"Checkpoint 10 is unreadable (CorruptCheckpoint: {stream / 'shard_0.npz'}" in out
  assert "Resuming from step 9" in out
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "corrupt" / "10")
  # step 10 trained again from checkpoint 9 and its memory: the straight run's parameters
  straight, again = _final(memory_run), _final(workdir)
  assert straight[0] == again[0] == 10
  _assert_identical(straight[1], again[1])


# ---------------------------------------------------------------- kill -9 at random points


def _command(variant, workdir, overrides):
  return [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={CONFIG}:{variant}",
          f"--workdir={workdir}", *overrides]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")


def _count(workdir):
  try:
    return len(_records(workdir))
  except (OSError, ValueError):
    return 0


def _kill_and_resume(variant, workdir, overrides, total_steps, rng, kills):
  """Runs the command, SIGKILLs it after a random number of steps `kills` times, then to the end."""
  for _ in range(kills):
    written = _count(workdir)
    if written >= total_steps - 1:
      break
    target = int(rng.integers(written + 1, total_steps))
    proc = subprocess.Popen(_command(variant, workdir, overrides), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while proc.poll() is None and _count(workdir) < target and time.time() < deadline:
      time.sleep(0.02)
    time.sleep(float(rng.uniform(0, 0.3)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  done = subprocess.run(_command(variant, workdir, overrides), env=_env(), capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0 and "finished at step" in done.stdout, done.stdout + done.stderr


def _kill9_case(tmp_path, straight, variant, updates, stages, seed, kills):
  """The run `straight` (trained in this process: the same compiled programs as the
  subprocesses') and the run killed `kills` times at random steps and resumed: final parameters
  bit-identical, every step's and every stage's evaluation record written once."""
  reference = _final(straight)
  total = reference[0]
  overrides = [f"--config.{k}={v}" for k, v in updates.items()]
  workdir = str(tmp_path / "killed")
  _kill_and_resume(variant, workdir, overrides, total, np.random.default_rng(seed), kills)
  step, params = _final(workdir)
  assert step == total
  _assert_identical(reference[1], params)
  assert [r["step"] for r in _records(workdir)] == list(range(1, total + 1))
  assert sorted(r["stage"] for r in _records(workdir, "eval")) == list(range(stages))


def test_kill9_plain_run_resumes_bit_identical(small_run, tmp_path):
  _kill9_case(tmp_path, small_run, "tiny", _SMALL, 2, seed=0, kills=2)


def test_kill9_memory_run_resumes_bit_identical(memory_run, tmp_path):
  _kill9_case(tmp_path, memory_run, "memory", _memory_updates(), 1, seed=1, kills=1)

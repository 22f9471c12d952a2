"""Two CPU processes on localhost train together through jax.distributed, as a slice's hosts do.

Each process (2 simulated devices, mesh data=2 x fsdp=2 over all 4) runs `launch/train.py` for 5
steps. The test checks that they end with identical parameters, read different data, that only
process 0 logs, that their collective checkpoint restores on one device, and that one device
fed the same global batches computes the same losses and parameters.

Run as a script, this file is one such process: it records what its data pipeline gave and the
parameters it holds when the final checkpoint is saved, then runs launch/train.py unchanged.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SEQ_LEN, GLOBAL_BATCH = 5, 32, 8


def _local_copy(array) -> np.ndarray:
  """The whole array from this process's own shards (fails if it holds only a part)."""
  out = np.zeros(array.shape, array.dtype)
  covered = np.zeros(array.shape, bool)
  for shard in array.addressable_shards:
    out[shard.index] = np.asarray(shard.data)
    covered[shard.index] = True
  assert covered.all(), "this process does not hold the whole parameter"
  return out


def _worker(out_dir: str, train_argv: list[str]) -> None:
  """Instruments the data pipeline and the final checkpoint, then runs launch/train.py."""
  import runpy  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from sosm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from sosm_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  from sosm_jax.train import startup_checks  # pylint: disable=g-import-not-at-top

  # Only the trainer's batches: pipelines made by the start-up input check (one batch each,
  # before the first compile) are not recorded.
  record = {"batches": [], "checking": False}
  make_pipeline, save = data_lib.make_pipeline, ckpt_lib.Checkpointer.save
  check_stage_inputs = startup_checks.check_stage_inputs

  def checking(*args, **kwargs):
    record["checking"] = True
    try:
      return check_stage_inputs(*args, **kwargs)
    finally:
      record["checking"] = False

  class Recorded:
    def __init__(self, pipeline):
      self._pipeline = pipeline

    def __iter__(self):
      return self

    def __next__(self):
      batch = next(self._pipeline)
      record["batches"].append({k: np.asarray(v) for k, v in batch.items()})
      return batch

    def __getattr__(self, name):
      return getattr(self._pipeline, name)

  def recording_pipeline(*args, **kwargs):
    record.update(process_index=kwargs["process_index"], process_count=kwargs["process_count"],
                  batch_size=kwargs["batch_size"])
    pipeline = make_pipeline(*args, **kwargs)
    return pipeline if record["checking"] else Recorded(pipeline)

  def saving(self, step, state, meta, **kwargs):
    result = save(self, step, state, meta, **kwargs)
    flat = traverse_util.flatten_dict(state.params, sep="/")
    arrays = {f"param/{k}": _local_copy(v) for k, v in flat.items()}
    for i, batch in enumerate(record["batches"]):
      arrays.update({f"batch{i}/{k}": v for k, v in batch.items()})
    np.savez(os.path.join(out_dir, f"process{jax.process_index()}.npz"), **arrays)
    with open(os.path.join(out_dir, f"process{jax.process_index()}.json"), "w") as f:
      json.dump({"step": int(step), "process_count": jax.process_count(),
                 "devices": jax.device_count(), "local_devices": jax.local_device_count(),
                 **{k: record[k] for k in ("process_index", "process_count", "batch_size")}}, f)
    return result

  data_lib.make_pipeline = recording_pipeline
  startup_checks.check_stage_inputs = checking
  ckpt_lib.Checkpointer.save = saving
  sys.argv = [os.path.join(ROOT, "launch", "train.py"), *train_argv]
  runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  _worker(sys.argv[1], sys.argv[2:])
  sys.exit(0)

# ---------------------------------------------------------------------------------------- tests
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import test_sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from sosm_jax.train import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_flags(workdir: str, port: int, process_id: int) -> list[str]:
  """The same command for both processes but for the process id; the model and optimizer are
  test_sharding's, so its compiled one-device step serves as the reference."""
  return [
      f"--config={ROOT}/configs/curriculum.py:tiny", f"--workdir={workdir}",
      f"--config.distributed.coordinator_address=127.0.0.1:{port}",
      "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}",
      "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1",
      "--config.model.pattern=('hgrn2','attn')", "--config.model.num_layers=2",
      f"--config.curriculum.seq_lens=({SEQ_LEN},)", f"--config.curriculum.steps=({STEPS},)",
      f"--config.curriculum.tokens_per_step={SEQ_LEN * GLOBAL_BATCH}",
      "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0",
      "--config.optimizer.learning_rate=0.01", "--config.optimizer.eps=0.0001",
      "--config.train.log_every=1", "--config.train.checkpoint_every=0",
      "--config.train.eval_batches=0", "--config.train.passkey_examples=0",
  ]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """Starts both processes, waits for them, and returns (workdir, outputs, per-process files)."""
  base = tmp_path_factory.mktemp("multihost")
  workdir, out_dir = str(base / "run"), str(base / "out")
  os.makedirs(out_dir)
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=2 "   # else as tests/conftest.py's
                       "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # compile fast: nothing here is timed
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), out_dir,
                             *_train_flags(workdir, port, i)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=420)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-4000:]
  files = []
  for i in range(2):
    with open(os.path.join(out_dir, f"process{i}.json")) as f:
      info = json.load(f)
    files.append((info, dict(np.load(os.path.join(out_dir, f"process{i}.npz")))))
  return workdir, outputs, files


def _params(arrays):
  return {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}


def _batches(arrays):
  steps = sorted({int(k.split("/")[0][5:]) for k in arrays if k.startswith("batch")})
  return [{k.split("/")[1]: v for k, v in arrays.items() if k.startswith(f"batch{s}/")}
          for s in steps]


def test_processes_end_with_identical_parameters_from_their_own_data(two_process_run):
  _, _, files = two_process_run
  (info0, arrays0), (info1, arrays1) = files
  for i, info in enumerate((info0, info1)):
    assert info["step"] == STEPS and info["process_count"] == 2
    assert info["devices"] == 4 and info["local_devices"] == 2
    assert (info["process_index"], info["process_count"]) == (i, 2)
    assert info["batch_size"] == GLOBAL_BATCH // 2
  params0, params1 = _params(arrays0), _params(arrays1)
  assert params0.keys() == params1.keys() and params0
  for name in params0:
    np.testing.assert_array_equal(params0[name], params1[name], err_msg=name)
  batches0, batches1 = _batches(arrays0), _batches(arrays1)
  assert len(batches0) == len(batches1) == STEPS
  assert batches0[0]["inputs"].shape == (GLOBAL_BATCH // 2, SEQ_LEN)
  for b0, b1 in zip(batches0, batches1):  # each process read its own shard of the data
    assert not np.array_equal(b0["inputs"], b1["inputs"])


def test_only_process_zero_logs_and_writes_metrics(two_process_run):
  workdir, outputs, _ = two_process_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    train = [r for r in map(json.loads, f) if r["kind"] == "train"]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  assert f"step {STEPS}: loss=" in outputs[0]
  assert "step 1: loss=" not in outputs[1] and f"step {STEPS}: loss=" not in outputs[1]


def test_one_device_on_the_same_global_batches_matches(two_process_run):
  """The reference: test_sharding's one-device trainer fed process 0's rows then process 1's."""
  workdir, _, files = two_process_run
  cfg = test_sharding.tiny_config()
  with test_sharding.quick_compile_context():
    trainer = test_sharding.trainer_for(cfg, (1, 1, 1), devices=jax.devices()[:1])
    initial = jax.device_get(trainer.init())
    global_batches = [{k: np.concatenate([b0[k], b1[k]]) for k in b0}
                      for b0, b1 in zip(_batches(files[0][1]), _batches(files[1][1]))]
    state, losses = test_sharding.run_steps(trainer, initial, global_batches)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]
  np.testing.assert_allclose(logged, losses, rtol=1e-5)
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  mine = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
  theirs = _params(files[0][1])
  assert mine.keys() == theirs.keys()
  for name in mine:
    np.testing.assert_allclose(theirs[name], mine[name], rtol=1e-4, atol=1e-5, err_msg=name)

  # The checkpoint both processes wrote restores on one device to what they held.
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  restored, meta, step = ckpt.restore_latest(trainer.abstract)
  ckpt.close()
  assert step == STEPS and meta["stage"] == 0
  for name, value in traverse_util.flatten_dict(jax.device_get(restored.params), sep="/").items():
    np.testing.assert_array_equal(value, theirs[name], err_msg=name)

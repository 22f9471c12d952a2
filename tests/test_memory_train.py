"""Training with memory (sosm_jax/train/memory_train.py): config errors, streams, checkpoint and resume."""
import os

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import helpers
from sosm_jax.train import config as config_lib
from sosm_jax.train import loop
from sosm_jax.train import memory_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "curriculum.py")


# trainer behaviour, not XLA's optimisations, is tested here: compile ~3x faster
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _memory_config(**overrides):
  argv = ["train.py", f"--config={CONFIG}:memory"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False,
                                  sys_argv=argv)
  fv(argv)
  # smaller than the variant (2 layers: hgrn2, graph; 32-token windows, 4 per stream row; 8
  # streams), as tests/test_faults.py's memory run: its compiles are in the session's cache
  cfg = helpers.update_config(fv.config, helpers.MEMORY_RUN)
  cfg.train.update(log_every=2, checkpoint_every=0, eval_batches=0, passkey_examples=0)
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


@pytest.mark.parametrize("key, value, message", [
    ("memory.top_k", 0, "config.memory.top_k"),
    ("memory.index", "ivf", "config.memory.index"),
    ("memory.segments", 0, "config.memory.segments"),
    ("memory.layers", (0,), "config.memory.layers"),    # layer 0 is hgrn2, not graph
])
def test_bad_memory_config_names_the_key(key, value, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(_memory_config(**{key: value}))


def test_memory_needs_a_graph_layer():
  cfg = _memory_config()
  cfg.model.update(architecture="hybrid", pattern=("hgrn2", "attn"))
  with pytest.raises(ValueError, match="config.memory.enabled.*graph"):
    config_lib.validate_config(cfg)
  cfg.memory.enabled = False   # the same model trains without memory
  config_lib.validate_config(cfg)


def _snapshot(runner):
  """Entries per stream and top-4 ids of fixed queries, per memory layer and stream."""
  rng = np.random.default_rng(0)
  out = {}
  for layer, bank in runner.banks.items():
    q = rng.standard_normal((5, runner.kv * runner.head_dim)).astype(np.float32)
    out[layer] = [(len(m), m.search(q, 4)[1].tolist()) for m in bank.memories]
  return out


def test_train_with_memory_checkpoints_and_resumes_it(tmp_path, monkeypatch):
  saved, restored = {}, {}
  real_save, real_restore = memory_train.SegmentFeeder.save, memory_train.SegmentFeeder.restore

  def save(self, directory):
    real_save(self, directory)
    saved[os.path.basename(directory).removesuffix(".tmp")] = (_snapshot(self.runner), self.segment)

  def restore(self, directory):
    real_restore(self, directory)
    restored[os.path.basename(directory)] = (_snapshot(self.runner), self.segment)

  monkeypatch.setattr(memory_train.SegmentFeeder, "save", save)
  monkeypatch.setattr(memory_train.SegmentFeeder, "restore", restore)
  workdir = str(tmp_path / "run")
  # 4 windows per row: step 6 stops in the middle of the second row (2 windows in memory)
  first = loop.train(_memory_config(**{"train.stop_at_step": 6}), workdir)
  assert first.status == "interrupted" and first.step == 6 and np.isfinite(first.last_metrics["loss"])
  mem = os.path.join(workdir, "checkpoints", "memory", "6")
  for layer in (1,):
    for stream in range(8):
      files = os.listdir(os.path.join(mem, f"layer_{layer}", f"stream_{stream}"))
      assert {"memory.json", "shard_0.faiss", "shard_0.npz"} <= set(files)
  snap, segment = saved["6"]
  assert segment == 2
  assert all(n > 0 for n, _ in snap[1]) and max(n for n, _ in snap[1]) <= 2 * 32

  second = loop.train(_memory_config(), workdir)        # resumes from step 6
  assert second.status == "finished" and second.step == 10
  assert restored["6"] == (snap, 2)                       # same entries and search results
  assert "10" in saved and os.path.isdir(os.path.join(workdir, "checkpoints", "memory", "10"))


class _Rows:
  """A stand-in data pipeline: the same rows again and again; state = rows read."""

  def __init__(self, rows, start):
    self.rows, self.read = rows, int(start or 0)

  def get_state(self):
    return self.read

  def __next__(self):
    self.read += 1
    return self.rows

  def stats(self):
    return {}

  def close(self):
    pass


def _feed(prefetch):
  """Four windows of two hand-made streams through a SegmentFeeder -> (memories, entries seen)."""
  from test_memory import SEG, _runner  # pylint: disable=import-outside-toplevel
  runner, params, _, _ = _runner()
  n = 4 * SEG
  seg_ids = np.ones((2, n), np.int32)
  seg_ids[0, -3:] = 0                               # stream 0: one document, then padding
  seg_ids[1, SEG + SEG // 2:] = 2                   # stream 1: doc 2 starts inside window 1
  seg_ids[1, 2 * SEG:] = 3                          #           doc 3 starts with window 2
  rng = np.random.default_rng(7)
  toks = rng.integers(0, 32, (2, n)).astype(np.int32)
  rows = {"inputs": toks, "targets": toks, "loss_mask": np.ones((2, n), np.float32),
          "segment_ids": seg_ids, "positions": np.tile(np.arange(n, dtype=np.int32), (2, 1))}
  cfg = memory_train.default_config()
  cfg.update(index="flat", top_k=4, segments=4, prefetch=prefetch)
  feeder = memory_train.SegmentFeeder(runner.model, cfg, seq_len=SEG, batch_size=2,
                                      make_pipeline=lambda length, st: _Rows(rows, st))
  memories, entries = [], []
  for _ in range(4):
    memories.append(feeder.next_batch(params)["memory"][0])
    entries.append(feeder.runner.entries())
    feeder.after_dispatch()
  entries.append(feeder.runner.entries())
  assert feeder.get_state()["segment"] == 4 and feeder.get_state()["before"] == 0
  return memories, entries


@pytest.mark.parametrize("prefetch", [False, True])
def test_streams_never_read_another_documents_memory(prefetch):
  from test_memory import SEG  # pylint: disable=import-outside-toplevel
  memories, entries = _feed(prefetch)
  valid = [m[2].any(-1) for m in memories]          # [2, SEG]: any valid memory edge per token
  assert not valid[0].any()                          # nothing before the first window
  assert valid[1][0].all() and valid[1][1, :SEG // 2].all()
  assert not valid[1][1, SEG // 2:].any()            # doc 2 tokens never see doc 1's entries
  assert not valid[2][1].any() and valid[3][1].all()  # doc 3 started with window 2: forgot
  assert entries[2] == [2 * SEG, 0]
  assert entries[-1] == [4 * SEG - 3, 2 * SEG]       # padding is never stored
  if prefetch:   # the params do not change here, so prefetching retrieves exactly the same
    for a, b in zip(memories, _feed(False)[0]):
      for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)

"""Generation with host memory (serve/memory.py, launch/generate.py) and what the server says."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from fastapi.testclient import TestClient

from sosm_jax.eval import loading
from sosm_jax.memory.segments import SegmentRunner
from sosm_jax.serve import app as app_lib
from sosm_jax.serve import engine as engine_lib
from sosm_jax.serve import loading as serve_loading
from sosm_jax.serve import registry as registry_lib
from sosm_jax.serve.memory import MemoryGenerator
from sosm_jax.train.memory_train import store_config
from test_eval_memory import WINDOW, memory_config, save_memory_checkpoint

pytestmark = pytest.mark.usefixtures("fast_compiles")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "A prompt of 89 bytes, longer than two windows of thirty-two tokens, so the memory is read"
NEW = 12            # with BOS 90 + 12 tokens: decoding crosses the window boundary at 96


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("memgen"))
  save_memory_checkpoint(workdir, memory_config(), seed=1)
  return loading.load_for_eval(workdir)


def _reference(loaded, ids, **sampling):
  """SegmentRunner.generate's new tokens for prompt ids (batch 1)."""
  runner = SegmentRunner(loaded.model, store_config(loaded.config.memory), num_streams=1)
  out = runner.generate(loaded.params, np.asarray([ids], np.int32), WINDOW, NEW, **sampling)
  return [int(t) for t in out[0, len(ids):]]


@pytest.fixture(scope="module")
def greedy_reference(loaded):
  return _reference(loaded, MemoryGenerator(loaded).encode(PROMPT))


def test_memory_generator_matches_segment_runner_generate(loaded, greedy_reference):
  gen = MemoryGenerator(loaded)
  ids = gen.encode(PROMPT)
  assert ids[0] == loaded.tokenizer.bos_id and len(ids) == 90
  greedy = engine_lib.SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
  got = list(gen.tokens(ids, greedy))
  assert got == greedy_reference and len(got) == NEW
  assert gen.runner.entries()[0] == 3 * WINDOW         # 3 full windows went to the memory
  sampled = engine_lib.SamplingParams(max_tokens=NEW, temperature=0.8, top_p=0.9, seed=3,
                                      ignore_eos=True)
  want = _reference(loaded, ids, rng=jax.random.key(3), temperature=0.8, top_p=0.9)
  assert list(gen.tokens(ids, sampled)) == want and want != got
  events = list(gen.events(PROMPT, greedy))
  assert [e.kind for e in events[-1:]] == ["done"] and events[-1].finish_reason == "length"
  assert events[-1].completion_tokens == NEW
  assert "".join(e.text for e in events) == loaded.tokenizer.decode(got)
  with pytest.raises(ValueError, match="top_k=5"):
    next(gen.tokens(ids, engine_lib.SamplingParams(max_tokens=4, top_k=5)))


def test_generate_cli_uses_memory_as_trained(loaded, greedy_reference):
  cmd = [sys.executable, os.path.join(ROOT, "launch", "generate.py"), f"--workdir={loaded.workdir}",
         f"--prompt={PROMPT}", f"--max_tokens={NEW}", "--ignore_eos"]
  # the settings of this process (conftest, fast_compiles): its compiled programs are cached
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == PROMPT + loaded.tokenizer.decode(greedy_reference) + "\n"
  assert f"[host memory: windows of {WINDOW} tokens]" in proc.stderr
  assert f"[{NEW} tokens, length]" in proc.stderr


def test_server_lists_that_it_serves_without_memory(loaded):
  engine, info = serve_loading.engine_from_workdir(
      loaded.workdir, engine_lib.EngineConfig(num_slots=1, max_len=64, prefill_chunk=16))
  assert info["host_memory"] == serve_loading.HOST_MEMORY_NOT_SERVED
  registry = registry_lib.ModelRegistry([registry_lib.ModelEntry("mem", engine, info=info)])
  with TestClient(app_lib.create_app(registry)) as client:
    listed = client.get("/v1/models").json()["data"]
  assert listed[0]["id"] == "mem" and "served without it" in listed[0]["host_memory"]

"""Generation with host memory (serve/memory.py, launch/generate.py) and what the server says."""
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

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
from sosm_jax.serve.memory import MemoryEngine, MemoryGenerator
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


def _serve(loaded, memory, name="mem", max_len=256):
  engine, info = serve_loading.engine_from_workdir(
      loaded.workdir, engine_lib.EngineConfig(num_slots=1, max_len=max_len, prefill_chunk=16),
      memory=memory, name=name)
  entry = registry_lib.ModelEntry(name, engine, info=info)
  return engine, info, registry_lib.ModelRegistry([entry])


def test_server_serves_memory_checkpoints_with_their_memory(loaded, greedy_reference):
  engine, info, registry = _serve(loaded, "auto")
  assert isinstance(engine, MemoryEngine) and info["host_memory"].startswith(
      f"on: windows of {WINDOW} tokens")
  body = dict(prompt=PROMPT, max_tokens=NEW, temperature=0, ignore_eos=True)
  want = loaded.tokenizer.decode(greedy_reference)
  with TestClient(app_lib.create_app(registry.start())) as client:
    listed = client.get("/v1/models").json()["data"]
    assert listed[0]["host_memory"] == info["host_memory"]
    first = client.post("/v1/completions", json=body).json()["choices"][0]
    assert first["text"] == want and first["finish_reason"] == "length"
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
      lines = [l[len("data: "):] for l in r.iter_lines() if l.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    assert "".join(json.loads(l)["choices"][0]["text"] for l in lines[:-1]) == want
    # requests sent together run one after the other, each with its own memory: same text
    with ThreadPoolExecutor(3) as pool:
      texts = list(pool.map(lambda _: client.post("/v1/completions", json=body).json()
                            ["choices"][0]["text"], range(3)))
    assert texts == [want] * 3
    # refused before running: top_k (not sampled on this path), a prompt past max_len
    bad = client.post("/v1/completions", json={**body, "top_k": 5})
    assert bad.status_code == 400 and "top_k=5" in bad.json()["error"]["message"]
    long = client.post("/v1/completions", json={**body, "prompt": "x" * 300})
    assert long.status_code == 400 and "takes at most 255" in long.json()["error"]["message"]
    stats = client.get("/health").json()["models"]["mem"]
  registry.stop()
  assert stats["steps"] == 5 * NEW and stats["failures"] == 0


def test_memory_engine_cancels_and_reports_failures(loaded):
  engine = MemoryEngine(loaded, engine_lib.EngineConfig(max_len=256), name="mem").start()
  events, done = [], threading.Event()

  def on_event(event):
    events.append(event)
    if event.kind in ("done", "error"):
      done.set()

  request = engine.submit(PROMPT, engine_lib.SamplingParams(max_tokens=40, temperature=0,
                                                            ignore_eos=True), on_event)
  request.cancel()
  assert done.wait(60) and events[-1].finish_reason == "cancelled"
  # a failing step: the request gets an 'error' event and the engine records it, then serves on
  events.clear(), done.clear()
  real = engine.generator.runner.stream
  engine.generator.runner.stream = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected"))
  engine.submit(PROMPT, engine_lib.SamplingParams(max_tokens=4, temperature=0), on_event)
  assert done.wait(60) and events[-1].kind == "error" and "injected" in str(events[-1].error)
  assert engine.failures == 1 and "injected" in engine.last_error
  engine.generator.runner.stream = real
  events.clear(), done.clear()
  engine.submit(PROMPT, engine_lib.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                on_event)
  assert done.wait(60) and events[-1].kind == "done" and events[-1].completion_tokens == 2
  engine.stop()
  assert not engine.alive()
  with pytest.raises(ValueError, match="kv_cache_dtype"):
    MemoryEngine(loaded, engine_lib.EngineConfig(kv_cache_dtype="int8"))


def test_server_without_memory_says_so(loaded):
  engine, info, registry = _serve(loaded, "off")
  assert isinstance(engine, engine_lib.Engine)
  assert info["host_memory"] == serve_loading.HOST_MEMORY_NOT_SERVED
  with TestClient(app_lib.create_app(registry)) as client:
    listed = client.get("/v1/models").json()["data"]
  assert listed[0]["id"] == "mem" and "served without it" in listed[0]["host_memory"]

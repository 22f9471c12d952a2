"""The HTTP server end to end: a tiny checkpoint served on localhost, called by a real HTTP client.

One server (two models: 'primary' with fallback 'backup') is shared by the module. Greedy text is
held to `LanguageModel.generate` (full prefill, one scan of decode steps) as the reference.
"""
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import uvicorn

import helpers
from sosm_jax import models
from sosm_jax.data.tokenizers import ByteTokenizer
from sosm_jax.serve import app as app_lib
from sosm_jax.serve import engine as engine_lib
from sosm_jax.serve import loading as serve_loading
from sosm_jax.serve import metrics as metrics_lib
from sosm_jax.serve import registry as registry_lib
from sosm_jax.train import config as config_lib

pytestmark = pytest.mark.usefixtures("fast_compiles")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAX_LEN = 96
PROMPTS = ["Hello there, general", "abc", "The quick brown fox jumps over the lazy dog again",
           "x", "0123456789", "serving test"]


def _config():
  c = config_lib.base_config()
  c.model.update(architecture="hybrid", pattern=("hgrn2", "attn"), num_layers=2, d_model=32,
                 mlp_dim=64, attn_num_heads=2, attn_num_kv_heads=1, attn_head_dim=16,
                 hgrn2_head_dim=16, vocab_size=260, dtype="float32", chunk_size=16)
  return c


def _save_checkpoint(workdir, config, seed):
  """Random parameters saved through the trainer's checkpointer; returns (model, parameters)."""
  params = helpers.random_params(config, seed)
  helpers.save_checkpoint(workdir, config, params, step=1)
  return models.build_model(config.model), params


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  config = _config()
  engine_config = engine_lib.EngineConfig(num_slots=4, max_len=MAX_LEN, prefill_chunk=8)
  entries, refs = [], {}
  for name, seed, fallback in (("primary", 0, "backup"), ("backup", 1, None)):
    workdir = str(tmp_path_factory.mktemp(name))
    refs[name] = _save_checkpoint(workdir, config, seed)
    refs[f"{name}_workdir"] = workdir
    engine, info = serve_loading.engine_from_workdir(workdir, engine_config, name=name)
    entries.append(registry_lib.ModelEntry(name, engine, fallback=fallback, info=info))
  metrics = metrics_lib.ServeMetrics()
  registry = registry_lib.ModelRegistry(entries, default="primary", deadline_s=60.0,
                                        cooldown_s=600.0, metrics=metrics).start()
  port = _free_port()
  uv = uvicorn.Server(uvicorn.Config(app_lib.create_app(registry), host="127.0.0.1", port=port,
                                     log_level="warning"))
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  while not uv.started:
    time.sleep(0.05)
  client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120.0)
  yield client, registry, refs
  client.close()
  uv.should_exit = True
  thread.join(timeout=10)
  registry.stop()


def _reference(refs, name, prompt, max_tokens):
  """Greedy text of LanguageModel.generate (BOS first, cut at EOS)."""
  model, params = refs[name]
  tok = ByteTokenizer()
  ids = jnp.asarray([[tok.bos_id] + tok.encode(prompt)])
  out = model.generate(params, ids, jax.random.key(0), max_tokens)
  out = list(np.asarray(out[0, ids.shape[1]:]))
  if tok.eos_id in out:
    out = out[:out.index(tok.eos_id)]
  return tok.decode(out)


def _complete(client, **body):
  r = client.post("/v1/completions", json=body)
  assert r.status_code == 200, r.text
  return r.json()


def _stream(client, **body):
  """(text, chunks) of a streamed completion."""
  chunks = []
  with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    for line in r.iter_lines():
      if line.startswith("data: "):
        chunks.append(line[len("data: "):])
  assert chunks[-1] == "[DONE]"
  parsed = [json.loads(c) for c in chunks[:-1]]
  return "".join(c["choices"][0]["text"] for c in parsed), parsed


def test_completion_is_the_reference_greedy_text(server):
  client, _, refs = server
  out = _complete(client, prompt=PROMPTS[0], max_tokens=12, temperature=0)
  assert out["object"] == "text_completion" and out["model"] == "primary"
  assert out["choices"][0]["text"] == _reference(refs, "primary", PROMPTS[0], 12)
  assert out["usage"]["prompt_tokens"] == len(PROMPTS[0]) + 1   # bytes + BOS
  assert out["usage"]["completion_tokens"] <= 12
  assert out["choices"][0]["finish_reason"] in ("length", "stop")


def test_streaming_gives_the_same_text_in_pieces(server):
  client, _, _ = server
  whole = _complete(client, prompt=PROMPTS[2], max_tokens=20, temperature=0)
  text, chunks = _stream(client, prompt=PROMPTS[2], max_tokens=20, temperature=0)
  assert text == whole["choices"][0]["text"]
  assert len(chunks) > 2
  assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
  assert chunks[-1]["usage"] == whole["usage"]


def test_concurrent_requests_get_the_sequential_greedy_text(server):
  """(Sequential engine text is held to generate's in the first test and test_serve_engine.)"""
  client, registry, refs = server
  bodies = [dict(prompt=p, max_tokens=12 + 3 * i, temperature=0) for i, p in enumerate(PROMPTS)]
  sequential = [_complete(client, **b) for b in bodies]
  steps = registry.entries["primary"].engine.steps
  with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:   # more requests than slots
    concurrent_ = list(pool.map(lambda b: _complete(client, **b), bodies))
  texts = [out["choices"][0]["text"] for out in sequential]
  assert [out["choices"][0]["text"] for out in concurrent_] == texts
  assert texts[0] == _reference(refs, "primary", bodies[0]["prompt"], bodies[0]["max_tokens"])
  # they were batched: fewer decode steps than tokens generated
  generated = sum(out["usage"]["completion_tokens"] for out in concurrent_)
  assert registry.entries["primary"].engine.steps - steps < generated


def test_sampling_parameters(server):
  client, _, _ = server
  greedy = _complete(client, prompt="abc", max_tokens=16, temperature=0)["choices"][0]["text"]
  top1 = _complete(client, prompt="abc", max_tokens=16, temperature=1.5, top_k=1, seed=3)
  assert top1["choices"][0]["text"] == greedy
  a = _complete(client, prompt="abc", max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
  b = _complete(client, prompt="abc", max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
  c = _complete(client, prompt="abc", max_tokens=16, temperature=1.0, seed=8, ignore_eos=True)
  assert a["choices"][0]["text"] == b["choices"][0]["text"]
  assert a["choices"][0]["text"] != c["choices"][0]["text"]


def test_stop_sequence_ends_the_text_before_it(server):
  client, _, _ = server
  full = _complete(client, prompt=PROMPTS[4], max_tokens=30, temperature=0,
                   ignore_eos=True)["choices"][0]["text"]
  stop = full[5:8]
  cut = full[:full.index(stop)]
  out = _complete(client, prompt=PROMPTS[4], max_tokens=30, temperature=0, ignore_eos=True,
                  stop=[stop])
  assert out["choices"][0]["text"] == cut
  assert out["choices"][0]["finish_reason"] == "stop"
  text, _ = _stream(client, prompt=PROMPTS[4], max_tokens=30, temperature=0, ignore_eos=True,
                    stop=stop)
  assert text == cut


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "malformed JSON"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x" * MAX_LEN, "max_tokens": 4}, 400, "at most 95"),
    ({"prompt": "hi", "model": "nope"}, 404, "'nope' is not served"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "one prompt"),
    ({"prompt": "hi", "logprobs": 5}, 400, "not supported"),
])
def test_bad_requests_get_a_4xx_and_do_not_disturb_others(server, body, status, needle):
  client, _, refs = server
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    good = pool.submit(_complete, client, prompt="abc", max_tokens=20, temperature=0)
    if isinstance(body, bytes):
      r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
      r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert good.result()["choices"][0]["text"] == _reference(refs, "primary", "abc", 20)


def test_models_and_health(server):
  client, _, _ = server
  listed = client.get("/v1/models").json()["data"]
  assert {m["id"] for m in listed} == {"primary", "backup"}
  assert [m["fallback"] for m in listed if m["id"] == "primary"] == ["backup"]
  health = client.get("/health")
  assert health.status_code == 200 and health.json()["models"]["primary"]["healthy"]


def test_injected_failure_moves_the_request_to_the_fallback(server):
  client, registry, refs = server
  primary = registry.entries["primary"].engine
  real = primary._decode
  def broken(*args):
    raise RuntimeError("injected failure")
  primary._decode = broken
  try:
    r = client.post("/v1/completions", json=dict(prompt="abc", max_tokens=10, temperature=0))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "backup" and r.headers["x-sosm-fallback-from"] == "primary"
    # the primary's prefill still works: its first token's text (unless held back as part of
    # an unfinished UTF-8 character) is kept and the backup continues it
    first = _reference(refs, "primary", "abc", 1)
    first = "" if first.endswith("\ufffd") else first
    expected = first + _reference(refs, "backup", "abc" + first, 10 - len(first.encode()))
    assert out["choices"][0]["text"] == expected
    health = client.get("/health").json()["models"]["primary"]
    assert not health["healthy"] and "injected failure" in health["reason"]
    # while unhealthy, new requests go to the fallback directly
    again = _complete(client, prompt="abc", max_tokens=4, temperature=0)
    assert again["model"] == "backup"
    text = client.get("/metrics").text
    assert 'sosm_fallbacks_total{from_model="primary",reason="error",to_model="backup"} 1.0' in text
    assert 'sosm_fallbacks_total{from_model="primary",reason="unhealthy",to_model="backup"}' in text
    assert 'sosm_errors_total{kind="error",model="primary"} 1.0' in text
  finally:
    primary._decode = real
    primary.last_failure = None
  assert _complete(client, prompt="abc", max_tokens=4, temperature=0)["model"] == "primary"


def test_disconnected_client_frees_its_slot(server):
  client, registry, _ = server
  engine = registry.entries["primary"].engine
  real = engine._decode
  def slow(*args):
    time.sleep(0.05)
    return real(*args)
  engine._decode = slow
  try:
    with client.stream("POST", "/v1/completions", json=dict(
        prompt="abc", max_tokens=MAX_LEN, temperature=0, ignore_eos=True, stream=True)) as r:
      for line in r.iter_lines():
        if line.startswith("data: "):
          break
      assert engine.stats()["active"] == 1
    deadline = time.time() + 3.0   # the whole generation would take ~4.5 s
    while engine.stats()["active"] and time.time() < deadline:
      time.sleep(0.02)
    assert engine.stats()["active"] == 0
  finally:
    engine._decode = real
  assert 'sosm_requests_total{model="primary",outcome="cancelled"}' in client.get("/metrics").text


def test_metrics_are_exposed(server):
  client, _, _ = server
  _complete(client, prompt="metrics", max_tokens=8, temperature=0)
  r = client.get("/metrics")
  assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
  text = r.text
  for name in ("sosm_requests_total", "sosm_prompt_tokens_total", "sosm_completion_tokens_total",
               "sosm_time_to_first_token_seconds_bucket", "sosm_inter_token_latency_seconds_bucket",
               "sosm_request_seconds_count", "sosm_batch_occupancy", "sosm_batch_occupancy_mean",
               "sosm_waiting_requests", "sosm_model_healthy"):
    assert name in text, name
  line = next(l for l in text.splitlines()
              if l.startswith('sosm_requests_total{model="primary",outcome="ok"}'))
  assert float(line.split()[-1]) >= 1


def test_generate_cli_streams_the_greedy_text(server):
  _, _, refs = server
  cmd = [sys.executable, os.path.join(ROOT, "launch", "generate.py"),
         f"--workdir={refs['primary_workdir']}", "--prompt=abc", "--max_tokens=20",
         "--prefill_chunk=4"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=True)
  assert out.stdout == "abc" + _reference(refs, "primary", "abc", 20) + "\n"
  assert "tokens" in out.stderr

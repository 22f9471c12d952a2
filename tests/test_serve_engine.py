"""Serving parts without HTTP: traced sampling, prefill pieces, text streaming, engine vs generate,
registry routing and fallback (with stand-in engines)."""
import asyncio
import queue
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_model_params
from sosm_jax import models
from sosm_jax.data.tokenizers import ByteTokenizer
from sosm_jax.models.config import default_model_config
from sosm_jax.models.sampling import sample_tokens, top_k_filter
from sosm_jax.serve import engine as engine_lib
from sosm_jax.serve import layout
from sosm_jax.serve import metrics as metrics_lib
from sosm_jax.serve import registry as registry_lib
from sosm_jax.serve.text import TextStream

pytestmark = pytest.mark.usefixtures("fast_compiles")


# ----------------------------------------------------------------------------- sampling


def test_top_k_filter_keeps_the_k_largest_per_row():
  logits = jax.random.normal(jax.random.key(0), (4, 50))
  k = jnp.array([1, 5, 0, 50])
  out = np.asarray(top_k_filter(logits, k))
  for row, kk in enumerate([1, 5, 50, 50]):
    expected = set(np.argsort(-np.asarray(logits[row]))[:kk])
    assert set(np.flatnonzero(np.isfinite(out[row]))) == expected


def test_sampled_frequencies_follow_the_filtered_distribution():
  """temperature, top-k, top-p: empirical frequencies over 20000 draws vs the exact law."""
  n = 20000
  logits = jnp.log(jnp.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
  keys = jax.random.split(jax.random.key(1), n)

  def freq(temperature, top_k, top_p):
    full = lambda x, dt: jnp.full((n,), x, dt)
    tokens = sample_tokens(jnp.broadcast_to(logits, (n, 6)), keys, full(temperature, jnp.float32),
                           full(top_k, jnp.int32), full(top_p, jnp.float32))
    return np.bincount(np.asarray(tokens), minlength=6) / n

  def law(temperature, keep):
    p = np.exp(np.asarray(logits) / temperature)
    p[keep:] = 0
    return p / p.sum()

  np.testing.assert_allclose(freq(1.0, 0, 1.0), law(1.0, 6), atol=0.015)
  np.testing.assert_allclose(freq(0.5, 0, 1.0), law(0.5, 6), atol=0.015)
  np.testing.assert_allclose(freq(1.0, 3, 1.0), law(1.0, 3), atol=0.015)
  # top_p 0.7: mass before token 2 is 0.65 < 0.7, before token 3 is 0.8: keeps tokens 0..2
  np.testing.assert_allclose(freq(1.0, 0, 0.7), law(1.0, 3), atol=0.015)
  # top-k 2 first, then the nucleus of those two: 0.4/0.65 = 0.62 >= 0.5 keeps one
  np.testing.assert_allclose(freq(1.0, 2, 0.5), law(1.0, 1), atol=0)
  # temperature 0 is argmax whatever the other settings
  np.testing.assert_array_equal(freq(0.0, 4, 0.3), law(1.0, 1))


def test_unfiltered_sampling_draws_the_filtered_paths_tokens():
  """filtered=False (no sorts) gives exactly the tokens of the full path with top-k and top-p off."""
  n = 64
  logits = 3 * jax.random.normal(jax.random.key(2), (n, 50))
  keys = jax.random.split(jax.random.key(3), n)
  temperature = jnp.tile(jnp.array([0.0, 0.7, 1.3, 2.0]), n // 4)
  off_k, off_p = jnp.zeros((n,), jnp.int32), jnp.ones((n,), jnp.float32)
  full = sample_tokens(logits, keys, temperature, off_k, off_p)
  fast = sample_tokens(logits, keys, temperature, off_k, off_p, filtered=False)
  np.testing.assert_array_equal(np.asarray(full), np.asarray(fast))
  assert len(set(np.asarray(full[1::4]).tolist())) > 5     # the draws are not all argmax


# ----------------------------------------------------------------------------- prefill pieces


@pytest.mark.parametrize("n", [1, 7, 8, 9, 31, 64, 100])
def test_prefill_pieces_cover_the_prompt_with_fixed_sizes(n):
  pieces = engine_lib.prefill_pieces(n, 16, 16)
  assert sum(pieces) == n
  assert set(pieces) <= {16, 8, 4, 2, 1}
  assert pieces == sorted(pieces, reverse=True)
  assert len(pieces) <= n // 16 + 4
  graph = engine_lib.prefill_pieces(n, 16, 1)   # continuing only one token at a time
  assert sum(graph) == n and graph[0] == 1 << (n.bit_length() - 1) and set(graph[1:]) <= {1}


# ----------------------------------------------------------------------------- text


def test_text_stream_holds_back_partial_characters_and_cuts_at_stop():
  tok = ByteTokenizer()
  stream = TextStream(tok, stop=("STOP",))
  pieces, stopped = [], False
  for b in "héllo wörld STOP more".encode():
    piece, stopped = stream.push(b)
    pieces.append(piece)
    if stopped:
      break
  assert stopped and "".join(pieces) == "héllo wörld "
  assert not any("\ufffd" in p for p in pieces)
  stream = TextStream(tok, stop=("ab",))
  assert stream.push(ord("x")) == ("", False)    # the last len('ab') - 1 chars are held
  assert stream.push(ord("a")) == ("x", False)   # 'a' may start 'ab': held
  assert stream.push(ord("c")) == ("a", False)
  assert stream.flush() == "c"


# ----------------------------------------------------------------------------- engine


def until_done(events: queue.Queue):
  """(streamed text, the 'done' event) of one request's engine events; fails on an error, or
  when the 'token' events are not one per generated token (1, 2, ... completion_tokens)."""
  text, counts = "", []
  while True:
    e = events.get(timeout=300)
    assert e.kind != "error", e.error
    text += e.text
    if e.kind == "token":
      counts.append(e.completion_tokens)
    if e.kind == "done":
      assert counts == list(range(1, len(counts) + 1)), counts
      assert e.completion_tokens == len(counts), (e, counts)
      return text, e


def _tiny(pattern):
  cfg = default_model_config("sosm" if "graph" in pattern else "hybrid")
  cfg.update(num_layers=len(pattern), d_model=32, mlp_dim=64, vocab_size=260, attn_num_heads=2,
             attn_num_kv_heads=1, attn_head_dim=16, hgrn2_head_dim=16, gdn_num_heads=2,
             gdn_head_dim=16, chunk_size=8, pattern=pattern, dtype="float32")
  model = models.build_model(cfg)
  return model, random_model_params(model)


@pytest.mark.parametrize("pattern", [("gdn", "attn"), ("hgrn2", "graph")])
def test_engine_greedy_text_is_generate_with_chunked_prefill_and_batching(pattern):
  """Prompts cut into several pieces, more requests than slots: each gets generate's text."""
  model, params = _tiny(pattern)
  tok = ByteTokenizer()
  engine = engine_lib.Engine(model, params, tok, engine_lib.EngineConfig(
      num_slots=2, max_len=40, prefill_chunk=4)).start()
  # 21 tokens with BOS: pieces 4,4,4,4,4,1 (16 then five single tokens for 'graph'); one length
  # so that the reference compiles once
  prompts, n = ["a prompt of 20 bytes", "another of 20 bytes.", "0123456789abcdefghij"], 12
  events = [queue.Queue() for _ in prompts]
  for p, q in zip(prompts, events):
    engine.submit(p, engine_lib.SamplingParams(max_tokens=n, temperature=0.0), q.put)
  texts = [until_done(q)[0] for q in events]
  engine.stop()
  for p, text in zip(prompts, texts):
    ids = jnp.asarray([engine.encode(p)])
    out = list(np.asarray(model.generate(params, ids, jax.random.key(0), n)[0, ids.shape[1]:]))
    out = out[:out.index(tok.eos_id)] if tok.eos_id in out else out
    assert text == tok.decode(out), p


@pytest.mark.parametrize("num_slots", [1, 2])     # 1: the onerow decode step, 2: the model's
def test_engine_with_an_int8_kv_cache_is_generate_of_that_model(num_slots):
  """kv_cache_dtype='int8': the engine's greedy text is generate's with the same int8 cache, and
  its attention caches hold int8 values."""
  model, params = _tiny(("hgrn2", "attn"))
  tok = ByteTokenizer()
  engine = engine_lib.Engine(model, params, tok, engine_lib.EngineConfig(
      num_slots=num_slots, max_len=40, prefill_chunk=8, kv_cache_dtype="int8")).start()
  assert engine.decode_path == ("onerow" if num_slots == 1 else "model")
  assert engine._slots["layers"][1]["k"].dtype == jnp.int8      # pylint: disable=protected-access
  prompt, n = "a prompt of 20 bytes", 12
  events = queue.Queue()
  engine.submit(prompt, engine_lib.SamplingParams(max_tokens=n, temperature=0.0), events.put)
  text = until_done(events)[0]
  engine.stop()
  int8_model = layout.with_kv_cache_dtype(model, "int8")
  ids = jnp.asarray([engine.encode(prompt)])
  out = list(np.asarray(int8_model.generate(params, ids, jax.random.key(0), n)[0, ids.shape[1]:]))
  out = out[:out.index(tok.eos_id)] if tok.eos_id in out else out
  assert text == tok.decode(out)


@pytest.mark.parametrize("num_slots", [1, 2])     # 1: the onerow decode step, 2: the model's
def test_engine_reading_kv_cache_buckets_gives_the_whole_caches_text(num_slots):
  """max_len 64, kv_read_bucket 8: decode programs read 8, 16, 32 or 64 cache positions; two
  requests whose lengths cross all four get the greedy text of an engine that reads the whole
  cache every time."""
  model, params = _tiny(("hgrn2", "attn"))
  tok = ByteTokenizer()
  prompts, n = ["hi", "a prompt of 20 bytes"], 30    # 3 and 21 tokens with BOS, then 30 more

  def serve(bucket):
    engine = engine_lib.Engine(model, params, tok, engine_lib.EngineConfig(
        num_slots=num_slots, max_len=64, prefill_chunk=8, decode_steps=4, kv_read_bucket=bucket))
    events = [queue.Queue() for _ in prompts]
    for p, q in zip(prompts, events):
      engine.submit(p, engine_lib.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                    q.put)
    engine.start()
    done = [until_done(q) for q in events]
    engine.stop()
    assert all(d.completion_tokens == n for _, d in done)
    return engine, [text for text, _ in done]

  bucketed, texts = serve(8)
  assert bucketed.decode_path == ("onerow" if num_slots == 1 else "model")
  assert bucketed.read_lengths == [8, 16, 32, 64]
  assert set(bucketed.dispatches_by_read_length) == {8, 16, 32, 64}
  whole, want = serve(0)
  assert whole.read_lengths == [64] and set(whole.dispatches_by_read_length) == {64}
  assert texts == want


def test_engine_with_the_decode_attention_kernel_gives_the_xla_forms_text():
  """model.attn_decode_impl='pallas_interpret' (the Triton kernels' code, interpreted): two
  requests in two slots (the model's step under a vmap over slots; onerow's single slot calls the
  same op), one prefilled in pieces that continue its cache (64 + 32 + 16 + 4 tokens), decoding
  across a 128-key block boundary through read lengths 128 and 256, get the text of the same
  engine with the XLA attention."""
  num_slots = 2
  model, params = _tiny(("hgrn2", "attn"))
  tok = ByteTokenizer()
  prompts, n = ["hi", "a prompt of 120 bytes " * 5 + "<end>"], 20   # 3 and 116 tokens with BOS

  def serve(impl):
    engine = engine_lib.Engine(layout.with_decode_impl(model, impl), params, tok,
                               engine_lib.EngineConfig(num_slots=num_slots, max_len=256,
                                                       prefill_chunk=64, decode_steps=4,
                                                       kv_read_bucket=128))
    events = [queue.Queue() for _ in prompts]
    for p, q in zip(prompts, events):
      engine.submit(p, engine_lib.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                    q.put)
    engine.start()
    texts = [until_done(q)[0] for q in events]
    engine.stop()
    assert set(engine.dispatches_by_read_length) == {128, 256}
    return texts

  assert serve("pallas_interpret") == serve("xla")


def test_a_filtered_neighbour_does_not_change_a_sampled_requests_text():
  """A request with top-k and top-p off decodes through the program without the filters' sorts;
  next to one with top-k (the filtered program for both) it samples the same text."""
  model, params = _tiny(("hgrn2", "attn"))
  tok = ByteTokenizer()
  plain = engine_lib.SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
  top_k = engine_lib.SamplingParams(max_tokens=12, temperature=0.9, top_k=5, seed=8,
                                    ignore_eos=True)

  def serve(requests):
    engine = engine_lib.Engine(model, params, tok, engine_lib.EngineConfig(
        num_slots=2, max_len=40, prefill_chunk=8, decode_steps=4))
    events = [queue.Queue() for _ in requests]
    for r, q in zip(requests, events):
      engine.submit("a prompt", r, q.put)
    engine.start()
    texts = [until_done(q)[0] for q in events]
    engine.stop()
    return engine, texts

  alone, (want,) = serve([plain])
  assert alone.filtered_dispatches == 0
  paired, (text, _) = serve([plain, top_k])
  assert paired.filtered_dispatches > 0
  assert text == want


def _sampled_reference(model, params, ids, seed, n, temperature):
  """Token m of a request is drawn with fold_in(key(seed), m) from the logits after token m - 1."""
  @jax.jit
  def draw(logits, m):
    key = jax.random.fold_in(jax.random.key(seed), m)[None]
    return sample_tokens(logits, key, jnp.full((1,), temperature), jnp.zeros((1,), jnp.int32),
                         jnp.ones((1,)))

  logits, cache = model.prefill(params, jnp.asarray([ids]), 64)
  logits, out, step = logits[:, -1], [], jax.jit(model.decode_step)
  for m in range(n):
    token = draw(logits, m)
    out.append(int(token[0]))
    logits, cache = step(params, token, cache)
  return out


def test_pipelined_dispatches_sample_each_token_with_its_own_step():
  """Dispatch k + 1 is queued before dispatch k's tokens are read: its sampling steps and
  budgets count the tokens in flight. Two seeded requests of different lengths in two slots
  sample exactly the tokens of a one-token-at-a-time reference."""
  model, params = _tiny(("hgrn2", "attn"))
  tok = ByteTokenizer()
  requests = [("a prompt", 13, 5), ("another prompt of more bytes", 7, 9)]   # text, tokens, seed
  engine = engine_lib.Engine(model, params, tok, engine_lib.EngineConfig(
      num_slots=2, max_len=64, prefill_chunk=8, decode_steps=4, serving_layout=False))
  events = [queue.Queue() for _ in requests]
  for (text, n, seed), q in zip(requests, events):
    engine.submit(text, engine_lib.SamplingParams(max_tokens=n, temperature=1.0, seed=seed,
                                                  ignore_eos=True), q.put)
  engine.start()
  texts = [until_done(q)[0] for q in events]
  engine.stop()
  for (text, n, seed), got in zip(requests, texts):
    want = _sampled_reference(model, params, engine.encode(text), seed, n, 1.0)
    assert got == tok.decode(want), text


@pytest.mark.parametrize("left", [4, 2])
def test_kv_positions_read_is_what_a_dispatch_attends_to(left):
  """A slot after a 5-token prompt and one generated token (cache index 5), 4 steps a dispatch
  of which `left` are kept: the cache read up to kv_positions_read gives the whole cache's logits
  at every kept step; one position fewer changes the last kept step's."""
  model, params = _tiny(("hgrn2", "attn"))
  _, cache = model.prefill(params, jnp.asarray([[1, 50, 60, 70, 80]], jnp.int32), 32)
  n = engine_lib.kv_positions_read(5, 1, 4, left)

  def logits(read_len):
    step = jax.jit(layout.with_decode_read_len(model, read_len).decode_step)
    c, out = cache, []
    for token in (90, 91, 92, 93)[:left]:
      x, c = step(params, jnp.asarray([token], jnp.int32), c)
      out.append(np.asarray(x))
    return np.stack(out)

  whole, short = logits(0), logits(n - 1)
  np.testing.assert_allclose(logits(n), whole, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(short[:-1], whole[:-1], rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(short[-1] - whole[-1])) > 1e-3


def test_decode_read_lengths_and_their_choice():
  assert engine_lib.decode_read_lengths(64, 8) == [8, 16, 32, 64]
  assert engine_lib.decode_read_lengths(100, 32) == [32, 64, 100]
  assert engine_lib.decode_read_lengths(64, 0) == engine_lib.decode_read_lengths(64, 128) == [64]
  lengths = [8, 16, 32, 64]
  assert [engine_lib.pick_read_length(need, lengths) for need in (1, 8, 9, 33, 64, 70)] == [
      8, 8, 16, 64, 64, 64]


@pytest.mark.parametrize("bad", [3, -1, 1000])
def test_kv_read_bucket_must_be_zero_or_a_power_of_two(bad):
  with pytest.raises(ValueError, match="kv_read_bucket"):
    engine_lib.EngineConfig(kv_read_bucket=bad).check()
  engine_lib.EngineConfig(kv_read_bucket=0).check()
  engine_lib.EngineConfig(kv_read_bucket=1).check()


def test_decode_read_len_is_checked_in_the_model_config():
  cfg = default_model_config("hybrid")
  cfg.attn_decode_read_len = -1
  with pytest.raises(ValueError, match="attn_decode_read_len"):
    models.build_model(cfg)


def test_kv_cache_dtype_is_checked_in_engine_and_model_configs():
  with pytest.raises(ValueError, match="kv_cache_dtype"):
    engine_lib.EngineConfig(kv_cache_dtype="fp8").check()
  cfg = default_model_config("hybrid")
  cfg.attn_kv_cache_dtype = "fp8"
  with pytest.raises(ValueError, match="attn_kv_cache_dtype"):
    models.build_model(cfg)


def test_engine_refuses_bad_requests_before_queueing():
  model, params = _tiny(("hgrn2", "attn"))
  engine = engine_lib.Engine(model, params, ByteTokenizer(), engine_lib.EngineConfig(
      num_slots=1, max_len=16, prefill_chunk=4))
  with pytest.raises(ValueError, match="at most 15"):
    engine.submit("x" * 15, engine_lib.SamplingParams(), print)
  for bad, field in ((dict(max_tokens=-1), "max_tokens"), (dict(top_p=1.5), "top_p"),
                     (dict(temperature=-1.0), "temperature"), (dict(stop=("",)), "stop")):
    with pytest.raises(ValueError, match=field):
      engine.submit("hi", engine_lib.SamplingParams(**bad), print)
  assert engine.stats()["pending"] == 0


# ----------------------------------------------------------------------------- registry


class _StandIn:
  """An engine stand-in: replies with `reply` at once, an 'error', or nothing (hangs)."""

  class _Handle:
    def __init__(self):
      self.cancelled = False

    def cancel(self):
      self.cancelled = True

  def __init__(self, name, mode, reply="ok"):
    self.name, self.mode, self.reply = name, mode, reply
    self.last_failure, self.last_error = None, ""
    self.config = engine_lib.EngineConfig(num_slots=1, max_len=64)
    self.prompts, self.handles = [], []
    self.stalled = 0.0

  def submit(self, prompt, params, on_event):
    del params
    self.prompts.append(prompt)
    self.handles.append(self._Handle())
    if self.mode == "ok":
      on_event(engine_lib.Event("token", text=self.reply, prompt_tokens=3, completion_tokens=1))
      on_event(engine_lib.Event("done", finish_reason="length", prompt_tokens=3,
                                completion_tokens=1))
    elif self.mode == "error":
      on_event(engine_lib.Event("error", error=engine_lib.EngineError("boom")))
    return self.handles[-1]

  def alive(self):
    return True

  def stalled_for(self):
    return self.stalled

  def stats(self):
    return {"slots": 1, "active": 0, "pending": 0, "steps": 0, "failures": 0,
            "mean_occupancy": 0.0}

  def start(self):
    return self

  def stop(self):
    pass


def _run(registry, model=None, prompt="p"):
  async def go():
    completion = registry.open(model, prompt, engine_lib.SamplingParams(max_tokens=4))
    text = ""
    async for event in completion.events():
      text += event.text
    return completion, text
  return asyncio.run(go())


@pytest.mark.parametrize("mode,reason", [("error", "error"), ("hang", "deadline")])
def test_failure_or_deadline_moves_the_request_to_the_fallback(mode, reason):
  metrics = metrics_lib.ServeMetrics()
  a, b = _StandIn("a", mode), _StandIn("b", "ok", reply="from b")
  registry = registry_lib.ModelRegistry(
      [registry_lib.ModelEntry("a", a, fallback="b"), registry_lib.ModelEntry("b", b)],
      deadline_s=0.2, metrics=metrics)
  completion, text = _run(registry)
  assert (completion.model, completion.moved_from, text) == ("b", "a", "from b")
  assert a.handles[0].cancelled and b.prompts == ["p"]
  assert metrics.fallbacks.labels("a", "b", reason)._value.get() == 1
  assert metrics.errors.labels("a", reason)._value.get() == 1


def test_no_fallback_is_an_error_with_a_status():
  registry = registry_lib.ModelRegistry([registry_lib.ModelEntry("a", _StandIn("a", "hang"))],
                                        deadline_s=0.1)
  with pytest.raises(registry_lib.ServeError, match="deadline") as info:
    _run(registry)
  assert info.value.status == 504


def test_unhealthy_model_sends_new_requests_to_its_fallback():
  a, b = _StandIn("a", "ok"), _StandIn("b", "ok", reply="b")
  a.last_failure, a.last_error = time.time(), "RuntimeError: x"
  registry = registry_lib.ModelRegistry(
      [registry_lib.ModelEntry("a", a, fallback="b"), registry_lib.ModelEntry("b", b)],
      cooldown_s=60, stall_s=60)
  assert not registry.health("a")[0]
  completion, _ = _run(registry)
  assert completion.model == "b" and a.prompts == []
  a.last_failure = time.time() - 61
  assert registry.health("a")[0] and _run(registry)[0].model == "a"
  a.stalled = 61.0   # stuck in a step for longer than stall_s
  assert "no step finished" in registry.health("a")[1] and _run(registry)[0].model == "b"


def test_weighted_ab_routing_and_unknown_models():
  entries = [registry_lib.ModelEntry("a", _StandIn("a", "ok"), weight=3.0),
             registry_lib.ModelEntry("b", _StandIn("b", "ok"), weight=1.0),
             registry_lib.ModelEntry("c", _StandIn("c", "ok"))]
  registry = registry_lib.ModelRegistry(entries, default="c", seed=0)
  routes = [registry.route(None) for _ in range(4000)]
  assert abs(routes.count("a") / 4000 - 0.75) < 0.03 and "c" not in routes
  assert registry.route("c") == "c"
  with pytest.raises(registry_lib.UnknownModelError, match="'z' is not served"):
    registry.route("z")
  with pytest.raises(ValueError, match="fallback 'zz' is not loaded"):
    registry_lib.ModelRegistry([registry_lib.ModelEntry("a", None, fallback="zz")])

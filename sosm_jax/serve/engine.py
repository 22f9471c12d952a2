"""Generation engine: slots of per-request caches, continuous batching, chunked bucketed prefill.

One engine serves one loaded model. It owns `num_slots` slots; a slot holds one request's
whole decode state (the model's cache at batch 1: recurrent states and conv tails of linear
layers, the KV cache of attention layers, sized `max_len` tokens, and its own position). The
slots are stacked on a leading axis and one jitted call decodes all of them at once
(`jax.vmap` over `LanguageModel.decode_step`, so every slot keeps its own position; one slot
runs the step itself, which launches fewer kernels than its vmap over a batch of one), then
samples each slot's next token with that slot's parameters (temperature, top-k, top-p, seed:
traced arrays, so no setting compiles a new program). One call runs `decode_steps` such steps
in a `lax.scan` with the sampling on the device, so the host dispatches, syncs and handles text
once per `decode_steps` tokens; inside the scan a slot stops emitting (its later tokens come back
as -1) after EOS or when its token budget (max_tokens, the cache length) is spent; stop
sequences are text and are cut on the host, which drops what a slot sampled after them. The
model runs in the serving layout (`serve/layout.py`: bfloat16 matmul weights, unrolled layers);
with one slot, decoding goes through `serve/onerow.py` where it supports the model (norm scales
folded into fused projections, the row carried twice: the fastest batch-1 step measured on an
H200, RESULTS.md "Decode speed"), else through `layout.decode_step` (projections on two rows);
with more slots, through the model's own step. A decode dispatch reads only a prefix of the
slots' KV caches (`attn_decode_read_len`): the smallest of kv_read_bucket, 2 kv_read_bucket,
4 kv_read_bucket, ..., max_len that holds every position the active slots attend to in it, so a
short request on a server with a long max_len decodes at the price of its own length (the
caches still take max_len of memory); at most ceil(log2(max_len / kv_read_bucket)) + 1 decode
programs are compiled.

A background thread runs the loop: between two decode calls it frees the slots of finished or
cancelled requests and runs up to `prefill_chunk` tokens of prefill (pieces of the oldest
waiting requests, while slots are free); when a prompt is done its cache is copied into a free
slot and it joins the running batch. Decode calls are pipelined: the next is queued before the
host reads the previous one's tokens (counting them as generated), so the device does not wait
for the host's part (the sync, text, events); tokens a request would get after it ended (EOS,
stop sequence, cancel) in the call queued meanwhile are dropped.

Prefill is exact, with no padding: a prompt of n tokens is cut into pieces whose lengths come
from a fixed set (`prefill_chunk` repeated, then the binary digits of the rest: 256, 128, ...,
1), so at most 2 (log2(prefill_chunk) + 1) prefill programs are ever compiled, and a long
prompt interleaves with decoding one piece at a time. The first piece runs `LanguageModel.prefill`
(from an empty cache, flash attention); later pieces continue the cache. Models with a 'graph'
layer can only continue one token at a time (the graph layer's decode step), so for them the
first piece is the largest power of two not above n and the rest goes token by token.

Text: BOS is prepended by the engine (the tokenizer's `bos_id`), generation stops at EOS
(unless `ignore_eos`), at a stop sequence (cut from the text), at `max_tokens`, or at the slot's
`max_len`. Host memory (FAISS) is not used by the engine.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import secrets
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sosm_jax.models.config import KV_CACHE_DTYPES, resolved_pattern
from sosm_jax.models.sampling import sample_tokens
from sosm_jax.serve import layout, onerow
from sosm_jax.serve.text import TextStream, prompt_ids


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """One request's sampling settings (validated by `check`)."""
  max_tokens: int = 16
  temperature: float = 1.0    # 0 = greedy
  top_k: int = 0              # 0 = off
  top_p: float = 1.0          # 1 = off
  seed: int | None = None     # None = random
  stop: tuple[str, ...] = ()
  ignore_eos: bool = False

  def check(self) -> None:
    """ValueError naming the bad field."""
    if self.max_tokens < 0:
      raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if any(not s for s in self.stop):
      raise ValueError("stop sequences must be non-empty strings")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Shapes the engine compiles for (all static)."""
  num_slots: int = 8          # requests decoded together
  max_len: int = 2048         # prompt (with BOS) + generated tokens per request
  prefill_chunk: int = 512    # longest prefill piece (a power of two)
  add_bos: bool = True
  decode_steps: int = 8       # tokens decoded per dispatch (requests join and leave between)
  serving_layout: bool = True  # serve/layout.py and, for one slot, serve/onerow.py (False:
                               # the parameters exactly as given, the model's decode step)
  kv_cache_dtype: str = ""     # attention KV cache: '' = the model config's
                               # (attn_kv_cache_dtype), 'int8' = half of a bf16 cache's bytes
  kv_read_bucket: int = 1024   # decode reads the KV caches' first kv_read_bucket x 2^k positions
                               # (capped at max_len; module doc); 0 = always the whole cache

  def check(self) -> None:
    if self.num_slots < 1:
      raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")
    if self.prefill_chunk < 1 or self.prefill_chunk & (self.prefill_chunk - 1):
      raise ValueError(f"prefill_chunk must be a power of two, got {self.prefill_chunk}")
    if self.max_len < 2:
      raise ValueError(f"max_len must be >= 2, got {self.max_len}")
    if self.decode_steps < 1:
      raise ValueError(f"decode_steps must be >= 1, got {self.decode_steps}")
    if self.kv_cache_dtype not in KV_CACHE_DTYPES:
      raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES} ('' = the model "
                       f"config's), got {self.kv_cache_dtype!r}")
    if self.kv_read_bucket < 0 or self.kv_read_bucket & (self.kv_read_bucket - 1):
      raise ValueError(f"kv_read_bucket must be 0 (read the whole cache) or a power of two, "
                       f"got {self.kv_read_bucket}; use e.g. 1024")


@dataclasses.dataclass
class Event:
  """What the engine tells a request's consumer. kind: 'token' | 'done' | 'error'."""
  kind: str
  text: str = ""                      # new text ('token', one per sampled token: '' while the
                                      # stream holds back bytes; 'done' may carry the flushed tail)
  finish_reason: str | None = None    # 'stop' | 'length' | 'cancelled' ('done')
  prompt_tokens: int = 0
  completion_tokens: int = 0
  error: BaseException | None = None  # ('error')


class EngineError(RuntimeError):
  """The engine failed while running a request (its step raised); the request may be retried."""


class Request:
  """A submitted request; `cancel()` frees its slot at the next step."""

  _ids = itertools.count()

  def __init__(self, prompt_ids: list[int], params: SamplingParams, on_event, stream: TextStream):
    self.id = next(Request._ids)
    self.prompt_ids = prompt_ids
    self.params = params
    self.on_event = on_event
    self.text = stream
    self.generated: list[int] = []
    self.cancelled = threading.Event()
    self.seed = params.seed if params.seed is not None else secrets.randbits(31)
    self.submitted = time.perf_counter()

  def cancel(self) -> None:
    self.cancelled.set()


def prefill_pieces(n: int, chunk: int, continue_max: int) -> list[int]:
  """Lengths of the prefill pieces of an n-token prompt (sum n, each from a fixed set).

  continue_max: the longest piece that may continue a cache (1 for models with 'graph' layers,
  else chunk). Pieces: chunk while >= chunk remain, then the binary digits of the rest.
  """
  if n < 1:
    raise ValueError(f"a prompt needs at least one token, got {n}")
  if continue_max >= chunk:
    pieces = [chunk] * (n // chunk)
    rest = n % chunk
    bit = chunk // 2
    while rest:
      if rest >= bit:
        pieces.append(bit)
        rest -= bit
      bit //= 2
    return pieces
  first = 1 << (n.bit_length() - 1)   # largest power of two <= n, from an empty cache
  return [first] + [1] * (n - first)


def kv_positions_read(prompt_len: int, generated: int, decode_steps: int, left: int) -> int:
  """How many cache positions, from 0, a slot's kept tokens attend to in one decode dispatch.

  The cache holds the prompt and every generated token but the last (the dispatch's input), so
  its index is prompt_len + generated - 1; step j writes and attends up to index + j, and only
  the first min(decode_steps, left) steps' tokens are kept (what later steps, and free slots,
  read does not matter: their tokens are discarded).
  """
  return prompt_len + generated - 1 + min(decode_steps, left)


def decode_read_lengths(max_len: int, bucket: int) -> list[int]:
  """The KV read lengths decode programs are compiled for, ascending: bucket, 2 bucket, ...
  below max_len, then max_len (only max_len when bucket is 0)."""
  lengths, n = [], bucket
  while 0 < n < max_len:
    lengths.append(n)
    n *= 2
  return lengths + [max_len]


def pick_read_length(need: int, lengths: list[int]) -> int:
  """The smallest of lengths (ascending) >= need; the last (max_len) when none is."""
  return next((n for n in lengths if n >= need), lengths[-1])


class QueuedEngine:
  """What every engine shows the registry and the server: `submit()` checks a request and queues
  it, `start()` launches the loop thread that serves the queue (`_loop`, the subclass's),
  `stop()` ends it; `alive`, `failures`, `last_failure` and `last_error` feed the health check.

  tokenizer: with encode, decode, bos_id, eos_id; config: `EngineConfig` (max_len, add_bos).
  """

  def __init__(self, tokenizer, config: EngineConfig, name: str):
    self.tokenizer, self.config, self.name = tokenizer, config, name
    self._pending: collections.deque[Request] = collections.deque()
    self._cv = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self.steps = 0
    self.failures = 0
    self.last_failure: float | None = None
    self.last_error: str = ""
    self._last_progress = time.perf_counter()

  def encode(self, prompt: str | list[int]) -> list[int]:
    """Prompt text (or ids) -> ids with BOS first (when config.add_bos)."""
    return prompt_ids(self.tokenizer, prompt, self.config.add_bos)

  @property
  def max_prompt_tokens(self) -> int:
    """The longest prompt (with BOS) that still leaves room for one generated token."""
    return self.config.max_len - 1

  def check(self, params: SamplingParams) -> None:
    """ValueError naming a sampling parameter this engine cannot serve."""
    params.check()

  def submit(self, prompt: str | list[int], params: SamplingParams,
             on_event: Callable[[Event], None]) -> Request:
    """Queues a request; events go to on_event (called from the engine thread).

    ValueError (before anything is queued) for bad parameters or a prompt that is too long.
    """
    self.check(params)
    ids = self.encode(prompt)
    if len(ids) > self.max_prompt_tokens:
      raise ValueError(f"prompt is {len(ids)} tokens (with BOS); model {self.name!r} takes at "
                       f"most {self.max_prompt_tokens} (max_len {self.config.max_len} minus one "
                       f"generated token)")
    request = Request(ids, params, on_event, TextStream(self.tokenizer, params.stop))
    if params.max_tokens == 0:
      on_event(Event("done", finish_reason="length", prompt_tokens=len(ids)))
      return request
    with self._cv:
      self._pending.append(request)
      self._cv.notify()
    return request

  def start(self):
    if self._thread is None or not self._thread.is_alive():
      self._stopping = False
      self._thread = threading.Thread(target=self._loop, name=f"engine-{self.name}", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    with self._cv:
      self._stopping = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join(timeout=30)

  def alive(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  def _loop(self) -> None:
    raise NotImplementedError


class Engine(QueuedEngine):
  """Continuous-batching generation over one model (see the module doc).

  model: `LanguageModel`; params: its parameters (unboxed); tokenizer: with encode, decode,
  bos_id, eos_id. `start()` launches the loop thread, `submit()` queues a request, `stop()`
  ends the loop.
  """

  def __init__(self, model, params, tokenizer, config: EngineConfig = EngineConfig(), *,
               name: str = "model"):
    config.check()
    model = layout.with_decode_read_len(model, 0)   # prefill's continued pieces read it all
    if config.kv_cache_dtype:
      model = layout.with_kv_cache_dtype(model, config.kv_cache_dtype)
    if config.serving_layout:
      model, params = layout.serving_layout(model, params)
    super().__init__(tokenizer, config, name)
    self.model, self.params = model, params
    eos = tokenizer.eos_id
    self._eos = -2 if eos is None else int(eos)   # -2: no token id, never matches
    self.decode_path, self._step_params = self._choose_decode_step()
    self.continue_max = 1 if "graph" in resolved_pattern(model.cfg) else config.prefill_chunk
    s, max_len = config.num_slots, config.max_len
    one = model.init_cache(1, max_len)
    self._slots = jax.tree.map(lambda a: jnp.broadcast_to(a, (s,) + a.shape), one)
    self._tokens = np.zeros((s,), np.int32)
    self._active: list[Request | None] = [None] * s
    self._prefill: tuple[Request, Any, list[int], int] | None = None  # request, cache, pieces, done
    self.occupied_slot_steps = 0
    self.read_lengths = decode_read_lengths(max_len, config.kv_read_bucket)
    self._decode_models = {n: layout.with_decode_read_len(model, 0 if n == max_len else n)
                           for n in self.read_lengths}
    self.dispatches_by_read_length: collections.Counter[int] = collections.Counter()
    self.filtered_dispatches = 0   # dispatches that ran the top-k / top-p filters
    self._decode = jax.jit(self._decode_fn, static_argnames=("read_len", "filtered"),
                           donate_argnums=(4,))
    self._inflight: _Dispatch | None = None   # queued on the device, its tokens not read yet
    self._insert = jax.jit(_insert_slot, donate_argnums=(0,))
    self._first = jax.jit(self._first_piece_fn)
    self._extend = jax.jit(self._extend_fn)
    self._sample = jax.jit(_sample_one)

  def _choose_decode_step(self):
    """('model' | 'two_rows' | 'onerow', the parameters the decode step reads).

    One slot in the serving layout: onerow where it supports the model (its fused, folded
    kernels: a second copy of the weights; prefill reads self.params), else projections on two
    rows (module doc). Otherwise the model's step: with several slots every projection already
    has a row per slot, and neither batch-1 lever was measured there.
    """
    if self.config.num_slots != 1 or not self.config.serving_layout:
      return "model", self.params
    if onerow.unsupported_reason(self.model.cfg):
      return "two_rows", self.params
    return "onerow", onerow.fold_params(self.model.cfg, self.params)

  def decode_step_fn(self, read_len: int):
    """The one-slot decode step that decode_path names, reading read_len cache positions:
    (step params, token `[1]`, one slot's cache) -> (logits `[1, V]`, cache)."""
    model = self._decode_models[read_len]
    if self.decode_path == "onerow":
      return functools.partial(onerow.decode_step, model.cfg)
    if self.decode_path == "two_rows":
      return functools.partial(layout.decode_step, model)
    return model.decode_step

  # ------------------------------------------------------------------ compiled pieces

  def _decode_fn(self, params, tokens, prev_out, from_host, slots, seeds, steps, temperature,
                 top_k, top_p, left, stop_at_eos, read_len, filtered):
    """config.decode_steps decode steps of every slot -> (tokens `[S, decode_steps]`, slots).

    Each slot's input token is tokens `[S]` (host) where from_host `[S]`, else the last column of
    prev_out `[S, decode_steps]` (the previous dispatch's output, still on the device: a slot
    that continues it). slots: caches stacked `[S, ...]`; per slot `[S]`:
    seeds, steps (tokens generated so far: the sampling key of step j is fold_in(key(seed),
    steps + j)), temperature, top_k, top_p, left (tokens it may still emit; 0 for a free slot),
    stop_at_eos (bool). A slot's tokens after its budget or after EOS are -1.
    read_len (static, one of self.read_lengths): attention reads the caches' first read_len
    positions, so every position a kept token attends to must be below it. filtered (static):
    False when no slot uses top-k or top-p, so the steps skip their sorts over the vocabulary.
    """
    one_slot_step = self.decode_step_fn(read_len)
    step = lambda t, c: one_slot_step(params, t[None], c)
    tokens = jnp.where(from_host, tokens, prev_out[:, -1])
    key = jax.vmap(jax.random.key)(seeds)

    def all_slots(tokens, slots):   # -> (logits `[S, 1, V]`, slots)
      if self.config.num_slots > 1:
        return jax.vmap(step)(tokens, slots)
      # one slot: the step itself, not a vmap of it over a batch of one
      logits, cache = step(tokens[0], jax.tree.map(lambda a: a[0], slots))
      return logits[None], jax.tree.map(lambda a: a[None], cache)

    def body(carry, j):
      tokens, slots, live = carry
      logits, slots = all_slots(tokens, slots)
      keys = jax.vmap(jax.random.fold_in)(key, steps + j)
      nxt = sample_tokens(logits[:, 0], keys, temperature, top_k, top_p, filtered=filtered)
      out = jnp.where(live, nxt, -1)
      live = live & (j + 1 < left) & ~(stop_at_eos & (nxt == self._eos))
      return (nxt, slots, live), out

    (_, slots, _), out = jax.lax.scan(body, (tokens, slots, left > 0),
                                      jnp.arange(self.config.decode_steps, dtype=jnp.int32))
    return out.T, slots

  def _first_piece_fn(self, params, tokens):
    """tokens `[1, T]` from an empty cache -> (last logits `[1, V]`, cache)."""
    logits, cache = self.model.prefill(params, tokens, self.config.max_len, last_only=True)
    return logits[:, -1], cache

  def _extend_fn(self, params, tokens, cache):
    """tokens `[1, T]` continuing cache -> (last logits `[1, V]`, cache).

    `LanguageModel.decode_step` for T tokens at once (positions index .. index + T - 1).
    """
    t = tokens.shape[1]
    positions = (cache["index"] + jnp.arange(t, dtype=jnp.int32))[None]
    logits, cache = self.model.module.apply({"params": params}, tokens, positions=positions,
                                            cache=cache, decode=True, last_logits_only=True)
    return logits[:, -1], cache

  # ------------------------------------------------------------------ public interface

  def stalled_for(self) -> float:
    """Seconds since the loop last finished an iteration while it has work (0 when idle)."""
    if not (self._pending or self._prefill is not None or any(self._active)):
      return 0.0
    return time.perf_counter() - self._last_progress

  def stats(self) -> dict:
    """Slots, active and waiting requests, steps and mean batch occupancy so far."""
    active = sum(r is not None for r in self._active)
    return {"slots": self.config.num_slots, "active": active,
            "pending": len(self._pending) + (self._prefill is not None),
            "steps": self.steps, "failures": self.failures,
            "mean_occupancy": self.occupied_slot_steps / max(1, self.steps * self.config.num_slots)}

  def warmup(self, prompt_lengths: list[int] | None = None) -> None:
    """Compiles the decode steps (one per KV read length) and the prefill pieces now, not on the
    first requests.

    prompt_lengths (with BOS): compile only the pieces these need; default every piece shape.
    """
    cfg = self.config
    if prompt_lengths is None:
      sizes = [cfg.prefill_chunk >> i for i in range(cfg.prefill_chunk.bit_length())]
      first = {t for t in sizes if t < cfg.max_len}
      more = {t for t in first if t <= self.continue_max}
    else:
      plans = [prefill_pieces(n, cfg.prefill_chunk, self.continue_max) for n in prompt_lengths]
      first = {p[0] for p in plans}
      more = {t for p in plans for t in p[1:]}
    for t in sorted(first):
      logits, cache = self._first(self.params, jnp.zeros((1, t), jnp.int32))
    for t in sorted(more):   # cache shapes do not depend on the piece that filled it
      self._extend(self.params, jnp.zeros((1, t), jnp.int32), cache)
    self._sample(logits, 0, 0, 0.0, 0, 1.0)
    self._slots = self._insert(self._slots, cache, 0)
    zeros = np.zeros((cfg.num_slots,), np.int32)
    no_out = np.zeros((cfg.num_slots, cfg.decode_steps), np.int32)
    for n, filtered in itertools.product(self.read_lengths, (False, True)):
      _, self._slots = self._decode(self._step_params, zeros, no_out, zeros.astype(bool),
                                    self._slots, zeros, zeros,
                                    zeros.astype(np.float32), zeros,
                                    np.ones_like(zeros, np.float32), zeros, zeros.astype(bool), n,
                                    filtered)
    jax.block_until_ready(self._slots)

  # ------------------------------------------------------------------ the loop

  def _loop(self) -> None:
    while True:
      with self._cv:
        while (not self._stopping and not self._pending and self._prefill is None
               and not any(self._active) and self._inflight is None):
          self._cv.wait()
        if self._stopping:
          break
      self._last_progress = time.perf_counter()   # idle time is no stall
      try:
        self._drop_cancelled()
        budget = self.config.prefill_chunk   # prefill tokens between two decode steps
        while budget > 0:
          done = self._advance_prefill()
          if not done:
            break
          budget -= done
        if any(self._active) or self._inflight is not None:
          self._decode_once()
      except Exception as e:  # pylint: disable=broad-except
        self._fail_all(e)
      self._last_progress = time.perf_counter()
    self._fail_all(EngineError(f"engine {self.name!r} stopped"))

  def _drop_cancelled(self) -> None:
    for i, r in enumerate(self._active):
      if r is not None and r.cancelled.is_set():
        self._finish(i, "cancelled")
    with self._cv:
      for r in [r for r in self._pending if r.cancelled.is_set()]:
        self._pending.remove(r)
        r.on_event(Event("done", finish_reason="cancelled", prompt_tokens=len(r.prompt_ids)))
    if self._prefill is not None and self._prefill[0].cancelled.is_set():
      r = self._prefill[0]
      self._prefill = None
      r.on_event(Event("done", finish_reason="cancelled", prompt_tokens=len(r.prompt_ids)))

  def _advance_prefill(self) -> int:
    """Runs one prefill piece of the oldest waiting request, if a slot is free for it.

    Returns the number of prompt tokens it ran (0: nothing to do).
    """
    if self._prefill is None:
      if None not in self._active:
        return 0
      with self._cv:
        if not self._pending:
          return 0
        r = self._pending.popleft()
      pieces = prefill_pieces(len(r.prompt_ids), self.config.prefill_chunk, self.continue_max)
      self._prefill = (r, None, pieces, 0)
    r, cache, pieces, done = self._prefill
    size = pieces[0]
    tokens = jnp.asarray(np.asarray(r.prompt_ids[done:done + size], np.int32)[None])
    if cache is None:
      logits, cache = self._first(self.params, tokens)
    else:
      logits, cache = self._extend(self.params, tokens, cache)
    pieces, done = pieces[1:], done + size
    if pieces:
      self._prefill = (r, cache, pieces, done)
      return size
    self._prefill = None
    p = r.params
    token = int(self._sample(logits, int(r.seed), 0, float(p.temperature), int(p.top_k),
                             float(p.top_p)))
    slot = self._active.index(None)
    self._slots = self._insert(self._slots, cache, slot)
    self._active[slot] = r
    self._emit(slot, token)
    return size

  def _decode_once(self) -> None:
    """Queues the next decode dispatch, then reads the one queued before it.

    Pipelined: the device runs dispatch k + 1 while the host reads dispatch k's tokens and hands
    them out, so the host's part of a dispatch is not device idle time. Dispatch k + 1 assumes
    every request still running in dispatch k emits all its decode_steps tokens there (the
    sampling steps and budgets count them); a request that ends in dispatch k (EOS, a stop
    sequence, its budget, a cancel) has its tokens from dispatch k + 1 dropped when they are read.
    """
    pending, self._inflight = self._inflight, None
    if any(self._active):
      self._inflight = self._dispatch(pending)
    if pending is not None:
      self._read(pending)

  def _dispatch(self, pending: _Dispatch | None) -> _Dispatch | None:
    """Queues decode_steps steps of the active slots (None when none has a token left)."""
    s, n = self.config.num_slots, self.config.decode_steps
    seeds, steps = np.zeros((s,), np.int32), np.zeros((s,), np.int32)
    temperature, top_p = np.zeros((s,), np.float32), np.ones((s,), np.float32)
    top_k, left = np.zeros((s,), np.int32), np.zeros((s,), np.int32)
    stop_at_eos, from_host = np.zeros((s,), bool), np.ones((s,), bool)
    need = 1   # cache positions [0, need) that the kept tokens attend to
    for i, r in enumerate(self._active):
      if r is None:
        continue
      continued = pending is not None and pending.requests[i] is r
      generated = len(r.generated) + (n if continued else 0)   # in flight counted
      from_host[i] = not continued
      seeds[i], steps[i] = r.seed, generated
      temperature[i], top_k[i], top_p[i] = r.params.temperature, r.params.top_k, r.params.top_p
      left[i] = max(0, min(r.params.max_tokens - generated,
                           self.config.max_len - len(r.prompt_ids) - generated))
      stop_at_eos[i] = not r.params.ignore_eos
      if left[i]:
        need = max(need, kv_positions_read(len(r.prompt_ids), generated, n, int(left[i])))
    if not left.any():
      return None
    read_len = pick_read_length(need, self.read_lengths)
    self.dispatches_by_read_length[read_len] += 1
    filtered = bool(np.any((temperature > 0) & ((top_k > 0) | (top_p < 1))))
    self.filtered_dispatches += filtered
    prev_out = pending.tokens if pending is not None else np.zeros((s, n), np.int32)
    # a copy: _read's _emit writes self._tokens while this dispatch may still be reading it
    tokens, self._slots = self._decode(self._step_params, self._tokens.copy(), prev_out, from_host,
                                       self._slots, seeds, steps, temperature, top_k, top_p,
                                       left, stop_at_eos, read_len, filtered)
    return _Dispatch(tokens, list(self._active))

  def _read(self, dispatch: _Dispatch) -> None:
    """Hands a dispatch's tokens to the requests that still hold their slots."""
    tokens = np.asarray(dispatch.tokens)
    self.steps += self.config.decode_steps
    self.occupied_slot_steps += int((tokens >= 0).sum())
    for i, r in enumerate(dispatch.requests):
      for token in tokens[i] if r is not None else ():
        if token < 0 or self._active[i] is not r:   # budget spent, EOS, a stop sequence, cancel
          break
        self._emit(i, int(token))

  def _emit(self, slot: int, token: int) -> None:
    """Hands a sampled token to its request; frees the slot when the request is finished."""
    r = self._active[slot]
    self._tokens[slot] = token
    if token == self.tokenizer.eos_id and not r.params.ignore_eos:
      self._finish(slot, "stop")
      return
    r.generated.append(token)
    text, stopped = r.text.push(token)
    # one event per token, also while the text stream holds back an incomplete character (text
    # ''): time to first token is the first event, whatever the tokenizer makes of it
    r.on_event(Event("token", text=text, prompt_tokens=len(r.prompt_ids),
                     completion_tokens=len(r.generated)))
    if stopped:
      self._finish(slot, "stop")
    elif (len(r.generated) >= r.params.max_tokens
          or len(r.prompt_ids) + len(r.generated) >= self.config.max_len):
      self._finish(slot, "length")

  def _finish(self, slot: int, reason: str) -> None:
    r = self._active[slot]
    self._active[slot] = None
    tail = "" if reason == "cancelled" else r.text.flush()
    r.on_event(Event("done", text=tail, finish_reason=reason, prompt_tokens=len(r.prompt_ids),
                     completion_tokens=len(r.generated)))

  def _fail_all(self, error: BaseException) -> None:
    """Every running or waiting request gets an 'error' event; the slots are freed."""
    if not isinstance(error, EngineError):
      self.failures += 1
      self.last_failure = time.time()
      self.last_error = f"{type(error).__name__}: {error}"
      error = EngineError(f"model {self.name!r} failed: {self.last_error}")
    victims = [r for r in self._active if r is not None]
    self._active = [None] * self.config.num_slots
    self._inflight = None
    if self._prefill is not None:
      victims.append(self._prefill[0])
      self._prefill = None
    with self._cv:
      victims += list(self._pending)
      self._pending.clear()
    for r in victims:
      r.on_event(Event("error", error=error, prompt_tokens=len(r.prompt_ids),
                       completion_tokens=len(r.generated)))
    if any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(self._slots)):
      one = self.model.init_cache(1, self.config.max_len)   # a failed donated step lost them
      self._slots = jax.tree.map(
          lambda a: jnp.broadcast_to(a, (self.config.num_slots,) + a.shape), one)


@dataclasses.dataclass
class _Dispatch:
  """A queued decode dispatch: its tokens `[S, decode_steps]` (a device array until read) and
  the request each slot held when it was queued."""
  tokens: Any
  requests: list


def _insert_slot(slots, cache, slot):
  """Writes a batch-1 cache into slot `slot` of the stacked slot caches."""
  return jax.tree.map(lambda big, one: big.at[slot].set(one), slots, cache)


def _sample_one(logits, seed, step, temperature, top_k, top_p):
  """logits `[1, V]` -> token id (scalar), with one request's parameters."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  return sample_tokens(logits, key[None], jnp.reshape(temperature, (1,)).astype(jnp.float32),
                       jnp.reshape(top_k, (1,)).astype(jnp.int32),
                       jnp.reshape(top_p, (1,)).astype(jnp.float32))[0]

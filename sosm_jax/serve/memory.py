"""Batch-1 generation with host memory beyond the window, for checkpoints trained with it.

The serving engine (engine.py) decodes within one window and batches requests; a checkpoint
trained with `config.memory.enabled` reads the windows before the current one through a host
FAISS memory. `MemoryGenerator` generates for one prompt at a time with
`SegmentRunner.stream` (sosm_jax/memory/segments.py): the prompt's whole windows fill the
memory, the last one is prefilled, and decoding moves to a fresh window (its predecessor stored)
whenever one is full. The window is the trained length. Used by `launch/generate.py`
(`--memory=auto|on|off`), and by the server through `MemoryEngine`: the engine's interface
(submit, cancel, health, stats) over one MemoryGenerator, requests one at a time in arrival
order (no batching: each request's memory is its own stream).

  gen = MemoryGenerator(loading.load_for_eval(workdir))
  for event in gen.events("Once upon a time", SamplingParams(max_tokens=64, temperature=0)):
    print(event.text, end="")
"""
from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Iterator

import jax

from sosm_jax.eval.memory import make_runner, memory_window
from sosm_jax.serve.engine import (EngineConfig, EngineError, Event, QueuedEngine, Request,
                                   SamplingParams)
from sosm_jax.serve.text import TextStream, prompt_ids


class MemoryGenerator:
  """Generation with host memory for a loaded checkpoint (eval/loading.py `LoadedModel`).

  window: tokens per window (default: the trained length). add_bos: prepend BOS to prompts.
  """

  def __init__(self, loaded, *, window: int = 0, add_bos: bool = True):
    self.params, self.tokenizer = loaded.params, loaded.tokenizer
    self.window = int(window or memory_window(loaded.config))
    self.add_bos = add_bos
    self.runner = make_runner(loaded.model, loaded.config, 1)

  def encode(self, prompt: str | list[int]) -> list[int]:
    """Prompt text (or ids) -> ids with BOS first (when add_bos), as the engine does."""
    return prompt_ids(self.tokenizer, prompt, self.add_bos)

  @staticmethod
  def check(params: SamplingParams) -> None:
    """ValueError naming a bad parameter, or top_k, which this path does not implement."""
    params.check()
    if params.top_k:
      raise ValueError(f"top_k={params.top_k}: generation with host memory samples with "
                       f"temperature and top_p only; drop top_k (or generate with --memory=off)")

  def tokens(self, ids: list[int], params: SamplingParams) -> Iterator[int]:
    """Generated ids after prompt `ids` (any length): up to max_tokens, ending before EOS
    (unless ignore_eos). Sampling: temperature (0 = greedy), top_p, seed (None = random).
    """
    self.check(params)
    if params.max_tokens == 0:
      return
    seed = params.seed if params.seed is not None else secrets.randbits(31)
    stream = self.runner.stream(self.params, [ids], self.window, params.max_tokens,
                                rng=jax.random.key(seed), temperature=params.temperature,
                                top_p=params.top_p)
    for token in stream:
      token = int(token[0])
      if token == self.tokenizer.eos_id and not params.ignore_eos:
        return
      yield token

  def events(self, prompt: str | list[int], params: SamplingParams) -> Iterator[Event]:
    """A 'token' event per generated token (its new text, '' while held back), then one 'done'
    (as the engine's)."""
    ids = self.encode(prompt)
    text = TextStream(self.tokenizer, params.stop)
    count, reason = 0, "length"
    for token in self.tokens(ids, params):
      count += 1
      piece, stopped = text.push(token)
      yield Event("token", text=piece, prompt_tokens=len(ids), completion_tokens=count)
      if stopped:
        reason = "stop"
        break
    else:
      if count < params.max_tokens:
        reason = "stop"     # EOS
    yield Event("done", text=text.flush(), finish_reason=reason, prompt_tokens=len(ids),
                completion_tokens=count)


class MemoryEngine(QueuedEngine):
  """`engine.Engine`'s interface for a checkpoint served with its host memory (module doc).

  One thread runs the requests in arrival order, each to its end (no continuous batching: the
  generator holds one stream's memory). config: its max_len bounds prompt + generated tokens,
  add_bos as the engine's; the slot, prefill and cache settings do not apply.
  """

  def __init__(self, loaded, config: EngineConfig = EngineConfig(), *, name: str = "model",
               window: int = 0):
    config.check()
    if config.kv_cache_dtype:
      raise ValueError("kv_cache_dtype is for the engine without host memory; serve this "
                       "checkpoint with memory 'off' to use it")
    super().__init__(loaded.tokenizer, config, name)
    self.generator = MemoryGenerator(loaded, window=window, add_bos=config.add_bos)
    self._current: Request | None = None
    self._current_tokens = 0       # the running request's generated tokens so far

  def check(self, params: SamplingParams) -> None:
    self.generator.check(params)   # top_k is refused on this path

  def stalled_for(self) -> float:
    """Seconds since the last generated token while a request runs or waits (0 when idle)."""
    if self._current is None and not self._pending:
      return 0.0
    return time.perf_counter() - self._last_progress

  def stats(self) -> dict:
    return {"slots": 1, "active": int(self._current is not None), "pending": len(self._pending),
            "steps": self.steps, "failures": self.failures,
            "mean_occupancy": 1.0 if self.steps else 0.0}   # its one stream, whenever it ran

  def warmup(self) -> None:
    """Compiles what a request past one window runs: a full window's prefill, then decoding."""
    ids = [self.tokenizer.bos_id] * (self.generator.window + 2)
    list(self.generator.tokens(ids, SamplingParams(max_tokens=2, temperature=0.0,
                                                   ignore_eos=True)))

  def _loop(self) -> None:
    while True:
      with self._cv:
        while not self._stopping and not self._pending:
          self._cv.wait()
        if self._stopping:
          break
        self._current = self._pending.popleft()
      self._last_progress = time.perf_counter()
      try:
        self._run(self._current)
      except Exception as e:  # pylint: disable=broad-except
        self.failures += 1
        self.last_failure = time.time()
        self.last_error = f"{type(e).__name__}: {e}"
        r = self._current
        r.on_event(Event("error", error=EngineError(f"model {self.name!r} failed: "
                                                    f"{self.last_error}"),
                         prompt_tokens=len(r.prompt_ids), completion_tokens=self._current_tokens))
      self._current, self._current_tokens = None, 0
    stopped = EngineError(f"engine {self.name!r} stopped")
    with self._cv:
      waiting = list(self._pending)
      self._pending.clear()
    for r in waiting:
      r.on_event(Event("error", error=stopped, prompt_tokens=len(r.prompt_ids)))

  def _run(self, r: Request) -> None:
    """One request to its end: its events as they come; cancelled between two of them."""
    if r.cancelled.is_set():   # cancelled while it waited: skip its prefill
      r.on_event(Event("done", finish_reason="cancelled", prompt_tokens=len(r.prompt_ids)))
      return
    room = self.config.max_len - len(r.prompt_ids)
    params = dataclasses.replace(r.params, max_tokens=min(r.params.max_tokens, room))
    counted = 0
    for event in self.generator.events(r.prompt_ids, params):
      if r.cancelled.is_set() or self._stopping:
        r.on_event(Event("done", finish_reason="cancelled", prompt_tokens=len(r.prompt_ids),
                         completion_tokens=counted))
        return
      self.steps += event.completion_tokens - counted
      counted = event.completion_tokens
      self._current_tokens = counted
      self._last_progress = time.perf_counter()
      r.on_event(event)

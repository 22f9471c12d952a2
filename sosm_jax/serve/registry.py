"""Model registry: several engines behind one interface, A/B routing, health, fallback.

A request names a model or takes the default route. The default route picks among the models
with an A/B weight > 0 (at random, in proportion to the weights; the default model alone when
no weight is set). A model whose health check fails (its engine thread is gone, or it failed
less than `cooldown_s` ago, or has had work but finished no step for `stall_s`) sends its new
requests to its fallback. When a request fails on a model (its engine step raised, or it was
not finished `deadline_s` after it reached the model) it is moved to the fallback model,
continuing from the text generated so far with the tokens it has left; every move is counted in
the metrics (`sosm_fallbacks`). A request is moved at most once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from typing import AsyncIterator

from sosm_jax.serve.engine import Event, QueuedEngine, SamplingParams
from sosm_jax.serve.metrics import ServeMetrics


class UnknownModelError(KeyError):
  """The request names a model that is not loaded."""

  def __str__(self):
    return str(self.args[0])


class ServeError(RuntimeError):
  """A request failed on its model and on its fallback (or had none). status: HTTP status."""

  def __init__(self, message: str, status: int = 503):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass
class ModelEntry:
  """One loaded model. weight: its share of the default route (A/B); fallback: a model name."""
  name: str
  engine: QueuedEngine
  fallback: str | None = None
  weight: float = 0.0
  info: dict = dataclasses.field(default_factory=dict)   # shown by /v1/models


class ModelRegistry:
  """Routing, health and fallback over named engines (module doc)."""

  def __init__(self, entries: list[ModelEntry], *, default: str | None = None,
               deadline_s: float = 300.0, cooldown_s: float = 30.0, stall_s: float = 60.0,
               metrics: ServeMetrics | None = None, seed: int | None = None):
    if not entries:
      raise ValueError("the registry needs at least one model")
    self.entries = {e.name: e for e in entries}
    if len(self.entries) != len(entries):
      raise ValueError(f"model names must be unique, got {[e.name for e in entries]}")
    self.default = default or entries[0].name
    for e in entries:
      if e.fallback is not None and e.fallback not in self.entries:
        raise ValueError(f"model {e.name!r}: fallback {e.fallback!r} is not loaded "
                         f"(loaded: {sorted(self.entries)})")
      if e.weight < 0:
        raise ValueError(f"model {e.name!r}: A/B weight must be >= 0, got {e.weight}")
    if self.default not in self.entries:
      raise ValueError(f"default model {self.default!r} is not loaded ({sorted(self.entries)})")
    self.deadline_s, self.cooldown_s, self.stall_s = deadline_s, cooldown_s, stall_s
    self.metrics = metrics
    self._random = random.Random(seed)

  def start(self) -> "ModelRegistry":
    for e in self.entries.values():
      e.engine.start()
    return self

  def stop(self) -> None:
    for e in self.entries.values():
      e.engine.stop()

  def route(self, requested: str | None) -> str:
    """The model that serves a request naming `requested` (None or 'default': the A/B route)."""
    if requested not in (None, "", "default"):
      if requested not in self.entries:
        raise UnknownModelError(f"model {requested!r} is not served here; available: "
                                f"{sorted(self.entries)} (or omit 'model' for the default)")
      return requested
    weighted = [(n, e.weight) for n, e in self.entries.items() if e.weight > 0]
    if not weighted:
      return self.default
    names, weights = zip(*weighted)
    return self._random.choices(names, weights)[0]

  def health(self, name: str) -> tuple[bool, str]:
    """(healthy, reason): the engine loop runs, has not failed in the last cooldown_s and has
    not been stuck in one step (with requests waiting) for stall_s."""
    engine = self.entries[name].engine
    if not engine.alive():
      return False, "engine loop is not running"
    if engine.stalled_for() > self.stall_s:
      return False, f"no step finished for {engine.stalled_for():.1f} s with requests waiting"
    if engine.last_failure is not None and time.time() - engine.last_failure < self.cooldown_s:
      return False, f"failed {time.time() - engine.last_failure:.1f} s ago: {engine.last_error}"
    return True, "ok"

  def open(self, requested: str | None, prompt: str, params: SamplingParams) -> "Completion":
    """Routes and submits a request (in the event loop's thread); streams through the result.

    Raises UnknownModelError or ValueError (bad parameters, prompt too long) before anything
    runs; ServeError when neither the model nor its fallback can take it.
    """
    name = self.route(requested)
    completion = Completion(self, prompt, params)
    healthy, reason = self.health(name)
    fallback = self.entries[name].fallback
    if not healthy and fallback is not None:
      self.count_fallback(name, fallback, "unhealthy")
      name = fallback
    elif not healthy:
      raise ServeError(f"model {name!r} is unhealthy ({reason}) and has no fallback")
    completion.submit(name)
    return completion

  def count_fallback(self, src: str, dst: str, reason: str) -> None:
    if self.metrics is not None:
      self.metrics.fallbacks.labels(src, dst, reason).inc()


class Completion:
  """One request's run: events of the serving model, moved to the fallback on failure."""

  def __init__(self, registry: ModelRegistry, prompt: str, params: SamplingParams):
    self.registry, self.prompt, self.params = registry, prompt, params
    self.loop = asyncio.get_running_loop()
    self.model: str = ""
    self.moved_from: str | None = None
    self.text = ""
    self.prompt_tokens = 0
    self.completion_tokens = 0
    self.start = time.perf_counter()
    self._handle = None
    self._queue: asyncio.Queue | None = None
    self._deadline = 0.0
    self._last_piece: float | None = None
    self._tokens_at_move = 0

  def submit(self, name: str) -> None:
    """Submits the request (continuing from self.text) to model `name`."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = self.loop

    def on_event(event: Event) -> None:   # runs in the engine thread
      try:
        loop.call_soon_threadsafe(queue.put_nowait, event)
      except RuntimeError:   # the event loop is gone (server shutting down): nobody listens
        pass

    params = dataclasses.replace(self.params,
                                 max_tokens=self.params.max_tokens - self.completion_tokens)
    engine = self.registry.entries[name].engine
    self._handle = engine.submit(self.prompt + self.text, params, on_event)
    self._queue, self.model = queue, name
    self._deadline = time.perf_counter() + self.registry.deadline_s

  def cancel(self) -> None:
    if self._handle is not None:
      self._handle.cancel()

  async def events(self) -> AsyncIterator[Event]:
    """'token' events, then one 'done' (ServeError when the request cannot be completed)."""
    metrics = self.registry.metrics
    while True:
      try:
        timeout = max(0.0, self._deadline - time.perf_counter())
        event = await asyncio.wait_for(self._queue.get(), timeout)
        reason = "error" if event.kind == "error" else None
      except asyncio.TimeoutError:
        event, reason = None, "deadline"
      if reason is None:
        self._observe(event)
        yield event
        if event.kind == "done":
          return
        continue
      self._handle.cancel()
      if metrics is not None:
        metrics.errors.labels(self.model, reason).inc()
      message = (f"model {self.model!r}: not finished within the {self.registry.deadline_s} s "
                 f"deadline" if event is None else str(event.error))
      fallback = self.registry.entries[self.model].fallback
      if fallback is None or self.moved_from is not None:
        status = 504 if event is None else 503
        raise ServeError(message, status)
      self.registry.count_fallback(self.model, fallback, reason)
      self.moved_from = self.model
      self._tokens_at_move = self.completion_tokens
      try:
        self.submit(fallback)
      except ValueError as e:   # e.g. prompt + text so far too long for the fallback model
        raise ServeError(f"{message}; the fallback model {fallback!r} refused the rest: {e}",
                         503) from e

  def _observe(self, event: Event) -> None:
    now = time.perf_counter()
    if self.moved_from is None:   # after a move the fallback's prompt includes earlier text
      self.prompt_tokens = event.prompt_tokens
    self.completion_tokens = self._tokens_at_move + event.completion_tokens
    metrics = self.registry.metrics
    if event.kind == "token":   # one per sampled token (its text may be '')
      if metrics is not None:
        if self._last_piece is None:
          metrics.ttft.labels(self.model).observe(now - self.start)
        else:
          metrics.token_latency.labels(self.model).observe(now - self._last_piece)
      self._last_piece = now
    self.text += event.text
    if event.kind == "done" and metrics is not None:
      metrics.tokens_in.labels(self.model).inc(self.prompt_tokens)
      metrics.tokens_out.labels(self.model).inc(self.completion_tokens)
      metrics.request_latency.labels(self.model).observe(now - self.start)

"""HTTP app (FastAPI): OpenAI-compatible /v1/completions with SSE streaming, /v1/models, /health,
/metrics.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: a malformed body or
a bad field is 400, an unknown model 404, a model that failed together with its fallback 503
(504 past the deadline). A bad request is refused before it reaches an engine, so it disturbs
no other request. A client that disconnects cancels its request, which frees its slot at the
engine's next step.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import fastapi
from fastapi import responses
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sosm_jax.serve.engine import SamplingParams
from sosm_jax.serve.metrics import ServeMetrics
from sosm_jax.serve.registry import ModelRegistry, ServeError, UnknownModelError

# How often a waiting non-streaming request checks whether its client is still there.
_DISCONNECT_POLL_S = 0.25


class CompletionRequest(BaseModel):
  """The body of POST /v1/completions (OpenAI's fields that this server implements).

  Extensions: top_k, ignore_eos. Unknown fields are ignored, as OpenAI clients send many;
  logprobs, echo and best_of > 1, which would change the answer's meaning, are refused.
  """
  model_config = ConfigDict(extra="ignore")
  model: str | None = None
  prompt: str | list[str]
  max_tokens: int = Field(16, ge=0)
  temperature: float = Field(1.0, ge=0.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=0)
  seed: int | None = Field(None, ge=0, lt=2**31)
  stop: str | list[str] | None = None
  stream: bool = False
  n: int = Field(1, ge=1, le=1)
  ignore_eos: bool = False
  logprobs: int | None = None
  echo: bool = False
  best_of: int | None = None

  @model_validator(mode="after")
  def _supported(self):
    if self.logprobs or self.echo or (self.best_of or 1) > 1:
      raise ValueError("logprobs, echo and best_of > 1 are not supported by this server")
    return self

  def text(self) -> str:
    if isinstance(self.prompt, str):
      return self.prompt
    if len(self.prompt) != 1:
      raise ValueError(f"prompt: one prompt per request, got a list of {len(self.prompt)}")
    return self.prompt[0]

  def sampling(self) -> SamplingParams:
    stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
    return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                          top_k=self.top_k, top_p=self.top_p, seed=self.seed, stop=stop,
                          ignore_eos=self.ignore_eos)


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> responses.JSONResponse:
  return responses.JSONResponse(
      {"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
  first = exc.errors()[0] if exc.errors() else {}
  if first.get("type") == "json_invalid":
    return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
  loc = [str(x) for x in first.get("loc", ()) if x != "body"]
  param = loc[0] if loc else None   # the field (deeper parts name a member of a union type)
  return f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}", param


def create_app(registry: ModelRegistry, metrics: ServeMetrics | None = None) -> fastapi.FastAPI:
  """The app over a started registry (its metrics, if any, are the registry's)."""
  metrics = metrics or registry.metrics
  app = fastapi.FastAPI(title="sosm_jax server")
  created = int(time.time())

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, exc):   # pylint: disable=unused-argument
    message, param = _validation_message(exc)
    if metrics is not None:
      metrics.requests.labels("none", "invalid").inc()
    return error_response(400, message, param=param)

  @app.get("/health")
  async def health():
    models = {}
    for name in registry.entries:
      ok, reason = registry.health(name)
      models[name] = {"healthy": ok, "reason": reason, **registry.entries[name].engine.stats()}
    ok = registry.health(registry.default)[0] or any(m["healthy"] for m in models.values())
    return responses.JSONResponse({"status": "ok" if ok else "unhealthy",
                                   "default": registry.default, "models": models},
                                  200 if ok else 503)

  @app.get("/v1/models")
  async def list_models():
    data = []
    for name, e in registry.entries.items():
      data.append({"id": name, "object": "model", "created": created, "owned_by": "sosm_jax",
                   "default": name == registry.default, "fallback": e.fallback,
                   "ab_weight": e.weight, "max_len": e.engine.config.max_len, **e.info})
    return {"object": "list", "data": data}

  @app.get("/metrics")
  async def prometheus_metrics():
    if metrics is None:
      return error_response(404, "metrics are not enabled on this server", "not_found")
    metrics.observe_engines(registry)
    body, content_type = metrics.render()
    return fastapi.Response(body, media_type=content_type)

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest, request: fastapi.Request):
    try:
      completion = registry.open(body.model, body.text(), body.sampling())
    except UnknownModelError as e:
      _count(metrics, "none", "invalid")
      return error_response(404, str(e), param="model", code="model_not_found")
    except ValueError as e:
      _count(metrics, "none", "invalid")
      return error_response(400, str(e))
    except ServeError as e:
      _count(metrics, "none", "error")
      return error_response(e.status, str(e), "server_error")
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    if body.stream:
      return responses.StreamingResponse(_sse(completion, rid, created, metrics),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
    return await _whole(completion, request, rid, metrics)

  return app


def _count(metrics, model: str, outcome: str) -> None:
  if metrics is not None:
    metrics.requests.labels(model, outcome).inc()


def _chunk(rid, created, model, text, finish_reason=None, usage=None) -> dict:
  out = {"id": rid, "object": "text_completion", "created": created, "model": model,
         "choices": [{"text": text, "index": 0, "logprobs": None,
                      "finish_reason": finish_reason}]}
  if usage is not None:
    out["usage"] = usage
  return out


def _usage(completion) -> dict:
  return {"prompt_tokens": completion.prompt_tokens,
          "completion_tokens": completion.completion_tokens,
          "total_tokens": completion.prompt_tokens + completion.completion_tokens}


async def _whole(completion, request, rid, metrics):
  """Runs a request to the end; cancels it when the client goes away."""
  events = completion.events()
  finish = None
  try:
    while finish is None:
      task = asyncio.ensure_future(events.__anext__())
      while not task.done():
        await asyncio.wait([task], timeout=_DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
          task.cancel()
          completion.cancel()
          _count(metrics, completion.model, "cancelled")
          return fastapi.Response(status_code=499)
      event = task.result()
      if event.kind == "done":
        finish = event.finish_reason
  except ServeError as e:
    _count(metrics, completion.model, "error")
    return error_response(e.status, str(e), "server_error")
  _count(metrics, completion.model, "ok")
  headers = {"x-sosm-fallback-from": completion.moved_from} if completion.moved_from else {}
  return responses.JSONResponse(
      _chunk(rid, int(time.time()), completion.model, completion.text, finish,
             _usage(completion)), headers=headers)


async def _sse(completion, rid, created, metrics):
  """Server-sent events: one chunk per text piece, a last chunk with finish_reason, [DONE]."""
  outcome = "cancelled"
  try:
    async for event in completion.events():
      if event.text or event.kind == "done":
        usage = _usage(completion) if event.kind == "done" else None
        reason = event.finish_reason if event.kind == "done" else None
        chunk = _chunk(rid, created, completion.model, event.text, reason, usage)
        yield f"data: {json.dumps(chunk)}\n\n"
    outcome = "ok"
  except ServeError as e:
    outcome = "error"
    err = {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
    yield f"data: {json.dumps(err)}\n\n"
  finally:
    if outcome == "cancelled":   # the client went away (the generator was closed)
      completion.cancel()
    _count(metrics, completion.model, outcome)
  yield "data: [DONE]\n\n"

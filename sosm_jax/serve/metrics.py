"""Prometheus metrics of the server (one `CollectorRegistry` per app, rendered at /metrics)."""
from __future__ import annotations

import prometheus_client as prom

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0)


class ServeMetrics:
  """Counters, histograms and gauges of the serving path, all labelled by model name.

  Gauges of the engines (batch occupancy, waiting requests) are read from `Engine.stats()` when
  /metrics is scraped (`observe_engines`).
  """

  def __init__(self):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter("sosm_requests", "Completion requests by model and outcome.",
                                 ["model", "outcome"], registry=r)
    self.tokens_in = prom.Counter("sosm_prompt_tokens", "Prompt tokens read.", ["model"],
                                  registry=r)
    self.tokens_out = prom.Counter("sosm_completion_tokens", "Tokens generated.", ["model"],
                                   registry=r)
    self.ttft = prom.Histogram("sosm_time_to_first_token_seconds",
                               "From request arrival to its first generated text.", ["model"],
                               buckets=_LATENCY_BUCKETS, registry=r)
    self.token_latency = prom.Histogram("sosm_inter_token_latency_seconds",
                                        "Time between two streamed pieces of one request.",
                                        ["model"], buckets=_LATENCY_BUCKETS, registry=r)
    self.request_latency = prom.Histogram("sosm_request_seconds", "Whole request time.",
                                          ["model"], buckets=_LATENCY_BUCKETS, registry=r)
    self.fallbacks = prom.Counter("sosm_fallbacks", "Requests moved to a fallback model.",
                                  ["from_model", "to_model", "reason"], registry=r)
    self.errors = prom.Counter("sosm_errors", "Errors by model and kind.", ["model", "kind"],
                               registry=r)
    self.occupancy = prom.Gauge("sosm_batch_occupancy",
                                "Fraction of decode slots holding a request (now).", ["model"],
                                registry=r)
    self.mean_occupancy = prom.Gauge("sosm_batch_occupancy_mean",
                                     "Mean fraction of slots in use over all decode steps.",
                                     ["model"], registry=r)
    self.waiting = prom.Gauge("sosm_waiting_requests", "Requests waiting for a slot or prefill.",
                              ["model"], registry=r)
    self.healthy = prom.Gauge("sosm_model_healthy", "1 when the model passes its health check.",
                              ["model"], registry=r)

  def observe_engines(self, registry) -> None:
    """Sets the gauges from each model's engine (called at scrape time)."""
    for name, entry in registry.entries.items():
      stats = entry.engine.stats()
      self.occupancy.labels(name).set(stats["active"] / stats["slots"])
      self.mean_occupancy.labels(name).set(stats["mean_occupancy"])
      self.waiting.labels(name).set(stats["pending"])
      self.healthy.labels(name).set(1.0 if registry.health(name)[0] else 0.0)

  def render(self) -> tuple[bytes, str]:
    """(body, content type) of the text exposition format."""
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST

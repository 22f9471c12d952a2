"""lm-evaluation-harness on a sosm_jax checkpoint: the model 'sosm_jax' for `lm_eval`.

Needs the `eval` extra (`pip install -e ".[eval]"`: lm-eval, no torch). Importing this module
registers the model; lm-eval's own `lm_eval` command cannot see models of other packages, so the
command line goes through launch/lm_harness.py, which is that command with the model registered:

  python launch/lm_harness.py run --model sosm_jax --model_args workdir=DIR,max_length=4096 \
      --tasks lambada_openai,hellaswag --batch_size 8 --output_path results/
  # from Python
  import lm_eval
  from sosm_jax.eval import lm_harness                    # registers 'sosm_jax'
  lm_eval.simple_evaluate(model="sosm_jax", model_args="workdir=DIR", tasks=[...])
  lm_eval.simple_evaluate(model=lm_harness.SosmJaxLM(workdir="DIR"), tasks=[...])

model_args: workdir (required), step (default: newest checkpoint), max_length (tokens the model
sees, default: the longest trained length), max_gen_toks (tokens generated when a task does not
say; default 256 or half of max_length if less), prefill_chunk (the
generation engine's longest prefill piece, default 512). lm-eval's --batch_size is the number
of rows per forward pass and of requests generated together ('auto' means 8).

How each request type is computed (the checkpoint's own tokenizer; BOS starts every row):
- loglikelihood(context, continuation): one forward pass of [BOS] + context + continuation
  (cut on the left to max_length + 1 tokens); the sum of the continuation tokens' log-probs and
  whether each of them is the argmax (is_greedy). Rows are batched, right-padded to a power of
  two (causal models: padding changes nothing before it).
- loglikelihood_rolling(text): lm-eval's disjoint rolling windows of max_length tokens, BOS first;
  the sum over windows.
- generate_until(context, gen_kwargs): the serving engine (sosm_jax/serve/engine.py: exact chunked
  prefill, recurrent state / KV cache decode), greedy unless do_sample; stops at EOS, at the first
  of `until` (cut from the text) or after max_gen_toks; the context keeps its last
  max_length - max_gen_toks tokens. Host memory (FAISS) is not used.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from sosm_jax.eval import loading, scoring
from sosm_jax.serve import engine as engine_lib

DEFAULT_BATCH_SIZE = 8
_log = logging.getLogger(__name__)


def pad_length(n: int, cap: int, minimum: int = 16) -> int:
  """The row length a row of n tokens is padded to: the next power of two (>= minimum), at most
  cap (so that a grid of request lengths compiles a few shapes)."""
  return min(cap, max(minimum, 1 << max(0, n - 1).bit_length()))


def rows_batch(rows: list[tuple[list[int], int]], length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Rows (tokens [n + 1], number of scored tokens at the end) -> a scorer batch `[rows, length]`.

  inputs = tokens[:-1], targets = tokens[1:], right-padded; loss_mask marks the scored targets.
  """
  b = len(rows)
  inputs = np.full((b, length), pad_id, np.int32)
  targets = np.full((b, length), pad_id, np.int32)
  mask = np.zeros((b, length), np.float32)
  for i, (tokens, scored) in enumerate(rows):
    n = len(tokens) - 1
    if n > length or scored > n:
      raise ValueError(f"row of {n} inputs with {scored} scored tokens does not fit length {length}")
    inputs[i, :n], targets[i, :n] = tokens[:-1], tokens[1:]
    mask[i, n - scored:n] = 1.0
  return {"inputs": inputs, "targets": targets, "loss_mask": mask,
          "segment_ids": np.ones((b, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()}


def _batch_size(value) -> int:
  if value is None or (isinstance(value, str) and value.startswith("auto")):
    return DEFAULT_BATCH_SIZE
  try:
    size = int(value)
  except ValueError:
    raise ValueError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
  if size < 1:
    raise ValueError(f"batch_size must be a positive integer or 'auto', got {value!r}")
  return size


@register_model("sosm_jax")
class SosmJaxLM(LM):
  """An lm-eval LM over a checkpoint in a training work directory (see the module doc)."""

  def __init__(self, workdir: str, step: int | None = None, max_length: int = 0,
               max_gen_toks: int = 0, prefill_chunk: int = 512, batch_size=DEFAULT_BATCH_SIZE,
               max_batch_size=None, device=None, **unknown: Any):
    super().__init__()
    # Batches are fixed-size (one compiled shape per length); JAX places the model on its
    # default device (choose with JAX_PLATFORMS / CUDA_VISIBLE_DEVICES), whatever --device says.
    del max_batch_size, device
    if unknown:
      raise ValueError(f"unknown model_args {sorted(unknown)} for model 'sosm_jax'; it takes "
                       f"workdir, step, max_length, max_gen_toks, prefill_chunk")
    self.loaded = loading.load_for_eval(workdir, step=None if step is None else int(step))
    self.tokenizer = self.loaded.tokenizer
    trained = int(max(self.loaded.config.curriculum.seq_lens))
    self.max_length = int(max_length) or trained
    self.max_gen_toks = int(max_gen_toks) or min(256, self.max_length // 2)
    if not 0 < self.max_gen_toks < self.max_length:
      raise ValueError(f"max_gen_toks ({self.max_gen_toks}) must be in [1, max_length "
                       f"({self.max_length})); raise max_length or lower max_gen_toks")
    self.prefill_chunk = int(prefill_chunk)
    self.batch_size = _batch_size(batch_size)
    self._scorer = scoring.model_scorer(self.loaded.model, self.loaded.params,
                                        batch_size=self.batch_size)

  # ------------------------------------------------------------------ tokens

  def encode(self, text: str) -> list[int]:
    return [int(t) for t in self.tokenizer.encode(text)]

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): trailing spaces of the context move to the
    continuation, and the pair is tokenized together where the tokenizer allows it."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = self.encode(context) if context else []
    whole = self.encode(context + continuation)
    if whole[:len(ctx)] == ctx:
      return ctx, whole[len(ctx):]
    return ctx, self.encode(continuation)

  # ------------------------------------------------------------------ scoring

  def score_rows(self, rows: list[tuple[list[int], int]],
                 desc: str = "") -> list[tuple[float, bool]]:
    """Rows (tokens with BOS, scored tokens at the end) -> (sum of their log-probs, all argmax).

    Longest rows first, `batch_size` rows per forward pass at a padded power-of-two length.
    """
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    starts = range(0, len(order), self.batch_size)
    for start in tqdm(starts, desc=desc or "sosm_jax scoring", disable=len(starts) < 2):
      idx = order[start:start + self.batch_size]
      length = pad_length(max(len(rows[i][0]) - 1 for i in idx), self.max_length)
      batch = rows_batch([rows[i] for i in idx], length, self.tokenizer.pad_id)
      scores = self._scorer(batch)
      hits = scores.pred == batch["targets"]
      for j, i in enumerate(idx):
        m = batch["loss_mask"][j] > 0
        results[i] = (float(-scores.nll[j][m].astype(np.float64).sum()), bool(hits[j][m].all()))
    return results

  def context_row(self, ctx: list[int], cont: list[int]) -> tuple[list[int], int]:
    """[BOS] + ctx + cont cut on the left to max_length + 1 tokens; scored = len(cont) (capped)."""
    tokens = [self.tokenizer.bos_id] + ctx + cont
    tokens = tokens[-(self.max_length + 1):]
    return tokens, min(len(cont), len(tokens) - 1)

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    rows, empty = [], []
    for r in requests:
      context, continuation = r.args
      ctx, cont = self.encode_pair(context, continuation)
      if not cont:
        empty.append(len(rows))
      rows.append(self.context_row(ctx, cont))
    skip = set(empty)
    keep = [i for i in range(len(rows)) if i not in skip]
    scored = self.score_rows([rows[i] for i in keep], "loglikelihood")
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    for i, s in zip(keep, scored):
      out[i] = s
    for r, s in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", r.args, s)
    return out

  def loglikelihood_rolling(self, requests) -> list[float]:
    rows, owner = [], []
    for k, r in enumerate(requests):
      (text,) = r.args[:1]
      windows = get_rolling_token_windows(self.encode(text), prefix_token=self.tokenizer.bos_id,
                                          max_seq_len=self.max_length, context_len=1)
      for ctx, pred in map(make_disjoint_window, windows):
        rows.append((list(ctx) + list(pred), len(pred)))
        owner.append(k)
    totals = [0.0] * len(requests)
    for k, (logprob, _) in zip(owner, self.score_rows(rows, "loglikelihood_rolling")):
      totals[k] += logprob
    for r, t in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", r.args, t)
    return totals

  # ------------------------------------------------------------------ generation

  def sampling_params(self, gen_kwargs: dict) -> engine_lib.SamplingParams:
    """lm-eval's gen_kwargs -> the engine's SamplingParams (greedy unless do_sample)."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
    params = engine_lib.SamplingParams(
        max_tokens=int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
        temperature=temperature if do_sample else 0.0,
        top_k=int(kwargs.pop("top_k", 0) or 0), top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
        seed=int(kwargs.pop("seed", 0) or 0), stop=tuple(s for s in until if s))
    if kwargs:
      _log.warning("sosm_jax: ignoring generation arguments %s (the engine takes until, "
                   "max_gen_toks, do_sample, temperature, top_k, top_p, seed)", sorted(kwargs))
    return params

  def generate_until(self, requests) -> list[str]:
    if not requests:
      return []
    params = [self.sampling_params(r.args[1]) for r in requests]
    prompts = []
    for r, p in zip(requests, params):
      if p.max_tokens >= self.max_length:
        raise ValueError(f"max_gen_toks {p.max_tokens} leaves no room for a context in "
                         f"max_length {self.max_length}; raise max_length")
      ids = [self.tokenizer.bos_id] + self.encode(r.args[0])
      keep = self.max_length - p.max_tokens
      prompts.append(ids if len(ids) <= keep else [ids[0]] + ids[len(ids) - keep + 1:])
    max_len = max(len(ids) + p.max_tokens for ids, p in zip(prompts, params))
    config = engine_lib.EngineConfig(num_slots=min(self.batch_size, len(requests)),
                                     max_len=max_len, prefill_chunk=self.prefill_chunk)
    engine = engine_lib.Engine(self.loaded.model, self.loaded.params, self.tokenizer, config,
                               name="sosm_jax").start()
    texts = [""] * len(requests)
    done = [threading.Event() for _ in requests]
    errors: list[BaseException] = []

    def listener(i):
      def on_event(event):
        texts[i] += event.text
        if event.kind == "error":
          errors.append(event.error)
        if event.kind in ("done", "error"):
          done[i].set()
      return on_event

    try:
      for i, (ids, p) in enumerate(zip(prompts, params)):
        engine.submit(ids, p, listener(i))
      for i in tqdm(range(len(requests)), desc="generate_until", disable=len(requests) < 2):
        done[i].wait()
        if errors:
          raise errors[0]
    finally:
      engine.stop()
    for r, t in zip(requests, texts):
      self.cache_hook.add_partial("generate_until", r.args, t)
    return texts

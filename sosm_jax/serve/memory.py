"""Batch-1 generation with host memory beyond the window, for checkpoints trained with it.

The serving engine (engine.py) decodes within one window and batches requests; a checkpoint
trained with `config.memory.enabled` reads the windows before the current one through a host
FAISS memory. `MemoryGenerator` generates for one prompt at a time with
`SegmentRunner.stream` (sosm_jax/memory/segments.py): the prompt's whole windows fill the
memory, the last one is prefilled, and decoding moves to a fresh window (its predecessor stored)
whenever one is full. The window is the trained length. Used by `launch/generate.py`
(`--memory=auto|on|off`).

  gen = MemoryGenerator(loading.load_for_eval(workdir))
  for event in gen.events("Once upon a time", SamplingParams(max_tokens=64, temperature=0)):
    print(event.text, end="")
"""
from __future__ import annotations

import secrets
from typing import Iterator

import jax

from sosm_jax.eval.memory import make_runner, memory_window
from sosm_jax.serve.engine import Event, SamplingParams
from sosm_jax.serve.text import TextStream


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
    ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if self.add_bos and (not ids or ids[0] != self.tokenizer.bos_id):
      ids = [self.tokenizer.bos_id] + ids
    return ids

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
    """'token' events with new text as it is generated, then one 'done' (as the engine's)."""
    ids = self.encode(prompt)
    text = TextStream(self.tokenizer, params.stop)
    count, reason = 0, "length"
    for token in self.tokens(ids, params):
      count += 1
      piece, stopped = text.push(token)
      if piece:
        yield Event("token", text=piece, prompt_tokens=len(ids), completion_tokens=count)
      if stopped:
        reason = "stop"
        break
    else:
      if count < params.max_tokens:
        reason = "stop"     # EOS
    yield Event("done", text=text.flush(), finish_reason=reason, prompt_tokens=len(ids),
                completion_tokens=count)

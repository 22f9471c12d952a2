"""Incremental detokenization with stop sequences: token ids in, text deltas out."""
from __future__ import annotations

_REPLACEMENT = "\ufffd"


def prompt_ids(tokenizer, prompt: str | list[int], add_bos: bool) -> list[int]:
  """Prompt text (or ids) -> ids, with the tokenizer's BOS first when add_bos (once)."""
  ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
  if add_bos and (not ids or ids[0] != tokenizer.bos_id):
    ids = [tokenizer.bos_id] + ids
  return ids


class TextStream:
  """Turns one request's generated ids into text pieces as they arrive.

  Text that may still change is held back: a trailing incomplete UTF-8 character (decoded as
  U+FFFD), and the last len(longest stop) - 1 characters, which may start a stop sequence.
  A stop sequence ends the text before it (the stop itself is never emitted).
  """

  def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
    self.tokenizer = tokenizer
    self.stop = tuple(stop)
    self.hold = max((len(s) for s in self.stop), default=1) - 1
    self.ids: list[int] = []
    self.emitted = 0
    self.text = ""

  def push(self, token: int) -> tuple[str, bool]:
    """Adds one id -> (new text safe to show, whether a stop sequence ended the text)."""
    self.ids.append(int(token))
    self.text = self.tokenizer.decode(self.ids)
    start = max(0, self.emitted - self.hold)
    cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
    if cut >= 0:
      self.text = self.text[:cut]
      return self._take(cut), True
    end = len(self.text) - self.hold
    while end > self.emitted and self.text[end - 1] == _REPLACEMENT:
      end -= 1
    return self._take(end), False

  def flush(self) -> str:
    """The held-back rest, at the end of generation."""
    return self._take(len(self.text))

  def _take(self, end: int) -> str:
    if end <= self.emitted:
      return ""
    piece = self.text[self.emitted:end]
    self.emitted = end
    return piece

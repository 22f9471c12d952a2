"""Tokenizers: byte-level (the default, no files) and SentencePiece, with a checkpointable identity.

Both give `encode(str) -> list[int]`, `encode_array(str) -> int32 [n]`, `decode(ids) -> str`,
`identity() -> dict` (JSON; saved with checkpoints and compared on resume by
`check_tokenizer_identity`), the special ids `pad_id`, `bos_id`, `eos_id`, `sep_id`, and
`task_ids(n)`: n distinct ordinary token ids that the synthetic tasks draw keys/values from.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable, Iterator

import numpy as np

BYTE_VOCAB_SIZE = 260  # 256 byte values + pad, bos, eos, sep


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; specials after them: pad 256, bos 257, eos 258, sep 259."""

  vocab_size = BYTE_VOCAB_SIZE
  pad_id, bos_id, eos_id, sep_id = 256, 257, 258, 259

  def encode_array(self, text: str) -> np.ndarray:
    """text -> int32 `[num_bytes]` (no bos/eos)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    """ids -> text; special ids are dropped, broken UTF-8 becomes U+FFFD."""
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")

  def task_ids(self, n: int) -> np.ndarray:
    """n distinct ordinary ids `[n]` for synthetic tasks (bytes 0..n-1)."""
    if not 1 <= n <= 256:
      raise ValueError(f"the byte tokenizer has 256 ordinary ids; a task vocabulary of {n} does "
                       f"not fit: set data.task_vocab_size to at most 256")
    return np.arange(n, dtype=np.int32)

  def identity(self) -> dict[str, Any]:
    return {"kind": "byte", "vocab_size": self.vocab_size, "pad_id": self.pad_id,
            "bos_id": self.bos_id, "eos_id": self.eos_id, "sep_id": self.sep_id}


class SentencePieceTokenizer:
  """A SentencePiece model file; its identity is the SHA-256 of the model bytes."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise ValueError(f"SentencePiece model {path!r} does not exist; train one with "
                       f"`python launch/train_tokenizer.py --source=... --output=PREFIX` and set "
                       f"data.tokenizer='sentencepiece:PREFIX.model'")
    with open(path, "rb") as f:
      self._proto = f.read()
    self.path = path
    self._load()

  def _load(self):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    sp = self._sp
    self.vocab_size = int(sp.get_piece_size())
    self.bos_id = int(sp.bos_id()) if sp.bos_id() >= 0 else int(sp.unk_id())
    self.eos_id = int(sp.eos_id()) if sp.eos_id() >= 0 else int(sp.unk_id())
    # Padding is masked out everywhere, so any valid id serves when the model has no pad piece.
    self.pad_id = int(sp.pad_id()) if sp.pad_id() >= 0 else int(sp.unk_id())
    sep = sp.piece_to_id("<sep>")
    self.sep_id = int(sep) if sep != sp.unk_id() else self.eos_id
    self.sha256 = hashlib.sha256(self._proto).hexdigest()
    self._ordinary = None

  def __getstate__(self):  # the C++ processor does not pickle; worker processes rebuild it
    return {"proto": self._proto, "path": self.path}

  def __setstate__(self, state):
    self._proto, self.path = state["proto"], state["path"]
    self._load()

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray)
                                                       else ids).reshape(-1)])

  def task_ids(self, n: int) -> np.ndarray:
    """The first n ids that are ordinary pieces (not control, unknown, unused or byte)."""
    if self._ordinary is None:  # computed once: a scan of the whole vocabulary
      sp, special = self._sp, {self.pad_id, self.bos_id, self.eos_id, self.sep_id}
      self._ordinary = [i for i in range(self.vocab_size) if i not in special and not (
          sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))]
    ok = self._ordinary
    if n > len(ok) or n < 1:
      raise ValueError(f"the SentencePiece model has {len(ok)} ordinary pieces; a task vocabulary "
                       f"of {n} does not fit: set data.task_vocab_size to at most {len(ok)}")
    return np.asarray(ok[:n], dtype=np.int32)

  def identity(self) -> dict[str, Any]:
    return {"kind": "sentencepiece", "vocab_size": self.vocab_size, "sha256": self.sha256,
            "pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id,
            "sep_id": self.sep_id, "path": self.path}


Tokenizer = ByteTokenizer | SentencePieceTokenizer

# Keys that describe where a tokenizer was found, not what it does: ignored when comparing.
_INFORMATIONAL_KEYS = ("path",)


def tokenizer_from_spec(spec: str) -> Tokenizer:
  """'byte' | 'sentencepiece:<model path>' -> tokenizer."""
  if spec in ("", "byte"):
    return ByteTokenizer()
  if spec.startswith("sentencepiece:"):
    return SentencePieceTokenizer(os.path.expanduser(spec[len("sentencepiece:"):]))
  raise ValueError(f"config.data.tokenizer: {spec!r} is unknown; use 'byte' or "
                   f"'sentencepiece:<path to .model>'")


def make_tokenizer(data_cfg) -> Tokenizer:
  """The tokenizer named by `data_cfg.tokenizer`."""
  return tokenizer_from_spec(data_cfg.tokenizer)


def check_tokenizer_identity(saved: dict[str, Any], current: dict[str, Any]) -> None:
  """Raises ValueError when a checkpoint's tokenizer differs from the one configured now."""
  keys = sorted((set(saved) | set(current)) - set(_INFORMATIONAL_KEYS))
  diffs = [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in keys
           if saved.get(k) != current.get(k)]
  if diffs:
    hint = (f"saved at {saved['path']!r}" if saved.get("path") else f"kind {saved.get('kind')!r}")
    raise ValueError("the checkpoint was trained with a different tokenizer (" + "; ".join(diffs)
                     + f"). Resume with the original tokenizer ({hint}) via "
                     "--config.data.tokenizer, or start a new workdir.")


def train_sentencepiece(texts: Iterator[str], output_prefix: str, *, vocab_size: int,
                        model_type: str = "unigram", max_bytes: int = 200_000_000,
                        character_coverage: float = 0.9995) -> str:
  """Trains a SentencePiece model on `texts` (lines are its sentences); returns the .model path.

  Ids: pad 0, unk 1, bos 2, eos 3, then '<sep>' (used by the synthetic tasks) as piece 4. No
  normalisation and byte fallback, so any text (code, its indentation and newlines included)
  round-trips exactly through encode/decode.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  def lines():
    seen = 0
    for text in texts:
      for line in text.splitlines():
        if line.strip():
          seen += len(line)
          yield line[:4096]
        if seen >= max_bytes:
          return

  os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines(), model_prefix=output_prefix, vocab_size=vocab_size,
      model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=["<sep>"],
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, split_digits=True, add_dummy_prefix=False,
      hard_vocab_limit=False, max_sentence_length=4096, minloglevel=2)
  return output_prefix + ".model"

"""Tokenizers: byte-level (the default, no files), SentencePiece and Hugging Face `tokenizers`, with a checkpointable identity.

All give `encode(str) -> list[int]`, `encode_array(str) -> int32 [n]`, `decode(ids) -> str`,
`identity() -> dict` (JSON; saved with checkpoints and compared on resume by
`check_tokenizer_identity`), the special ids `pad_id`, `bos_id`, `eos_id`, `sep_id`, and
`task_ids(n)`: n distinct ordinary token ids that the synthetic tasks draw keys/values from.
"""
from __future__ import annotations

import hashlib
import json
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


# Special tokens looked up by name when a Hugging Face tokenizer folder does not name them.
_HF_BOS = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[CLS]", "<|endoftext|>")
_HF_EOS = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]", "<|im_end|>")
_HF_PAD = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def _hf_special_names(folder: str) -> dict[str, str]:
  """{'bos'|'eos'|'pad': token text} from tokenizer_config.json / special_tokens_map.json."""
  names = {}
  for fname in ("special_tokens_map.json", "tokenizer_config.json"):
    path = os.path.join(folder, fname)
    if not os.path.isfile(path):
      continue
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
    for role in ("bos", "eos", "pad"):
      value = cfg.get(f"{role}_token")
      if isinstance(value, dict):
        value = value.get("content")
      if isinstance(value, str) and role not in names:
        names[role] = value
  return names


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json; its identity is the SHA-256 of that file.

  Special ids: bos/eos/pad as named by tokenizer_config.json or special_tokens_map.json beside
  the file, else the first of the usual names the vocabulary has (`_HF_BOS`, ...); a tokenizer with
  neither bos nor eos is refused. pad falls back to eos, sep to '<sep>' or eos. Text is encoded
  without the tokenizer's own added specials (the pipeline adds BOS/EOS per document).
  """

  def __init__(self, path: str):
    path = os.path.expanduser(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise ValueError(f"Hugging Face tokenizer {file!r} does not exist; set "
                       f"data.tokenizer='hf:<tokenizer.json or the folder holding it>'")
    with open(file, "rb") as f:
      self._json = f.read()
    self.path = file
    self._names = _hf_special_names(folder)
    self._load()

  def _load(self):
    from tokenizers import Tokenizer as _Tok  # pylint: disable=g-import-not-at-top
    self._tok = _Tok.from_str(self._json.decode("utf-8"))
    tok = self._tok
    self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))

    def find(role, candidates):
      names = ([self._names[role]] if role in self._names else []) + list(candidates)
      for name in names:
        i = tok.token_to_id(name)
        if i is not None:
          return int(i)
      return None

    bos, eos = find("bos", _HF_BOS), find("eos", _HF_EOS)
    if bos is None and eos is None:
      raise ValueError(f"the Hugging Face tokenizer {self.path!r} has no BOS or EOS token (looked "
                       f"for {_HF_BOS + _HF_EOS}); add one (e.g. '<|endoftext|>') or name it as "
                       f"bos_token/eos_token in a tokenizer_config.json beside it")
    self.bos_id = bos if bos is not None else eos
    self.eos_id = eos if eos is not None else bos
    pad = find("pad", _HF_PAD)
    self.pad_id = pad if pad is not None else self.eos_id
    sep = tok.token_to_id("<sep>")
    self.sep_id = int(sep) if sep is not None else self.eos_id
    self.sha256 = hashlib.sha256(self._json).hexdigest()
    self._special = {int(i) for i, t in tok.get_added_tokens_decoder().items() if t.special}
    self._special |= {self.pad_id, self.bos_id, self.eos_id, self.sep_id}

  def __getstate__(self):  # the Rust tokenizer is rebuilt in worker processes
    return {"json": self._json, "path": self.path, "names": self._names}

  def __setstate__(self, state):
    self._json, self.path, self._names = state["json"], state["path"], state["names"]
    self._load()

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Iterable[int]) -> str:
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def task_ids(self, n: int) -> np.ndarray:
    """The first n ids that are not special tokens."""
    ok = [i for i in range(min(self.vocab_size, n + len(self._special))) if i not in self._special]
    if n < 1 or n > len(ok):
      raise ValueError(f"the Hugging Face tokenizer has {self.vocab_size} ids; a task vocabulary "
                       f"of {n} does not fit: lower data.task_vocab_size")
    return np.asarray(ok[:n], dtype=np.int32)

  def identity(self) -> dict[str, Any]:
    return {"kind": "hf", "vocab_size": self.vocab_size, "sha256": self.sha256,
            "pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id,
            "sep_id": self.sep_id, "path": self.path}


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HFTokenizer

# Keys that describe where a tokenizer was found, not what it does: ignored when comparing.
_INFORMATIONAL_KEYS = ("path",)


TOKENIZER_SPECS = "'byte', 'sentencepiece:<path to .model>' or 'hf:<tokenizer.json or folder>'"


def tokenizer_from_spec(spec: str) -> Tokenizer:
  """'byte' | 'sentencepiece:<model path>' | 'hf:<tokenizer.json or its folder>' -> tokenizer."""
  if spec in ("", "byte"):
    return ByteTokenizer()
  if spec.startswith("sentencepiece:"):
    return SentencePieceTokenizer(os.path.expanduser(spec[len("sentencepiece:"):]))
  if spec.startswith("hf:") and len(spec) > 3:
    return HFTokenizer(spec[len("hf:"):])
  raise ValueError(f"config.data.tokenizer: {spec!r} is unknown; use {TOKENIZER_SPECS}")


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

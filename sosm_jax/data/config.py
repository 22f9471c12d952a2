"""The data section of the config (`config.data`): defaults, meaning of each key, validation."""
from __future__ import annotations

import ml_collections

from sosm_jax.data import sources

_TASKS = ("mqar", "passkey", "copy", "niah")
_RECORD_FORMATS = ("text", "int32", "uint16")
TASK_DEPTHS = ("uniform", "arcsine")


def default_data_config() -> ml_collections.ConfigDict:
  """Every key the data pipeline reads, with defaults."""
  return ml_collections.ConfigDict(dict(
      # What to read. '' or 'stdlib' = this Python's standard library source (no download);
      # 'text:<dir|glob|file>'; 'tfds:<name>[/<config>][:<version>][:<split>]';
      # 'array_record:<glob>'; 'synthetic:mqar|passkey|copy|niah';
      # 'mix:<source>=<weight>,<source>=<weight>' (e.g. 'mix:stdlib=0.9,synthetic:passkey=0.1').
      source="",
      eval_source="",         # split='validation' reads this instead; '' = held-out part of source
      tokenizer="byte",       # 'byte' | 'sentencepiece:<path to .model>' | 'hf:<tokenizer.json|dir>'
      data_dir="",            # tfds data_dir ('' = tfds default; gs:// works on Cloud TPU)
      text_field="text",      # field holding the text in .jsonl lines and tfds examples
      record_format="text",   # array_record records: 'text' (UTF-8) | 'int32' | 'uint16' token ids
      val_fraction=0.02,      # held-out fraction of documents (text/stdlib/array_record)
      separate_documents=True,  # True: segment ids per document (no attention across documents)
      shuffle=True,           # seeded global shuffle of documents, reshuffled every epoch (train)
      num_workers=0,          # >0: grain worker processes build batches; 0: threads in-process
      read_threads=2,         # threads reading and tokenizing documents
      prefetch=4,             # batches prepared ahead of the consumer
      # Synthetic tasks (alone or inside mix:).
      task_length=0,          # tokens per task example; 0 = seq_len (one example fills a row)
      # ((seq_len, length), ...): rows of that seq_len get task examples of `length` tokens
      # instead (each its own document, seq_len // length of them a row), e.g. ((4096, 1024),)
      # packs 4 examples into each 4K task row of a curriculum while longer stages keep
      # task_length; seq_lens not listed use task_length.
      task_length_by_seq_len=(),
      task_vocab_size=256,    # ordinary ids the tasks draw from (mqar: half keys, half values)
      # Loss weight of a task example's answer tokens (text tokens weigh 1), an integer in
      # [1, 255]: the loss is the weighted mean over scored tokens, and the logged 'tokens' is
      # their summed weight.
      task_answer_weight=1,
      mqar_num_pairs=32,      # key-value pairs in the context
      mqar_num_queries=0,     # queries after the context; 0 = one per pair
      passkey_digits=5,       # digits of the hidden number
      passkey_depth=-1.0,     # where the needle sits in [0, 1]; <0 = random per example
      # How random depths (passkey, and NIAH's asked needle) are drawn: 'uniform', or 'arcsine'
      # (Beta(1/2, 1/2): 6.4% of needles in the first 1% of the filler and 6.4% in the last,
      # against 1% each uniformly; the middle still at >= 0.64 of the uniform density).
      task_depths="uniform",
      niah_num_needles=4,     # niah: needles of the multi-needle kinds (as evaluate.py's default)
      niah_digits=7,          # niah: digits of number needles
      # niah: relative weights of the kinds (single, multikey, multivalue, multiquery) among the
      # training examples; () = equal
      niah_kind_weights=(),
      eval_examples=256,      # size of a synthetic validation set
  ))


def _require(ok: bool, key: str, problem: str, fix: str) -> None:
  if not ok:
    raise ValueError(f"config.data.{key}: {problem}; {fix}")


def task_length_for(cfg: ml_collections.ConfigDict, seq_len: int) -> int:
  """Tokens per task example in rows of seq_len (task_length_by_seq_len, else task_length)."""
  for row, length in cfg.task_length_by_seq_len:
    if int(row) == seq_len:
      return int(length)
  return cfg.task_length or seq_len


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad key; file existence is checked by make_pipeline."""
  for key in ("source", "eval_source"):
    if cfg[key]:
      try:
        comps = sources.parse_source(cfg[key])
      except ValueError as e:
        raise ValueError(f"config.data.{key}: {e}") from None
      for comp in comps:
        if comp.kind == "synthetic":
          _require(comp.arg in _TASKS, key, f"unknown synthetic task {comp.arg!r}",
                   f"use one of {_TASKS}")
  tok = cfg.tokenizer
  _require(tok == "byte" or (tok.startswith("sentencepiece:") and len(tok) > 14)
           or (tok.startswith("hf:") and len(tok) > 3), "tokenizer",
           f"{tok!r} is unknown", "use 'byte', 'sentencepiece:<path to .model>' or "
           "'hf:<tokenizer.json or folder>'")
  _require(cfg.record_format in _RECORD_FORMATS, "record_format",
           f"{cfg.record_format!r} is unknown", f"use one of {_RECORD_FORMATS}")
  _require(0.0 < cfg.val_fraction < 1.0, "val_fraction", f"{cfg.val_fraction} is outside (0, 1)",
           "use e.g. 0.02")
  _require(cfg.num_workers >= 0, "num_workers", "is negative", "use 0 (threads) or more")
  _require(cfg.read_threads >= 0, "read_threads", "is negative", "use e.g. 2")
  _require(cfg.prefetch >= 0, "prefetch", "is negative", "use e.g. 4")
  _require(cfg.task_length >= 0, "task_length", "is negative", "use 0 (= seq_len) or a length")
  pairs = cfg.task_length_by_seq_len
  _require(isinstance(pairs, (tuple, list)) and all(
      isinstance(p, (tuple, list)) and len(p) == 2 and all(
          isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in p) for p in pairs),
      "task_length_by_seq_len", f"{pairs!r} is not a tuple of (seq_len, length) pairs of "
      "positive integers", "write e.g. ((4096, 1024),) or () for none")
  seen = [int(p[0]) for p in pairs]
  _require(len(set(seen)) == len(seen), "task_length_by_seq_len",
           f"lists a seq_len twice ({seen})", "give each seq_len one length")
  for seq_len, length in pairs:
    _require(length <= seq_len, "task_length_by_seq_len",
             f"length {length} exceeds its seq_len {seq_len}", "use at most the seq_len")
  weight = cfg.task_answer_weight
  _require(isinstance(weight, int) and not isinstance(weight, bool) and 1 <= weight <= 255,
           "task_answer_weight", f"{weight!r} is not an integer in [1, 255]",
           "use e.g. 1 (answers weigh as text tokens) or 4")
  _require(cfg.task_vocab_size >= 2, "task_vocab_size", f"{cfg.task_vocab_size} < 2",
           "use e.g. 256")
  _require(cfg.mqar_num_pairs >= 1, "mqar_num_pairs", "must be positive", "use e.g. 32")
  _require(cfg.mqar_num_queries >= 0, "mqar_num_queries", "is negative",
           "use 0 (one per pair) or a count")
  _require(1 <= cfg.passkey_digits <= 18, "passkey_digits", f"{cfg.passkey_digits} outside 1..18",
           "use e.g. 5")
  _require(cfg.passkey_depth <= 1.0, "passkey_depth", f"{cfg.passkey_depth} > 1",
           "use a depth in [0, 1], or <0 for random depths")
  _require(1 <= cfg.niah_num_needles <= 24, "niah_num_needles",
           f"{cfg.niah_num_needles} outside 1..24", "use e.g. 4")
  _require(cfg.task_depths in TASK_DEPTHS, "task_depths", f"{cfg.task_depths!r} is unknown",
           f"use one of {TASK_DEPTHS}")
  weights = tuple(cfg.niah_kind_weights)
  _require(not weights or (len(weights) == 4 and all(w >= 0 for w in weights) and sum(weights) > 0),
           "niah_kind_weights", f"{weights} is not 4 non-negative weights with a positive sum",
           "use () for equal kinds or e.g. (1, 1, 2, 2) for single, multikey, multivalue, "
           "multiquery")
  _require(1 <= cfg.niah_digits <= 18, "niah_digits", f"{cfg.niah_digits} outside 1..18",
           "use e.g. 7")
  _require(cfg.eval_examples >= 1, "eval_examples", "must be positive", "use e.g. 256")

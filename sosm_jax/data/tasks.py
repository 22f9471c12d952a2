"""Synthetic long-context tasks with known answers: MQAR, passkey retrieval, copy.

Every example is a token sequence that starts with BOS and whose answer tokens are marked:
`answer_mask[i] = 1` means token i is an answer, scored when predicted from position i-1.
The same functions make training documents (inside `synthetic:` and `mix:` sources) and single
evaluation examples, so training and evaluation see one format.

- mqar (multi-query associative recall, Zoology style): `k1 v1 k2 v2 ... kN vN`, then a query
  region filled with SEP where Q queries `k v` sit at random even offsets; keys are distinct and
  drawn from the first half of the task vocabulary, values from the second half; each queried
  value is the answer, and is the value paired with that key in the context. Queried keys are
  drawn with replacement (a key may be asked twice), so the values already answered say nothing
  about the next answer.
- passkey: a header, filler text with a sentence "The pass key is NNNNN." at a chosen depth,
  then "What is the pass key? The pass key is " and the digits as the answer. Lengths too short
  for these sentences (under ~200 bytes) use a terse form: filler, "#NNNNN" at the depth, filler,
  "#" and the digits.
- copy: random tokens, SEP, the same tokens again (the second copy is the answer).
- niah: one RULER-style needle-in-a-haystack example (sosm_jax/eval/niah.py) of a kind (single,
  multikey, multivalue, multiquery) and needle (number, word) drawn per example, the target
  needle at a uniform depth, in the 'prose' haystack: the evaluation's generator, so a model can
  be trained on the format it is tested on (with other seeds).
"""
from __future__ import annotations

import dataclasses

import numpy as np

TASKS = ("mqar", "passkey", "copy", "niah")

_HEADER = "A pass key is hidden somewhere in the long text below. Find it and remember it.\n"
_FILLER = ("Rivers run to the sea. Leaves turn in autumn. Clocks tick and the day goes on. "
           "Nothing important is said here. ")
_NEEDLE = " The pass key is {key}. Remember it: {key} is the pass key. "
_QUESTION = "\nWhat is the pass key? The pass key is "
_TERSE_NEEDLE, _TERSE_QUESTION = "#{key}", "#"


@dataclasses.dataclass(frozen=True)
class TaskExample:
  """One example; `length` = len(tokens).

  tokens: int32 `[length]`, tokens[0] = BOS.
  answer_mask: float32 `[length]`, 1 at answer tokens.
  answer_positions: int32 `[num_answers]`, indices of the answer tokens.
  answer: int32 `[num_answers]` = tokens[answer_positions].
  answer_text: the passkey digits ('' for other tasks).
  prompt_length: number of tokens before the first answer token.
  """
  tokens: np.ndarray
  answer_mask: np.ndarray
  answer_positions: np.ndarray
  answer: np.ndarray
  answer_text: str
  prompt_length: int


def _rng(seed) -> np.random.Generator:
  return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _example(tokens: np.ndarray, mask: np.ndarray, answer_text: str = "") -> TaskExample:
  positions = np.flatnonzero(mask).astype(np.int32)
  return TaskExample(tokens=tokens.astype(np.int32), answer_mask=mask.astype(np.float32),
                     answer_positions=positions, answer=tokens[positions].astype(np.int32),
                     answer_text=answer_text, prompt_length=int(positions[0]))


def mqar_example(tokenizer, length: int, *, num_pairs: int, seed, num_queries: int = 0,
                 vocab_size: int = 256) -> TaskExample:
  """Multi-query associative recall of `num_pairs` pairs, `num_queries` (0 = num_pairs) queries."""
  num_queries = num_queries or num_pairs
  ids = tokenizer.task_ids(vocab_size)
  keys_pool, values_pool = ids[:vocab_size // 2], ids[vocab_size // 2:]
  if num_pairs > len(keys_pool):
    raise ValueError(f"mqar: {num_pairs} pairs need {num_pairs} distinct keys but the task "
                     f"vocabulary {vocab_size} has {len(keys_pool)}; raise data.task_vocab_size "
                     f"or lower data.mqar_num_pairs")
  slots = (length - 1 - 2 * num_pairs) // 2
  if slots < num_queries:
    raise ValueError(f"mqar: length {length} cannot hold {num_pairs} pairs and {num_queries} "
                     f"queries (needs at least {1 + 2 * num_pairs + 2 * num_queries}); lower "
                     f"data.mqar_num_pairs or raise the length")
  rng = _rng(seed)
  keys = rng.choice(keys_pool, num_pairs, replace=False)
  values = rng.choice(values_pool, num_pairs, replace=True)
  tokens = np.full(length, tokenizer.sep_id, np.int32)
  mask = np.zeros(length, np.float32)
  tokens[0] = tokenizer.bos_id
  tokens[1:1 + 2 * num_pairs:2] = keys
  tokens[2:2 + 2 * num_pairs:2] = values
  # Queried pairs are drawn with replacement. Teacher forcing shows every answered value in the
  # input, so a permutation of the pairs (each asked once) would let a model that only tracks
  # which values are still unasked score H(N)/N (34% at 8 pairs, 13% at 32) without binding any
  # key to its value; models settle on that shortcut and it counts as recall.
  which = rng.integers(0, num_pairs, num_queries)
  starts = 1 + 2 * num_pairs + 2 * np.sort(rng.choice(slots, num_queries, replace=False))
  tokens[starts] = keys[which]
  tokens[starts + 1] = values[which]
  mask[starts + 1] = 1.0
  return _example(tokens, mask)


def random_depth(rng: np.random.Generator, distribution: str = "uniform") -> float:
  """A needle's relative depth in [0, 1]: 'uniform', or 'arcsine' (Beta(1/2, 1/2): more needles
  near both ends, where a uniform draw rarely puts them at long lengths)."""
  if distribution == "uniform":
    return float(rng.uniform())
  if distribution == "arcsine":
    return float(rng.beta(0.5, 0.5))
  raise ValueError(f"unknown depth distribution {distribution!r}; use 'uniform' or 'arcsine'")


def passkey_example(tokenizer, length: int, *, seed, depth: float | None = None,
                    digits: int = 5, depths: str = "uniform") -> TaskExample:
  """A `digits`-digit number hidden at relative `depth` in [0, 1] of the filler (None: drawn
  from the `depths` distribution, `random_depth`)."""
  rng = _rng(seed)
  key = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
  depth = random_depth(rng, depths) if depth is None or depth < 0 else float(depth)
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"passkey: depth {depth} is outside [0, 1]")
  enc = tokenizer.encode_array
  answer = enc(key)
  header, needle, question = enc(_HEADER), enc(_NEEDLE.format(key=key)), enc(_QUESTION)
  fill = length - (1 + len(header) + len(needle) + len(question) + len(answer))
  if fill < 0:  # the terse form for short lengths
    header, needle = np.zeros(0, np.int32), enc(_TERSE_NEEDLE.format(key=key))
    question = enc(_TERSE_QUESTION)
    fill = length - (1 + len(needle) + len(question) + len(answer))
  if fill < 0:
    raise ValueError(f"passkey: length {length} is shorter than the {length - fill} tokens of "
                     f"even the terse prompt and answer; use a longer length or fewer digits")
  filler = np.resize(enc(_FILLER), fill)
  before = int(round(depth * fill))
  tokens = np.concatenate([[tokenizer.bos_id], header, filler[:before], needle, filler[before:],
                           question, answer]).astype(np.int32)
  mask = np.zeros(length, np.float32)
  mask[length - len(answer):] = 1.0
  return _example(tokens, mask, answer_text=key)


def copy_example(tokenizer, length: int, *, seed, vocab_size: int = 256) -> TaskExample:
  """BOS, n random tokens, SEP, the same n tokens (n = (length - 2) // 2; odd leftover is SEP)."""
  n = (length - 2) // 2
  if n < 1:
    raise ValueError(f"copy: length {length} is too short; use at least 4")
  ids = tokenizer.task_ids(vocab_size)
  seq = _rng(seed).choice(ids, n, replace=True)
  tokens = np.full(length, tokenizer.sep_id, np.int32)
  tokens[0] = tokenizer.bos_id
  tokens[1:1 + n] = seq
  tokens[2 + n:2 + 2 * n] = seq
  mask = np.zeros(length, np.float32)
  mask[2 + n:2 + 2 * n] = 1.0
  return _example(tokens, mask)


def niah_training_example(tokenizer, length: int, *, seed, num_needles: int = 4, digits: int = 7,
                          spec_index: int | None = None, depths: str = "uniform",
                          kind_weights: tuple = ()) -> TaskExample:
  """A NIAH example of a random kind (drawn by kind_weights, in niah.KINDS' order; () = equal)
  and needle, its asked needle at a depth from `depths` (spec_index: that one of the 8 specs,
  kinds outer)."""
  # The generator lives with the evaluation (which imports this module), hence the late import.
  from sosm_jax.eval import niah  # pylint: disable=g-import-not-at-top
  rng = _rng(seed)
  specs = niah.task_specs(num_needles=num_needles, digits=digits)
  if spec_index is None and not kind_weights:
    spec_index = int(rng.integers(len(specs)))
  elif spec_index is None:
    kinds = np.asarray(kind_weights, np.float64)
    kind = int(rng.choice(len(kinds), p=kinds / kinds.sum()))
    spec_index = kind * len(niah.NEEDLES) + int(rng.integers(len(niah.NEEDLES)))
  spec = specs[spec_index]
  return niah.niah_example(tokenizer, length, spec, seed=rng,
                           depth=random_depth(rng, depths)).example


def check_task_length(task: str, tokenizer, length: int, data_cfg) -> None:
  """ValueError when an example of `task` cannot be made at `length` (niah: any of its kinds)."""
  if task != "niah":
    make_example(task, tokenizer, length, np.random.default_rng(0), data_cfg)
    return
  from sosm_jax.eval import niah  # pylint: disable=g-import-not-at-top
  for index in range(len(niah.KINDS) * len(niah.NEEDLES)):
    niah_training_example(tokenizer, length, seed=0, num_needles=data_cfg.niah_num_needles,
                          digits=data_cfg.niah_digits, spec_index=index)


def make_example(task: str, tokenizer, length: int, seed, data_cfg) -> TaskExample:
  """The example of `task` configured by data_cfg's task keys (see config.py)."""
  if task == "mqar":
    return mqar_example(tokenizer, length, num_pairs=data_cfg.mqar_num_pairs, seed=seed,
                        num_queries=data_cfg.mqar_num_queries, vocab_size=data_cfg.task_vocab_size)
  if task == "passkey":
    depth = data_cfg.passkey_depth if data_cfg.passkey_depth >= 0 else None
    return passkey_example(tokenizer, length, seed=seed, depth=depth,
                           digits=data_cfg.passkey_digits, depths=data_cfg.task_depths)
  if task == "copy":
    return copy_example(tokenizer, length, seed=seed, vocab_size=data_cfg.task_vocab_size)
  if task == "niah":
    return niah_training_example(tokenizer, length, seed=seed,
                                 num_needles=data_cfg.niah_num_needles, digits=data_cfg.niah_digits,
                                 depths=data_cfg.task_depths,
                                 kind_weights=tuple(data_cfg.niah_kind_weights))
  raise ValueError(f"unknown synthetic task {task!r}; use one of {TASKS}")


def example_batch(examples: list[TaskExample], pad_id: int) -> dict[str, np.ndarray]:
  """Examples (equal lengths L) -> a model batch of `[num_examples, L]` arrays.

  inputs = tokens; targets = tokens shifted left (last = pad); loss_mask = answer_mask shifted
  left, so the loss and accuracy count exactly the answer tokens; one segment per row.
  """
  tokens = np.stack([e.tokens for e in examples]).astype(np.int32)
  mask = np.stack([e.answer_mask for e in examples]).astype(np.float32)
  b, length = tokens.shape
  targets = np.concatenate([tokens[:, 1:], np.full((b, 1), pad_id, np.int32)], axis=1)
  loss_mask = np.concatenate([mask[:, 1:], np.zeros((b, 1), np.float32)], axis=1)
  return {"inputs": tokens, "targets": targets, "loss_mask": loss_mask,
          "segment_ids": np.ones((b, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()}


def passkey_eval_batch(tokenizer, *, seq_len: int, num_examples: int, seed: int,
                       depths=None, digits: int = 5) -> dict[str, np.ndarray]:
  """`num_examples` passkey rows of length seq_len at evenly spread depths (or `depths`)."""
  if depths is None:
    depths = np.linspace(0.0, 1.0, num_examples) if num_examples > 1 else [0.5]
  examples = [passkey_example(tokenizer, seq_len, seed=np.random.default_rng([seed, i]),
                              depth=float(d), digits=digits) for i, d in enumerate(depths)]
  return example_batch(examples, tokenizer.pad_id)


def mqar_eval_batch(tokenizer, *, seq_len: int, num_examples: int, seed: int, num_pairs: int,
                    num_queries: int = 0, vocab_size: int = 256) -> dict[str, np.ndarray]:
  """`num_examples` MQAR rows of length seq_len; accuracy over loss_mask is the MQAR score."""
  examples = [mqar_example(tokenizer, seq_len, num_pairs=num_pairs, num_queries=num_queries,
                           vocab_size=vocab_size, seed=np.random.default_rng([seed, i]))
              for i in range(num_examples)]
  return example_batch(examples, tokenizer.pad_id)

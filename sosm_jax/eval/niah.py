"""Needle-in-a-haystack tasks in the style of RULER: single, multi-key, multi-value, multi-query.

Every example is natural-looking text (the haystack) with one or more needles, sentences
" The hidden <kind> for <key> is <value>." (kind 'number': a `digits`-digit number; kind 'word':
a word), then a question whose answer closes the example. Keys are hyphenated word pairs
("amber-falcon"); neither keys, value words nor digits occur in the haystack, so a needle is
the only place an answer can come from.

  single      one needle; the question asks for its value.
  multikey    `num_needles` needles with different keys; the question asks for one of them.
  multivalue  `num_needles` needles with the same key and different values; the answer lists
              every value in the order the needles appear in the text ("v1, v2, v3, v4.").
  multiquery  `num_needles` needles with different keys; the question asks for all of them in
              a random order and the answer lists their values in that order.

The needle a depth refers to (the queried one; in multivalue the first value, in multiquery the
first key asked) starts at the sentence boundary nearest to `depth` x the haystack; the other
needles go to random sentence boundaries. Answers end with a full stop, so a number followed by
more digits is wrong. Haystacks: 'prose' (sentences drawn from a small grammar, seeded), 'repeat'
(the passkey task's four filler sentences over and over, RULER's "noise"), or 'text:<dir|glob|
file>' (sentences of your own text files, e.g. books, from a seeded starting sentence on;
sentences holding a key or value of the example are left out).

Scoring is exact match of the whole answer under teacher forcing: an example counts when every
answer token is the argmax given the true prefix. The answer is the last span of the example,
so this is exactly "greedy generation from the prompt starts with the answer" (the greedy
tokens are then the true ones at every step); tests/test_eval_niah.py checks it against the
model's own greedy generation. Examples are deterministic in (seed, length, depth, task).

Opt-in, RULER's own order-free metric (`niah_grid(..., generator=...)`; evaluate.py
--niah_generate): every example's continuation is greedy-generated from its prompt (at most the
answer's tokens + GENERATE_MARGIN, stopping after the first '.'; `EngineGenerator` runs it through
the serving engine, whose bucketed prefill compiles a bounded set of shapes whatever the prompt
lengths) and scored as RULER's `string_match_all`: the fraction of the answer's values that occur,
case-insensitively, anywhere in the generated text (`ruler_match_all`). A multi-value or
multi-query answer with every value right but in another order scores 1 there and 0 under exact
match. The exact metric stays the primary one.
"""
from __future__ import annotations

import dataclasses
import functools
import queue
import re
from typing import Callable, Sequence

import numpy as np

from sosm_jax.data import sources
from sosm_jax.data import tasks as tasks_lib
from sosm_jax.eval.recall import cell_seed, score_cells
from sosm_jax.eval.scoring import Scorer
from sosm_jax.serve import engine as engine_lib

KINDS = ("single", "multikey", "multivalue", "multiquery")
NEEDLES = ("number", "word")
HAYSTACKS = ("prose", "repeat", "text:<dir|glob|file>")
MAX_TEXT_BYTES = 16 << 20   # read at most this much of a 'text:' haystack

Progress = Callable[[int], None] | None
GENERATE_MARGIN = 8   # tokens a generation may run past the answer's length

# Haystack grammar: subject, action, place, time. None of these words is a key or a value word.
_SUBJECTS = ("The old miller", "A young sailor", "The baker's daughter", "Our neighbour",
             "The village teacher", "A tired traveller", "The gardener", "My grandmother",
             "The night watchman", "A quiet student", "The shepherd", "The harbour keeper",
             "A travelling merchant", "The blacksmith", "Her little brother", "The old priest")
_ACTIONS = ("walked slowly along", "painted a picture of", "told a long story about",
            "often dreamed of", "swept the path beside", "sang softly near", "wrote a letter about",
            "carried bread to", "looked for a while at", "forgot the way to", "sat alone by",
            "spoke kindly of", "returned at last to", "waited patiently at")
_PLACES = ("the river", "the stone bridge", "the orchard", "the market square",
           "the chapel on the hill", "the narrow lane", "the mill pond", "the empty station",
           "the wheat fields", "the lighthouse", "the farmhouse", "the town gate", "the beach",
           "the wooden pier")
_TIMES = ("before the rain came", "while the bells rang", "late in the evening",
          "on a cold morning", "as the fog lifted", "after the long winter",
          "when nobody was watching", "without saying a word", "under a pale sky",
          "just before supper", "in the first days of spring", "at the end of the harvest")
_REPEAT = ("Rivers run to the sea.", "Leaves turn in autumn.",
           "Clocks tick and the day goes on.", "Nothing important is said here.")
_KEY_ADJECTIVES = ("amber", "cobalt", "crimson", "velvet", "frozen", "golden", "hollow", "ivory",
                   "jade", "lucky", "misty", "noble", "olive", "polar", "rapid", "rusty",
                   "scarlet", "tidal", "vivid", "zesty", "brisk", "dusky", "fuzzy", "giant")
_KEY_NOUNS = ("falcon", "otter", "comet", "glacier", "harp", "lantern", "meadow", "nebula",
              "orchid", "pepper", "quartz", "raven", "saddle", "tiger", "violin", "walrus",
              "willow", "yacht", "zebra", "badger", "cactus", "dolphin", "ember", "fjord")
_VALUE_WORDS = ("apricot", "blizzard", "compass", "dynamo", "eclipse", "fossil", "granite",
                "horizon", "igloo", "jigsaw", "kettle", "lagoon", "magnet", "nugget", "oyster",
                "pyramid", "quiver", "rocket", "sapphire", "thimble", "umbrella", "volcano",
                "wizard", "yogurt", "anchor", "biscuit", "candle", "diamond", "feather", "helmet",
                "jasmine", "kayak")

_HEADER = "Some hidden {kind}s are written in the text below. Remember them: a question follows.\n"
_NEEDLE = " The hidden {kind} for {key} is {value}."
_QUESTIONS = {
    "single": "\nWhat is the hidden {kind} for {key}? The hidden {kind} for {key} is ",
    "multikey": "\nWhat is the hidden {kind} for {key}? The hidden {kind} for {key} is ",
    "multivalue": ("\nWhat are all the hidden {kind}s for {key}, in the order of the text? "
                   "The hidden {kind}s for {key} are "),
    "multiquery": "\nWhat are the hidden {kind}s for {keys}? In that order, they are ",
}


@dataclasses.dataclass(frozen=True)
class NiahSpec:
  """One NIAH task: kind in KINDS, needle in NEEDLES; `name` is e.g. 'multikey_word'."""
  kind: str
  needle: str
  num_needles: int = 4
  digits: int = 7
  haystack: str = "prose"

  @property
  def name(self) -> str:
    return f"{self.kind}_{self.needle}"

  def check(self) -> None:
    """ValueError naming the bad field."""
    if self.kind not in KINDS:
      raise ValueError(f"NIAH kind {self.kind!r} is unknown; use one of {KINDS}")
    if self.needle not in NEEDLES:
      raise ValueError(f"NIAH needle {self.needle!r} is unknown; use one of {NEEDLES}")
    if self.haystack.startswith("text:"):
      text_sentences(self.haystack[len("text:"):])   # names a missing path or an empty text
    elif self.haystack not in HAYSTACKS[:2]:
      raise ValueError(f"NIAH haystack {self.haystack!r} is unknown; use one of {HAYSTACKS}")
    most = min(len(_KEY_ADJECTIVES) * len(_KEY_NOUNS), len(_VALUE_WORDS))
    if not 1 <= self.num_needles <= most:
      raise ValueError(f"NIAH num_needles must be in [1, {most}], got {self.num_needles}")
    if not 1 <= self.digits <= 18:
      raise ValueError(f"NIAH digits must be in [1, 18], got {self.digits}")
    if self.needle == "number" and self.num_needles > 9 * 10 ** (self.digits - 1):
      raise ValueError(f"NIAH: {self.num_needles} distinct {self.digits}-digit numbers do not "
                       f"exist; raise digits or lower num_needles")


@dataclasses.dataclass(frozen=True)
class NiahExample:
  """A TaskExample plus where its needles are.

  needle_starts: int `[num_needles]` token index of each needle in `example.tokens`, in text
  order; target: index into needle_starts of the needle the depth refers to; depth: the
  fraction of the haystack before the target needle (the nearest sentence boundary to the
  requested depth); answer_text: the answer as text; values: every needle's value, in text
  order; answer_values: the values the answer lists, in its order.
  """
  example: tasks_lib.TaskExample
  needle_starts: np.ndarray
  target: int
  depth: float
  answer_text: str
  values: tuple[str, ...] = ()
  answer_values: tuple[str, ...] = ()


@functools.lru_cache(maxsize=4)
def text_sentences(pattern: str) -> tuple[str, ...]:
  """The sentences of the text files `pattern` names (a directory, glob or file, as in a 'text:'
  data source), whitespace normalised, split after . ! or ?; at most MAX_TEXT_BYTES are read."""
  _, files = sources.list_text_files(pattern)
  chunks, total = [], 0
  for path in files:
    with open(path, "rb") as f:
      raw = f.read(MAX_TEXT_BYTES - total)
    chunks.append(raw.decode("utf-8", errors="replace"))
    total += len(raw)
    if total >= MAX_TEXT_BYTES:
      break
  text = " ".join(" ".join(chunks).split())
  sentences = tuple(s for s in re.split(r"(?<=[.!?])\s+", text) if s)
  if len(sentences) < 2:
    raise ValueError(f"NIAH haystack text:{pattern} holds {len(sentences)} sentence(s); give "
                     f"text files with prose in them")
  return sentences


def _sentences(kind: str, rng: np.random.Generator, exclude: Sequence[str] = ()):
  """An endless stream of haystack sentences (each with a leading space); sentences of a 'text:'
  haystack that contain one of `exclude` (case-insensitive) are skipped."""
  if kind == "repeat":
    i = 0
    while True:
      yield " " + _REPEAT[i % len(_REPEAT)]
      i += 1
  if kind.startswith("text:"):
    sentences = text_sentences(kind[len("text:"):])
    banned = re.compile("|".join(re.escape(x) for x in exclude), re.IGNORECASE) if exclude else None
    i = int(rng.integers(len(sentences)))
    since_kept = 0
    while since_kept <= len(sentences):
      s = sentences[i % len(sentences)]
      i += 1
      since_kept += 1
      if banned is None or not banned.search(s):
        since_kept = 0
        yield " " + s
    raise ValueError(f"every sentence of the haystack {kind} contains one of {list(exclude)}")
  while True:
    yield (f" {_SUBJECTS[rng.integers(len(_SUBJECTS))]} {_ACTIONS[rng.integers(len(_ACTIONS))]} "
           f"{_PLACES[rng.integers(len(_PLACES))]} {_TIMES[rng.integers(len(_TIMES))]}.")


def haystack(tokenizer, num_tokens: int, *, kind: str = "prose", seed=0,
             exclude: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 `[num_tokens]`, sentence starts int `[n]`, 0 first, num_tokens last).

  Sentences are tokenized one by one and concatenated; the last one is cut at num_tokens.
  `exclude`: strings no sentence of a 'text:' haystack may contain (the example's keys, values).
  """
  rng = np.random.default_rng(seed) if not isinstance(seed, np.random.Generator) else seed
  pieces, starts, total = [], [0], 0
  stream = _sentences(kind, rng, exclude)
  while total < num_tokens:
    piece = tokenizer.encode_array(next(stream))
    pieces.append(piece)
    total += len(piece)
    starts.append(total)
  tokens = np.concatenate(pieces)[:num_tokens] if pieces else np.zeros(0, np.int32)
  bounds = np.unique(np.minimum(np.asarray(starts), num_tokens))
  return tokens.astype(np.int32), bounds


def _keys(rng: np.random.Generator, n: int) -> list[str]:
  pairs = rng.choice(len(_KEY_ADJECTIVES) * len(_KEY_NOUNS), n, replace=False)
  return [f"{_KEY_ADJECTIVES[p // len(_KEY_NOUNS)]}-{_KEY_NOUNS[p % len(_KEY_NOUNS)]}"
          for p in pairs]


def _values(rng: np.random.Generator, n: int, needle: str, digits: int) -> list[str]:
  if needle == "word":
    return [_VALUE_WORDS[i] for i in rng.choice(len(_VALUE_WORDS), n, replace=False)]
  low, high = 10 ** (digits - 1), 10 ** digits
  values: list[str] = []
  while len(values) < n:  # distinct, so an answer names one needle
    v = str(int(rng.integers(low, high)))
    if v not in values:
      values.append(v)
  return values


def niah_example(tokenizer, length: int, spec: NiahSpec, *, seed,
                 depth: float = 0.5) -> NiahExample:
  """One example of exactly `length` tokens (BOS first; the answer is the last span).

  ValueError when the header, needles, question and answer do not fit in `length`.
  """
  spec.check()
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"NIAH depth {depth} is outside [0, 1]")
  rng = np.random.default_rng(seed) if not isinstance(seed, np.random.Generator) else seed
  n = 1 if spec.kind == "single" else spec.num_needles
  keys = _keys(rng, 1 if spec.kind == "multivalue" else n)
  values = _values(rng, n, spec.needle, spec.digits)
  needle_keys = keys * n if spec.kind == "multivalue" else keys
  other_depths = rng.uniform(size=n - 1)
  asked = rng.permutation(n) if spec.kind == "multiquery" else None
  target = int(asked[0]) if asked is not None else 0   # which needle (by index) `depth` places

  enc = tokenizer.encode_array
  kind = spec.needle
  needles = [enc(_NEEDLE.format(kind=kind, key=k, value=v)) for k, v in zip(needle_keys, values)]
  header = enc(_HEADER.format(kind=kind))
  fixed = 1 + len(header) + sum(len(x) for x in needles)
  # Depth of every needle; multivalue's answer lists the values in this (= the text's) order.
  depths = np.empty(n)
  depths[target] = depth
  depths[[i for i in range(n) if i != target]] = other_depths
  if spec.kind == "multiquery":
    question = _QUESTIONS["multiquery"].format(kind=kind, keys=_join([keys[i] for i in asked]))
    answer_values = [values[i] for i in asked]
  else:
    question = _QUESTIONS[spec.kind].format(kind=kind, key=keys[target])
    answer_values = ([values[i] for i in np.argsort(depths, kind="stable")]
                     if spec.kind == "multivalue" else [values[target]])
  answer_text = ", ".join(answer_values) + "."
  question_ids, answer = enc(question), enc(answer_text)
  fill = length - fixed - len(question_ids) - len(answer)
  if fill < 0:
    raise ValueError(f"NIAH {spec.name}: length {length} is shorter than the {length - fill} "
                     f"tokens of its header, needles, question and answer; use a longer length "
                     f"(or fewer needles / digits)")
  hay, bounds = haystack(tokenizer, fill, kind=spec.haystack, seed=rng,
                         exclude=tuple(keys) + tuple(values))
  # Each needle goes to the sentence boundary nearest its depth. Nearest-boundary rounding keeps
  # the depth order, so the text order is the depth order the answer was built from.
  order = np.argsort(depths, kind="stable")
  cut = bounds[np.abs(bounds[None, :] - depths[:, None] * fill).argmin(axis=1)]
  parts, starts, at, pos = [np.array([tokenizer.bos_id], np.int32), header], {}, 0, 1 + len(header)
  for i in order:
    parts.append(hay[at:cut[i]])
    pos += cut[i] - at
    at = cut[i]
    starts[i] = pos
    parts.append(needles[i])
    pos += len(needles[i])
  parts += [hay[at:], question_ids, answer]
  tokens = np.concatenate(parts).astype(np.int32)
  mask = np.zeros(len(tokens), np.float32)
  mask[len(tokens) - len(answer):] = 1.0
  example = tasks_lib.TaskExample(
      tokens=tokens, answer_mask=mask,
      answer_positions=np.flatnonzero(mask).astype(np.int32), answer=tokens[mask > 0],
      answer_text=answer_text, prompt_length=len(tokens) - len(answer))
  text_order = np.asarray([starts[i] for i in order])
  return NiahExample(example=example, needle_starts=text_order,
                     target=int(np.flatnonzero(order == target)[0]),
                     depth=float(cut[target] / fill) if fill else 0.0, answer_text=answer_text,
                     values=tuple(values[i] for i in order), answer_values=tuple(answer_values))


def value_token_spans(tokenizer, ex: NiahExample) -> list[np.ndarray] | None:
  """For each value the answer lists, the indices (into the answer's tokens) of the tokens that
  carry its characters; None if the tokenizer's decoded prefixes of the answer are not prefixes
  of its text (then values cannot be told apart)."""
  answer, text = ex.example.answer, ex.answer_text
  ends = []
  for i in range(len(answer) + 1):
    prefix = tokenizer.decode(answer[:i])
    if not text.startswith(prefix):
      return None
    ends.append(len(prefix))
  ends = np.asarray(ends)    # answer token i spans characters [ends[i], ends[i + 1])
  spans, at = [], 0
  for value in ex.answer_values:
    start = text.index(value, at)
    at = start + len(value)
    spans.append(np.flatnonzero((ends[:-1] < at) & (ends[1:] > start)))
  return spans


def value_scores(tokenizer, ex: NiahExample, hits: np.ndarray, pred: np.ndarray) -> dict | None:
  """Value by value, for one scored example (`hits`, `pred`: its row `[time]`, teacher forced).

  Returns {'exact': [bool per answer value], 'wrong': values whose first token is wrong,
  'other_needle': of those, how many the model began with the first token of another needle's
  value (as the tokenizer encodes that value alone: exact for bytes)}; None when the answer's
  tokens cannot be mapped to its values (`value_token_spans`).
  """
  spans = value_token_spans(tokenizer, ex)
  if spans is None:
    return None
  at = ex.example.prompt_length - 1    # answer token j is predicted at position prompt_length-1+j
  first_token = {v: int(tokenizer.encode_array(v)[0]) for v in ex.values}
  exact, wrong, other = [], 0, 0
  for value, span in zip(ex.answer_values, spans):
    exact.append(bool(hits[at + span].all()))
    if not hits[at + span[0]]:
      wrong += 1
      other += int(pred[at + span[0]]) in {t for v, t in first_token.items() if v != value}
  return {"exact": exact, "wrong": wrong, "other_needle": other}


def ruler_match_all(generated_text: str, answer_values: Sequence[str]) -> float:
  """RULER's string_match_all for one example: the fraction of `answer_values` that occur in
  `generated_text`, case-insensitively, as substrings (in any order, anywhere; a value inside
  another value's text counts as found, as RULER counts it)."""
  text = generated_text.lower()
  return sum(v.lower() in text for v in answer_values) / len(answer_values)


def text_through_stop(text: str, stop: str = ".") -> str:
  """`text` up to and including the first `stop` (all of it when there is none): the answer a
  generation gave before it ran on."""
  at = text.find(stop)
  return text if at < 0 else text[:at + len(stop)]


def generation_budget(ex: NiahExample) -> int:
  """Tokens a generation for `ex` may produce: its answer's and GENERATE_MARGIN more."""
  return len(ex.example.answer) + GENERATE_MARGIN


def engine_generate(engine, examples: Sequence[NiahExample]) -> list[str]:
  """Greedy continuation of every example's prompt (`tokens[:prompt_length]`, BOS first) on a
  started serving engine (`serve.engine.Engine`), at most `generation_budget` tokens and through
  the first '.'; the texts in the order of `examples`. All requests are queued at once, so the
  engine decodes them together in its slots. EngineError when the engine fails one."""
  done = queue.Queue()
  requests = []
  for i, ex in enumerate(examples):
    params = engine_lib.SamplingParams(max_tokens=generation_budget(ex), temperature=0.0,
                                       stop=(".",))
    prompt = [int(t) for t in ex.example.tokens[:ex.example.prompt_length]]
    requests.append(engine.submit(prompt, params, lambda e, i=i: done.put((i, e))))
  finished = {}
  while len(finished) < len(requests):
    i, event = done.get()
    if event.kind == "error":
      raise engine_lib.EngineError(f"NIAH generation failed: {event.error}") from event.error
    if event.kind == "done":
      finished[i] = event
  # The token ids, not the streamed text: the engine's text leaves out the stop '.' it cut at.
  return [text_through_stop(engine.tokenizer.decode(r.generated)) for r in requests]


class EngineGenerator:
  """A NIAH generator (`niah_grid(generator=...)`): greedy continuations through a serving
  engine of its own over `model` and `params` exactly as given (no serving layout, the model's
  KV cache dtype), so they are the model's `generate`.

  max_len: the longest prompt + generation it serves (the longest NIAH length +
  GENERATE_MARGIN); every slot holds a cache of that many tokens. Prefill runs in pieces of
  prefill_chunk, prefill_chunk / 2, ..., 1 tokens: at most 2 (log2(prefill_chunk) + 1) compiled
  prefill shapes whatever the prompt lengths (a model with a 'graph' layer continues a prompt
  one token at a time after its first power-of-two piece: slow on long prompts).
  """

  def __init__(self, model, params, tokenizer, *, max_len: int, num_slots: int = 4,
               prefill_chunk: int = 512):
    self.config = engine_lib.EngineConfig(num_slots=num_slots, max_len=max_len,
                                          prefill_chunk=prefill_chunk, serving_layout=False)
    self.config.check()   # a bad setting fails now, not after the scoring
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.engine = None    # made on the first call: its slot caches take memory the scorer may need

  def __call__(self, examples: Sequence[NiahExample]) -> list[str]:
    longest = max((e.example.prompt_length + generation_budget(e) for e in examples), default=0)
    if longest > self.config.max_len:
      raise ValueError(f"NIAH generation needs max_len >= {longest} (prompt + answer + "
                       f"{GENERATE_MARGIN}); the generator has {self.config.max_len}")
    if self.engine is None:
      self.engine = engine_lib.Engine(self.model, self.params, self.tokenizer, self.config,
                                      name="niah").start()
    return engine_generate(self.engine, examples)

  def close(self) -> None:
    if self.engine is not None:
      self.engine.stop()


Generator = Callable[[Sequence[NiahExample]], list[str]]


def _generate_cells(generator: Generator, cells: Sequence[Sequence[NiahExample]]
                    ) -> list[list[str]]:
  """The generated texts of every cell's examples, from one generator call over all of them."""
  flat = [ex for examples in cells for ex in examples]
  texts = list(generator(flat))
  if len(texts) != len(flat):
    raise ValueError(f"the NIAH generator returned {len(texts)} texts for {len(flat)} examples")
  starts = np.cumsum([0] + [len(examples) for examples in cells])
  return [texts[a:b] for a, b in zip(starts[:-1], starts[1:])]


def _ruler_summary(texts: Sequence[str], examples: Sequence[NiahExample]) -> dict:
  """A cell's RULER fields: mean string_match_all, rate of answers with every value found, and
  the generated texts."""
  scores = [ruler_match_all(t, ex.answer_values) for t, ex in zip(texts, examples)]
  return {"ruler_score": float(np.mean(scores)), "ruler_all": float(np.mean(np.equal(scores, 1))),
          "generated": list(texts)}


def _join(items: Sequence[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def niah_cell_examples(tokenizer, spec: NiahSpec, *, seq_len: int, num_examples: int, seed: int,
                       depth: float) -> list[NiahExample]:
  """The `num_examples` examples of one task at one (length, depth) cell."""
  return [niah_example(tokenizer, seq_len, spec, depth=depth,
                       seed=np.random.default_rng([seed, i])) for i in range(num_examples)]


def niah_eval_batch(tokenizer, spec: NiahSpec, *, seq_len: int, num_examples: int, seed: int,
                    depth: float) -> dict[str, np.ndarray]:
  """`num_examples` rows `[num_examples, seq_len]` of one task at one depth (a model batch)."""
  examples = niah_cell_examples(tokenizer, spec, seq_len=seq_len, num_examples=num_examples,
                                seed=seed, depth=depth)
  return tasks_lib.example_batch([e.example for e in examples], tokenizer.pad_id)


def _value_summary(scores: list[dict | None]) -> dict:
  """A cell's value-by-value fields from its examples' `value_scores`."""
  scored = [s for s in scores if s is not None]
  if not scored:
    return {}
  exact = np.asarray([s["exact"] for s in scored], float)    # [examples, answer values]
  return {"value_accuracy": [float(x) for x in exact.mean(axis=0)],
          "wrong_values": int(sum(s["wrong"] for s in scored)),
          "wrong_values_other_needle": int(sum(s["other_needle"] for s in scored))}


def task_specs(kinds: Sequence[str] = KINDS, needles: Sequence[str] = NEEDLES, *,
               num_needles: int = 4, digits: int = 7, haystack_kind: str = "prose") -> list[NiahSpec]:
  """Every (kind, needle) pair as a checked NiahSpec, kinds outer."""
  specs = [NiahSpec(k, n, num_needles=num_needles, digits=digits, haystack=haystack_kind)
           for k in kinds for n in needles]
  for s in specs:
    s.check()
  return specs


def niah_grid(scorer: Scorer, tokenizer, specs: Sequence[NiahSpec], *, lengths: Sequence[int],
              depths: Sequence[float], num_examples: int = 2, seed: int = 2468,
              progress: Progress = None, generator: Generator | None = None) -> dict:
  """Exact-match accuracy of every task at every (length, depth).

  All cells of one length are scored in one scorer call (one compiled shape per length).
  Returns {'tasks': {name: {'cells': [{'length', 'depth', 'accuracy', 'token_accuracy',
  'value_accuracy', 'wrong_values', 'wrong_values_other_needle'} | {..., 'accuracy': None,
  'skipped': reason}], 'mean_accuracy'}}, 'mean_accuracy' (mean of the task means),
  'num_examples', 'lengths', 'depths'}: value_accuracy is the exact-match rate of the answer's
  1st, 2nd, ... value, wrong_values the values begun with a wrong token, of which
  wrong_values_other_needle began as another needle's value (`value_scores`; the three are
  absent when the tokenizer's tokens cannot be mapped to values). `progress(n)` counts finished
  cells.

  generator (opt-in, e.g. `EngineGenerator`): `generator(examples) -> generated texts`, called
  once per length with every example of it; then every scored cell also has 'ruler_score' (mean
  `ruler_match_all`: RULER's string_match_all), 'ruler_all' (rate of answers with every value
  found) and 'generated' (the texts), every task 'ruler_mean' (mean of its cells' ruler_score),
  and the result 'ruler_mean' (mean of the task means).
  """
  out = {s.name: [] for s in specs}
  for length in lengths:
    todo, batches = [], []
    for t_index, spec in enumerate(specs):
      for d_index, depth in enumerate(depths):
        cell = {"length": int(length), "depth": float(depth)}
        try:
          examples = niah_cell_examples(
              tokenizer, spec, seq_len=int(length), num_examples=num_examples,
              seed=cell_seed(seed, length, t_index, d_index), depth=float(depth))
        except ValueError as e:  # the prompt does not fit this length
          out[spec.name].append({**cell, "accuracy": None, "skipped": str(e)})
          if progress:
            progress(1)
          continue
        batches.append(tasks_lib.example_batch([e.example for e in examples], tokenizer.pad_id))
        todo.append((spec.name, cell, examples))
    if not batches:
      continue
    texts = _generate_cells(generator, [exs for _, _, exs in todo]) if generator else None
    for c_index, ((name, cell, examples), (hits, batch, pred)) in enumerate(
        zip(todo, score_cells(scorer, batches))):
      mask = batch["loss_mask"] > 0
      values = [value_scores(tokenizer, ex, hits[r], pred[r]) for r, ex in enumerate(examples)]
      ruler = _ruler_summary(texts[c_index], examples) if texts is not None else {}
      out[name].append({**cell, "accuracy": float(np.all(hits | ~mask, axis=1).mean()),
                        "token_accuracy": float(hits[mask].mean()), **_value_summary(values),
                        **ruler})
      if progress:
        progress(1)
  result = {}
  for name, cells in out.items():
    cells.sort(key=lambda c: (c["length"], c["depth"]))
    scored = [c["accuracy"] for c in cells if c["accuracy"] is not None]
    result[name] = {"cells": cells, "mean_accuracy": float(np.mean(scored)) if scored else None}
    if generator:
      ruler = [c["ruler_score"] for c in cells if "ruler_score" in c]
      result[name]["ruler_mean"] = float(np.mean(ruler)) if ruler else None
  means = [r["mean_accuracy"] for r in result.values() if r["mean_accuracy"] is not None]
  grid = {"tasks": result, "mean_accuracy": float(np.mean(means)) if means else None,
          "num_examples": num_examples, "lengths": [int(x) for x in lengths],
          "depths": [float(d) for d in depths]}
  if generator:
    ruler_means = [r["ruler_mean"] for r in result.values() if r["ruler_mean"] is not None]
    grid["ruler_mean"] = float(np.mean(ruler_means)) if ruler_means else None
  return grid

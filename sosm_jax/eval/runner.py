"""Runs the evaluation tasks on one scorer and assembles the report (with a progress bar).

  from sosm_jax.eval import runner
  loaded = loading.load_for_eval(workdir)
  scorer = scoring.model_scorer(loaded.model, loaded.params, batch_size=8)
  report = runner.run_tasks(scorer, loaded.tokenizer, loaded.config, runner.EvalOptions())
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Iterable

import ml_collections
from tqdm.auto import tqdm

from sosm_jax import data as data_lib
from sosm_jax.data import sources
from sosm_jax.eval import niah, perplexity, recall
from sosm_jax.eval.scoring import Batch, Scorer

TASKS = ("ppl", "mqar", "passkey", "niah")


@dataclasses.dataclass
class EvalOptions:
  """What to evaluate and how much. Lengths of () are derived from the trained length."""
  tasks: tuple[str, ...] = TASKS
  seed: int = 1234
  # perplexity by position
  ppl_seq_len: int = 0                 # 0 = the longest trained length
  ppl_batches: int = 8
  ppl_batch_size: int = 4
  ppl_first_edge: int = 16             # buckets [0, 16), [16, 32), [32, 64), ...
  ppl_source: str = ""                 # read whole; '' = `text_source`'s held-out text
  # MQAR (Zoology style: trained up to (256, 64), tested up to (1024, 256))
  mqar_lengths: tuple[int, ...] = (64, 128, 256, 512, 1024)
  mqar_pairs: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
  mqar_examples: int = 16
  # passkey
  passkey_lengths: tuple[int, ...] = ()
  passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  passkey_examples: int = 4
  passkey_digits: int = 5
  # needle in a haystack (RULER-style, see niah.py); lengths () = the passkey lengths
  niah_kinds: tuple[str, ...] = niah.KINDS
  niah_needles: tuple[str, ...] = niah.NEEDLES
  niah_lengths: tuple[int, ...] = ()
  niah_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  niah_examples: int = 2
  niah_num_needles: int = 4
  niah_digits: int = 7
  niah_haystack: str = "prose"
  niah_generate: bool = False          # also RULER's string_match_all on greedy generations

  def niah_specs(self) -> list[niah.NiahSpec]:
    return niah.task_specs(self.niah_kinds, self.niah_needles, num_needles=self.niah_num_needles,
                           digits=self.niah_digits, haystack_kind=self.niah_haystack)

  def check(self) -> None:
    unknown = [t for t in self.tasks if t not in TASKS]
    if unknown or not self.tasks:
      raise ValueError(f"unknown tasks {unknown or '(none given)'}; use a comma-separated subset "
                       f"of {TASKS}")
    for name in ("ppl_batches", "ppl_batch_size", "mqar_examples", "passkey_examples",
                 "niah_examples"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if any(not 0.0 <= d <= 1.0 for d in self.passkey_depths):
      raise ValueError(f"passkey depths must lie in [0, 1], got {self.passkey_depths}")
    if "niah" in self.tasks:
      if any(not 0.0 <= d <= 1.0 for d in self.niah_depths) or not self.niah_depths:
        raise ValueError(f"niah depths must lie in [0, 1], got {self.niah_depths}")
      if not self.niah_kinds or not self.niah_needles:
        raise ValueError(f"niah needs at least one kind of {niah.KINDS} and one needle of "
                         f"{niah.NEEDLES}; got {self.niah_kinds} and {self.niah_needles}")
      self.niah_specs()   # names a bad kind, needle, haystack, count or digits


def trained_length(config: ml_collections.ConfigDict) -> int:
  """The longest sequence length of the config's curriculum."""
  return int(max(config.curriculum.seq_lens))


def default_passkey_lengths(trained: int, minimum: int = 32) -> tuple[int, ...]:
  """trained/8, /4, /2, trained and 2x trained (the last beyond training), at least `minimum`.

  Below ~190 tokens (byte tokenizer) the generator uses its terse prompt ('#12345' ... '#').
  """
  lengths = sorted({max(minimum, trained * k // 8) for k in (1, 2, 4, 8, 16)})
  return tuple(lengths)


def _source_string(components) -> str:
  """Components back to a source string (one: its spec; several: a 'mix:' with their weights)."""
  specs = ["stdlib" if c.kind == "stdlib" else f"{c.kind}:{c.arg}" for c in components]
  if len(specs) == 1:
    return specs[0]
  return "mix:" + ",".join(f"{spec}={c.weight:g}" for spec, c in zip(specs, components))


def text_source(config, source: str = "") -> tuple[str, str]:
  """(source, split) of the perplexity task's held-out text; split 'all' reads the source whole.

  `source` (`--ppl_source`) or `data.eval_source` is read whole. Otherwise the validation split
  of `data.source`'s text: a mix's synthetic tasks are dropped (their rows score only answers,
  which say nothing about text), and each text component keeps its own hash split, so the
  documents are the ones training held out. A model trained on synthetic tasks alone is read
  against the standard library's text, whole (it trained on none of it).
  """
  if source:
    return source, "all"
  if config.data.eval_source:
    comps = sources.parse_source(config.data.eval_source)
    has_text = any(c.kind != "synthetic" for c in comps)
    return (config.data.eval_source if has_text else "stdlib"), "all"
  text = [c for c in sources.parse_source(config.data.source) if c.kind != "synthetic"]
  if not text:
    return "stdlib", "all"
  return _source_string(text), "validation"


def describe_text_source(config, source: str = "") -> str:
  """`text_source` in words, for the report."""
  src, split = text_source(config, source)
  return src if split == "all" else f"validation split of {src!r}"


def text_batches(config, tokenizer, *, seq_len: int, batch_size: int, num_batches: int,
                 seed: int, source: str = "") -> Iterable[Batch]:
  """Up to `num_batches` held-out batches `[batch_size, seq_len]` (see `text_source`)."""
  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  src, split = text_source(config, source)
  if split == "all":
    data_cfg.eval_source = src
  else:
    data_cfg.source, data_cfg.eval_source = src, ""
  data_cfg.num_workers = 0
  pipeline = data_lib.make_pipeline(data_cfg, tokenizer, seq_len=seq_len, batch_size=batch_size,
                                    seed=seed, split="validation", process_index=0,
                                    process_count=1)
  return itertools.islice(pipeline, num_batches)


def count_units(options: EvalOptions, passkey_lengths, niah_lengths=()) -> int:
  """Progress-bar units: one per perplexity batch and one per grid cell."""
  n = 0
  if "ppl" in options.tasks:
    n += options.ppl_batches
  if "mqar" in options.tasks:
    n += len(options.mqar_lengths) * len(options.mqar_pairs)
  if "passkey" in options.tasks:
    n += len(passkey_lengths) * len(options.passkey_depths)
  if "niah" in options.tasks:
    n += (len(niah_lengths) * len(options.niah_depths) * len(options.niah_kinds)
          * len(options.niah_needles))
  return n


def niah_lengths(options: EvalOptions, config: ml_collections.ConfigDict,
                 memory_span: int = 0) -> tuple[int, ...]:
  """The NIAH lengths run_tasks evaluates: options.niah_lengths, else the passkey lengths."""
  trained = trained_length(config)
  pk_lengths = tuple(options.passkey_lengths) or memory_lengths(trained, memory_span)
  return tuple(options.niah_lengths) or pk_lengths


def check_niah_generate(options: EvalOptions, *, memory: bool, predictor: str = "model") -> None:
  """ValueError, naming the flags, when options.niah_generate cannot run: generation needs the
  model itself (not a stand-in predictor) and does not read host memory."""
  if not (options.niah_generate and "niah" in options.tasks):
    return
  if predictor != "model":
    raise ValueError(f"--niah_generate generates with the model; the '{predictor}' stand-in "
                     f"predictor cannot generate (drop --niah_generate or use --predictor=model)")
  if memory:
    raise ValueError("--niah_generate does not support host memory (the serving engine reads "
                     "no memory); evaluate with --memory=off or drop --niah_generate")


def memory_lengths(trained: int, memory_span: int) -> tuple[int, ...]:
  """Default passkey lengths with memory: those of `default_passkey_lengths` plus the memory
  span (the document length memory training read: windows x segments) and twice it."""
  extra = (memory_span, 2 * memory_span) if memory_span else ()
  return tuple(sorted(set(default_passkey_lengths(trained)) | set(extra)))


def run_tasks(scorer: Scorer, tokenizer, config: ml_collections.ConfigDict,
              options: EvalOptions, *, batches: Iterable[Batch] | None = None,
              show_progress: bool | None = None, memory_span: int = 0,
              generator: niah.Generator | None = None) -> dict:
  """Evaluates `scorer` on options.tasks; returns the report dict (see report.py).

  `batches` replaces the held-out text of the perplexity task (tests pass their own).
  memory_span: for a scorer with host memory (eval/memory.py), the tokens memory training read
  per stream (window x config.memory.segments): the default perplexity length, and with twice it
  among the default passkey lengths; 0 = no memory.
  generator: with options.niah_generate, what generates the NIAH answers (`niah.niah_grid`'s
  generator, e.g. `niah.EngineGenerator` sized for `niah_lengths`); required then.
  """
  options.check()
  check_niah_generate(options, memory=bool(memory_span))
  if options.niah_generate and "niah" in options.tasks and generator is None:
    raise ValueError("niah_generate needs a generator (e.g. niah.EngineGenerator over the model)")
  trained = trained_length(config)
  pk_lengths = tuple(options.passkey_lengths) or memory_lengths(trained, memory_span)
  nh_lengths = niah_lengths(options, config, memory_span)
  disable = (not sys.stderr.isatty()) if show_progress is None else not show_progress
  bar = tqdm(total=count_units(options, pk_lengths, nh_lengths), unit="cell", dynamic_ncols=True,
             disable=disable)
  step = lambda n=1: bar.update(n)
  report = {"meta": {"trained_length": trained, "tasks": ",".join(options.tasks),
                     "scoring": "teacher-forced argmax; passkey and niah: exact match of the "
                                "whole answer (= greedy generation starts with it)"},
            "options": dataclasses.asdict(options)}
  if options.niah_generate and "niah" in options.tasks:
    report["meta"]["scoring"] += ("; niah also greedy generation scored as RULER's "
                                  "string_match_all (values found in any order)")
  if memory_span:
    report["meta"]["memory_span"] = memory_span
  try:
    if "ppl" in options.tasks:
      bar.set_description("perplexity")
      seq_len = options.ppl_seq_len or memory_span or trained
      if batches is None:
        report["meta"]["ppl_source"] = describe_text_source(config, options.ppl_source)
        batches = text_batches(config, tokenizer, seq_len=seq_len,
                               batch_size=options.ppl_batch_size, num_batches=options.ppl_batches,
                               seed=options.seed, source=options.ppl_source)
      edges = perplexity.position_bucket_edges(seq_len, options.ppl_first_edge)
      report["perplexity"] = perplexity.loss_by_position(scorer, batches, edges, progress=step)
    if "mqar" in options.tasks:
      bar.set_description("mqar")
      report["mqar"] = recall.mqar_grid(
          scorer, tokenizer, lengths=options.mqar_lengths, num_pairs=options.mqar_pairs,
          num_examples=options.mqar_examples, seed=options.seed,
          vocab_size=config.data.task_vocab_size, progress=step)
    if "passkey" in options.tasks:
      bar.set_description("passkey")
      report["passkey"] = recall.passkey_grid(
          scorer, tokenizer, lengths=pk_lengths, depths=options.passkey_depths,
          num_examples=options.passkey_examples, seed=options.seed + 1,
          digits=options.passkey_digits, progress=step)
    if "niah" in options.tasks:
      bar.set_description("niah")
      report["niah"] = niah.niah_grid(
          scorer, tokenizer, options.niah_specs(), lengths=nh_lengths,
          depths=options.niah_depths, num_examples=options.niah_examples, seed=options.seed + 2,
          progress=step, generator=generator if options.niah_generate else None)
  finally:
    bar.close()
  means = [report[t]["mean_accuracy"] for t in ("mqar", "passkey", "niah")
           if t in report and report[t]["mean_accuracy"] is not None]
  if means:
    report["average_recall"] = sum(means) / len(means)
  return report

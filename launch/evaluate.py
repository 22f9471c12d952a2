"""Evaluate a checkpoint: python launch/evaluate.py --workdir=DIR [--tasks=ppl,mqar,passkey,niah].

Reads the newest (or --step) checkpoint of a training run with its own config, evaluates
  ppl      loss / perplexity by position bucket on held-out text (does loss fall with context?)
  mqar     MQAR accuracy over lengths x key-value pairs
  passkey  passkey accuracy over lengths x needle depths, up to 2x the trained length
  niah     RULER-style needle in a haystack (single, multikey, multivalue, multiquery; number and
           word needles in generated prose) over lengths x depths (sosm_jax/eval/niah.py)
and writes report.json, report.md, loss_by_position.png, mqar_heatmap.png, passkey_heatmap.png,
niah_heatmaps.png, niah_by_length.png to DIR/eval/<step>/ (or --out); plots mark the trained
length. Scoring is teacher-forced argmax (see sosm_jax/eval/scoring.py); passkey and niah count
an example when its whole answer is right, which is exactly greedy generation starting with it.

--niah_generate (opt-in) also greedy-generates every NIAH answer (through the serving engine,
sosm_jax/serve/engine.py: a bounded set of compiled prefill shapes) and scores it as RULER does,
string_match_all: the fraction of the answer's values found in the generated text, in any order
(a multi-value / multi-query answer with its values in another order counts in full). The
report adds a table of it per task x length ('ruler_score' per cell, 'ruler_mean' per task and
overall in report.json); exact match stays the primary metric. It needs the model itself (not
--predictor=oracle|random) and no host memory (--memory=off for a checkpoint trained with it).

A checkpoint trained with host memory (config.memory.enabled) is scored with it, window by
window as it trained (sosm_jax/eval/memory.py); --memory=off scores it without, so two reports
show what memory adds. The report says which (meta 'host_memory', section 'memory').

  python launch/evaluate.py --workdir=workdir/curriculum-smoke --tasks=ppl,passkey \
      --passkey_lengths=256,512,1024,2048 --passkey_depths=0,0.5,1
  python launch/evaluate.py --workdir=DIR --tasks=niah --niah_lengths=4096,16384,65536,131072 \
      --niah_depths=0,0.1,0.25,0.5,0.75,0.9,1 --niah_examples=4
  python launch/evaluate.py --workdir=DIR --tasks=niah --niah_kinds=multivalue,multiquery \
      --niah_lengths=4096,16384 --niah_generate          # + RULER's string_match_all
  python launch/evaluate.py --workdir=DIR --memory=off --out=DIR/eval/no-memory
  python launch/evaluate.py --workdir=DIR --predictor=oracle   # checks the evaluator: ~100%
                                     # (niah: single and multikey only; the oracle copies)
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from sosm_jax.eval import loading, memory as memory_lib, niah, report as report_lib, runner
from sosm_jax.eval import scoring, standins

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of a training run.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional config replacing the checkpoint's own (its model must describe the "
    "same parameters; e.g. to change model.rope_base or model.linear_impl for evaluation).")
_TASKS = flags.DEFINE_list("tasks", list(runner.TASKS), f"Subset of {runner.TASKS}.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_OUT = flags.DEFINE_string("out", "", "Output directory (default: WORKDIR/eval/<step>).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per forward pass of the grids.")
_SEED = flags.DEFINE_integer("seed", 1234, "Seed of the generated examples.")
_PREDICTOR = flags.DEFINE_enum("predictor", "model", ["model", "oracle", "random"],
                               "'oracle'/'random': stand-ins that check the evaluator itself.")
_MEMORY = flags.DEFINE_enum(
    "memory", "auto", list(memory_lib.MODES), "Host memory beyond the window: 'auto' = as the "
    "checkpoint trained (config.memory.enabled), 'on', 'off'.")
_PPL_LEN = flags.DEFINE_integer("ppl_seq_len", 0, "Perplexity sequence length (0: trained; with "
                                "memory: window x config.memory.segments).")
_PPL_BATCHES = flags.DEFINE_integer("ppl_batches", 8, "Held-out batches for perplexity.")
_PPL_BS = flags.DEFINE_integer("ppl_batch_size", 4, "Rows per perplexity batch.")
_PPL_SOURCE = flags.DEFINE_string("ppl_source", "", "Text source read whole for perplexity, "
                                  "e.g. 'text:/data/books/*.txt' (default: the validation split "
                                  "of the config's text, a mix's synthetic tasks dropped).")
_MQAR_LENS = flags.DEFINE_list("mqar_lengths", ["64", "128", "256", "512", "1024"], "")
_MQAR_PAIRS = flags.DEFINE_list("mqar_pairs", ["4", "8", "16", "32", "64", "128", "256"], "")
_MQAR_N = flags.DEFINE_integer("mqar_examples", 16, "Examples per MQAR cell.")
_PK_LENS = flags.DEFINE_list("passkey_lengths", [], "Default: trained/8 .. 2x trained.")
_PK_DEPTHS = flags.DEFINE_list("passkey_depths", ["0", "0.25", "0.5", "0.75", "1"], "")
_PK_N = flags.DEFINE_integer("passkey_examples", 4, "Examples per passkey cell.")
_PK_DIGITS = flags.DEFINE_integer("passkey_digits", 5, "Digits of the passkey.")
_NIAH_KINDS = flags.DEFINE_list("niah_kinds", list(niah.KINDS), f"Subset of {niah.KINDS}.")
_NIAH_NEEDLES = flags.DEFINE_list("niah_needles", list(niah.NEEDLES),
                                  f"Subset of {niah.NEEDLES} (what the values are).")
_NIAH_LENS = flags.DEFINE_list("niah_lengths", [], "Default: the passkey lengths.")
_NIAH_DEPTHS = flags.DEFINE_list("niah_depths", ["0", "0.25", "0.5", "0.75", "1"], "")
_NIAH_N = flags.DEFINE_integer("niah_examples", 2, "Examples per NIAH cell.")
_NIAH_NUM = flags.DEFINE_integer("niah_num_needles", 4, "Needles of the multi-needle tasks.")
_NIAH_DIGITS = flags.DEFINE_integer("niah_digits", 7, "Digits of number needles.")
_NIAH_GEN = flags.DEFINE_bool(
    "niah_generate", False, "Also greedy-generate the NIAH answers and score them with RULER's "
    "order-free string_match_all (needs --predictor=model, no host memory).")
_NIAH_SLOTS = flags.DEFINE_integer("niah_generate_slots", 4, "With --niah_generate: answers "
                                   "decoded together (each slot holds a cache of the longest "
                                   "length).")
_NIAH_CHUNK = flags.DEFINE_integer("niah_prefill_chunk", 512, "With --niah_generate: longest "
                                   "prefill piece (a power of two; attention's scores of a piece "
                                   "span the whole cache).")
_NIAH_HAY = flags.DEFINE_string(
    "niah_haystack", "prose", "'prose': generated sentences; 'repeat': four sentences repeated; "
    "'text:<dir|glob|file>': sentences of your text files (e.g. books).")


def _ints(values, name):
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise app.UsageError(f"--{name} takes comma-separated integers, got {','.join(values)}")


def _floats(values, name):
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise app.UsageError(f"--{name} takes comma-separated numbers in [0, 1], got "
                         f"{','.join(values)}")


def options_from_flags() -> runner.EvalOptions:
  depths = _floats(_PK_DEPTHS.value, "passkey_depths")
  return runner.EvalOptions(
      tasks=tuple(_TASKS.value), seed=_SEED.value, ppl_seq_len=_PPL_LEN.value,
      ppl_batches=_PPL_BATCHES.value, ppl_batch_size=_PPL_BS.value, ppl_source=_PPL_SOURCE.value,
      mqar_lengths=_ints(_MQAR_LENS.value, "mqar_lengths"),
      mqar_pairs=_ints(_MQAR_PAIRS.value, "mqar_pairs"), mqar_examples=_MQAR_N.value,
      passkey_lengths=_ints(_PK_LENS.value, "passkey_lengths"), passkey_depths=depths,
      passkey_examples=_PK_N.value, passkey_digits=_PK_DIGITS.value,
      niah_kinds=tuple(_NIAH_KINDS.value), niah_needles=tuple(_NIAH_NEEDLES.value),
      niah_lengths=_ints(_NIAH_LENS.value, "niah_lengths"),
      niah_depths=_floats(_NIAH_DEPTHS.value, "niah_depths"), niah_examples=_NIAH_N.value,
      niah_num_needles=_NIAH_NUM.value, niah_digits=_NIAH_DIGITS.value,
      niah_haystack=_NIAH_HAY.value, niah_generate=_NIAH_GEN.value)


def make_scorer(kind: str, loaded, batch_size: int, memory: str):
  """(scorer, whether it reads host memory); ValueError for a --memory the model cannot take."""
  if kind == "model":
    return memory_lib.model_scorer(loaded, batch_size=batch_size, mode=memory)
  memory_lib.resolve_memory(loaded.config, memory)   # checks the flag; stand-ins read no memory
  if kind == "oracle":
    return scoring.scorer_from_answers(standins.induction_oracle()), False
  return scoring.scorer_from_logits(standins.random_logits(loaded.config.model.vocab_size)), False


def make_generator(loaded, options: runner.EvalOptions):
  """The NIAH answers' generator: a serving engine over the model, sized for the longest length."""
  longest = max(runner.niah_lengths(options, loaded.config))
  try:
    return niah.EngineGenerator(loaded.model, loaded.params, loaded.tokenizer,
                                max_len=longest + niah.GENERATE_MARGIN,
                                num_slots=_NIAH_SLOTS.value, prefill_chunk=_NIAH_CHUNK.value)
  except ValueError as e:   # a bad slot count or prefill chunk
    raise app.UsageError(f"--niah_generate: {e}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every restore at INFO
    logging.set_verbosity(logging.WARNING)
  options = options_from_flags()
  if _PREDICTOR.value == "oracle" and "ppl" in options.tasks:
    print("note: the oracle gives answers, not likelihoods: skipping the 'ppl' task", flush=True)
    options.tasks = tuple(t for t in options.tasks if t != "ppl") or ("mqar", "passkey")
  try:
    options.check()
  except ValueError as e:
    raise app.UsageError(str(e))
  try:
    runner.check_niah_generate(options, memory=False, predictor=_PREDICTOR.value)  # no stand-in
  except ValueError as e:
    raise app.UsageError(str(e))
  loaded = loading.load_for_eval(_WORKDIR.value, step=_STEP.value, config=_CONFIG.value)
  try:
    # before any compile: generation cannot read host memory
    runner.check_niah_generate(options, predictor=_PREDICTOR.value,
                               memory=memory_lib.resolve_memory(loaded.config, _MEMORY.value))
    scorer, use_memory = make_scorer(_PREDICTOR.value, loaded, _BATCH.value, _MEMORY.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  described = (memory_lib.memory_description(loaded.config, use_memory, _MEMORY.value)
               if _PREDICTOR.value == "model" else "off (a stand-in predictor)")
  print(f"Evaluating {loaded.workdir} checkpoint {loaded.step} ({_PREDICTOR.value}; host memory "
        f"{described}): {', '.join(options.tasks)}", flush=True)
  span = memory_lib.memory_span(loaded.config) if use_memory else 0
  generating = options.niah_generate and "niah" in options.tasks
  generator = make_generator(loaded, options) if generating else None
  try:
    result = runner.run_tasks(scorer, loaded.tokenizer, loaded.config, options, memory_span=span,
                              generator=generator)
  finally:
    if generator is not None:
      generator.close()
  result["meta"].update(workdir=loaded.workdir, step=loaded.step, predictor=_PREDICTOR.value,
                        architecture=loaded.config.model.architecture, host_memory=described)
  if use_memory:
    result["memory"] = memory_lib.report_section(loaded.config, scorer)
  out = _OUT.value or os.path.join(loaded.workdir, "eval", str(loaded.step))
  paths = report_lib.write_report(result, out)
  print(report_lib.to_markdown(result), flush=True)
  print(json.dumps(paths, indent=2), flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)

"""Does a checkpoint trained with host memory recall beyond its window? MQAR across windows.

Rows of `--windows` x the trained window (MQAR as the training data makes it: the pairs open the
row, the queries follow through every window) are scored window by window as training reads them
(`eval/memory.MemoryScorer`), twice:
  memory     the earlier windows of the row in the host memory (as trained);
  no memory  the same windows with the memory cut off: each window gets its own document id, so
             the memory is reset at every window and the same-document rule finds nothing.
Each answer is classed by where its pair can be seen: `in window` when the key (with its value
after it) occurs earlier in the answer's own window (the opening pairs, or an earlier query of
the same key), else `memory only`: its pair lies only in earlier windows, so without the memory
the model can at best guess among the values (`bag chance` = 1 / pairs for a model that copies a
value of the context without binding it).

  python benchmarks/memory_mqar.py --workdir=DIR [--pairs=8 --queries=48 --vocab=64] [--out=F]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from sosm_jax.data import tasks as tasks_lib
from sosm_jax.eval import loading
from sosm_jax.eval.memory import MemoryCounts, MemoryScorer, memory_window, trained_with_memory
from sosm_jax.eval.scoring import answer_correct


def answer_classes(inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                   window: int) -> np.ndarray:
  """`[rows, time]` int: 0 = not an answer, 1 = in window, 2 = memory only (module doc).

  The answer at target position t predicts targets[t] after key inputs[t]; it is `in window`
  when that key was an input at a position j of t's window with j < t whose next input is a
  value (j + 1 < t), i.e. the pair was visible inside the window.
  """
  out = np.zeros(inputs.shape, np.int8)
  for r, t in zip(*np.nonzero(mask > 0)):
    start = (t // window) * window
    earlier = np.nonzero(inputs[r, start:t - 1] == inputs[r, t])[0] + start
    out[r, t] = 1 if any(j + 1 < t for j in earlier) else 2
  return out


def separate_windows(segment_ids: np.ndarray, window: int) -> np.ndarray:
  """Segment ids with every window its own document (ids stay > 0 where they were)."""
  index = np.arange(segment_ids.shape[1]) // window + 1
  return np.where(segment_ids > 0, index[None, :], 0).astype(segment_ids.dtype)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--windows", type=int, default=0, help="windows a row (0 = memory.segments)")
  ap.add_argument("--pairs", type=int, default=0, help="0 = the config's data.mqar_num_pairs")
  ap.add_argument("--queries", type=int, default=0, help="0 = the config's data.mqar_num_queries")
  ap.add_argument("--vocab", type=int, default=0, help="0 = the config's data.task_vocab_size")
  ap.add_argument("--examples", type=int, default=32)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--seed", type=int, default=4321)
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)

  loaded = loading.load_for_eval(args.workdir)
  config = loaded.config
  if not trained_with_memory(config):
    raise SystemExit(f"{args.workdir}: not trained with host memory (config.memory.enabled)")
  window = memory_window(config)
  windows = args.windows or int(config.memory.segments)
  pairs = args.pairs or int(config.data.mqar_num_pairs)
  queries = args.queries or int(config.data.mqar_num_queries) or pairs
  vocab = args.vocab or int(config.data.task_vocab_size)
  batch = tasks_lib.mqar_eval_batch(loaded.tokenizer, seq_len=windows * window,
                                    num_examples=args.examples, seed=args.seed, num_pairs=pairs,
                                    num_queries=queries, vocab_size=vocab)
  batch = {k: np.asarray(v) for k, v in batch.items()}
  classes = answer_classes(batch["inputs"], batch["targets"], batch["loss_mask"], window)
  scorer = MemoryScorer(loaded.model, loaded.params, config, batch_size=args.batch_size)
  results = {}
  for name, segment_ids in (("memory", batch["segment_ids"]),
                            ("no memory", separate_windows(batch["segment_ids"], window))):
    scorer.counts = MemoryCounts()
    hits = answer_correct(scorer({**batch, "segment_ids": segment_ids}), batch)
    results[name] = {
        cls: {"accuracy": float(hits[classes == code].mean()) if (classes == code).any() else None,
              "answers": int((classes == code).sum())}
        for cls, code in (("in window", 1), ("memory only", 2))}
    results[name]["memory_counts"] = scorer.counts.as_dict()
  report = dict(workdir=args.workdir, step=loaded.step, device=str(jax.devices()[0]),
                platform=platform.machine(), window=window, windows=windows, pairs=pairs,
                queries=queries, vocab=vocab, examples=args.examples, bag_chance=1.0 / pairs,
                results=results)
  print(json.dumps(report, indent=1))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  sys.exit(main() and 0)

"""Input-pipeline throughput: packed byte-level tokens per second delivered to the consumer.

    python benchmarks/data_throughput.py [--source=''] [--seq_len=4096] [--batch_size=16]
        [--seconds=20] [--read_threads=2] [--prefetch=4] [--num_workers=0] [--output=FILE.json]

The consumer does nothing but take batches, so this is the rate at which the pipeline can feed
a training step. Reports the startup time (build + first batch), and the median and minimum of
tokens/s over windows of `--window` batches, as JSON on stdout (and in --output).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sosm_jax import data  # noqa: E402  (after the path insert)


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def run(args) -> dict:
  cfg = data.default_data_config()
  cfg.source = args.source
  cfg.tokenizer = args.tokenizer
  cfg.read_threads, cfg.prefetch = args.read_threads, args.prefetch
  cfg.num_workers = args.num_workers
  cfg.separate_documents = not args.no_separate_documents
  tokenizer = data.make_tokenizer(cfg)
  start = time.perf_counter()
  pipeline = data.make_pipeline(cfg, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
                                seed=0, process_index=0, process_count=1)
  batch = next(pipeline)
  startup = time.perf_counter() - start
  tokens_per_batch = batch["inputs"].size
  rates, real = [], []
  end = time.perf_counter() + args.seconds
  while time.perf_counter() < end:
    t0 = time.perf_counter()
    nonpad = 0
    for _ in range(args.window):
      batch = next(pipeline)
      nonpad += int((batch["segment_ids"] > 0).sum())
    dt = time.perf_counter() - t0
    rates.append(args.window * tokens_per_batch / dt)
    real.append(nonpad / dt)
  state_bytes = len(json.dumps(pipeline.get_state()))
  t0 = time.perf_counter()
  rebuilt = data.make_pipeline(cfg, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
                               seed=0, process_index=0, process_count=1,
                               start_state=pipeline.get_state())
  next(rebuilt)
  resume = time.perf_counter() - t0
  stats = pipeline.stats()
  pipeline.close()
  rebuilt.close()
  return {
      "benchmark": "data_throughput", "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
      "python": platform.python_version(), "source": args.source or "stdlib",
      "tokenizer": args.tokenizer, "seq_len": args.seq_len, "batch_size": args.batch_size,
      "read_threads": args.read_threads, "prefetch": args.prefetch,
      "num_workers": args.num_workers, "separate_documents": cfg.separate_documents,
      "windows": len(rates), "window_batches": args.window,
      "median_tokens_per_s": statistics.median(rates), "min_tokens_per_s": min(rates),
      "median_nonpad_tokens_per_s": statistics.median(real),
      "startup_s": startup, "resume_s": resume, "state_json_bytes": state_bytes,
      "documents_read": stats["documents"], "replaced_bytes": stats["replaced_bytes"],
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--source", default="")
  p.add_argument("--tokenizer", default="byte")
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--seconds", type=float, default=20.0)
  p.add_argument("--window", type=int, default=10)
  p.add_argument("--read_threads", type=int, default=2)
  p.add_argument("--prefetch", type=int, default=4)
  p.add_argument("--num_workers", type=int, default=0)
  p.add_argument("--no_separate_documents", action="store_true")
  p.add_argument("--output", default="")
  args = p.parse_args(argv)
  result = run(args)
  text = json.dumps(result, indent=2)
  print(text)
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()

"""The backbone study: which mixer pattern recalls best at equal parameters and token budget.

Trains every variant with the project's trainer (`sosm_jax.train.loop.train`) on the same
synthetic task mix (MQAR + passkey), with the MLP width of each variant set so that all have the
same parameter count, then evaluates it with `sosm_jax.eval` (teacher-forced argmax):
  average recall = mean of (MQAR accuracy averaged over the lengths x pairs grid,
                            passkey exact-match accuracy averaged over the lengths x depths grid)
and times one forward pass at 2,048 tokens. Variants: HGRN-2 3:1 and 5:1, Gated DeltaNet 3:1 and
5:1 (linear : attention layers), the transformer baseline, linear-only (HGRN-2), and sosm (HGRN-2
3:1 with the graph-routing layer in place of attention).

  python benchmarks/backbone_study.py --quick --out=/tmp/backbone_quick      # small grid, CPU
  python benchmarks/backbone_study.py --out=/tmp/backbone                    # full grid, GPU
  python benchmarks/backbone_study.py --out=/tmp/backbone --variants=gdn_3to1,transformer

Every variant trains in OUT/<variant>/ (a re-run resumes or reuses it) and writes
OUT/<variant>/result.json; the table (OUT/backbone_study.{json,md}) and the plot
(OUT/backbone_study.png) gather all variants found in OUT, so the full grid can run in pieces
(`--report_only` rebuilds them from result.json files gathered from several machines).
"""
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from sosm_jax.eval import loading, recall, report as report_lib, scoring
from sosm_jax.eval.sizing import count_params, match_mlp_dim
from sosm_jax.train import config as config_lib
from sosm_jax.train import loop

VARIANTS = {
    "hgrn2_3to1": dict(architecture="hybrid", pattern=("hgrn2",) * 3 + ("attn",)),
    "hgrn2_5to1": dict(architecture="hybrid", pattern=("hgrn2",) * 5 + ("attn",)),
    "gdn_3to1": dict(architecture="hybrid", pattern=("gdn",) * 3 + ("attn",)),
    "gdn_5to1": dict(architecture="hybrid", pattern=("gdn",) * 5 + ("attn",)),
    "transformer": dict(architecture="transformer", pattern=("attn",)),
    "linear_only": dict(architecture="hybrid", pattern=("hgrn2",)),
    "sosm": dict(architecture="sosm", pattern=("hgrn2",) * 3 + ("graph",)),
}
REFERENCE = "hgrn2_3to1"  # its parameter count at the base MLP width is everyone's target

# The earlier study's numbers (background/sam2_phase0_summary.md), for the table.
EARLIER = {"hgrn2_3to1": "86.7% (6.83M, 0.136 s)", "gdn_5to1": "86.7% (9.98M, 0.143 s)",
           "hgrn2_5to1": "66.7% (9.98M, 0.154 s)"}

# 12 layers: a multiple of both pattern lengths (4 and 6), so every variant has the same depth.
# 'quick' checks the whole path on a CPU in minutes (too few steps to learn recall: its numbers
# are near chance); 'full' is the study (~9.5M parameters, 33M training tokens per variant, about
# a minute on an H100).
# MQAR is learned in a sudden transition (the induction circuit forms) whose wait grows sharply
# with gradient noise: tiny models stay at the "copy some context value" level (1/pairs) with 32
# examples per step and learn with 128+ (benchmarks/mqar_sanity.py). So every step carries many
# examples: short task examples (task_length) packed several to a row, 64K tokens per step
# (~150 MQAR examples), instead of one long example per row at 16K tokens (~19, or 2 at 4K).
SETTINGS = {
    "quick": dict(
        model=dict(num_layers=12, d_model=32, mlp_dim=64, attn_num_heads=2, attn_num_kv_heads=1,
                   attn_head_dim=16, hgrn2_head_dim=16, gdn_num_heads=2, gdn_head_dim=16,
                   chunk_size=16),
        seq_lens=(64,), steps=(40,), tokens_per_step=1024, learning_rate=3e-3, warmup=5,
        task_length=0, mqar_pairs=8, mqar_queries=0, mqar_lengths=(64, 128),
        mqar_grid_pairs=(4, 8, 16),
        passkey_lengths=(64, 128), passkey_depths=(0.0, 0.5, 1.0), examples=8,
        forward_len=2048, forward_repeats=3),
    "full": dict(
        model=dict(num_layers=12, d_model=256, mlp_dim=704, attn_num_heads=4, attn_num_kv_heads=2,
                   attn_head_dim=64, hgrn2_head_dim=64, gdn_num_heads=4, gdn_head_dim=64,
                   chunk_size=64),
        seq_lens=(1024,), steps=(500,), tokens_per_step=65536, learning_rate=1e-3, warmup=30,
        task_length=256, mqar_pairs=32, mqar_queries=0, mqar_lengths=(64, 128, 256, 512, 1024),
        mqar_grid_pairs=(4, 8, 16, 32, 64, 128), passkey_lengths=(256, 512, 1024, 2048),
        passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0), examples=32, forward_len=2048,
        forward_repeats=10),
    # The graph-routing comparison (graph layer vs full attention vs linear-only) on MQAR up to
    # 4K tokens: the full setting's model. Recall is learned at 512 tokens (128 examples a step),
    # then stretched to 4K (16 examples a step) once the circuit exists. Queries: one per pair, as
    # the evaluation asks them (training at another query density costs accuracy at evaluation).
    "long_mqar": dict(
        model=dict(num_layers=12, d_model=256, mlp_dim=704, attn_num_heads=4, attn_num_kv_heads=2,
                   attn_head_dim=64, hgrn2_head_dim=64, gdn_num_heads=4, gdn_head_dim=64,
                   chunk_size=64),
        seq_lens=(512, 4096), steps=(400, 100), tokens_per_step=65536, learning_rate=1e-3,
        warmup=30, task_length=0, mqar_pairs=32, mqar_queries=0,
        mqar_lengths=(512, 1024, 2048, 4096),
        mqar_grid_pairs=(16, 32, 64), passkey_lengths=(1024, 4096),
        passkey_depths=(0.0, 0.5, 1.0), examples=32, forward_len=2048, forward_repeats=10),
}


FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import it)."""
  flags.DEFINE_string("out", "", "Output directory (default /tmp/backbone_study[_quick]).")
  flags.DEFINE_bool("quick", False, "The small CPU grid instead of the full one.")
  flags.DEFINE_enum("setting", "", ["", *SETTINGS], "A named setting ('' = quick or full).")
  flags.DEFINE_list("variants", list(VARIANTS), f"Subset of {list(VARIANTS)}.")
  flags.DEFINE_integer("steps", 0, "Training steps per variant (0: the setting's).")
  flags.DEFINE_string("dtype", "", "Activation dtype ('': float32 on CPU, bfloat16 else).")
  flags.DEFINE_string(
      "task_mix", "mix:synthetic:mqar=0.6,synthetic:passkey=0.4", "Training data of every variant.")
  flags.DEFINE_integer("eval_batch_size", 16, "Rows per evaluation forward pass.")
  flags.DEFINE_bool("report_only", False,
                    "Train nothing: rebuild the table and plot from the OUT/<variant>/result.json "
                    "found (e.g. gathered from several machines).")


def variant_config(name: str, setting: dict, dtype: str, steps: int, task_mix: str):
  """The trainer config of one variant (before its MLP width is matched)."""
  c = config_lib.base_config()
  c.model.update(vocab_size=260, dtype=dtype, **setting["model"])
  c.model.update(VARIANTS[name])
  c.data.update(source=task_mix, mqar_num_pairs=setting["mqar_pairs"], task_vocab_size=256,
                mqar_num_queries=setting.get("mqar_queries", 0),
                task_length=setting.get("task_length", 0))
  per_stage = tuple(steps for _ in setting["seq_lens"]) if steps else setting["steps"]
  c.curriculum.update(seq_lens=setting["seq_lens"], steps=per_stage,
                      tokens_per_step=setting["tokens_per_step"])
  c.optimizer.update(learning_rate=setting["learning_rate"], warmup_steps=setting["warmup"])
  c.train.update(log_every=25, checkpoint_every=0, keep_checkpoints=1, eval_batches=0,
                 passkey_examples=0)
  c.mesh.data = 1  # one device: equal conditions for every variant
  # Gated DeltaNet variants use the model default output gate ('sigmoid2' since issue 22; the
  # first study ran 'silu', which stalled MQAR: benchmarks/RESULTS.md, "Gated DeltaNet output
  # gate"). The chunked forms train on CPU too (the XLA:CPU hang of the gated delta rule's
  # triangular solve is gone).
  return c


def forward_seconds(model, params, length: int, repeats: int) -> float:
  """Median wall time of one jitted forward pass over `[1, length]` tokens (after a warm-up)."""
  fwd = jax.jit(lambda p, t: model.apply(p, t))
  tokens = jnp.zeros((1, length), jnp.int32)
  jax.block_until_ready(fwd(params, tokens))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fwd(params, tokens))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run_variant(name: str, setting: dict, out: str, dtype: str, steps: int, task_mix: str,
                target_params: int, eval_batch_size: int) -> dict:
  """Trains (or resumes) one variant, evaluates it, returns and saves its result row."""
  config = variant_config(name, setting, dtype, steps, task_mix)
  config.model.mlp_dim, params = match_mlp_dim(config.model, target_params)
  workdir = os.path.join(out, name)
  start = time.time()
  result = loop.train(config, workdir)
  train_seconds = time.time() - start
  eval_config = config.copy_and_resolve_references()
  eval_config.model.linear_impl = "auto"  # the platform's best form
  loaded = loading.load_for_eval(workdir, config=eval_config)
  scorer = scoring.model_scorer(loaded.model, loaded.params, batch_size=eval_batch_size)
  start = time.time()
  mqar = recall.mqar_grid(scorer, loaded.tokenizer, lengths=setting["mqar_lengths"],
                          num_pairs=setting["mqar_grid_pairs"], num_examples=setting["examples"],
                          vocab_size=256)
  passkey = recall.passkey_grid(scorer, loaded.tokenizer, lengths=setting["passkey_lengths"],
                                depths=setting["passkey_depths"],
                                num_examples=max(1, setting["examples"] // 4))
  eval_seconds = time.time() - start
  row = {
      "variant": name, "pattern": list(config.model.pattern),
      "architecture": config.model.architecture, "params": params,
      "mlp_dim": config.model.mlp_dim, "d_model": config.model.d_model,
      "num_layers": config.model.num_layers, "steps": result.step,
      "gdn_output_gate": config.model.gdn_output_gate if "gdn" in config.model.pattern else None,
      "tokens": result.step * setting["tokens_per_step"],
      "final_loss": result.last_metrics.get("loss"),
      "mqar_accuracy": mqar["mean_accuracy"], "passkey_accuracy": passkey["mean_accuracy"],
      "average_recall": float(np.mean([mqar["mean_accuracy"], passkey["mean_accuracy"]])),
      "chance": float(np.mean([mqar["chance"], passkey["chance"]])),  # uniform guessing
      "forward_seconds_2k": forward_seconds(loaded.model, loaded.params, setting["forward_len"],
                                            setting["forward_repeats"]),
      "train_seconds": train_seconds, "eval_seconds": eval_seconds,
      "device": jax.devices()[0].device_kind, "mqar": mqar, "passkey": passkey,
  }
  with open(os.path.join(workdir, "result.json"), "w", encoding="utf-8") as f:
    json.dump(row, f, indent=2, default=str)
  return row


def gather(out: str) -> list[dict]:
  rows = []
  for name in VARIANTS:
    path = os.path.join(out, name, "result.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        rows.append(json.load(f))
  return rows


def table(rows: list[dict], failures: dict[str, str]) -> str:
  header = ["variant", "pattern", "params", "avg recall %", "MQAR %", "passkey %",
            "fwd 2K tokens (s)", "final loss", "earlier study"]
  body = []
  for r in sorted(rows, key=lambda r: -(r["average_recall"] or 0)):
    body.append([r["variant"], pattern_str(r["pattern"]), f"{r['params'] / 1e6:.3f}M",
                 report_lib.fmt(r["average_recall"], pct=True),
                 report_lib.fmt(r["mqar_accuracy"], pct=True),
                 report_lib.fmt(r["passkey_accuracy"], pct=True),
                 f"{r['forward_seconds_2k']:.4f}",
                 f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "–",
                 EARLIER.get(r["variant"], "")])
  for name, reason in failures.items():
    body.append([name, "", "", "failed: " + reason.replace("|", "/")[:120], "", "", "", "", ""])
  return report_lib.markdown_table(header, body)


def mqar_by_length(rows: list[dict]) -> str:
  """Markdown: one row per variant, one column per MQAR length (accuracy averaged over pairs)."""
  lengths = sorted({c["length"] for r in rows for c in r["mqar"]["cells"]})
  body = []
  for r in rows:
    cells = []
    for length in lengths:
      acc = [c["accuracy"] for c in r["mqar"]["cells"]
             if c["length"] == length and c["accuracy"] is not None]
      cells.append(report_lib.fmt(statistics.mean(acc) if acc else None, pct=True))
    body.append([r["variant"], *cells])
  return report_lib.markdown_table(["variant", *map(str, lengths)], body)


def pattern_str(pattern) -> str:
  """('hgrn2','hgrn2','hgrn2','attn') -> '3 hgrn2 : 1 attn'; ('attn',) -> 'attn only'."""
  names = list(dict.fromkeys(pattern))
  if len(names) == 1:
    return f"{names[0]} only"
  return " : ".join(f"{sum(p == n for p in pattern)} {n}" for n in names)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    ax.scatter(r["forward_seconds_2k"], 100 * r["average_recall"], s=40)
    ax.annotate(r["variant"], (r["forward_seconds_2k"], 100 * r["average_recall"]),
                textcoords="offset points", xytext=(5, 4), fontsize=8)
  chance = [r["chance"] for r in rows if r.get("chance") is not None]
  if chance:
    ax.axhline(100 * chance[0], ls="--", color="gray", lw=0.8, label="chance")
    ax.legend(fontsize=8)
  ax.set_xlabel("forward time at 2K tokens (s)")
  ax.set_ylabel("average recall (%)")
  ax.set_title("Backbone study: recall vs speed at equal parameters")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  unknown = [v for v in FLAGS.variants if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"unknown variants {unknown}; use a subset of {list(VARIANTS)}")
  setting_name = FLAGS.setting or ("quick" if FLAGS.quick else "full")
  setting = SETTINGS[setting_name]
  out = os.path.abspath(FLAGS.out or f"/tmp/backbone_study_{setting_name}")
  os.makedirs(out, exist_ok=True)
  dtype = FLAGS.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  reference = variant_config(REFERENCE, setting, dtype, FLAGS.steps, FLAGS.task_mix)
  target = count_params(reference.model)
  print(f"target parameters {target:,} ({REFERENCE} at mlp_dim {reference.model.mlp_dim}); "
        f"output {out}", flush=True)
  failures = {}
  for name in ([] if FLAGS.report_only else FLAGS.variants):
    print(f"== {name}", flush=True)
    try:
      row = run_variant(name, setting, out, dtype, FLAGS.steps, FLAGS.task_mix, target,
                        FLAGS.eval_batch_size)
      print(f"{name}: params {row['params']:,}, average recall {row['average_recall']:.3f}, "
            f"forward {row['forward_seconds_2k']:.4f}s", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      traceback.print_exc()
      print(f"{name} failed: {failures[name]}", flush=True)
  write_report(out, setting_name, target, failures)


def write_report(out: str, setting_name: str, target: int, failures: dict[str, str]) -> None:
  """Writes OUT/backbone_study.{json,md,png} from every OUT/<variant>/result.json found."""
  rows = gather(out)
  devices = sorted({r.get("device", "") for r in rows}) or [jax.devices()[0].device_kind]
  summary = {"setting": setting_name, "target_params": target,
             "task_mix": FLAGS.task_mix, "device": ", ".join(devices),
             "jax": jax.__version__, "command": " ".join(sys.argv), "failures": failures,
             "rows": [{k: v for k, v in r.items() if k not in ("mqar", "passkey")} for r in rows]}
  with open(os.path.join(out, "backbone_study.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, default=str)
  md = table(rows, failures)
  chance = [r["chance"] for r in rows if r.get("chance") is not None]
  if chance:
    md += f"\n\nChance (uniform guessing) of the average recall: {100 * chance[0]:.2f}%."
  bag = [r["mqar"].get("bag_chance") for r in rows if r["mqar"].get("bag_chance") is not None]
  if bag:  # a model that copies some value from its context without binding keys
    md += f" MQAR bag chance (mean over the grid): {100 * bag[0]:.1f}%."
  md += "\n\nMQAR accuracy (%) by length, mean over the pairs grid:\n\n" + mqar_by_length(rows)
  with open(os.path.join(out, "backbone_study.md"), "w", encoding="utf-8") as f:
    f.write(md + "\n")
  if rows:
    plot(rows, os.path.join(out, "backbone_study.png"))
  print(md, flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)

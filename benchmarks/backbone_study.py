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
  # issue 22 item 2: 5 variants x 3 seeds, each variant's lr picked from a sweep on seed 0, in
  # pieces that fit a device call (benchmarks/RESULTS.md, "The firm study"):
  python benchmarks/backbone_study.py --setting=firm --out=/tmp/bb_firm --max_seconds=450 \
      --results_from=PIECES.json --export=$OUT
  # the same with 3 pieces at once on the one GPU, each in a child process of this script:
  python benchmarks/backbone_study.py --setting=firm --out=/tmp/bb_firm --workers=3 ...

A piece is one (variant, seed, learning rate) run, trained in OUT/<variant>/seed<k>/lr<lr>/
(a re-run resumes it, or skips it once its result.json exists). The trainer seed and the data
seed are the piece's seed; evaluation uses the same fixed examples for every piece. With several
learning rates (--lrs), every variant first runs each of them on the first seed, then the other
seeds at the one with the best average recall (ties: lower final loss). All finished pieces are
also gathered into OUT/backbone_pieces.json after each piece: a device call returns that one file,
and the next call passes it back with --results_from, so its pieces are skipped. With
--workers=N, up to N pieces run at once, each as a child process (--single_piece) that writes
only its piece's directory (its output in child.log there); this process plans, keeps the time
budget and writes the report.
(The single-seed layout of earlier runs, OUT/<variant>/result.json, is still read, as seed 0 at
the setting's learning rate.) The report (OUT/backbone_study.{json,md,png}) gathers every piece:
with one seed and one learning rate the per-variant table as before; else mean and 95%
t-interval over seeds per variant, the sweep, the ranking with overlapping intervals marked, the
earlier study's numbers with a reproduced / refuted / not distinguishable verdict, and whether
the ranking by training accuracy still moved over the last quarter of the steps.
"""
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import scipy.stats
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
# Their average recall, for the verdict: HGRN-2 3:1 = GDN 5:1 > HGRN-2 5:1.
EARLIER_RECALL = {"hgrn2_3to1": 0.867, "gdn_5to1": 0.867, "hgrn2_5to1": 0.667}

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
        forward_len=2048, forward_repeats=3, piece_seconds_guess=40),
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

# Issue 22 item 2, the study made firm: the 'full' setting's model, data and evaluation grid (so
# its numbers sit beside the one-seed table of benchmarks/RESULTS.md), for the five variants of
# the earlier study's comparison, 3 seeds, and a 2-point learning-rate sweep per variant on seed
# 0 (1e-3 was the one-seed table's; 3e-3 learned MQAR 2-3x sooner in the CPU ablations, RESULTS
# "Gated DeltaNet output gate" and "The transformer baseline's MQAR budget"): 5 x (2 + 2) = 20
# pieces. No forward timing (speed is the full table's question) and 64 evaluation rows a pass
# (fewer launches). 500 steps is what fits one session's three device calls (about 21 minutes of
# pieces, estimated from the H100 timings; RESULTS "Backbone study ... firm"); 'firm_long' is the
# same study at 1,000 steps (about twice the time: two sessions) for when the report says the
# ranking still moved over the last quarter of the steps.
SETTINGS["firm"] = dict(
    SETTINGS["full"], seeds=(0, 1, 2), lrs=(1e-3, 3e-3), forward_repeats=0, eval_batch_size=64,
    variants=("hgrn2_3to1", "hgrn2_5to1", "gdn_3to1", "gdn_5to1", "transformer"),
    piece_seconds_guess=120)
SETTINGS["firm_long"] = dict(SETTINGS["firm"], steps=(1000,), warmup=60, piece_seconds_guess=220)


FLAGS = flags.FLAGS
PIECES_FILE = "backbone_pieces.json"
PIECES_FORMAT = "backbone_study.pieces/1"


# the study's training data (--task_mix): 60% MQAR, 40% passkey examples
TASK_MIX = "mix:synthetic:mqar=0.6,synthetic:passkey=0.4"


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import it)."""
  flags.DEFINE_string("out", "", "Output directory (default /tmp/backbone_study_<setting>).")
  flags.DEFINE_bool("quick", False, "The small CPU grid instead of the full one.")
  flags.DEFINE_enum("setting", "", ["", *SETTINGS], "A named setting ('' = quick or full).")
  flags.DEFINE_list("variants", [], f"Subset of {list(VARIANTS)} (default: the setting's, or all).")
  flags.DEFINE_list("seeds", [], "Seeds (trainer and data) of every variant (default: the "
                    "setting's, or 0).")
  flags.DEFINE_list("lrs", [], "Learning rates to sweep on the first seed; the other seeds run "
                    "at the best one (default: the setting's sweep, or its learning rate).")
  flags.DEFINE_integer("steps", 0, "Training steps per variant (0: the setting's).")
  flags.DEFINE_string("dtype", "", "Activation dtype ('': float32 on CPU, bfloat16 else).")
  flags.DEFINE_string("task_mix", TASK_MIX, "Training data of every variant.")
  flags.DEFINE_integer("eval_batch_size", 0, "Rows per evaluation forward pass (0: the "
                       "setting's, or 16).")
  flags.DEFINE_float("max_seconds", 0, "Start no piece that would not finish within this many "
                     "seconds of the script's start (estimated from the pieces timed so far); "
                     "0: no limit. The next invocation continues with the pieces left.")
  flags.DEFINE_list("results_from", [], f"{PIECES_FILE} files (or folders holding one) of "
                    "earlier invocations: their pieces count as done.")
  flags.DEFINE_string("export", "", f"Also copy {PIECES_FILE} and the report here after each "
                      "piece (e.g. a device call's $OUT).")
  flags.DEFINE_integer("forward_repeats", -1, "Timed forward passes of forward_len tokens per "
                       "piece (-1: the setting's; 0: none).")
  flags.DEFINE_integer("workers", 1, "Pieces run at once, each by a child process of this script "
                       "on the same accelerator (1: one after another in this process).")
  flags.DEFINE_bool("single_piece", False, "Run the one piece given by --variants, --seeds and "
                    "--lrs and write its result.json, but no report (a --workers child).")
  flags.DEFINE_bool("report_only", False,
                    "Train nothing: rebuild the table and plot from the result.json files found "
                    "in OUT and the --results_from pieces (e.g. gathered from several machines).")


def variant_config(name: str, setting: dict, dtype: str, steps: int, task_mix: str,
                   seed: int = 0, learning_rate: float | None = None):
  """The trainer config of one variant (before its MLP width is matched)."""
  c = config_lib.base_config()
  c.seed = int(seed)  # parameter initialisation and the training data's order and examples
  c.model.update(vocab_size=260, dtype=dtype, **setting["model"])
  c.model.update(VARIANTS[name])
  c.data.update(source=task_mix, mqar_num_pairs=setting["mqar_pairs"], task_vocab_size=256,
                mqar_num_queries=setting.get("mqar_queries", 0),
                task_length=setting.get("task_length", 0))
  per_stage = tuple(steps for _ in setting["seq_lens"]) if steps else setting["steps"]
  c.curriculum.update(seq_lens=setting["seq_lens"], steps=per_stage,
                      tokens_per_step=setting["tokens_per_step"])
  c.optimizer.update(learning_rate=float(learning_rate or setting["learning_rate"]),
                     warmup_steps=setting["warmup"])
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


# ---------------------------------------------------------------------------------------------
# Pieces: one (variant, seed, learning rate) run each.

class PieceInterrupted(RuntimeError):
  """The trainer stopped before the piece's last step (a stop signal): nothing is recorded."""


def lr_tag(lr: float) -> str:
  return f"lr{float(lr):g}"


def piece_id(variant: str, seed: int, lr: float) -> str:
  """'gdn_3to1/seed1/lr0.003': the key in backbone_pieces.json and the path under OUT."""
  return f"{variant}/seed{int(seed)}/{lr_tag(lr)}"


def study_signature(setting_name: str, setting: dict, steps: int, task_mix: str) -> dict:
  """What must match for two pieces to belong to one study (stored in every result row)."""
  return {"setting": setting_name, "steps": int(sum(steps for _ in setting["seq_lens"]) if steps
                                                else sum(setting["steps"])),
          "seq_lens": list(setting["seq_lens"]), "tokens_per_step": setting["tokens_per_step"],
          "d_model": setting["model"]["d_model"], "num_layers": setting["model"]["num_layers"],
          "task_mix": task_mix}


def _signature_mismatch(row: dict, signature: dict) -> list[str]:
  """Fields in which a row's study differs from `signature` (legacy rows: width and depth)."""
  theirs = row.get("study")
  if theirs is None:  # a result.json of the single-seed script: its width and depth (its steps
    # are the steps it reached: one run of the H100 table stopped at 498 of 500)
    theirs = {k: row.get(k) for k in ("d_model", "num_layers")}
  return [f"{k}: {theirs[k]!r} here {signature[k]!r}" for k in theirs
          if k in signature and theirs[k] != signature[k]]


def _metrics_records(workdir: str) -> list[dict]:
  """The trainer's records in workdir/metrics.jsonl ([] before it exists)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def train_curve(workdir: str, points: int = 20) -> list[dict]:
  """Mean training loss and answer-token accuracy over each 1/points of the steps, from
  metrics.jsonl (20 points: the stability check reads the windows ending at 50, 75, 100%)."""
  records = [r for r in _metrics_records(workdir)
             if r.get("kind") == "train" and r.get("loss") is not None]
  if not records:
    return []
  last = max(r["step"] for r in records)
  curve = []
  for i in range(1, points + 1):
    lo, hi = last * (i - 1) / points, last * i / points
    window = [r for r in records if lo < r["step"] <= hi]
    if window:
      curve.append({"fraction": i / points, "step": int(hi),
                    "loss": float(np.mean([r["loss"] for r in window])),
                    "accuracy": float(np.mean([r.get("accuracy", np.nan) for r in window]))})
  return curve


def step_timing(workdir: str) -> dict:
  """Compile seconds and the steady seconds per step, from metrics.jsonl (for the budget)."""
  compile_s, times = 0.0, []
  for r in _metrics_records(workdir):
    if r.get("kind") == "stage":
      compile_s += float(r.get("compile_seconds") or 0.0)
    elif r.get("kind") == "train" and r.get("time") is not None:
      times.append((r["step"], r["time"]))
  step_s = None
  if len(times) > 2:  # from the second step on: the first one waits for the data's start
    (s0, t0), (s1, t1) = times[1], times[-1]
    step_s = (t1 - t0) / max(1, s1 - s0)
  return {"compile_seconds": compile_s, "seconds_per_step": step_s}


def run_variant(name: str, setting: dict, out: str, dtype: str, steps: int, task_mix: str,
                target_params: int, eval_batch_size: int, seed: int = 0,
                learning_rate: float | None = None, workdir: str | None = None,
                signature: dict | None = None) -> dict:
  """Trains (or resumes) one piece, evaluates it, returns and saves its result row.

  `workdir` defaults to OUT/<name> (the single-seed layout); the result goes to
  workdir/result.json. Raises PieceInterrupted, writing nothing, if training stopped early.
  """
  config = variant_config(name, setting, dtype, steps, task_mix, seed, learning_rate)
  config.model.mlp_dim, params = match_mlp_dim(config.model, target_params)
  # one compilation cache for every piece: the seeds of a variant at one learning rate, and every
  # evaluation of a variant, compile the same programs
  config.train.compile_cache = os.path.join(out, "compile_cache")
  workdir = workdir or os.path.join(out, name)
  planned = sum(config.curriculum.steps)
  start = time.time()
  result = loop.train(config, workdir)
  train_seconds = time.time() - start
  if result.status != "finished" or result.step < planned:
    raise PieceInterrupted(f"{name} seed {seed}: stopped at step {result.step} of {planned} "
                           f"({result.status})")
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
  forward = (forward_seconds(loaded.model, loaded.params, setting["forward_len"],
                             setting["forward_repeats"]) if setting["forward_repeats"] else None)
  row = {
      "variant": name, "seed": int(seed), "learning_rate": float(config.optimizer.learning_rate),
      "pattern": list(config.model.pattern),
      "architecture": config.model.architecture, "params": params,
      "mlp_dim": config.model.mlp_dim, "d_model": config.model.d_model,
      "num_layers": config.model.num_layers, "steps": result.step,
      "gdn_output_gate": config.model.gdn_output_gate if "gdn" in config.model.pattern else None,
      "tokens": result.step * setting["tokens_per_step"],
      "final_loss": result.last_metrics.get("loss"),
      "mqar_accuracy": mqar["mean_accuracy"], "passkey_accuracy": passkey["mean_accuracy"],
      "average_recall": float(np.mean([mqar["mean_accuracy"], passkey["mean_accuracy"]])),
      "chance": float(np.mean([mqar["chance"], passkey["chance"]])),  # uniform guessing
      "forward_seconds_2k": forward,
      "train_seconds": train_seconds, "eval_seconds": eval_seconds,
      "piece_seconds": train_seconds + eval_seconds, **step_timing(workdir),
      "curve": train_curve(workdir),
      "device": jax.devices()[0].device_kind, "mqar": mqar, "passkey": passkey,
  }
  if signature is not None:
    row["study"] = signature
  # atomically: with --workers, other processes gather OUT's result.json files at any time
  path = os.path.join(workdir, "result.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(row, f, indent=2, default=str)
  os.replace(path + ".tmp", path)
  return row


def gather(out: str) -> list[dict]:
  """The single-seed layout's rows: OUT/<variant>/result.json."""
  rows = []
  for name in VARIANTS:
    path = os.path.join(out, name, "result.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        rows.append(json.load(f))
  return rows


def gather_pieces(out: str, setting_lr: float, signature: dict) -> dict[str, dict]:
  """Every finished piece under OUT: {piece_id: row}.

  OUT/<variant>/seed<k>/lr<lr>/result.json, and the single-seed layout's OUT/<variant>/
  result.json read as seed 0 at the setting's learning rate (the one it was trained with). A
  row of another study (steps, width, data) is a clear error: use another OUT.
  """
  found = {}
  for row in gather(out):
    row = {"seed": 0, "learning_rate": float(setting_lr), **row}
    found[piece_id(row["variant"], row["seed"], row["learning_rate"])] = row
  for name in VARIANTS:
    vdir = os.path.join(out, name)
    if not os.path.isdir(vdir):
      continue
    for sdir in sorted(os.listdir(vdir)):
      if not sdir.startswith("seed") or not os.path.isdir(os.path.join(vdir, sdir)):
        continue
      for ldir in sorted(os.listdir(os.path.join(vdir, sdir))):
        path = os.path.join(vdir, sdir, ldir, "result.json")
        if os.path.exists(path):
          with open(path, encoding="utf-8") as f:
            row = json.load(f)
          found[piece_id(row["variant"], row["seed"], row["learning_rate"])] = row
  for key, row in found.items():
    bad = _signature_mismatch(row, signature)
    if bad:
      raise ValueError(f"{out}: piece {key} belongs to another study ({'; '.join(bad)}); "
                       "use another --out or the same setting and --steps")
  return found


def read_pieces(path: str, signature: dict) -> dict[str, dict]:
  """The pieces of a backbone_pieces.json (or of a folder holding one), checked against the
  study (steps, width, data, setting)."""
  if os.path.isdir(path):
    path = os.path.join(path, PIECES_FILE)
  with open(path, encoding="utf-8") as f:
    bundle = json.load(f)
  if bundle.get("format") != PIECES_FORMAT:
    raise ValueError(f"{path}: not a {PIECES_FILE} (format {bundle.get('format')!r})")
  for key, row in bundle["pieces"].items():
    bad = _signature_mismatch(row, signature)
    if bad:
      raise ValueError(f"{path}: piece {key} belongs to another study ({'; '.join(bad)})")
  return dict(bundle["pieces"])


def import_pieces(out: str, pieces: dict[str, dict]) -> int:
  """Writes OUT/<piece>/result.json for each given piece not yet in OUT; returns how many."""
  n = 0
  for key, row in pieces.items():
    path = os.path.join(out, key, "result.json")
    if os.path.exists(path):
      continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(row, f, indent=2, default=str)
    n += 1
  return n


def write_pieces(path: str, pieces: dict[str, dict], signature: dict) -> None:
  """All finished pieces in one file (a device call returns at most 8 files), atomically."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"format": PIECES_FORMAT, "study": signature,
               "pieces": dict(sorted(pieces.items()))}, f, indent=1, default=str)
  os.replace(tmp, path)


def choose_lr(rows: list[dict]) -> float:
  """The sweep's pick: the best average recall; ties (e.g. all at chance) the lower final loss."""
  if not rows:
    raise ValueError("no sweep rows to choose a learning rate from")
  def key(r):
    loss = r.get("final_loss")
    return (r["average_recall"], -(loss if loss is not None else math.inf))
  return float(max(rows, key=key)["learning_rate"])


def plan_pieces(variants, seeds, lrs, done: dict[str, dict]) -> tuple[list[tuple], dict]:
  """The pieces still to run, in order, and each variant's learning rate (None: sweep unfinished).

  First every variant's sweep (each learning rate on the first seed), then the other seeds of
  each variant at its chosen learning rate; a variant's other seeds wait for its whole sweep.
  Returns ([(variant, seed, lr), ...], {variant: chosen lr or None}).
  """
  seeds, lrs = [int(s) for s in seeds], [float(x) for x in lrs]
  todo, chosen = [], {}
  for v in variants:
    for lr in lrs:
      if piece_id(v, seeds[0], lr) not in done:
        todo.append((v, seeds[0], lr))
  for v in variants:
    sweep = [done.get(piece_id(v, seeds[0], lr)) for lr in lrs]
    if len(lrs) == 1:
      chosen[v] = lrs[0]
    elif all(sweep):
      chosen[v] = choose_lr(sweep)
    else:
      chosen[v] = None
      continue
    for s in seeds[1:]:
      if piece_id(v, s, chosen[v]) not in done:
        todo.append((v, s, chosen[v]))
  return todo, chosen


def estimate_seconds(variant: str, timed: dict[str, list[float]], pieces: dict[str, dict],
                     guess: float) -> float:
  """A piece's expected seconds: the slowest piece of the variant timed so far in this process,
  else in earlier invocations (cold caches: an upper bound), else the setting's guess."""
  if timed.get(variant):
    return max(timed[variant])
  earlier = [r["piece_seconds"] for r in pieces.values()
             if r.get("variant") == variant and r.get("piece_seconds")]
  return max(earlier) if earlier else guess


def run_pieces(variants, seeds, lrs, out: str, done: dict[str, dict], run_one,
               max_seconds: float = 0.0, guess: float = 120.0, clock=time.monotonic,
               start: float | None = None, on_piece=None) -> dict:
  """Runs the planned pieces (`run_one(variant, seed, lr, workdir) -> row`) until none is left or
  none fits in `max_seconds` from `start`; `done` ({piece_id: row}) grows as pieces finish and
  `on_piece(row, done)` is called after each. Returns {'ran', 'deferred', 'failed', 'stopped'}.
  """
  start = clock() if start is None else start
  timed, ran, failed, deferred = {}, [], {}, []
  stopped = None
  while True:
    todo, _ = plan_pieces(variants, seeds, lrs, done)
    todo = [p for p in todo if piece_id(*p) not in failed and piece_id(*p) not in deferred]
    if not todo:
      break
    variant, seed, lr = todo[0]
    key = piece_id(variant, seed, lr)
    if not _fits(key, estimate_seconds(variant, timed, done, guess), clock() - start,
                 max_seconds):
      deferred.append(key)  # a later (cheaper) piece may still fit
      continue
    print(f"== {key}", flush=True)
    t0 = clock()
    try:
      row = run_one(variant, seed, lr, os.path.join(out, key))
    except PieceInterrupted as e:
      stopped = str(e)
      print(f"{key}: {e}; stopping (nothing recorded for it)", flush=True)
      break
    except Exception as e:  # pylint: disable=broad-except
      _record_failure(key, e, failed)
      continue
    timed.setdefault(variant, []).append(clock() - t0)
    _record_piece(key, row, done, ran, (variants, seeds, lrs), clock() - start, max_seconds,
                  on_piece)
  return {"ran": ran, "deferred": deferred, "failed": failed, "stopped": stopped}


def _fits(key: str, need: float, used: float, max_seconds: float) -> bool:
  """Whether a piece needing `need` seconds fits the budget (else says it is deferred)."""
  if max_seconds and used + need > max_seconds:
    print(f"-- {key}: deferred (needs ~{need:.0f} s, {max_seconds - used:.0f} s left)",
          flush=True)
    return False
  return True


def _record_failure(key: str, e: Exception, failed: dict[str, str]) -> None:
  """A failed piece: its reason into `failed` (the call goes on with the others)."""
  if isinstance(e, ChildFailed):  # its traceback is in the child's log
    failed[key] = e.reason
    print(f"{key}: the end of its log ({e.log}):\n{e.log_tail}", flush=True)
  else:
    failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    traceback.print_exc()
  print(f"{key} failed: {failed[key]}", flush=True)


def _record_piece(key, row, done, ran, plan, used, max_seconds, on_piece) -> None:
  """A finished piece: into `done` and `ran`, its progress line, then `on_piece`."""
  done[key] = row
  ran.append(key)
  left, _ = plan_pieces(*plan, done)
  print(progress_line(row, len(ran), len(done), len(left), used, max_seconds), flush=True)
  if on_piece is not None:
    on_piece(row, done)


# ---------------------------------------------------------------------------------------------
# Several pieces at once (--workers): each in a child process of this script (--single_piece),
# on the same accelerator. The model is small: one piece alone leaves the GPU mostly idle
# (compiles, Python-driven evaluation), so N pieces at once take less than N times as long.

CHILD_LOG = "child.log"   # in the piece's directory
INTERRUPTED_EXIT = 3      # a child's exit status when its trainer stopped early (a signal)


class ChildFailed(RuntimeError):
  """A child piece failed: `reason` as the in-process path records it, and its log's end."""

  def __init__(self, reason: str, log: str, log_tail: str):
    super().__init__(reason)
    self.reason, self.log, self.log_tail = reason, log, log_tail


def child_argv(variant: str, seed: int, lr: float, out: str, setting_name: str, steps: int,
               task_mix: str, eval_batch_size: int, dtype: str = "",
               forward_repeats: int = -1) -> list[str]:
  """The command of a child that runs one piece: every flag that changes a piece's result or its
  study signature, so the child's signature is the parent's. No --export, --results_from or
  --max_seconds (the parent owns the report, the imports and the budget). dtype '': the child
  picks it from its own backend, as the in-process path does."""
  argv = [sys.executable, os.path.abspath(__file__), f"--setting={setting_name}",
          f"--variants={variant}", f"--seeds={int(seed)}", f"--lrs={float(lr)!r}",
          f"--steps={int(steps)}", f"--task_mix={task_mix}",
          f"--eval_batch_size={int(eval_batch_size)}", f"--out={out}", "--single_piece"]
  if forward_repeats >= 0:
    argv.append(f"--forward_repeats={int(forward_repeats)}")
  return argv + ([f"--dtype={dtype}"] if dtype else [])


def child_env(workers: int, base=None) -> dict[str, str]:
  """A child's environment: XLA's own limit on the share of accelerator memory one process
  takes (default 75% each, so two children would not fit), and unbuffered output for its log."""
  env = dict(os.environ if base is None else base)
  env.update(XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / workers:.3f}", PYTHONUNBUFFERED="1")
  return env


def concurrent_guess(guess: float, workers: int) -> float:
  """A piece's wall time with `workers` pieces at once, before any is timed: the setting's guess
  is for a piece alone, and each other piece running beside it is taken to add half of that
  (they share the GPU and the host's cores; the GPU is mostly idle for one piece). Deliberately
  high: a piece cut by the time limit costs more than one deferred to the next call."""
  return guess * (1 + (workers - 1) / 2)


def child_failure_reason(log_text: str, key: str, returncode: int) -> str:
  """The reason a child printed (run_pieces' 'KEY failed: REASON' line), else its exit status
  and last line (it died before or outside the piece: a crash, a bad flag, a kill)."""
  lines = [l for l in log_text.splitlines() if l.strip()]
  said = [l[len(f"{key} failed: "):] for l in lines if l.startswith(f"{key} failed: ")]
  if said:
    return said[-1]
  return f"child exited with status {returncode}" + (f": {lines[-1][:200]}" if lines else "")


class ChildPiece:
  """One piece run by a child process (`argv`, e.g. child_argv), its output in
  <workdir>/child.log: the handle run_pieces_parallel drives (done, result, terminate, wait)."""

  def __init__(self, argv: list[str], workdir: str, key: str, env: dict[str, str] | None = None):
    os.makedirs(workdir, exist_ok=True)
    self.workdir, self.key, self.log = workdir, key, os.path.join(workdir, CHILD_LOG)
    with open(self.log, "a", encoding="utf-8") as log:   # appends: a resumed piece keeps both
      log.write(f"$ {' '.join(argv)}\n")
      log.flush()
      self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

  def done(self) -> bool:
    return self.proc.poll() is not None

  def result(self) -> dict:
    """The piece's row; raises PieceInterrupted (stopped by a signal: nothing recorded) or
    ChildFailed, like run_one in the in-process path."""
    rc, path = self.proc.returncode, os.path.join(self.workdir, "result.json")
    if rc == 0 and os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        return json.load(f)
    with open(self.log, encoding="utf-8", errors="replace") as f:
      text = f.read()
    if rc in (INTERRUPTED_EXIT, -signal.SIGTERM, -signal.SIGINT):
      raise PieceInterrupted(f"{self.key}: its child stopped before the end (status {rc})")
    raise ChildFailed(child_failure_reason(text, self.key, rc), self.log,
                      "\n".join(text.splitlines()[-30:]))

  def terminate(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()   # SIGTERM: the trainer stops at its next step

  def wait(self, timeout: float) -> None:
    """Waits up to `timeout` seconds for the child to exit, then kills it."""
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()


def stop_pieces(handles, grace: float) -> None:
  """SIGTERM to every running child, then at most `grace` seconds (shared) before SIGKILL."""
  for h in handles:
    h.terminate()
  deadline = time.monotonic() + grace
  for h in handles:
    h.wait(max(0.0, deadline - time.monotonic()))


def _stop_with_parent() -> None:
  """A --workers child gets SIGTERM when its parent dies, even by SIGKILL (Linux's
  PR_SET_PDEATHSIG): no orphan keeps training on the accelerator."""
  if sys.platform.startswith("linux"):
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG


def run_pieces_parallel(variants, seeds, lrs, out: str, done: dict[str, dict], launch,
                        workers: int, max_seconds: float = 0.0, guess: float = 120.0,
                        clock=time.monotonic, start: float | None = None, on_piece=None,
                        sleep=time.sleep, poll: float = 1.0, stop_requested=lambda: None,
                        grace: float = 10.0) -> dict:
  """run_pieces with up to `workers` pieces at once. `launch(variant, seed, lr, workdir)` starts
  one and returns a handle (ChildPiece): done() -> bool; result() -> row, raising as run_one
  does; terminate(); wait(timeout). Free slots are filled from plan_pieces each time a piece
  finishes, so a variant's other seeds start once its whole sweep has finished; a piece starts
  only if its estimate (wall time under concurrency once timed here) fits `max_seconds`.
  `stop_requested()` -> a reason (a signal came) or None: then, as when a child reports that it
  was stopped, the running pieces are stopped and nothing is recorded for them. Returns
  {'ran', 'deferred', 'failed', 'stopped'}.
  """
  start = clock() if start is None else start
  timed, ran, failed, deferred, running = {}, [], {}, [], {}
  stopped = None
  try:
    while True:
      stopped = stopped or stop_requested()
      if stopped:
        break
      todo, _ = plan_pieces(variants, seeds, lrs, done)
      for variant, seed, lr in todo:
        key = piece_id(variant, seed, lr)
        if len(running) >= workers:
          break
        if key in failed or key in deferred or key in running:
          continue
        if not _fits(key, estimate_seconds(variant, timed, done, guess), clock() - start,
                     max_seconds):
          deferred.append(key)
          continue
        print(f"== {key} ({len(running) + 1} running)", flush=True)
        running[key] = (launch(variant, seed, lr, os.path.join(out, key)), variant, clock())
      if not running:
        break
      sleep(poll)
      signalled = stop_requested()
      for key, (handle, variant, t0) in list(running.items()):
        if not handle.done():
          continue
        del running[key]
        try:
          row = handle.result()
        except PieceInterrupted as e:
          stopped = stopped or str(e)
          print(f"{key}: {e}; stopping (nothing recorded for it)", flush=True)
          continue
        except Exception as e:  # pylint: disable=broad-except
          if not signalled:   # else the signal ended it: nothing recorded, not a failure
            _record_failure(key, e, failed)
          continue
        timed.setdefault(variant, []).append(clock() - t0)
        _record_piece(key, row, done, ran, (variants, seeds, lrs), clock() - start,
                      max_seconds, on_piece)
  finally:  # whatever ends the loop (a signal, an error here), no child outlives it
    if running:
      print(f"stopping {', '.join(running)} (nothing recorded for them)", flush=True)
      stop_pieces([h for h, _, _ in running.values()], grace)
  return {"ran": ran, "deferred": deferred, "failed": failed, "stopped": stopped}


def progress_line(row: dict, ran: int, done: int, left: int, used: float,
                  max_seconds: float) -> str:
  """One line per finished piece: what it scored, what it cost, how far the study is."""
  budget = f" of {max_seconds:.0f}" if max_seconds else ""
  loss = row.get("final_loss")
  return (f"[piece {ran} this call; {done} done, {left} ready to run] {row['variant']} seed "
          f"{row['seed']} lr {row['learning_rate']:g}: avg recall "
          f"{100 * row['average_recall']:.1f}% (MQAR {100 * row['mqar_accuracy']:.1f}%, passkey "
          f"{100 * row['passkey_accuracy']:.1f}%), loss {loss if loss is None else f'{loss:.3f}'}"
          f"; train {row['train_seconds']:.0f} s + eval {row['eval_seconds']:.0f} s; "
          f"{used:.0f} s used{budget}")


# ---------------------------------------------------------------------------------------------
# Statistics and the seeds report.

def t975(df: int) -> float:
  """t(0.975, df), the two-sided 95% Student t quantile (scipy, a dependency of jax)."""
  if df < 1:
    raise ValueError(f"degrees of freedom {df} < 1")
  return float(scipy.stats.t.ppf(0.975, df))


def mean_ci(values) -> dict:
  """Mean and two-sided 95% Student t-interval over seeds (mean ± t(0.975, n-1)·s/√n).

  n = 1: no interval (lo = hi = None). Not clipped to [0, 1] (the display clips).
  """
  v = [float(x) for x in values if x is not None]
  if not v:
    return {"n": 0, "mean": None, "sd": None, "lo": None, "hi": None}
  mean = float(np.mean(v))
  if len(v) == 1:
    return {"n": 1, "mean": mean, "sd": None, "lo": None, "hi": None}
  sd = float(np.std(v, ddof=1))
  half = t975(len(v) - 1) * sd / math.sqrt(len(v))
  return {"n": len(v), "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def _bounds(ci: dict) -> tuple[float, float]:
  """An interval's ends; a single seed is a point."""
  return (ci["mean"], ci["mean"]) if ci["lo"] is None else (ci["lo"], ci["hi"])


def overlaps(a: dict, b: dict) -> bool:
  (alo, ahi), (blo, bhi) = _bounds(a), _bounds(b)
  return alo <= bhi and blo <= ahi


def fmt_ci(ci: dict) -> str:
  """'70.7 [62.1, 79.3]' (percent, interval clipped to [0, 100]); '70.7 (n=1)'; '–'."""
  if ci["mean"] is None:
    return "–"
  if ci["lo"] is None:
    return f"{100 * ci['mean']:.1f} (n=1)"
  lo, hi = max(0.0, ci["lo"]), min(1.0, ci["hi"])
  return f"{100 * ci['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def summarize(pieces: dict[str, dict], variants, seeds, lrs) -> dict:
  """Per variant: the chosen learning rate, its rows over seeds, and mean/CI of each metric."""
  _, chosen = plan_pieces(variants, seeds, lrs, pieces)
  out = {}
  for v in variants:
    lr = chosen.get(v)
    rows = ([pieces[piece_id(v, s, lr)] for s in seeds if piece_id(v, s, lr) in pieces]
            if lr is not None else [])
    out[v] = {"lr": lr, "rows": rows, "seeds": [r["seed"] for r in rows],
              **{m: mean_ci([r[m] for r in rows])
                 for m in ("average_recall", "mqar_accuracy", "passkey_accuracy", "final_loss")}}
  return out


def compare_with_earlier(summary: dict, earlier: dict[str, float] = None) -> list[str]:
  """Sentences: each earlier value and each earlier ordering, against the intervals here.

  Value: reproduced if inside the 95% interval, refuted if outside, not determined with one seed.
  Ordering a > b: reproduced if a's interval lies above b's, refuted if below, else not
  distinguishable (the intervals overlap); a = b (equal earlier values): reproduced if the
  intervals overlap, else refuted. The last sentence is the verdict on the earlier table:
  refuted if any ordering is refuted, reproduced if all are reproduced, else not distinguishable.
  Overlap of 95% intervals is a conservative test of a difference (two means can differ at the
  5% level with slightly overlapping intervals).
  """
  earlier = EARLIER_RECALL if earlier is None else earlier
  names = [v for v in earlier if v in summary and summary[v]["average_recall"]["n"]]
  lines = []
  for v in names:
    ci = summary[v]["average_recall"]
    e = earlier[v]
    if ci["n"] < 2:
      verdict = "not determined (one seed: no interval)"
    elif ci["lo"] <= e <= ci["hi"]:
      verdict = "reproduced (inside the 95% interval)"
    else:
      verdict = "refuted (outside the 95% interval)"
    lines.append(f"{v}: earlier {100 * e:.1f}%, here {fmt_ci(ci)} over {ci['n']} seed(s): "
                 f"{verdict}.")
  verdicts = []
  for i, first in enumerate(names):
    for second in names[i + 1:]:
      a, b = (first, second) if earlier[first] >= earlier[second] else (second, first)
      ca, cb = summary[a]["average_recall"], summary[b]["average_recall"]
      if earlier[a] == earlier[b]:
        claim = f"{a} = {b}"
        if overlaps(ca, cb):
          verdict = "reproduced (not distinguishable here either)"
        else:
          top = a if ca["mean"] > cb["mean"] else b
          verdict = f"refuted ({top} is above, the intervals do not overlap)"
      else:
        claim = f"{a} > {b}"
        (alo, ahi), (blo, bhi) = _bounds(ca), _bounds(cb)
        if alo > bhi:
          verdict = "reproduced (intervals apart, in that order)"
        elif blo > ahi:
          verdict = "refuted (intervals apart, in the other order)"
        else:
          verdict = "not distinguishable (the intervals overlap)"
      verdicts.append(verdict.split(" ")[0])
      lines.append(f"Earlier ordering {claim}: {verdict}.")
  if verdicts:
    overall = ("refuted" if "refuted" in verdicts else
               "reproduced" if all(v == "reproduced" for v in verdicts) else "not distinguishable")
    order = ", ".join(f"{v} {100 * earlier[v]:.1f}%" for v in names)
    lines.append(f"**The earlier table ({order}) is {overall} here** "
                 f"({sum(v == 'reproduced' for v in verdicts)} of {len(verdicts)} orderings "
                 "reproduced).")
  return lines


def ranking_stability(summary: dict, fractions=(0.5, 0.75, 1.0)) -> tuple[str, list[str]]:
  """The ranking by mean training answer accuracy (over seeds) at fractions of the steps.

  Returns (Markdown table, sentences). The ranking 'stopped moving' if the order at 75% of the
  steps equals the order at 100%, ignoring variants within 0.01 of each other at the end.
  """
  acc = {}
  for v, s in summary.items():
    for f in fractions:
      vals = [p["accuracy"] for r in s["rows"] for p in r.get("curve", [])
              if abs(p["fraction"] - f) < 1e-6]
      if vals:
        acc.setdefault(v, {})[f] = float(np.mean(vals))
  names = [v for v in acc if len(acc[v]) == len(fractions)]
  if len(names) < 2:
    return "", ["Ranking stability: fewer than two variants with training curves."]
  body = []
  orders = {f: sorted(names, key=lambda v: -acc[v][f]) for f in fractions}
  for v in orders[fractions[-1]]:
    body.append([v, *(f"{100 * acc[v][f]:.1f} (#{orders[f].index(v) + 1})" for f in fractions)])
  md = report_lib.markdown_table(
      ["variant", *(f"train acc % at {int(100 * f)}% of steps (rank)" for f in fractions)], body)
  end, before = fractions[-1], fractions[-2]
  swaps = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
           if (acc[a][end] - acc[b][end]) * (acc[a][before] - acc[b][before]) < 0
           and abs(acc[a][end] - acc[b][end]) > 0.01]
  if swaps:
    pairs = ", ".join(f"{a} / {b}" for a, b in swaps)
    line = (f"The ranking still moved between {int(100 * before)}% and 100% of the steps "
            f"({pairs} swapped): more steps are needed before it is final (--setting=firm_long).")
  else:
    line = (f"The ranking did not move between {int(100 * before)}% and 100% of the steps "
            "(training answer accuracy, mean over seeds; differences under 1 point ignored).")
  return md, [line]


def seeds_report(pieces: dict[str, dict], variants, seeds, lrs, pending: list[str] = (),
                 failures: dict[str, str] = None) -> tuple[str, dict]:
  """Markdown and JSON summary of a multi-seed (and/or swept) study."""
  failures = failures or {}
  summary = summarize(pieces, variants, seeds, lrs)
  lines = [f"Seeds {', '.join(map(str, seeds))}; learning rates swept on seed {seeds[0]}: "
           f"{', '.join(f'{x:g}' for x in lrs)}. Intervals: two-sided 95% Student t over seeds "
           "(mean ± t(0.975, n-1)·s/√n; 4.30·s/√3 for 3 seeds), shown clipped to [0, 100]; "
           "evaluation examples are the same for every piece, so they measure the spread over "
           "training seeds. The first seed's value also chose the learning rate, so it is "
           "slightly optimistic (alike for every swept variant).", ""]
  if len(lrs) > 1:
    body = []
    for v in variants:
      for lr in lrs:
        r = pieces.get(piece_id(v, seeds[0], lr))
        mark = " **(chosen)**" if summary[v]["lr"] == float(lr) else ""
        body.append([v, f"{lr:g}{mark}", *(
            [report_lib.fmt(r["average_recall"], pct=True), report_lib.fmt(r["mqar_accuracy"],
             pct=True), report_lib.fmt(r["passkey_accuracy"], pct=True),
             report_lib.fmt(r.get("final_loss"))] if r else ["not run yet", "", "", ""])])
    lines += [f"Learning-rate sweep (seed {seeds[0]}):", "",
              report_lib.markdown_table(["variant", "lr", "avg recall %", "MQAR %", "passkey %",
                                         "final loss"], body), ""]
  ranked = sorted([v for v in variants if summary[v]["average_recall"]["n"]],
                  key=lambda v: -summary[v]["average_recall"]["mean"])
  body = []
  for i, v in enumerate(ranked):
    s = summary[v]
    ties = [w for w in ranked if w != v and overlaps(s["average_recall"],
                                                     summary[w]["average_recall"])]
    first = s["rows"][0]
    body.append([str(i + 1), v, pattern_str(first["pattern"]), f"{first['params'] / 1e6:.3f}M",
                 f"{s['lr']:g}", str(s["average_recall"]["n"]), fmt_ci(s["average_recall"]),
                 fmt_ci(s["mqar_accuracy"]), fmt_ci(s["passkey_accuracy"]),
                 report_lib.fmt(s["final_loss"]["mean"]), ", ".join(ties) or "none",
                 EARLIER.get(v, "")])
  for v in variants:
    if not summary[v]["average_recall"]["n"]:
      body.append(["–", v, "", "", "", "0", "not run yet", "", "", "", "", EARLIER.get(v, "")])
  for key, reason in failures.items():
    body.append(["–", key, "", "", "", "", "failed: " + reason.replace("|", "/")[:100], "", "",
                 "", "", ""])
  lines += ["Ranking by mean average recall (95% interval); 'overlaps' names the variants whose "
            "average-recall interval overlaps this one's (not distinguishable):", "",
            report_lib.markdown_table(
                ["rank", "variant", "pattern", "params", "lr", "seeds", "avg recall %",
                 "MQAR %", "passkey %", "final loss", "overlaps", "earlier study"], body), ""]
  compare = compare_with_earlier(summary)
  if compare:
    lines += ["Against the earlier study (its numbers come from another setup and grid: the "
              "orderings are the test, the values indicative):", ""]
    lines += [f"- {c}" for c in compare] + [""]
  stab_md, stab = ranking_stability(summary)
  if stab_md:
    lines += ["Training answer accuracy (MQAR + passkey answer tokens, mean over seeds) at "
              "fractions of the steps:", "", stab_md, ""]
  lines += stab + [""]
  secs = {}
  for r in pieces.values():
    if r.get("piece_seconds"):
      secs.setdefault(r["variant"], []).append(r)
  if secs:
    body = [[v, str(len(rs)), f"{np.mean([r['train_seconds'] for r in rs]):.0f}",
             f"{np.mean([r['eval_seconds'] for r in rs]):.0f}",
             report_lib.fmt(np.mean([r.get('compile_seconds') or 0 for r in rs])),
             report_lib.fmt(np.mean([r['seconds_per_step'] for r in rs
                                     if r.get('seconds_per_step')] or [np.nan]) * 1e3)]
            for v, rs in secs.items()]
    lines += ["Time per piece (means; compile included in train):", "",
              report_lib.markdown_table(["variant", "pieces", "train s", "eval s", "compile s",
                                         "ms/step"], body), ""]
  if pending:
    per = {v: max(r["piece_seconds"] for r in rs) for v, rs in secs.items()}
    known = [per[p.split("/")[0]] for p in pending if p.split("/")[0] in per]
    guess = (f" About {sum(known):.0f} s of pieces by the slowest timed piece of each variant"
             + (f" ({len(pending) - len(known)} of them not timed yet)"
                if len(known) < len(pending) else "") + "." if known else "")
    lines.append(f"Pieces not run yet ({len(pending)}): {', '.join(pending)}.{guess}")
  data = {v: {k: s[k] for k in ("lr", "seeds", "average_recall", "mqar_accuracy",
                                "passkey_accuracy", "final_loss")} for v, s in summary.items()}
  return "\n".join(lines).rstrip() + "\n", {"variants": data, "earlier": compare,
                                           "stability": stab, "pending": list(pending)}


# ---------------------------------------------------------------------------------------------
# The single-seed table (one seed, one learning rate: the report as before).

def table(rows: list[dict], failures: dict[str, str]) -> str:
  header = ["variant", "pattern", "params", "avg recall %", "MQAR %", "passkey %",
            "fwd 2K tokens (s)", "final loss", "earlier study"]
  body = []
  for r in sorted(rows, key=lambda r: -(r["average_recall"] or 0)):
    fwd = r.get("forward_seconds_2k")
    body.append([r["variant"], pattern_str(r["pattern"]), f"{r['params'] / 1e6:.3f}M",
                 report_lib.fmt(r["average_recall"], pct=True),
                 report_lib.fmt(r["mqar_accuracy"], pct=True),
                 report_lib.fmt(r["passkey_accuracy"], pct=True),
                 f"{fwd:.4f}" if fwd is not None else "–",
                 f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "–",
                 EARLIER.get(r["variant"], "")])
  for name, reason in failures.items():
    body.append([name, "", "", "failed: " + reason.replace("|", "/")[:120], "", "", "", "", ""])
  return report_lib.markdown_table(header, body)


def mqar_by_length(rows: list[dict], label=lambda r: r["variant"]) -> str:
  """Markdown: one row per result, one column per MQAR length (accuracy averaged over pairs)."""
  lengths = sorted({c["length"] for r in rows for c in r["mqar"]["cells"]})
  body = []
  for r in rows:
    cells = []
    for length in lengths:
      acc = [c["accuracy"] for c in r["mqar"]["cells"]
             if c["length"] == length and c["accuracy"] is not None]
      cells.append(report_lib.fmt(statistics.mean(acc) if acc else None, pct=True))
    body.append([label(r), *cells])
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
  rows = [r for r in rows if r.get("forward_seconds_2k") is not None]
  if not rows:
    return
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


def plot_seeds(summary: dict, path: str) -> None:
  """Bars: mean over seeds of each metric per variant, 95% interval as error bar, seeds as dots."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = sorted([v for v, s in summary.items() if s["average_recall"]["n"]],
                 key=lambda v: -summary[v]["average_recall"]["mean"])
  if not names:
    return
  metrics = (("average_recall", "avg recall"), ("mqar_accuracy", "MQAR"),
             ("passkey_accuracy", "passkey"))
  fig, ax = plt.subplots(figsize=(8, 4.5))
  width = 0.8 / len(metrics)
  for j, (m, label) in enumerate(metrics):
    xs = np.arange(len(names)) + (j - 1) * width
    means = [100 * summary[v][m]["mean"] for v in names]
    err = [[100 * (summary[v][m]["mean"] - max(0.0, summary[v][m]["lo"]))
            if summary[v][m]["lo"] is not None else 0 for v in names],
           [100 * (min(1.0, summary[v][m]["hi"]) - summary[v][m]["mean"])
            if summary[v][m]["hi"] is not None else 0 for v in names]]
    ax.bar(xs, means, width, yerr=err, capsize=3, label=label, alpha=0.8)
    for x, v in zip(xs, names):
      ax.scatter([x] * len(summary[v]["rows"]), [100 * r[m] for r in summary[v]["rows"]],
                 s=8, color="black", zorder=3)
  ax.set_xticks(np.arange(len(names)), [f"{v}\nlr {summary[v]['lr']:g}" for v in names],
                fontsize=8)
  ax.set_ylabel("% (mean over seeds, 95% t-interval; dots: seeds)")
  ax.set_ylim(0, 105)
  ax.set_title("Backbone study over seeds, each variant at its swept learning rate")
  ax.legend(fontsize=8)
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------

def _resolve(setting_name: str):
  """The run's setting, variants, seeds and learning rates from the flags and the setting."""
  setting = SETTINGS[setting_name]
  if FLAGS.forward_repeats >= 0:   # timing only: not part of the study's signature
    setting = dict(setting, forward_repeats=FLAGS.forward_repeats)
  variants = FLAGS.variants or list(setting.get("variants", VARIANTS))
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"unknown variants {unknown}; use a subset of {list(VARIANTS)}")
  try:
    seeds = [int(s) for s in FLAGS.seeds] or list(setting.get("seeds", (0,)))
    lrs = [float(x) for x in FLAGS.lrs] or list(setting.get("lrs", (setting["learning_rate"],)))
  except ValueError as e:
    raise app.UsageError(f"--seeds takes integers, --lrs numbers: {e}") from e
  if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise app.UsageError(f"--seeds={seeds}: distinct integers >= 0")
  if any(x <= 0 for x in lrs) or len(set(lrs)) != len(lrs):
    raise app.UsageError(f"--lrs={lrs}: distinct positive learning rates")
  return setting, variants, seeds, lrs


def main(argv):
  del argv
  start = time.monotonic()
  logging.set_verbosity(logging.WARNING)
  setting_name = FLAGS.setting or ("quick" if FLAGS.quick else "full")
  setting, variants, seeds, lrs = _resolve(setting_name)
  if FLAGS.workers < 1:
    raise app.UsageError(f"--workers={FLAGS.workers}: at least 1")
  if FLAGS.single_piece and (FLAGS.workers != 1 or len(variants) * len(seeds) * len(lrs) != 1):
    raise app.UsageError("--single_piece runs one piece: one variant, one seed, one learning "
                         "rate, --workers=1")
  if FLAGS.single_piece:
    _stop_with_parent()
  parallel = FLAGS.workers > 1 and not FLAGS.report_only
  if parallel:  # the parent only schedules: it leaves the accelerator's memory to its children
    jax.config.update("jax_platforms", "cpu")
  out = os.path.abspath(FLAGS.out or f"/tmp/backbone_study_{setting_name}")
  os.makedirs(out, exist_ok=True)
  # (the parent of --workers uses it only for the parameter count: its children pick their own)
  dtype = FLAGS.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  eval_batch_size = FLAGS.eval_batch_size or setting.get("eval_batch_size", 16)
  signature = study_signature(setting_name, setting, FLAGS.steps, FLAGS.task_mix)
  reference = variant_config(REFERENCE, setting, dtype, FLAGS.steps, FLAGS.task_mix)
  target = count_params(reference.model)
  print(f"target parameters {target:,} ({REFERENCE} at mlp_dim {reference.model.mlp_dim}); "
        f"output {out}; variants {variants}; seeds {seeds}; learning rates {lrs}", flush=True)
  imported = 0
  for path in FLAGS.results_from:
    imported += import_pieces(out, read_pieces(path, signature))
  done = gather_pieces(out, setting["learning_rate"], signature)
  todo, _ = plan_pieces(variants, seeds, lrs, done)
  print(f"{len(done)} pieces done ({imported} imported), {len(todo)} ready to run", flush=True)

  def report(failures, echo=True):
    return write_report(out, setting_name, target, failures, variants, seeds, lrs, signature,
                        export=FLAGS.export, echo=echo)

  def run_one(variant, seed, lr, workdir):
    return run_variant(variant, setting, out, dtype, FLAGS.steps, FLAGS.task_mix, target,
                       eval_batch_size, seed=seed, learning_rate=lr, workdir=workdir,
                       signature=signature)

  def launch(variant, seed, lr, workdir):
    argv = child_argv(variant, seed, lr, out, setting_name, FLAGS.steps, FLAGS.task_mix,
                      eval_batch_size, FLAGS.dtype, FLAGS.forward_repeats)
    return ChildPiece(argv, workdir, piece_id(variant, seed, lr), child_env(FLAGS.workers))

  if FLAGS.single_piece:   # a --workers child: its piece's result.json, no report
    status = run_pieces(variants, seeds, lrs, out, done, run_one)
    return INTERRUPTED_EXIT if status["stopped"] else int(bool(status["failed"]))
  failures = {}
  guess = setting.get("piece_seconds_guess", 120)

  def on_piece(row, done):
    del row, done
    report({}, echo=False)

  if parallel:
    received = []   # SIGTERM/SIGINT (e.g. from `timeout`): stop the children, then report
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, lambda signum, _: received.append(signal.Signals(signum).name))
    status = run_pieces_parallel(
        variants, seeds, lrs, out, done, launch, FLAGS.workers, max_seconds=FLAGS.max_seconds,
        guess=concurrent_guess(guess, FLAGS.workers), start=start, on_piece=on_piece,
        stop_requested=lambda: f"signal {received[0]}" if received else None)
  elif not FLAGS.report_only:
    status = run_pieces(variants, seeds, lrs, out, done, run_one, max_seconds=FLAGS.max_seconds,
                        guess=guess, start=start, on_piece=on_piece)
  if not FLAGS.report_only:
    failures = status["failed"]
    left, _ = plan_pieces(variants, seeds, lrs, done)
    print(f"this call: {len(status['ran'])} pieces run, {len(status['deferred'])} deferred "
          f"(time budget), {len(failures)} failed"
          + (f", stopped: {status['stopped']}" if status["stopped"] else "")
          + f"; {len(done)} done, {len(left)} ready to run next"
          + f"; {time.monotonic() - start:.0f} s", flush=True)
  report(failures)


def write_report(out: str, setting_name: str, target: int, failures: dict[str, str],
                 variants, seeds, lrs, signature: dict, export: str = "",
                 echo: bool = True) -> str:
  """Writes OUT/backbone_study.{json,md,png} and OUT/backbone_pieces.json from every piece
  found in OUT, copies them to `export` (if given), and returns the Markdown."""
  pieces = gather_pieces(out, SETTINGS[setting_name]["learning_rate"], signature)
  rows = list(pieces.values())
  devices = sorted({r.get("device", "") for r in rows}) or [jax.devices()[0].device_kind]
  summary = {"setting": setting_name, "target_params": target, "study": signature,
             "seeds": list(seeds), "lrs": list(lrs), "variants": list(variants),
             "task_mix": signature["task_mix"], "device": ", ".join(devices),
             "jax": jax.__version__, "command": " ".join(sys.argv), "failures": failures,
             "pieces_done": len(pieces),
             "rows": [{k: v for k, v in r.items() if k not in ("mqar", "passkey", "curve")}
                      for r in rows]}
  todo, _ = plan_pieces(variants, seeds, lrs, pieces)
  waiting = [v for v in variants if plan_pieces(variants, seeds, lrs, pieces)[1][v] is None]
  pending = [piece_id(*p) for p in todo] + [f"{v}/seed{s} (after its sweep)" for v in waiting
                                            for s in seeds[1:]]
  if len(seeds) == 1 and len(lrs) == 1:  # the single-seed study: its table as before
    chosen = [pieces[piece_id(v, seeds[0], lrs[0])] for v in variants
              if piece_id(v, seeds[0], lrs[0]) in pieces]
    md = table(chosen, failures)
    chance = [r["chance"] for r in chosen if r.get("chance") is not None]
    if chance:
      md += f"\n\nChance (uniform guessing) of the average recall: {100 * chance[0]:.2f}%."
    bag = [r["mqar"].get("bag_chance") for r in chosen
           if r["mqar"].get("bag_chance") is not None]
    if bag:  # a model that copies some value from its context without binding keys
      md += f" MQAR bag chance (mean over the grid): {100 * bag[0]:.1f}%."
    if chosen:
      md += ("\n\nMQAR accuracy (%) by length, mean over the pairs grid:\n\n"
             + mqar_by_length(chosen))
    md += "\n"
    if chosen:
      plot(chosen, os.path.join(out, "backbone_study.png"))
  else:
    md, data = seeds_report(pieces, variants, seeds, lrs, pending, failures)
    summary.update(data)
    chance = [r["chance"] for r in rows if r.get("chance") is not None]
    bag = [r["mqar"].get("bag_chance") for r in rows if r["mqar"].get("bag_chance") is not None]
    if chance:
      md += (f"\nChance (uniform guessing) of the average recall: {100 * chance[0]:.2f}%"
             + (f"; MQAR bag chance (mean over the grid): {100 * bag[0]:.1f}%." if bag else ".")
             + "\n")
    final = summarize(pieces, variants, seeds, lrs)
    chosen_rows = [r for s in final.values() for r in s["rows"]]
    if chosen_rows:
      md += ("\nMQAR accuracy (%) by length, mean over the pairs grid, each piece at its "
             "variant's learning rate:\n\n"
             + mqar_by_length(chosen_rows, lambda r: f"{r['variant']} seed {r['seed']}") + "\n")
      plot_seeds(final, os.path.join(out, "backbone_study.png"))
  with open(os.path.join(out, "backbone_study.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, default=str)
  with open(os.path.join(out, "backbone_study.md"), "w", encoding="utf-8") as f:
    f.write(md)
  write_pieces(os.path.join(out, PIECES_FILE), pieces, signature)
  if export:
    os.makedirs(export, exist_ok=True)
    for name in (PIECES_FILE, "backbone_study.md", "backbone_study.json", "backbone_study.png"):
      if os.path.exists(os.path.join(out, name)):
        shutil.copyfile(os.path.join(out, name), os.path.join(export, name))
  if echo:
    print(md, flush=True)
  return md


if __name__ == "__main__":
  define_flags()
  app.run(main)

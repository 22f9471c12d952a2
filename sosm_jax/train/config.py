"""The trainer's config sections (optimizer, curriculum, train, mesh, distributed) and checks.

Model and data sections come from `sosm_jax.models.config` and `sosm_jax.data.config`; this file
assembles the whole tree and validates it, so a bad value fails at start with its key named.
"""
from __future__ import annotations

import difflib

import ml_collections
import numpy as np

from sosm_jax.data import config as data_config
from sosm_jax.models import config as model_config
from sosm_jax.parallel.context import check_context_config
from sosm_jax.train import finetune
from sosm_jax.train import memory_train

_REMATS = ("none", "full", "dots", "auto")   # auto: see curriculum.AUTO_REMAT_ORDER


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with defaults; configs/*.py start from this and override."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = ""  # --workdir wins; '' = workdir/<config name>
  c.model = model_config.default_model_config()
  c.data = data_config.default_data_config()

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-4, warmup_steps=200, schedule="cosine",  # 'cosine' | 'wsd' | 'constant'
      min_lr_ratio=0.1, decay_fraction=0.2,  # wsd: final fraction of steps spent decaying
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_embeddings=False, clip_norm=1.0,
      # True: the same AdamW on a few flat buffers (optimizer.FusedAdamW: fewer, larger kernels;
      # sharded parameters keep their shards in place); checkpoints of either setting resume on
      # any mesh and with either setting (the optimizer state is converted on restore, exactly)
      fused=False))

  c.curriculum = ml_collections.ConfigDict(dict(
      seq_lens=(4096,), steps=(1000,), steps_per_stage=0,  # >0 overrides every stage's steps
      tokens_per_step=65536,   # global batch = tokens_per_step // seq_len unless global_batch says
      global_batch=(),         # per-stage batch (0 = from tokens_per_step); () = all derived
      grad_accum=(),           # per-stage micro-batches; () = 1
      remat=(),                # per-stage remat: 'none'|'dots'|'full'|'auto' (the lightest that
                               # fits the device, by the compiled step); () = model.remat
      rope_base=(),            # per-stage RoPE base of the attention layers; () = model.rope_base
  ))

  c.train = ml_collections.ConfigDict(dict(
      log_every=10, checkpoint_every=500, keep_checkpoints=3, max_nonfinite_steps=5,
      eval_batches=4, eval_batch_size=8, passkey_examples=8,
      memory_limit_gib=0.0,  # 0 = the device's own limit (where it reports one)
      stop_at_step=0,        # >0: checkpoint and stop at this global step, as on SIGTERM
      max_update_ratio=1.0,  # reject an update whose norm exceeds this x the parameters' norm
                             # (an exploding learning rate); 0 = only non-finite values rejected
      restart=False,         # True: when the workdir's checkpoints cannot be resumed (another
                             # model or tokenizer, or none readable), move that run aside to
                             # <workdir>/previous/<time>/ and start at step 0 (never deletes)
      compile_cache="workdir",  # persistent XLA compilation cache: 'workdir' (<workdir>/
                             # compile_cache), 'user' (~/.cache/sosm_jax/xla), 'off', or a path
      preflight="auto",      # 'all_stages': compile every stage the run reaches before step 1
                             # and stop if one does not fit the memory limit; 'off': each stage
                             # when it starts; 'auto': all_stages where a limit is known (GPU,
                             # TPU, memory_limit_gib), else off (startup_checks.stages_to_preflight)
  ))

  c.finetune = finetune.default_config()  # LoRA, distillation, init_from (train/finetune.py)
  c.memory = memory_train.default_config()  # memory beyond the window (off by default)
  # context: devices one sequence is split over (its time axis; sosm_jax/parallel/context.py)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1))
  return c


def _require(ok: bool, key: str, problem: str, fix: str) -> None:
  if not ok:
    raise ValueError(f"config.{key}: {problem}; {fix}")


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _ints(values, key: str, low: int, fix: str) -> None:
  """Every entry of the tuple `values` an int >= low."""
  for v in tuple(values):
    _require(_is_int(v), key, f"entry {v!r} of {tuple(values)!r} is not an integer", fix)
    _require(v >= low, key, f"entry {v} of {tuple(values)!r} is below {low}", fix)


def validate_config(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first impossible value and how to fix it."""
  _require(_is_int(c.seed) and c.seed >= 0, "seed", f"{c.seed!r} is not an integer >= 0",
           "use e.g. 0")
  model_config.validate_model_config(c.model)
  data_config.validate_data_config(c.data)
  o = c.optimizer
  _require(o.learning_rate > 0, "optimizer.learning_rate", f"{o.learning_rate} is not positive",
           "use e.g. 3e-4")
  _require(o.warmup_steps >= 0, "optimizer.warmup_steps", "is negative", "use 0 or more")
  _require(0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", f"{o.min_lr_ratio} outside [0, 1]",
           "use e.g. 0.1")
  _require(0 < o.decay_fraction <= 1, "optimizer.decay_fraction",
           f"{o.decay_fraction} outside (0, 1]", "use e.g. 0.2")
  _require(o.schedule in ("cosine", "wsd", "constant"), "optimizer.schedule",
           f"{o.schedule!r} is unknown", "use 'cosine', 'wsd' or 'constant'")
  _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optimizer.b1/b2", "must be in [0, 1)", "use 0.9/0.95")
  _require(o.clip_norm >= 0, "optimizer.clip_norm", "is negative", "use 0 (off) or e.g. 1.0")
  _require(isinstance(o.get("fused", False), bool), "optimizer.fused",
           f"{o.get('fused')!r} is not a bool", "use true or false")
  if o.get("fused", False):
    _require(not finetune.wraps_params(c.finetune), "optimizer.fused",
             "is not supported with LoRA or distillation (their optimizer updates a subtree)",
             "use --config.optimizer.fused=false")
  cur = c.curriculum
  _require(cur.tokens_per_step > 0, "curriculum.tokens_per_step", "must be positive",
           "use e.g. 65536")
  _ints(cur.seq_lens, "curriculum.seq_lens", 1, "write lengths as integers, e.g. (4096, 8192)")
  _ints(cur.steps, "curriculum.steps", 0, "write step counts as integers, e.g. (1000, 500)")
  _ints(cur.global_batch, "curriculum.global_batch", 0,
        "use 0 (from tokens_per_step) or a positive batch per stage")
  _ints(cur.grad_accum, "curriculum.grad_accum", 1, "use 1 or more micro-batches per stage")
  _require(_is_int(cur.steps_per_stage) and cur.steps_per_stage >= 0,
           "curriculum.steps_per_stage", f"{cur.steps_per_stage!r} is not an integer >= 0",
           "use 0 (curriculum.steps decides) or a step count")
  for remat in tuple(cur.remat):
    _require(remat in _REMATS, "curriculum.remat", f"{remat!r} is unknown", f"use one of {_REMATS}")
  memory_train.validate_config(c)
  finetune.validate_config(c.finetune)
  check_context_config(c.mesh.get("context", 1), c.model.pattern, cur.seq_lens,
                       c.memory.enabled, c.model.conv_width)
  t = c.train
  _require(t.log_every > 0, "train.log_every", "must be positive", "use e.g. 10")
  _require(t.checkpoint_every >= 0, "train.checkpoint_every", "is negative", "use 0 (only at "
           "stage ends) or a positive interval")
  _require(t.keep_checkpoints > 0, "train.keep_checkpoints", "must be positive", "use e.g. 3")
  _require(t.max_nonfinite_steps > 0, "train.max_nonfinite_steps", "must be positive",
           "use e.g. 5")
  _require(t.eval_batches >= 0 and t.passkey_examples >= 0, "train.eval_batches/passkey_examples",
           "is negative", "use 0 to switch it off")
  _require(t.eval_batch_size >= 1, "train.eval_batch_size", f"{t.eval_batch_size} is below 1",
           "use e.g. 8 (train.eval_batches=0 switches the evaluation off)")
  _require(t.stop_at_step >= 0, "train.stop_at_step", "is negative", "use 0 (off) or a step")
  _require(t.max_update_ratio >= 0, "train.max_update_ratio", "is negative",
           "use 0 (off) or e.g. 1.0")
  _require(isinstance(t.compile_cache, str) and t.compile_cache != "", "train.compile_cache",
           f"{t.compile_cache!r} is not a setting", "use 'workdir', 'user', 'off' or a directory")
  _require(t.preflight in ("auto", "all_stages", "off"), "train.preflight",
           f"{t.preflight!r} is unknown", "use 'auto', 'all_stages' or 'off'")


def check_override_flags(argv: list[str], config: ml_collections.ConfigDict,
                         prefix: str = "config") -> None:
  """Raises ValueError for a `--config.a.b=...` override that names no key or is given twice.

  An unknown key is named with the closest valid keys of its section, before any traceback
  from the flag parser; a key given twice would otherwise be merged or silently replaced.
  """
  seen = set()
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    if name.startswith("no") and name[2:].startswith(prefix + "."):
      name = name[2:]
    if not name.startswith(prefix + "."):
      continue
    if name in seen:
      raise ValueError(f"--{name} is given twice; give each override once")
    seen.add(name)
    node, done = config, [prefix]
    for part in name.split(".")[1:]:
      if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
        where = ".".join(done)
        keys = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
        close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
        hint = (f"did you mean {', '.join(f'--{where}.{k}' for k in close)}?" if close
                else f"{where} has the keys {', '.join(keys)}" if keys
                else f"{where} is a value, not a section")
        raise ValueError(f"--{name}: {where} has no key {part!r}; {hint}")
      node = node[part]
      done.append(part)

"""The trainer's config sections (optimizer, curriculum, train, mesh, distributed) and checks.

Model and data sections come from `sosm_jax.models.config` and `sosm_jax.data.config`; this file
assembles the whole tree and validates it, so a bad value fails at start with its key named.
"""
from __future__ import annotations

import ml_collections

from sosm_jax.data import config as data_config
from sosm_jax.models import config as model_config
from sosm_jax.train import memory_train

_REMATS = ("none", "full", "dots")


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
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_embeddings=False, clip_norm=1.0))

  c.curriculum = ml_collections.ConfigDict(dict(
      seq_lens=(4096,), steps=(1000,), steps_per_stage=0,  # >0 overrides every stage's steps
      tokens_per_step=65536,   # global batch = tokens_per_step // seq_len unless global_batch says
      global_batch=(),         # per-stage batch (0 = from tokens_per_step); () = all derived
      grad_accum=(),           # per-stage micro-batches; () = 1
      remat=(),                # per-stage remat policy; () = model.remat
      rope_base=(),            # per-stage RoPE base of the attention layers; () = model.rope_base
  ))

  c.train = ml_collections.ConfigDict(dict(
      log_every=10, checkpoint_every=500, keep_checkpoints=3, max_nonfinite_steps=5,
      eval_batches=4, eval_batch_size=8, passkey_examples=8,
      memory_limit_gib=0.0,  # 0 = the device's own limit (where it reports one)
      stop_at_step=0,        # >0: checkpoint and stop at this global step, as on SIGTERM
  ))

  c.memory = memory_train.default_config()  # memory beyond the window (off by default)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1))
  return c


def _require(ok: bool, key: str, problem: str, fix: str) -> None:
  if not ok:
    raise ValueError(f"config.{key}: {problem}; {fix}")


def validate_config(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first impossible value and how to fix it."""
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
  cur = c.curriculum
  _require(cur.tokens_per_step > 0, "curriculum.tokens_per_step", "must be positive",
           "use e.g. 65536")
  for remat in tuple(cur.remat):
    _require(remat in _REMATS, "curriculum.remat", f"{remat!r} is unknown", f"use one of {_REMATS}")
  memory_train.validate_config(c)
  t = c.train
  _require(t.log_every > 0, "train.log_every", "must be positive", "use e.g. 10")
  _require(t.checkpoint_every >= 0, "train.checkpoint_every", "is negative", "use 0 (only at "
           "stage ends) or a positive interval")
  _require(t.keep_checkpoints > 0, "train.keep_checkpoints", "must be positive", "use e.g. 3")
  _require(t.max_nonfinite_steps > 0, "train.max_nonfinite_steps", "must be positive",
           "use e.g. 5")
  _require(t.eval_batches >= 0 and t.passkey_examples >= 0, "train.eval_batches/passkey_examples",
           "is negative", "use 0 to switch it off")

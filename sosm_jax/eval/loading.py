"""Loading a trained model for evaluation: config, tokenizer and parameters from a work directory.

A work directory holds `config.json` and `checkpoints/<step>/` (orbax items 'state', a TrainState,
and 'meta', JSON with 'config', 'tokenizer', 'data_state', 'stage'). Only the parameters are
restored (a partial restore: no optimizer state is read). Everything that would make the numbers
meaningless fails with a ValueError naming the problem and the fix: no checkpoint, a config whose
model differs from the checkpoint's, parameter shapes that do not match, another tokenizer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from sosm_jax import data as data_lib
from sosm_jax import models
from sosm_jax.train import config as config_lib
from sosm_jax.train import curriculum as curriculum_lib

# Model keys that change how the same parameters are computed, not what they are: a config may
# differ from the checkpoint's in these (e.g. a longer RoPE base or another kernel at eval time).
EVAL_SAFE_MODEL_KEYS = ("remat", "rope_base", "linear_impl", "attn_impl", "chunk_size", "dtype",
                        "attn_window", "document_masking", "loss_chunk_size")


@dataclasses.dataclass
class LoadedModel:
  config: ml_collections.ConfigDict
  model: Any             # models.LanguageModel
  params: Any            # unboxed parameter tree
  tokenizer: Any
  step: int
  meta: dict
  workdir: str


def _tuples(x):
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
  """A full trainer config from a saved dict (JSON lists become tuples; unknown keys are kept)."""
  config = config_lib.base_config()

  def merge(into, values, prefix):
    for key, value in values.items():
      nested = key in into and isinstance(into[key], ml_collections.ConfigDict)
      if isinstance(value, dict) and nested:
        merge(into[key], value, f"{prefix}{key}.")
      else:
        try:
          into[key] = value
        except (TypeError, KeyError):  # a saved value of another type than today's default
          del into[key]
          into[key] = value

  merge(config, _tuples(saved), "")
  if "model" in saved and "gdn_output_gate" not in saved["model"]:
    config.model.gdn_output_gate = "silu"  # saved before the key existed (issue 22): the old gate
  return config


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps with a finished checkpoint in workdir (ValueError when there is none)."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise ValueError(f"{workdir!r} has no checkpoints/ directory; pass the --workdir of a training "
                     f"run (python launch/train.py --config=... --workdir=DIR writes one)")
  with _manager(workdir) as m:
    steps = sorted(m.all_steps())
  if not steps:
    raise ValueError(f"{directory} holds no finished checkpoint; train longer (a checkpoint is "
                     f"written at every stage end and every train.checkpoint_every steps)")
  return steps


@contextlib.contextmanager
def _manager(workdir: str):
  options = ocp.CheckpointManagerOptions(create=False)  # nothing is saved through it
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)
  try:
    yield manager
  finally:
    manager.close()


def read_meta(workdir: str, step: int) -> dict:
  """The checkpoint's JSON metadata (config, tokenizer, data_state, stage)."""
  with _manager(workdir) as m:
    return dict(m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def saved_param_shapes(workdir: str, step: int) -> dict[str, tuple]:
  """{'path/to/param': shape} of the parameters stored in checkpoint `step`."""
  path = os.path.join(checkpoint_dir(workdir), str(step), "state")
  metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
  tree = getattr(metadata, "tree", metadata)
  if "params" not in tree:
    raise ValueError(f"checkpoint {path} has no 'params' in its state; it was not written by "
                     f"sosm_jax.train (keys: {sorted(tree)})")
  return {_path_str(p): tuple(leaf.shape) for p, leaf in
          jax.tree_util.tree_flatten_with_path(tree["params"])[0]}


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def compare_model_configs(saved: dict, given: dict) -> list[str]:
  """Differences between two model config dicts, ignoring EVAL_SAFE_MODEL_KEYS.

  `given` is built by today's code, so it holds every key the model reads; a key only the
  checkpoint's config holds was removed since (it shapes nothing now) and is not a difference.
  """
  saved, given = _tuples(saved), _tuples(given)
  diffs = []
  for key in sorted(set(saved) | set(given)):
    if key in EVAL_SAFE_MODEL_KEYS or key not in given:
      continue
    if saved.get(key) != given.get(key):
      diffs.append(f"model.{key}: checkpoint {saved.get(key)!r}, given {given.get(key)!r}")
  return diffs


def check_param_shapes(saved: dict[str, tuple], expected: dict[str, tuple], where: str) -> None:
  """Raises ValueError listing parameters missing, extra, or of another shape."""
  problems = []
  for path in sorted(set(saved) | set(expected)):
    if path not in saved:
      problems.append(f"{path}: the model has it {expected[path]}, the checkpoint does not")
    elif path not in expected:
      problems.append(f"{path}: the checkpoint has it {saved[path]}, the model does not")
    elif tuple(saved[path]) != tuple(expected[path]):
      problems.append(f"{path}: checkpoint {saved[path]}, model {expected[path]}")
  if problems:
    more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
    raise ValueError(
        f"checkpoint {where} does not fit the model built from the config: "
        + "; ".join(problems[:6]) + more + ". It was written by a model with another config; "
        "evaluate with the checkpoint's own config (drop --config, or its model.* overrides).")


def load_for_eval(workdir: str, *, step: int | None = None,
                  config: ml_collections.ConfigDict | None = None) -> LoadedModel:
  """Config, model, parameters and tokenizer of checkpoint `step` (default: the newest).

  `config` (optional) replaces the checkpoint's own config; its model section must describe the
  same parameters (keys in EVAL_SAFE_MODEL_KEYS may differ), and its tokenizer the same one.
  """
  steps = checkpoint_steps(workdir)
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"no checkpoint {step} in {checkpoint_dir(workdir)}; there are {steps}")
  meta = read_meta(workdir, step)
  saved_cfg = meta.get("config")
  if saved_cfg is None:
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
      raise ValueError(f"checkpoint {step} has no config in its metadata and {config_path} is "
                       f"missing; pass --config with the config it was trained with")
    with open(config_path, encoding="utf-8") as f:
      saved_cfg = json.load(f)
  where = os.path.join(checkpoint_dir(workdir), str(step))
  if config is None:
    config = config_from_dict(saved_cfg)
    if "stage" in meta:
      # the curriculum may change the RoPE base per stage: evaluate with the one the checkpoint's
      # stage trained with, not the model section's default
      config.model.rope_base = curriculum_lib.stage_rope_base(
          config.curriculum, int(meta["stage"]), config.model.rope_base)
  else:
    diffs = compare_model_configs(saved_cfg.get("model", {}), config.model.to_dict())
    if diffs:
      raise ValueError(f"the given config's model differs from checkpoint {where}'s: "
                       + "; ".join(diffs) + ". Evaluate with the checkpoint's own config (drop "
                       "--config or the differing overrides).")
  tokenizer = data_lib.make_tokenizer(config.data)
  if "tokenizer" in meta:
    data_lib.check_tokenizer_identity(meta["tokenizer"], tokenizer.identity())
  model = models.build_model(config.model)
  abstract = nn.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), 1, config.model.chunk_size)))
  expected = {_path_str(p): tuple(x.shape) for p, x in
              jax.tree_util.tree_flatten_with_path(abstract)[0]}
  check_param_shapes(saved_param_shapes(workdir, step), expected, where)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  with _manager(workdir) as m:
    # Explicit restore args put every array on this device, whatever mesh the run trained on.
    restored = m.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": target}, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target}))))
  return LoadedModel(config=config, model=model, params=restored.state["params"],
                     tokenizer=tokenizer, step=step, meta=meta, workdir=os.path.abspath(workdir))

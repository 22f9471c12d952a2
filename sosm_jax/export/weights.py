"""Weights in and out: parameters as safetensors with a config JSON, and import into a work directory.

An export folder holds
  model.safetensors   every parameter under its flax path joined by '.', in the model's own
                      layout (with scan_layers the layer parameters are stacked `[groups, ...]`
                      under 'layers.block_<p>'), dtype as trained (param_dtype, float32 default)
  config.json         {'format': 'sosm_jax', 'format_version', 'config': the full trainer config,
                       'tokenizer': the tokenizer identity, 'step', 'tokenizer_file'}
  tokenizer.model | tokenizer/   a copy of the tokenizer's files when it has some (SentencePiece
                      .model; Hugging Face tokenizer.json with its special-token configs); the
                      byte tokenizer needs none
The parameter names and shapes are checked against the model the config builds, so a file that
does not describe the config's model is refused with the names that differ.

Import (`import_to_workdir`) writes a new work directory that `launch/evaluate.py` reads and
`launch/train.py --workdir=NEW` resumes from: its config.json and checkpoint 0 holding the
imported parameters with a fresh optimizer state (step 0, no data position).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util

FORMAT = "sosm_jax"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def flatten(params) -> dict[str, np.ndarray]:
  """Nested parameter dict -> {'a.b.kernel': numpy array}, host copies in their own dtype."""
  flat = traverse_util.flatten_dict(nn.unbox(params), sep=".")
  return {name: np.asarray(jax.device_get(value)) for name, value in sorted(flat.items())}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  """{'a.b.kernel': array} -> the nested parameter dict."""
  return traverse_util.unflatten_dict(dict(flat), sep=".")


def expected_shapes(model_cfg) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'a.b.kernel': (shape, dtype name)} of the parameters the config's model has (traced only)."""
  from sosm_jax import models  # pylint: disable=import-outside-toplevel
  model = models.build_model(model_cfg)
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), 1, model.cfg.chunk_size)))
  flat = traverse_util.flatten_dict(abstract, sep=".")
  return {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in flat.items()}


def check_names_and_shapes(flat: dict[str, np.ndarray], model_cfg, where: str) -> None:
  """ValueError listing parameters missing, extra, or of another shape than the model's."""
  expected = expected_shapes(model_cfg)
  problems = []
  for name in sorted(set(flat) | set(expected)):
    if name not in flat:
      problems.append(f"{name} missing (the model has {expected[name][0]})")
    elif name not in expected:
      problems.append(f"{name} {tuple(flat[name].shape)} is not a parameter of the model")
    elif tuple(flat[name].shape) != expected[name][0]:
      problems.append(f"{name}: file {tuple(flat[name].shape)}, model {expected[name][0]}")
  if problems:
    more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
    raise ValueError(f"{where} does not describe the model of its config: " + "; ".join(
        problems[:8]) + more + ". Export it again from the work directory it was trained in.")


_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(spec: str, dst_dir: str) -> tuple[str, str | None]:
  """Copies the files behind a tokenizer spec into dst_dir; returns (new spec, copied name).

  SentencePiece: the .model file (as tokenizer.model); Hugging Face: tokenizer.json and the
  config files naming its special tokens (into the folder tokenizer/). The byte tokenizer has
  no files: (spec, None).
  """
  kind, sep, path = spec.partition(":")
  if not sep or kind not in ("sentencepiece", "hf"):
    return spec, None
  path = os.path.expanduser(path)
  if kind == "sentencepiece":
    files, name = {path: "tokenizer.model"}, "tokenizer.model"
  else:
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    main = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    files = {main: os.path.join("tokenizer", "tokenizer.json")}
    for extra in _HF_TOKENIZER_FILES[1:]:
      if os.path.isfile(os.path.join(folder, extra)):
        files[os.path.join(folder, extra)] = os.path.join("tokenizer", extra)
    name = "tokenizer"
  for src, rel in files.items():
    if not os.path.isfile(src):
      raise ValueError(f"the tokenizer file {src!r} (config.data.tokenizer) is missing; an export "
                       f"or import would not be usable without it. Point data.tokenizer at it.")
    dst = os.path.join(dst_dir, rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.abspath(src) != os.path.abspath(dst):
      shutil.copyfile(src, dst)
  return f"{kind}:{os.path.join(os.path.abspath(dst_dir), name)}", name


def save(out_dir: str, params, config: ml_collections.ConfigDict, *,
         tokenizer_identity: dict | None = None, step: int = 0) -> str:
  """Writes model.safetensors + config.json (+ the tokenizer file) to out_dir; returns out_dir.

  params: the nested parameter dict (boxed or not, any devices); config: the full trainer config.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  flat = flatten(params)
  check_names_and_shapes(flat, config.model, "the parameters given to export")
  os.makedirs(out_dir, exist_ok=True)
  header = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
            "config": json.loads(config.to_json_best_effort()),
            "tokenizer": tokenizer_identity, "tokenizer_file": None}
  _, header["tokenizer_file"] = copy_tokenizer(config.data.tokenizer, out_dir)
  save_file(flat, os.path.join(out_dir, WEIGHTS_FILE),
            metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(header, f, indent=2)
  return out_dir


def read_header(path: str) -> dict:
  """config.json of an export folder (ValueError when it is not one)."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path) or not os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
    raise ValueError(f"{path!r} is not an export folder (it needs {WEIGHTS_FILE} and "
                     f"{CONFIG_FILE}); write one with launch/export.py --format=safetensors")
  with open(config_path, encoding="utf-8") as f:
    header = json.load(f)
  if header.get("format") != FORMAT:
    raise ValueError(f"{config_path} has format {header.get('format')!r}, not {FORMAT!r}; for a "
                     f"flash-linear-attention folder use --import_from with --from_format=fla")
  if header.get("format_version", 0) > FORMAT_VERSION:
    raise ValueError(f"{config_path} is format version {header['format_version']}, newer than "
                     f"this code reads ({FORMAT_VERSION}); update sosm_jax")
  return header


def load(path: str) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """(full trainer config, nested params as numpy, header) of an export folder, checked."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from sosm_jax.eval.loading import config_from_dict  # pylint: disable=import-outside-toplevel
  header = read_header(path)
  config = config_from_dict(header["config"])
  if header.get("tokenizer_file"):
    config.data.tokenizer = (config.data.tokenizer.partition(":")[0] + ":"
                             + os.path.join(os.path.abspath(path), header["tokenizer_file"]))
  flat = load_file(os.path.join(path, WEIGHTS_FILE))
  check_names_and_shapes(flat, config.model, os.path.join(path, WEIGHTS_FILE))
  return config, unflatten(flat), header


def write_workdir(workdir: str, config: ml_collections.ConfigDict, params, *,
                  tokenizer_identity: dict | None = None) -> str:
  """A new work directory holding `params` as checkpoint 0 (fresh optimizer state).

  Refuses a folder that already has checkpoints. Returns the absolute path.
  """
  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp
  from sosm_jax import data as data_lib
  from sosm_jax.train import checkpoint as ckpt_lib
  from sosm_jax.train import optimizer as optimizer_lib
  from sosm_jax.train.state import TrainState, checkpoint_form
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ValueError(f"{ckpt_dir} already holds checkpoints; import into a new work directory")
  os.makedirs(workdir, exist_ok=True)
  config = copy.deepcopy(config)   # the work directory keeps its own copy of the tokenizer
  config.data.tokenizer, _ = copy_tokenizer(config.data.tokenizer, workdir)
  tokenizer = data_lib.make_tokenizer(config.data)
  if tokenizer_identity is not None:
    data_lib.check_tokenizer_identity(tokenizer_identity, tokenizer.identity())
  params = jax.tree.map(jnp.asarray, params)
  # The optimizer state's structure does not depend on the number of steps.
  optimizer, _ = optimizer_lib.make_optimizer(config.optimizer, 1)
  zero = jnp.zeros((), jnp.int32)
  state = TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                     nonfinite_streak=zero, nonfinite_total=zero)
  meta = {"data_state": None, "stage": 0, "tokenizer": tokenizer.identity(),
          "config": config.to_dict()}
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  # the trainer's form (fused moments as per-parameter trees): the import resumes on any mesh
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, async_save=False,
                                       form=checkpoint_form(optimizer))
  checkpointer.save(0, state, meta, wait=True)
  checkpointer.close()
  return workdir


def import_to_workdir(path: str, workdir: str) -> str:
  """Export folder `path` -> new work directory `workdir` (checkpoint 0); returns workdir."""
  config, params, header = load(path)
  return write_workdir(workdir, config, params, tokenizer_identity=header.get("tokenizer"))


def export_workdir(workdir: str, out_dir: str, *, step: int | None = None) -> str:
  """The newest (or `step`) checkpoint of a training run -> export folder out_dir.

  A LoRA / distillation run (config.finetune) exports its merged weights (base + adapters; not
  the teacher), and a LoRA run also writes its adapters alone (`save_adapters`).
  """
  loaded = load_run(workdir, step=step)
  save(out_dir, loaded.params, loaded.config, tokenizer_identity=loaded.tokenizer.identity(),
       step=loaded.step)
  save_adapters(out_dir, loaded)
  return out_dir


def save_adapters(out_dir: str, loaded) -> str | None:
  """adapters.safetensors ('<kernel path>/a', '/b'; rank and alpha in its metadata) of a LoRA run."""
  if loaded.adapters is None:
    return None
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  flat = {f"{path}/{k}": np.asarray(jax.device_get(v)) for path, ab in loaded.adapters.items()
          for k, v in ab.items()}
  path = os.path.join(out_dir, "adapters.safetensors")
  save_file(flat, path, metadata={"lora_rank": str(loaded.lora[0]),
                                  "lora_alpha": str(loaded.lora[1])})
  return path


def load_run(workdir: str, *, step: int | None = None):
  """`eval.loading.LoadedModel`'s fields of a run's checkpoint, fine-tuning runs merged.

  Adds `adapters` ({kernel path: {'a', 'b'}} of a LoRA run, else None) and `lora` ((rank, alpha)).
  """
  # pylint: disable=import-outside-toplevel
  import dataclasses
  from sosm_jax import data as data_lib
  from sosm_jax import models
  from sosm_jax.eval import loading
  from sosm_jax.train import finetune
  steps = loading.checkpoint_steps(workdir)
  meta = loading.read_meta(workdir, steps[-1] if step is None else step)
  saved = loading.config_from_dict(meta.get("config") or {})
  if not finetune.wraps_params(saved.finetune):
    loaded = loading.load_for_eval(workdir, step=step)
    fields = {f.name: getattr(loaded, f.name) for f in dataclasses.fields(loaded)}
    return _WithAdapters(**fields, adapters=None, lora=None)
  config, params, adapters, step = finetune.load_merged(workdir, step)
  tokenizer = data_lib.make_tokenizer(config.data)
  if "tokenizer" in meta:
    data_lib.check_tokenizer_identity(meta["tokenizer"], tokenizer.identity())
  lora = (config.finetune.lora_rank, config.finetune.lora_alpha)
  config.finetune = finetune.default_config()   # the merged weights are a plain model
  return _WithAdapters(config=config, model=models.build_model(config.model), params=params,
                       tokenizer=tokenizer, step=step, meta=meta,
                       workdir=os.path.abspath(workdir), adapters=adapters, lora=lora)


class _WithAdapters:
  """LoadedModel's fields plus `adapters` (a LoRA run's, else None)."""

  def __init__(self, **fields):
    self.__dict__.update(fields)


def describe(params) -> dict[str, Any]:
  """{'parameters': count, 'bytes': size} of a parameter tree."""
  leaves = jax.tree.leaves(nn.unbox(params))
  return {"parameters": int(sum(np.prod(x.shape) for x in leaves)),
          "bytes": int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves))}

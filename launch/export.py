"""Export a trained model, or import weights into a new work directory.

Export the newest (or --step) checkpoint of a training run:
  python launch/export.py --workdir=DIR --format=safetensors --out=OUT   # model.safetensors + config.json
  python launch/export.py --workdir=DIR --format=stablehlo --out=OUT     # forward/decode, jax.export
  python launch/export.py --workdir=DIR --format=onnx --out=OUT          # forward/decode, onnxruntime-checked
  python launch/export.py --workdir=DIR --format=fla --out=OUT           # flash-linear-attention HF folder
A fine-tuning run (config.finetune: LoRA or distillation) exports its merged weights, and a LoRA
run its adapters alone too (adapters.safetensors).
Import (a new work directory whose checkpoint 0 holds the weights; evaluate it, or resume
training in it with the same config):
  python launch/export.py --import_from=OUT --workdir=NEW                # a safetensors export
  python launch/export.py --import_from=FLA_DIR --from_format=fla --workdir=NEW
StableHLO and ONNX programs are traced at --batch_size x --seq_len (forward) and with a cache of
--max_len tokens (decode) and compared with JAX on random tokens (--check); the maximum absolute
differences are printed and written to OUT/check.json.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top

FORMATS = ("safetensors", "stablehlo", "onnx", "fla")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of a training run (export), or "
                               "the new work directory (import).")
_FORMAT = flags.DEFINE_enum("format", "safetensors", FORMATS, "What to write.")
_OUT = flags.DEFINE_string("out", None, "Output folder of an export.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
_IMPORT = flags.DEFINE_string("import_from", None, "Import this folder into --workdir.")
_FROM = flags.DEFINE_enum("from_format", "safetensors", ("safetensors", "fla"),
                          "Format of --import_from.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Batch of the exported programs.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens of the exported forward program.")
_MAX_LEN = flags.DEFINE_integer("max_len", 256, "Cache length of the exported decode program.")
_DTYPE = flags.DEFINE_string("dtype", "", "Compute dtype of exported programs ('' = trained; "
                             "ONNX defaults to float32, which onnxruntime runs on any CPU).")
_PLATFORMS = flags.DEFINE_list("platforms", [], "StableHLO lowering platforms, e.g. cpu,cuda "
                               "(default: this machine's).")
_CHECK = flags.DEFINE_bool("check", True, "Compare exported programs with JAX.")


def _export(workdir: str, out: str) -> dict:
  # pylint: disable=import-outside-toplevel
  from sosm_jax.export import programs, weights
  loaded = weights.load_run(workdir, step=_STEP.value)   # fine-tuning runs: merged weights
  fmt = _FORMAT.value
  if fmt == "fla":
    from sosm_jax.export import fla
    fla.save_fla(out, loaded.params, loaded.config.model)
    return {"format": fmt, "out": out, "step": loaded.step}
  if fmt in ("safetensors", "stablehlo"):   # StableHLO programs take these weights as arguments
    weights.save(out, loaded.params, loaded.config, tokenizer_identity=loaded.tokenizer.identity(),
                 step=loaded.step)
    weights.save_adapters(out, loaded)   # a LoRA run's adapters alone, beside the merged weights
  result = {"format": fmt, "out": out, "step": loaded.step, **weights.describe(loaded.params)}
  if fmt in ("stablehlo", "onnx"):
    model_cfg = programs.export_model_config(loaded.config.model, dtype=_DTYPE.value or (
        "float32" if fmt == "onnx" else None))
    shapes = dict(batch_size=_BATCH.value, seq_len=_SEQ.value, max_len=_MAX_LEN.value)
    if fmt == "stablehlo":
      programs.export_stablehlo(model_cfg, loaded.params, out, platforms=tuple(_PLATFORMS.value),
                                **shapes)
    else:
      programs.export_onnx(model_cfg, loaded.params, out, **shapes)
    if _CHECK.value:
      result["max_abs_diff"] = programs.compare(model_cfg, loaded.params, out, kind=fmt, **shapes)
      with open(os.path.join(out, "check.json"), "w", encoding="utf-8") as f:
        json.dump(result["max_abs_diff"], f, indent=2)
  return result


def _import(path: str, workdir: str) -> dict:
  # pylint: disable=import-outside-toplevel
  from sosm_jax.export import weights
  if _FROM.value == "fla":
    from sosm_jax.export import fla
    config, params = fla.load_fla(path)
    weights.write_workdir(workdir, config, params)
  else:
    weights.import_to_workdir(path, workdir)
  return {"imported": path, "workdir": os.path.abspath(workdir)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (the run to export, or the new import target)")
  if _IMPORT.value:
    result = _import(_IMPORT.value, _WORKDIR.value)
  else:
    if not _OUT.value:
      raise app.UsageError("--out is required for an export (a folder to write)")
    result = _export(_WORKDIR.value, _OUT.value)
  print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
  app.run(main)

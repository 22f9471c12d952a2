"""Weights in and out and deployment formats: safetensors folders, fla/HF layout, INT8, StableHLO, ONNX.

  from sosm_jax.export import weights
  weights.export_workdir('workdir/run', 'export/run')          # model.safetensors + config.json
  weights.import_to_workdir('export/run', 'workdir/imported')   # checkpoint 0 of a new run
"""

"""Weights in and out and deployment formats: safetensors folders, fla/HF layout, INT8, StableHLO, ONNX.

  weights.py     model.safetensors + config.json folders; import into a new work directory
  layout.py      layer-scan (stacked) <-> per-layer parameter layouts
  programs.py    forward pass and one decode step as StableHLO (jax.export) and ONNX (jax2onnx)
  int8.py        weight-only int8 dense projections (Qwix) for generation
  fla.py         flash-linear-attention's Hugging Face layout (HGRN-2, Gated DeltaNet hybrids)
  fla_parity.py  GPU check of the fla conversion against fla's own models

  from sosm_jax.export import weights
  weights.export_workdir('workdir/run', 'export/run')          # model.safetensors + config.json
  weights.import_to_workdir('export/run', 'workdir/imported')   # checkpoint 0 of a new run
"""

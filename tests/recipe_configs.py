"""configs/curriculum.py's variants for tests (the configs folder is not a package)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def curriculum_config(variant: str = ""):
  """`configs/curriculum.py`'s `get_config(variant)`."""
  spec = importlib.util.spec_from_file_location(
      "curriculum_config", os.path.join(ROOT, "configs", "curriculum.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)

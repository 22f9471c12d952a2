"""Evaluation loads a checkpoint with the RoPE base its curriculum stage trained with."""
import os
import sys

import pytest

import helpers
from sosm_jax.eval import loading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import curriculum as curriculum_config  # pylint: disable=wrong-import-position


@pytest.mark.parametrize("stage,base", [(0, 1000.0), (1, 7000.0)])
def test_checkpoint_of_a_stage_loads_with_that_stages_rope_base(tmp_path, stage, base):
  config = curriculum_config.get_config("tiny")
  config.curriculum.rope_base = (1000.0, 7000.0)
  assert config.model.rope_base not in (1000.0, 7000.0)
  helpers.save_checkpoint(str(tmp_path), config, helpers.random_params(config), step=5,
                          stage=stage)
  loaded = loading.load_for_eval(str(tmp_path))
  assert loaded.config.model.rope_base == base
  assert loaded.model.cfg.rope_base == base


def test_checkpoint_without_per_stage_bases_keeps_the_models(tmp_path):
  config = curriculum_config.get_config("tiny")
  config.model.rope_base = 3000.0
  helpers.save_checkpoint(str(tmp_path), config, helpers.random_params(config), step=5, stage=1)
  assert loading.load_for_eval(str(tmp_path)).config.model.rope_base == 3000.0

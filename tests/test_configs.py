"""Every preset builds under jax.eval_shape with the published parameter count; configs validate."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from gemma_jax.configs import ALL_PRESETS, GLOBAL, LOCAL, PRESETS, PUBLISHED_PARAMS, ModelConfig, get_preset
from gemma_jax.transformer import Transformer


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_count_matches_published(name):
  cfg = PRESETS[name]
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  counted = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert counted == cfg.param_count()
  assert abs(counted / PUBLISHED_PARAMS[name] - 1) < 0.01, (counted, PUBLISHED_PARAMS[name])


def test_layer_patterns_and_query_scales():
  assert [i for i, t in enumerate(PRESETS["gemma3_1b"].attention_types) if t == GLOBAL] == [5, 11, 17, 23]
  assert PRESETS["gemma2_2b"].attention_types[:3] == (LOCAL, GLOBAL, LOCAL)
  assert PRESETS["gemma1_7b"].attention_types == (GLOBAL,) * 28
  np.testing.assert_allclose(PRESETS["gemma2_9b"].query_scale, 256 ** -0.5)
  np.testing.assert_allclose(PRESETS["gemma2_27b"].query_scale, 144 ** -0.5)
  np.testing.assert_allclose(PRESETS["gemma3_27b"].query_scale, 168 ** -0.5)
  assert PRESETS["gemma3_4b"].rope_scale_global == 8 and PRESETS["gemma3_1b"].rope_scale_global == 1


def test_config_round_trips_through_dict():
  for cfg in ALL_PRESETS.values():
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("changes, message", [
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(dtype="float16"), "float16 overflows"),
    (dict(attention_pattern=("local",), sliding_window=None), "needs a positive sliding_window"),
    (dict(attention_pattern=("sliding",)), "attention_pattern entries"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
])
def test_invalid_configs_name_the_problem(changes, message):
  with pytest.raises(ValueError, match=message):
    get_preset("gemma1_2b").replace(**changes)


def test_unknown_preset_lists_known_ones():
  with pytest.raises(ValueError, match="unknown preset 'gemma4'.*gemma3_270m"):
    get_preset("gemma4")

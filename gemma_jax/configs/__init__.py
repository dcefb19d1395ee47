"""Model configurations: ModelConfig, the per-family defaults, and the named presets."""

from .families import FAMILY_DEFAULTS, OWN_LOCAL_ROPE_BASE, family_config, family_defaults
from .model_config import DTYPES, GLOBAL, LOCAL, QUANT_BLOCKS, QUANT_SCHEMES, ModelConfig
from .presets import ALL_PRESETS, PRESETS, PUBLISHED_PARAMS, TINY_PRESETS, get_preset

__all__ = ["DTYPES", "FAMILY_DEFAULTS", "GLOBAL", "LOCAL", "OWN_LOCAL_ROPE_BASE", "ModelConfig", "QUANT_BLOCKS",
           "QUANT_SCHEMES", "family_config", "family_defaults", "ALL_PRESETS", "PRESETS", "PUBLISHED_PARAMS",
           "TINY_PRESETS", "get_preset"]

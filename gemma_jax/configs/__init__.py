"""Model configurations: ModelConfig and the named presets."""

from .model_config import DTYPES, GLOBAL, LOCAL, ModelConfig
from .presets import ALL_PRESETS, PRESETS, PUBLISHED_PARAMS, TINY_PRESETS, get_preset

__all__ = ["DTYPES", "GLOBAL", "LOCAL", "ModelConfig", "ALL_PRESETS", "PRESETS", "PUBLISHED_PARAMS",
           "TINY_PRESETS", "get_preset"]

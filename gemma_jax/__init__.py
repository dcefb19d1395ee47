"""gemma_jax: Google's Gemma 1, 2 and 3 text models in JAX/Flax NNX.

  import gemma_jax as gj
  model = gj.load("out/ckpt")                       # a checkpoint made by `python -m gemma_jax.convert`
  model = gj.load("out/ckpt", mesh=gj.make_mesh("data=1,model=-1"))   # spread over every device
  model.generate("The capital of France is", max_new_tokens=16)
  small = gj.quantize(model, "int8")                # int8 weights (or "int4"), dequantized in the matmuls
"""

from .cache import init_cache
from .configs import ALL_PRESETS, PRESETS, TINY_PRESETS, ModelConfig, get_preset
from .convert import convert
from .errors import GemmaError
from .model import Completion, Model, load
from .quantize import quantize
from .session import ChatSession
from .sharding import GENERATION, TRAINING, Layout, make_mesh
from .tokenizer import Tokenizer

__all__ = ["ALL_PRESETS", "GENERATION", "PRESETS", "TINY_PRESETS", "TRAINING", "ChatSession", "Completion",
           "GemmaError", "Layout", "Model", "ModelConfig", "Tokenizer", "convert", "get_preset", "init_cache", "load",
           "make_mesh", "quantize"]

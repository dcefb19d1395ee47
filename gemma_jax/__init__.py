"""gemma_jax: Google's Gemma 1, 2 and 3 text models in JAX/Flax NNX.

  import gemma_jax as gj
  model = gj.load("out/ckpt")                       # a checkpoint made by `python -m gemma_jax.convert`
  model = gj.load("out/ckpt", mesh=gj.make_mesh("data=1,model=-1"))   # spread over every device
  model.generate("The capital of France is", max_new_tokens=16)
  small = gj.quantize(model, "int8")                # int8 weights (or "int4"), dequantized in the matmuls

Fine-tuning: `python -m gemma_jax.train` (README "Fine-tuning"); from Python, gemma_jax.trainer (start, fit,
export) with a Recipe, or the pieces: gemma_jax.data, gemma_jax.lora (LoraConfig, apply, merge),
gemma_jax.optim (the loss and the jitted step).
"""

from .cache import init_cache
from .compile_cache import enable_compilation_cache
from .configs import ALL_PRESETS, PRESETS, TINY_PRESETS, ModelConfig, get_preset
from .convert import convert
from .default_model import default_checkpoint
from .errors import GemmaError
from .evaluate import generate_until, loglikelihood, rolling_loglikelihood, text_perplexity
from .lora import LoraConfig
from .model import Completion, Model, load
from .quantize import quantize
from .readers import read_docs
from .recipe import Recipe
from .session import ChatSession
from .sharding import GENERATION, TRAINING, Layout, make_mesh
from .tasks import run_task
from .tokenizer import Tokenizer

__all__ = ["ALL_PRESETS", "GENERATION", "PRESETS", "TINY_PRESETS", "TRAINING", "ChatSession", "Completion",
           "GemmaError", "Layout", "LoraConfig", "Model", "ModelConfig", "Recipe", "Tokenizer", "convert",
           "default_checkpoint", "enable_compilation_cache", "generate_until", "get_preset", "init_cache", "load", "loglikelihood", "make_mesh",
           "quantize", "read_docs", "rolling_loglikelihood", "run_task", "text_perplexity"]

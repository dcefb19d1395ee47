"""gemma_jax: Google's Gemma 1, 2 and 3 text models in JAX/Flax NNX.

  import gemma_jax as gj
  model = gj.load("out/ckpt")                       # a checkpoint made by `python -m gemma_jax.convert`
  model = gj.load("out/ckpt", mesh=gj.make_mesh("data=1,model=-1"))   # spread over every device
  model.generate("The capital of France is", max_new_tokens=16)
"""

from .cache import init_cache
from .configs import ALL_PRESETS, PRESETS, TINY_PRESETS, ModelConfig, get_preset
from .convert import convert
from .default_model import default_checkpoint
from .errors import GemmaError
from .evaluate import generate_until, loglikelihood, rolling_loglikelihood, text_perplexity
from .model import Completion, Model, load
from .readers import read_docs
from .session import ChatSession
from .sharding import GENERATION, TRAINING, Layout, make_mesh
from .tasks import run_task
from .tokenizer import Tokenizer

__all__ = ["ALL_PRESETS", "GENERATION", "PRESETS", "TINY_PRESETS", "TRAINING", "ChatSession", "Completion",
           "GemmaError", "Layout", "Model", "ModelConfig", "Tokenizer", "convert", "default_checkpoint",
           "generate_until", "get_preset", "init_cache", "load", "loglikelihood", "make_mesh", "read_docs",
           "rolling_loglikelihood", "run_task", "text_perplexity"]

"""Shape annotations are checked in the test run (tests/conftest.py installs jaxtyping's import hook): a
wrong rank or a dimension that disagrees with another argument is a jaxtyping error, eagerly and under jit;
pytree dataclasses still rebuild from whatever JAX puts at their leaves."""

import jax
import jax.numpy as jnp
import jaxtyping
import pytest

from gemma_jax.cache import init_cache
from gemma_jax.configs import TINY_PRESETS
from gemma_jax.rope import apply_rope
from gemma_jax.sampling import make_sampling, next_token
from gemma_jax.attention import attention_mask

CFG = TINY_PRESETS["tiny_gemma3_qk"]


def test_a_wrong_rank_is_caught():
  with pytest.raises(jaxtyping.TypeCheckError, match="q_pos"):
    attention_mask(jnp.zeros((2, 3, 1), jnp.int32), jnp.zeros((2, 5), jnp.int32), window=None)


def test_dimensions_must_agree_across_arguments_also_under_jit():
  # positions for 4 tokens, x for 3: T disagrees.
  with pytest.raises(jaxtyping.TypeCheckError, match="positions"):
    jax.jit(lambda x, p: apply_rope(x, p, base=10_000.0))(jnp.zeros((1, 3, 2, 8)), jnp.zeros((1, 4), jnp.int32))
  # A float step where the sampler needs an integer scalar.
  with pytest.raises(jaxtyping.TypeCheckError, match="step"):
    next_token(jnp.zeros((2, 7)), make_sampling(2), jnp.float32(0))


def test_cache_writes_are_checked_and_abstract_caches_still_build():
  cache = init_cache(CFG, batch_size=2, cache_len=8)
  k = jnp.zeros((2, 3, CFG.num_kv_heads, CFG.head_dim))
  with pytest.raises(jaxtyping.TypeCheckError, match="positions"):
    cache[0].write(k, k, jnp.zeros((2, 4), jnp.int32))
  # jax.eval_shape rebuilds the cache from ShapeDtypeStructs: the dataclass fields are not checked then.
  abstract = jax.eval_shape(lambda: init_cache(CFG, batch_size=2, cache_len=8))
  assert abstract[0].k.shape == (2, CFG.sliding_window, CFG.num_kv_heads, CFG.head_dim)


def test_decoder_inputs_are_checked():
  import gemma_jax as gj

  model = gj.Model.random(CFG)
  tokens = jnp.zeros((2, 5), jnp.int32)
  with pytest.raises(jaxtyping.TypeCheckError, match="positions"):
    model.decoder.forward(model.params, tokens, jnp.zeros((2, 6), jnp.int32))
  assert model.decoder.token_logprobs(model.params, tokens, jnp.zeros((2, 5), jnp.int32)).shape == (2, 4)

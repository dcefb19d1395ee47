"""Block and Transformer: embed -> blocks -> final norm -> tied logits -> (Gemma 2) soft-cap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import Attention
from .cache import Cache
from .configs import ModelConfig
from .layers import Einsum, Embedder, RMSNorm


class FeedForward(nnx.Module):
  """GeGLU: linear(gelu_tanh(x W_gate) * (x W_up)); gating_einsum (F, 2, D) holds [gate, up] per row.

  F-major (the official layout is (2, F, D), transposed at import) so that one 2-D matmul computes
  both branches and sharding F splits whole rows of both.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    self.gating_einsum = Einsum((config.hidden_dim, 2, config.embed_dim), ("F", "_", "D"), dtype=dtype,
                                rngs=rngs)
    self.linear = Einsum((config.hidden_dim, config.embed_dim), ("F", "D"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.gating_einsum("BTD,FCD->BTFC", x)
    gate = jax.nn.gelu(h[..., 0], approximate=True)
    return self.linear("BTF,FD->BTD", gate * h[..., 1])


class Block(nnx.Module):
  """pre-attn norm -> attn -> [post-attn norm] -> add -> pre-ffw norm -> MLP -> [post-ffw norm] -> add."""

  def __init__(self, config: ModelConfig, attn_type: str, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    norm = lambda: RMSNorm(config.embed_dim, "D", eps=config.norm_eps, dtype=dtype, rngs=rngs)
    self.pre_attention_norm = norm()
    self.attn = Attention(config, attn_type, rngs=rngs)
    self.post_attention_norm = norm() if config.use_post_attn_norm else None
    self.pre_ffw_norm = norm()
    self.mlp = FeedForward(config, rngs=rngs)
    self.post_ffw_norm = norm() if config.use_post_ffw_norm else None

  def __call__(self, x, positions, cache, fresh=False):
    a, cache = self.attn(self.pre_attention_norm(x), positions, cache, fresh)
    if self.post_attention_norm is not None:
      a = self.post_attention_norm(a)
    x = x + a
    m = self.mlp(self.pre_ffw_norm(x))
    if self.post_ffw_norm is not None:
      m = self.post_ffw_norm(m)
    return x + m, cache


class Transformer(nnx.Module):
  """The Gemma decoder. Params are named as in the official checkpoints (layer_{i}/attn/q_einsum/w...),
  in D-major layouts (see attention.py)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embedder = Embedder(config.vocab_size, config.embed_dim, dtype=jnp.dtype(config.dtype), rngs=rngs)
    for i, attn_type in enumerate(config.attention_types):
      setattr(self, f"layer_{i}", Block(config, attn_type, rngs=rngs))
    self.final_norm = RMSNorm(config.embed_dim, "D", eps=config.norm_eps, dtype=jnp.dtype(config.dtype),
                              rngs=rngs)

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None, fresh: bool = False
               ) -> tuple[jax.Array, Cache | None]:
    """tokens, positions (B, T) -> final-normed hidden states (B, T, D) and the updated cache.

    positions are absolute (-1 marks padding); with a cache, the chunk attends to what the cache holds,
    unless fresh=True (static) says the cache is empty and is only to be written.
    """
    x = self.embedder.encode(tokens)
    new_cache = []
    for i in range(self.config.num_layers):
      x, layer_cache = getattr(self, f"layer_{i}")(x, positions, None if cache is None else cache[i], fresh)
      new_cache.append(layer_cache)
    return self.final_norm(x), (None if cache is None else tuple(new_cache))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, T, V) float32 logits through the tied embedding, soft-capped for Gemma 2."""
    logits = self.embedder.decode(hidden)
    cap = self.config.final_logits_softcap
    if cap is not None:
      logits = jnp.tanh(logits / cap) * cap
    return logits

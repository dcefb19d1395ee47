"""Block and Transformer: embed -> blocks -> final norm -> tied logits -> (Gemma 2) soft-cap.

Also the model's abstract form (graph definition and param shapes, nothing allocated) and the boundary
between the module tree and the official parameter names: inside, blocks are an nnx.List
(`blocks/0/attn/...`); checkpoints, importers and users see the official names (`layer_0/attn/...`).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import Attention
from .cache import Cache
from .configs import ModelConfig
from .layers import Einsum, Embedder, RMSNorm
from .tree import flatten, unflatten
from .xent import chunk_positions, token_nll_sum


# Rows (B * T) from which a training step computes the two GeGLU branches as two matmuls on slices of the
# weight, activations (2, B, T, F), instead of one matmul with activations (B, T, F, 2). With 2 in the
# minor dim XLA:CPU runs the GeGLU's backward elementwise code unvectorised: 44 ms per layer of a bfloat16
# Gemma 3 270M LoRA step at 1024 rows, 1.08-1.15x on the step (benchmarks/results/
# 2026-12-06_train_layouts.md); the slices' copy costs about 1 ms. Inference keeps the one matmul: a
# 512-token prefill is 6-7% faster with it.
SPLIT_GATING_ROWS = 256


class FeedForward(nnx.Module):
  """GeGLU: linear(gelu_tanh(x W_gate) * (x W_up)); gating_einsum (F, 2, D) holds [gate, up] per row.

  F-major (the official layout is (2, F, D), transposed at import) so that one 2-D matmul computes
  both branches and sharding F splits whole rows of both.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    q = dict(dtype=jnp.dtype(config.dtype), rngs=rngs, quant=config.quant, block=config.quant_block)
    self.gating_einsum = Einsum((config.hidden_dim, 2, config.embed_dim), ("F", "_", "D"), -1, **q)
    self.linear = Einsum((config.hidden_dim, config.embed_dim), ("F", "D"), 1, **q)
    self.sliced = False  # set by Transformer.training_layout (see SPLIT_GATING_ROWS)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.sliced and x.shape[0] * x.shape[1] >= SPLIT_GATING_ROWS:
      gate, up = self.gating_einsum("BTD,FCD->CBTF", x)
    else:
      h = self.gating_einsum("BTD,FCD->BTFC", x)
      gate, up = h[..., 0], h[..., 1]
    return self.linear("BTF,FD->BTD", jax.nn.gelu(gate, approximate=True) * up)


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

  def __call__(self, x, positions, cache, fresh=False, segments=None):
    a, cache = self.attn(self.pre_attention_norm(x), positions, cache, fresh, segments)
    if self.post_attention_norm is not None:
      a = self.post_attention_norm(a)
    x = x + a
    m = self.mlp(self.pre_ffw_norm(x))
    if self.post_ffw_norm is not None:
      m = self.post_ffw_norm(m)
    return x + m, cache


class Output(NamedTuple):
  """What Transformer.__call__ returns.

  Attributes:
    hidden: (B, T, D) final-normed hidden states ((B, 1, D) with last_only).
    cache: the cache with this chunk written, None when called without one.
  """

  hidden: jax.Array
  cache: Cache | None


class Transformer(nnx.Module):
  """The Gemma decoder, in D-major projection layouts (see attention.py). Blocks live in an nnx.List;
  checkpoints name them layer_{i} (official_path / state_path)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embedder = Embedder(config.vocab_size, config.embed_dim, dtype=jnp.dtype(config.dtype), rngs=rngs,
                             quant=config.quant_embedding, block=config.quant_block)
    self.blocks = nnx.List([Block(config, t, rngs=rngs) for t in config.attention_types])
    self.final_norm = RMSNorm(config.embed_dim, "D", eps=config.norm_eps, dtype=jnp.dtype(config.dtype),
                              rngs=rngs)

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None, *, fresh: bool = False,
               last_only: bool = False, segments: jax.Array | None = None, remat: bool = False) -> Output:
    """tokens, positions (B, T) -> Output(hidden (B, T, D), cache).

    positions are absolute (-1 marks padding); with a cache, the chunk attends to what the cache holds,
    unless fresh=True (static) says the cache is empty and is only to be written. last_only (static):
    hidden only at each row's last (highest-position) token, (B, 1, D): all a prefill needs, and the
    final norm then runs on B positions instead of B * T. Training only (no cache): segments (B, T)
    number the examples of packed rows (attention never crosses them, attention.attention_mask), and
    remat=True (static) recomputes each block's activations in the backward pass instead of keeping them
    (jax.checkpoint per block: memory of one block's activations, about a third more compute).
    """
    x = self.embedder.encode(tokens)
    new_cache = []
    for i, block in enumerate(self.blocks):
      if remat:
        if cache is not None:
          raise ValueError("remat is for training; it cannot be combined with a cache")
        x, layer_cache = nnx.remat(lambda blk, h: blk(h, positions, None, False, segments))(block, x)
      else:
        x, layer_cache = block(x, positions, None if cache is None else cache[i], fresh, segments)
      new_cache.append(layer_cache)
    if last_only:
      x = jnp.take_along_axis(x, jnp.argmax(positions, axis=1)[:, None, None], axis=1)
    return Output(self.final_norm(x), None if cache is None else tuple(new_cache))

  def training_layout(self) -> "Transformer":
    """This model, with the activation layouts of a training step (SPLIT_GATING_ROWS); returns self."""
    for block in self.blocks:
      block.mlp.sliced = True
    return self

  def logits(self, hidden: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, T, V) float32 logits through the tied embedding, soft-capped for Gemma 2."""
    logits = self.embedder.decode(hidden)
    cap = self.config.final_logits_softcap
    if cap is not None:
      logits = jnp.tanh(logits / cap) * cap
    return logits

  def token_logprobs(self, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets | hidden): hidden (B, T, D), targets (B, T) int -> (B, T) float32.

    Normalised over every embedding row, as the model defines the distribution. The one log-prob
    computation: scoring (decode.py), evaluation and the training loss (train.py) all come here.
    """
    return self.token_scores(hidden, targets)[0]

  def token_nll_sum(self, hidden: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(weights * -log p(targets | hidden)), () float32: hidden (B, T, D), targets (B, T) int, weights (B, T).

    The training loss's output layer: equal to -sum(token_logprobs(hidden, targets) * weights), computed
    by xent.token_nll_sum in chunks of positions with its gradient fused (no (B, T, V) logits are held).
    A quantized embedding (QLoRA's int8/int4 table, never trained) takes the plain path.
    """
    if self.embedder.input_embedding_scale is not None:
      return -jnp.sum(self.token_logprobs(hidden, targets) * weights)
    table = self.embedder.input_embedding[...]
    b, t = targets.shape
    chunk = chunk_positions(b, t, table.shape[0])
    return token_nll_sum(hidden, table, targets, weights.astype(jnp.float32), self.config.final_logits_softcap, chunk)

  def token_scores(self, hidden: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(targets | hidden), targets == the most likely token): hidden (B, T, D), targets (B, T) int ->
    (B, T) float32 and (B, T) bool.

    The most likely token is the first maximal row (jnp.argmax, as torch.argmax in lm-evaluation-harness's
    is_greedy); under jit the argmax costs nothing where only the log-probs are used (training).
    """
    logits = self.logits(hidden)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


# ---- the abstract model and the official names ----------------------------------------------------

def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph definition and its params as ShapeDtypeStructs (nothing allocated)."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))


_STATE_BLOCK = re.compile(r"^blocks/(\d+)/")
_OFFICIAL_BLOCK = re.compile(r"^layer_(\d+)/")


def official_path(path: str) -> str:
  """A param's path in the module tree -> its official name: "blocks/3/attn/..." -> "layer_3/attn/..."."""
  return _STATE_BLOCK.sub(r"layer_\1/", path)


def state_path(path: str) -> str:
  """An official param name -> its path in the module tree: "layer_3/attn/..." -> "blocks/3/attn/..."."""
  return _OFFICIAL_BLOCK.sub(r"blocks/\1/", path)


def flat_params(params: nnx.State) -> dict[str, Any]:
  """{official name: leaf} of a state's params, e.g. "layer_0/attn/q_einsum/w" -> (D, N, H) array."""
  return {official_path(p): x for p, x in flatten(nnx.to_pure_dict(params)).items()}


def set_flat_params(params: nnx.State, flat: dict[str, Any]) -> None:
  """Replaces a state's param values, in place, from {official name: array}."""
  nnx.replace_by_pure_dict(params, unflatten({state_path(p): x for p, x in flat.items()}))


def param_shapes(config: ModelConfig, abstract: nnx.State | None = None) -> dict[str, tuple[int, ...]]:
  """{'layer_0/attn/q_einsum/w': (D, N, H), ...}: every parameter's shape for this config, official names.

  abstract: the abstract params of abstract_model(config), when the caller already built them.
  """
  abstract = abstract_model(config)[1] if abstract is None else abstract
  return {path: tuple(x.shape) for path, x in flat_params(abstract).items()}

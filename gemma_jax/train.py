"""Training objective: the mean next-token negative log-likelihood (the start of the training module).

Sharded training places params with sharding.TRAINING (FSDP over `data`, model parallel over `model`)
and the batch over `data`; jax.value_and_grad of loss_fn under jit then runs partitioned, with gradients
sharded like the params.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, tokens: jax.Array, positions: jax.Array) -> jax.Array:
  """Mean of -log p(tokens[:, t+1] | tokens[:, :t+1]) over every target that is not padding.

  Args:
    params: the model's params (differentiated).
    tokens, positions: (B, T) int32; positions -1 mark padding, which is neither input nor target.
  Returns:
    () float32.
  """
  model = nnx.merge(graphdef, params)
  nll = -model.token_logprobs(model(tokens, positions).hidden[:, :-1], tokens[:, 1:])  # (B, T-1)
  mask = (positions[:, 1:] >= 0).astype(jnp.float32)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

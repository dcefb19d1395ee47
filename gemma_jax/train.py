"""Fine-tuning: the loss, the optax optimizer, the jitted train step, the CheckpointManager loop, resume.

Sharded training places params with sharding.TRAINING (FSDP over `data`, model parallel over `model`)
and the batch over `data`; jax.value_and_grad of the loss under jit then runs partitioned, with gradients
and optimizer state sharded like the params.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .shapes import Array, Float, Int


class TrainBatch(NamedTuple):
  """A batch on device (data.Batch's arrays, as a pytree).

  Attributes:
    tokens: (B, T) int32 ids.
    positions: (B, T) int32, restarting at 0 for each packed example; -1 at padding.
    segments: (B, T) int32 example number within the row (attention stays within it); 0 at padding.
    targets: (B, T) float32 loss weight of tokens[:, t] as the prediction from position t - 1.
  """

  tokens: Int[Array, "B T"]
  positions: Int[Array, "B T"]
  segments: Int[Array, "B T"]
  targets: Float[Array, "B T"]


def cast_floats(state: nnx.State, dtype) -> nnx.State:
  """Every floating leaf of a state cast to dtype (the compute copy of float32 master weights)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def nll_sum(params: nnx.State, graphdef: nnx.GraphDef, batch: TrainBatch, *, frozen: nnx.State | None = None,
            dtype=None, remat: bool = False) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """(sum of target-weighted -log p(tokens[:, t] | tokens[:, :t]), sum of target weights), both () float32.

  Sums, not a mean, so that gradient accumulation over microbatches divides once by the tokens of the
  whole step and equals the step on one big batch.

  Args:
    params: the trainable params (differentiated); frozen: the rest of the model's state (LoRA's base),
      merged in but not differentiated.
    dtype: compute dtype (params are cast to it inside, so gradients reach the float32 masters); None keeps
      the params' dtype.
    remat: rematerialise each block in the backward pass (Transformer.__call__).
  """
  states = (params,) if frozen is None else (params, frozen)
  if dtype is not None:
    states = tuple(cast_floats(s, dtype) for s in states)
  model = nnx.merge(graphdef, *states)
  hidden = model(batch.tokens, batch.positions, segments=batch.segments, remat=remat).hidden
  nll = -model.token_logprobs(hidden[:, :-1], batch.tokens[:, 1:])  # (B, T-1) float32
  weight = batch.targets[:, 1:]
  return jnp.sum(nll * weight), jnp.sum(weight)


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: TrainBatch, *, frozen: nnx.State | None = None,
            dtype=None, remat: bool = False) -> Float[Array, ""]:
  """The mean next-token negative log-likelihood over the batch's targets, () float32 (see nll_sum)."""
  total, count = nll_sum(params, graphdef, batch, frozen=frozen, dtype=dtype, remat=remat)
  return total / jnp.maximum(count, 1.0)

"""The training math: the loss, the optax optimizer and the jitted train and eval steps.

Sharded training places params with sharding.TRAINING (FSDP over `data`, model parallel over `model`)
and the batch over `data`; the step is jitted with the params' shardings as its in- and out-shardings,
so GSPMD partitions the forward and backward passes and gradients and optimizer state stay sharded like
the params. The loop around it (checkpoints, resume, metrics) is trainer.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
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


def frozen_for_step(frozen: nnx.State | None, dtype) -> nnx.State | None:
  """LoRA's frozen base cast to the compute dtype once, before the loop (None and float32 pass through).

  The steps cast every state to the compute dtype on each call; for a base already in it that cast is
  nothing, instead of re-reading the whole float32 base (about 1 GB for Gemma 3 270M) every step. The
  float32 base stays the caller's (the merge at the end folds the adapters into it, not into this copy).
  """
  if frozen is None or dtype is None or all(x.dtype == dtype for x in jax.tree.leaves(frozen)
                                            if jnp.issubdtype(x.dtype, jnp.floating)):
    return frozen
  return jax.jit(functools.partial(cast_floats, dtype=dtype))(frozen)


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
  model = nnx.merge(graphdef, *states).training_layout()
  hidden = model(batch.tokens, batch.positions, segments=batch.segments, remat=remat).hidden
  weight = batch.targets[:, 1:]
  return model.token_nll_sum(hidden[:, :-1], batch.tokens[:, 1:], weight), jnp.sum(weight)


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: TrainBatch, *, frozen: nnx.State | None = None,
            dtype=None, remat: bool = False) -> Float[Array, ""]:
  """The mean next-token negative log-likelihood over the batch's targets, () float32 (see nll_sum)."""
  total, count = nll_sum(params, graphdef, batch, frozen=frozen, dtype=dtype, remat=remat)
  return total / jnp.maximum(count, 1.0)


# ---- the optimizer ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then cosine decay to `final_fraction` of the peak, global-norm clipping.

  Defaults follow the usual LLM fine-tuning recipe (Hugging Face Trainer: betas (0.9, 0.999), eps 1e-8;
  clipping at 1.0).
  """

  learning_rate: float = 1e-4
  warmup: int = 0
  steps: int = 1000
  weight_decay: float = 0.0
  clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  final_fraction: float = 0.0


def schedule(config: OptimConfig) -> optax.Schedule:
  """The learning rate per step: 0 -> peak over `warmup` steps, then cosine to peak * final_fraction."""
  return optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup, max(config.steps, config.warmup + 1),
      end_value=config.learning_rate * config.final_fraction)


def decay_mask(params: nnx.State) -> nnx.State:
  """True for the params weight decay applies to: every matrix, not the norms' scales (decaying a
  zero-centred RMSNorm scale pulls the layer towards unit gain, which is not regularisation)."""
  return nnx.map_state(lambda path, x: not str(path[-1]).endswith("scale"), params)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule, weight decay masked off norms)."""
  return optax.chain(
      optax.clip_by_global_norm(config.clip),
      optax.adamw(schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                  weight_decay=config.weight_decay, mask=decay_mask))


# ---- the jitted steps -----------------------------------------------------------------------------------

class StepMetrics(NamedTuple):
  """What a train step reports, () float32 each: the mean loss over the step's targets, the gradient's
  global norm (before clipping), the number of target tokens and of non-padding tokens."""

  loss: jax.Array
  grad_norm: jax.Array
  targets: jax.Array
  tokens: jax.Array


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *, dtype=None,
                    remat: bool = False, shardings=None):
  """A jitted (params, opt_state, frozen, batches) -> (params, opt_state, StepMetrics).

  batches: a TrainBatch whose arrays are (A, B, T): A microbatches accumulated into one update. The
  gradient is of the summed loss over all A * B rows divided once by their target count, so the update
  equals one step on the (A * B, T) batch (up to float summation order). params and opt_state are donated.
  shardings: (params, opt_state, metrics) shardings of the outputs (a mesh keeps them where the inputs
  are); None lets XLA choose (one device).
  """
  def step(params, opt_state, frozen, batches):
    def grad(batch):
      (t, c), g = jax.value_and_grad(nll_sum, has_aux=True)(params, graphdef, batch, frozen=frozen, dtype=dtype,
                                                             remat=remat)
      return g, t, c

    def micro(carry, batch):
      grads, total, count = carry
      g, t, c = grad(batch)
      return (jax.tree.map(jnp.add, grads, g), total + t, count + c), None

    # The first microbatch's gradients start the sum (0 + g is g, so the result is the same bits): no
    # zero-filled gradient buffer to write and add, which for full fine-tuning of Gemma 3 270M is 1 GB
    # written and 2 GB read per step (benchmarks/results/2026-12-06_train_layouts.md).
    carry = grad(jax.tree.map(lambda x: x[0], batches))
    if batches.tokens.shape[0] > 1:
      carry, _ = jax.lax.scan(micro, carry, jax.tree.map(lambda x: x[1:], batches))
    grads, total, count = carry
    scale = 1.0 / jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g * scale, grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    tokens = jnp.sum(batches.positions >= 0).astype(jnp.float32)
    return params, opt_state, StepMetrics(total * scale, optax.tree.norm(grads), count, tokens)

  return jax.jit(step, donate_argnums=(0, 1), out_shardings=shardings)


def make_eval_step(graphdef: nnx.GraphDef, *, dtype=None):
  """A jitted (params, frozen, batch) -> (summed nll, target count), () float32 each."""
  return jax.jit(functools.partial(_eval, graphdef=graphdef, dtype=dtype))


def _eval(params, frozen, batch, *, graphdef, dtype):
  return nll_sum(params, graphdef, batch, frozen=frozen, dtype=dtype)

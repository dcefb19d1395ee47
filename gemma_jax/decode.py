"""The jitted core: full forward, prefill and the decode loop. The library's only jit site.

Params and the cache are jit arguments (the cache donated), never closure constants; the graph
definition is static. Values a user varies per call (max_new_tokens, stop ids) are traced, so changing
them does not recompile; only shapes (batch, bucketed prompt length, cache length, output capacity) do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .cache import Cache


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, positions: jax.Array
            ) -> jax.Array:
  """Full-sequence forward without a cache: tokens, positions (B, T) -> float32 logits (B, T, V)."""
  model = nnx.merge(graphdef, params)
  hidden, _ = model(tokens, positions)
  return model.logits(hidden)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def prefill(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, positions: jax.Array,
            cache: Cache) -> tuple[jax.Array, Cache]:
  """Runs a (padded) prompt chunk through the model and the cache.

  Args:
    tokens, positions: (B, T); positions -1 mark padding.
  Returns:
    logits (B, V) float32 at each row's last (highest-position) token -- the only position whose
    logits are computed -- and the cache with the chunk written.
  """
  model = nnx.merge(graphdef, params)
  hidden, cache = model(tokens, positions, cache)
  last = jnp.argmax(positions, axis=1)
  hidden_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
  return model.logits(hidden_last)[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0, 8), donate_argnums=4)
def greedy_loop(graphdef: nnx.GraphDef, params: nnx.State, logits: jax.Array, next_pos: jax.Array,
                cache: Cache, max_new_tokens: jax.Array, stop_ids: jax.Array, vocab_limit: jax.Array,
                capacity: int) -> tuple[jax.Array, jax.Array, Cache]:
  """Greedy decoding in a lax.while_loop, each row stopping on its own.

  Args:
    logits: (B, V) float32 logits of the next token (from prefill).
    next_pos: (B,) int32 position of the next token of each row.
    max_new_tokens: traced int32 <= capacity.
    stop_ids: (X,) int32 ids that end a row (the stop id is kept in the output).
    vocab_limit: traced int32; logits of rows >= vocab_limit (embedding padding rows in Gemma 1/2)
      are never chosen.
    capacity: static size of the output buffer.
  Returns:
    tokens (B, capacity) int32 (-1 after a row's end), lengths (B,) int32, and the cache holding every
    token fed so far (returned so a conversation can continue from it; it also lets XLA reuse the
    donated buffers).
  """
  model = nnx.merge(graphdef, params)
  batch = logits.shape[0]
  vocab_ok = jnp.arange(logits.shape[-1]) < vocab_limit

  def cond(state):
    step, _, done, *_ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, out, done, lengths, logits, pos, cache = state
    tok = jnp.argmax(jnp.where(vocab_ok, logits, -jnp.inf), axis=-1).astype(jnp.int32)
    out = out.at[:, step].set(jnp.where(done, -1, tok))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, stop_ids)
    hidden, cache = model(tok[:, None], pos[:, None], cache)
    return step + 1, out, done, lengths, model.logits(hidden)[:, 0], pos + 1, cache

  state = (jnp.int32(0), jnp.full((batch, capacity), -1, jnp.int32), jnp.zeros((batch,), bool),
           jnp.zeros((batch,), jnp.int32), logits, next_pos.astype(jnp.int32), cache)
  _, out, _, lengths, _, _, cache = jax.lax.while_loop(cond, body, state)
  return out, lengths, cache


@functools.partial(jax.jit, static_argnums=0)
def token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, positions: jax.Array
                   ) -> jax.Array:
  """Teacher-forced log p(tokens[:, t+1] | tokens[:, :t+1]) for t < T-1: (B, T) -> (B, T-1) float32.

  Normalised over every embedding row, as the model defines the distribution.
  """
  logits = forward.__wrapped__(graphdef, params, tokens, positions)[:, :-1]
  logz = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
  return target - logz

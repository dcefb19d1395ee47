"""The jitted inference core: full forward, prefill, the decode loop and token log-probs.

The library's inference jit site. What must recompile when it changes lives in one frozen, hashable
`Decoder` (graph definition, sharding layout, output capacity) passed to jit as the static `self`;
everything a user varies per call (max_new_tokens, sampling settings, seeds, stop and forbidden ids) is
traced, so changing it does not recompile; only shapes (batch, bucketed prompt length, cache length) and
the Decoder do. Params and the cache are jit arguments (the cache donated), never closure constants.

Sharded runs carry a `layout` (sharding.Layout): params, cache and batch arrive placed by its rules and
XLA partitions the computation from them; the outputs are constrained back to the rules (the cache where
it came from, so donation reuses it; what the host reads replicated, so every process can read it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from .cache import Cache
from .sampling import Sampling, next_token
from .shapes import Array, Bool, Float, Int, Positions, Tokens, unchecked_fields
from .sharding import Layout, constrain, constrain_cache


NONFINITE = -2  # decode_loop's token for a row whose logits held nan or inf (the row is then done)
# Scoring (Decoder.score, token_logprobs, score_chunk) computes output-layer logits for at most this many
# positions at a time: (256, V) float32 is 256 MiB for Gemma 2/3's 256k vocabularies, where a 2048-token
# window's (T, V) logits would be 2 GiB (and a 16K-token text's 16 GiB).
SCORE_ROWS = 256



def chunked_scores(model, hidden: Float[Array, "B T D"], targets: Int[Array, "B T"]
                   ) -> tuple[Float[Array, "B T"], Bool[Array, "B T"]]:
  """Transformer.token_scores over positions in chunks: (log p(targets | hidden), targets == argmax), (B, T)
  float32 and bool, with at most SCORE_ROWS rows of (B * positions, V) logits alive at once (lax.map runs
  the chunks one after another), so memory does not grow with T x V. Padding positions added to fill the
  last chunk score token 0 and are cut off.
  """
  b, t, d = hidden.shape
  step = max(1, min(t, SCORE_ROWS // b))
  n = -(-t // step)
  if n == 1:
    return model.token_scores(hidden, targets)
  hidden = jnp.pad(hidden, ((0, 0), (0, n * step - t), (0, 0))).reshape(b, n, step, d).swapaxes(0, 1)
  targets = jnp.pad(targets, ((0, 0), (0, n * step - t))).reshape(b, n, step).swapaxes(0, 1)
  lp, greedy = jax.lax.map(lambda x: model.token_scores(*x), (hidden, targets))  # (n, B, step) each
  return tuple(x.swapaxes(0, 1).reshape(b, n * step)[:, :t] for x in (lp, greedy))


@unchecked_fields
@struct.dataclass
class DecodeState:
  """Where generation stands between calls of Decoder.decode_loop; all arrays, so it is a jit argument.

  Attributes:
    logits: (B, V) float32 logits of each row's next token.
    pos: (B,) int32 position of each row's next token.
    done: (B,) bool; a done row draws nothing and writes nothing to the cache.
    step: () int32 tokens drawn so far; folded into the sampling keys.
    cache: the KV cache holding every token fed so far.
  """

  logits: Float[Array, "B V"]
  pos: Int[Array, "B"]
  done: Bool[Array, "B"]
  step: Int[Array, ""]
  cache: Cache


@dataclasses.dataclass(frozen=True)
class Decoder:
  """The static half of inference: one compiled program per Decoder and input shapes.

  Attributes:
    graphdef: the model's graph definition (nnx.split); the params travel separately.
    layout: the mesh and rules inputs are placed by (None: one device).
    capacity: tokens one decode_loop call can draw (the size of its output buffer).
  """

  graphdef: nnx.GraphDef
  layout: Layout | None = None
  capacity: int = 32

  def with_capacity(self, capacity: int) -> "Decoder":
    return self if capacity == self.capacity else dataclasses.replace(self, capacity=capacity)

  @functools.partial(jax.jit, static_argnums=0)
  def forward(self, params: nnx.State, tokens: Tokens, positions: Positions) -> Float[Array, "B T V"]:
    """Full-sequence forward without a cache: tokens, positions (B, T) -> float32 logits (B, T, V).

    With a layout the logits come back replicated (the host reads them).
    """
    model = nnx.merge(self.graphdef, params)
    return constrain(self.layout, model.logits(model(tokens, positions).hidden))

  @functools.partial(jax.jit, static_argnums=0, static_argnames="fresh", donate_argnums=4)
  def prefill(self, params: nnx.State, tokens: Tokens, positions: Positions, cache: Cache, fresh: bool = False
              ) -> tuple[Float[Array, "B V"], Cache]:
    """Runs a (padded) prompt chunk through the model and the cache.

    Args:
      tokens, positions: (B, T); positions -1 mark padding.
      fresh: static; the cache is empty, so attention skips its slots (a first prefill: for a 512-token
        prompt in a 1024-slot cache that is 2/3 of the attention work).
    Returns:
      logits (B, V) float32 at each row's last (highest-position) token -- the only position whose
      logits are computed -- and the cache with the chunk written.
    """
    model = nnx.merge(self.graphdef, params)
    out = model(tokens, positions, cache, fresh=fresh, last_only=True)
    return constrain(self.layout, model.logits(out.hidden)[:, 0], ("B", "V")), constrain_cache(self.layout, out.cache)

  @functools.partial(jax.jit, static_argnums=0, static_argnames="fresh", donate_argnums=5)
  def score_chunk(self, params: nnx.State, tokens: Tokens, positions: Positions, targets: Tokens, cache: Cache,
                  fresh: bool = False) -> tuple[Float[Array, "B T"], Cache]:
    """Teacher-forced scoring through the cache: log p(targets[:, t] | the cache and tokens[:, :t+1]).

    tokens, positions, targets (B, T); positions -1 mark padding (their log-probs are meaningless).
    Returns the (B, T) float32 log-probs (replicated with a layout) and the cache with the chunk written,
    so a long text is scored chunk after chunk with the memory of one chunk's attention ((T, S) scores per
    layer) and SCORE_ROWS rows of logits (chunked_scores).
    """
    model = nnx.merge(self.graphdef, params)
    out = model(tokens, positions, cache, fresh=fresh)
    return (constrain(self.layout, chunked_scores(model, out.hidden, targets)[0]),
            constrain_cache(self.layout, out.cache))

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
  def decode_loop(self, params: nnx.State, state: DecodeState, sampling: Sampling, max_steps: Int[Array, ""],
                  stop_ids: Int[Array, "_"], allowed: Bool[Array, "V"]) -> tuple[Int[Array, "B _"], DecodeState]:
    """Draws up to max_steps tokens per row in a lax.while_loop; rows stop on their own.

    Each drawn token is fed back (a stop token too, so a conversation can continue from the cache).
    Args:
      max_steps: traced int32 <= capacity.
      stop_ids: (X,) int32 ids that end a row (kept in the output).
      allowed: (V,) bool; tokens outside it (embedding padding rows, forbidden tokens) are never drawn.
    Returns:
      tokens (B, capacity) int32, -1 where a row drew nothing, NONFINITE where its logits were not finite
      (nan or inf: damaged weights, an overflow; the row is then done), and the state to continue from. With a
      layout, tokens, pos, done and step are replicated (hosts read them) and logits and cache are
      placed by the rules.
    """
    model, layout = nnx.merge(self.graphdef, params), self.layout

    def placed(st: DecodeState) -> DecodeState:
      return DecodeState(logits=constrain(layout, st.logits, ("B", "V")), pos=constrain(layout, st.pos),
                         done=constrain(layout, st.done), step=constrain(layout, st.step),
                         cache=constrain_cache(layout, st.cache))

    def cond(carry):
      i, _, st = carry
      return (i < max_steps) & ~jnp.all(st.done)

    def body(carry):
      i, out, st = carry
      tok = next_token(jnp.where(allowed, st.logits, -jnp.inf), sampling, st.step)
      broken = ~jnp.all(jnp.isfinite(st.logits), axis=-1) & ~st.done
      tok = jnp.where(st.done, -1, jnp.where(broken, NONFINITE, tok))
      out = out.at[:, i].set(tok)
      # Done rows feed padding (position -1): nothing is written to their cache slots.
      step = model(jnp.maximum(tok, 0)[:, None], jnp.where(st.done, -1, st.pos)[:, None], st.cache)
      st = DecodeState(logits=model.logits(step.hidden)[:, 0], pos=st.pos + (~st.done).astype(jnp.int32),
                       done=st.done | broken | jnp.isin(tok, stop_ids), step=st.step + 1, cache=step.cache)
      return i + 1, out, placed(st)

    out = constrain(layout, jnp.full((state.pos.shape[0], self.capacity), -1, jnp.int32))
    _, out, state = jax.lax.while_loop(cond, body, (jnp.int32(0), out, placed(state)))
    return constrain(layout, out), placed(state)

  @functools.partial(jax.jit, static_argnums=0)
  def token_logprobs(self, params: nnx.State, tokens: Tokens, positions: Positions) -> Float[Array, "B T-1"]:
    """Teacher-forced log p(tokens[:, t+1] | tokens[:, :t+1]) for t < T-1: (B, T) -> (B, T-1) float32.

    The logits are computed SCORE_ROWS positions at a time (chunked_scores): never all (B, T, V) of them.
    With a layout the result is replicated and each chunk's logits stay sharded by the rules (never
    gathered). Attention is the full (T, T) of one forward: long texts go through score_chunk instead
    (engine.score).
    """
    model = nnx.merge(self.graphdef, params)
    hidden = model(tokens, positions).hidden
    return constrain(self.layout, chunked_scores(model, hidden[:, :-1], tokens[:, 1:])[0])

  @functools.partial(jax.jit, static_argnums=0)
  def score(self, params: nnx.State, tokens: Tokens, positions: Positions, at: Int[Array, "B scored"],
            targets: Int[Array, "B scored"]) -> tuple[Float[Array, "B scored"], Bool[Array, "B scored"]]:
    """Teacher-forced scores of chosen tokens (evaluation): for each (b, c), the log-probability of
    targets[b, c] given row b's tokens up to index at[b, c], and whether it is the most likely token there.

    Args:
      tokens, positions: (B, T); positions -1 mark padding.
      at: (B, scored) int32 indices into T of the positions whose next token is scored.
      targets: (B, scored) int32 the tokens scored there.
    Returns:
      (B, scored) float32 log-probabilities and bool (argmax == target), replicated with a layout. Only the
      picked positions reach the output layer, SCORE_ROWS positions at a time (lax.map), so a long window
      never holds its (T, V) logits.
    """
    model = nnx.merge(self.graphdef, params)
    hidden = model(tokens, positions).hidden
    picked = jnp.take_along_axis(hidden, at[:, :, None], axis=1)  # (B, scored, D)
    lp, greedy = chunked_scores(model, picked, targets)
    return constrain(self.layout, lp), constrain(self.layout, greedy)

"""Next-token choice from (logits, key): greedy, temperature, top-k, top-p, min-p, per row.

Semantics follow Hugging Face `generate` (the API users know): temperature scales the logits, then top-k
keeps the k most likely tokens, then top-p keeps the smallest set of the remaining (renormalised) tokens
whose mass reaches p, then min-p drops tokens less likely than min_p times the most likely one.
Temperature 0 means greedy. Every setting is a per-row traced array, so a batch can mix settings and
changing them never recompiles.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .errors import GemmaError
from .shapes import Array, Float, Int, unchecked_fields

# A setting for make_sampling: one value for every row or one per row, as numbers, a sequence or an array.
# make_sampling checks the values itself (integers whole, ranges), with errors that name the setting.
Setting = float | Sequence[float] | np.ndarray | jax.Array


@unchecked_fields
@struct.dataclass
class Sampling:
  """Per-row sampling settings, each (B,).

  Attributes:
    temperature: float32; 0 = greedy (argmax).
    top_k: int32; 0 = off.
    top_p: float32 in (0, 1]; 1 = off.
    min_p: float32 in [0, 1]; 0 = off.
    seed: int32; the same seed gives the same tokens.
  """

  temperature: Float[Array, "B"]
  top_k: Int[Array, "B"]
  top_p: Float[Array, "B"]
  min_p: Float[Array, "B"]
  seed: Int[Array, "B"]


def _per_row(name: str, value: object, batch: int, dtype: type[np.generic]) -> np.ndarray:
  """value (anything a user passed for `name`) as (batch,) values of dtype, or a GemmaError naming it."""
  raw = np.asarray(value)
  if raw.dtype.kind == "O" and all(type(v) is int for v in raw.reshape(-1)):
    raw = raw.astype(np.float64)  # Python ints beyond int64 (the range check below names them)
  if raw.dtype.kind not in "iuf":  # strings ("0.7"), bools, None: named, never coerced
    raise GemmaError(f"{name} must be a number or one number per prompt, got {value!r}")
  arr = raw.astype(np.float64)
  if arr.ndim == 0:
    arr = np.full((batch,), arr)
  if arr.shape != (batch,):
    raise GemmaError(f"{name} must be one value or one per prompt ({batch}), got shape {arr.shape}")
  if not np.all(np.isfinite(arr)):
    raise GemmaError(f"{name} must be finite, got {value!r}")
  if np.issubdtype(dtype, np.integer):
    if not np.all(arr == np.round(arr)):
      raise GemmaError(f"{name} must be an integer, got {value!r}")
    limit = np.iinfo(dtype)
    if np.any((arr < limit.min) | (arr > limit.max)):  # before the cast, which would wrap around
      raise GemmaError(f"{name} must be in [{limit.min}, {limit.max}], got {value!r}")
  return arr.astype(dtype)


@typing.no_type_check  # the user-input boundary: it checks every value itself, with errors naming the setting
def make_sampling(batch: int, *, temperature: Setting = 0.0, top_k: Setting = 0, top_p: Setting = 1.0,
                  min_p: Setting = 0.0, seed: Setting = 0) -> Sampling:
  """Validated per-row settings; scalars apply to every row. Bad values raise GemmaError naming them."""
  t = _per_row("temperature", temperature, batch, np.float32)
  k = _per_row("top_k", top_k, batch, np.int32)
  p = _per_row("top_p", top_p, batch, np.float32)
  m = _per_row("min_p", min_p, batch, np.float32)
  s = _per_row("seed", seed, batch, np.int64)
  if np.any(t < 0):
    raise GemmaError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
  if np.any(k < 0):
    raise GemmaError(f"top_k must be >= 0 (0 means off), got {top_k!r}")
  if np.any((p <= 0) | (p > 1)):
    raise GemmaError(f"top_p must be in (0, 1] (1 means off), got {top_p!r}")
  if np.any((m < 0) | (m > 1)):
    raise GemmaError(f"min_p must be in [0, 1] (0 means off), got {min_p!r}")
  if np.any((s < 0) | (s >= 2 ** 31)):
    raise GemmaError(f"seed must be in [0, 2**31), got {seed!r}")
  return Sampling(jnp.asarray(t), jnp.asarray(k), jnp.asarray(p), jnp.asarray(m), jnp.asarray(s, jnp.int32))


def filter_logits(logits: Float[Array, "B V"], s: Sampling) -> Float[Array, "B V"]:
  """(B, V) float32 logits -> temperature-scaled logits with dropped tokens at -inf.

  Rows with temperature 0 are returned unscaled (they are decided by argmax). The sort needed by top-k
  and top-p runs only when some row uses them.
  """
  greedy = s.temperature <= 0
  scaled = logits / jnp.where(greedy, 1.0, s.temperature)[:, None]
  v = logits.shape[-1]
  needs_sort = jnp.any(~greedy & ((s.top_k > 0) | (s.top_p < 1)))

  def sorted_threshold(x):
    desc = -jnp.sort(-x, axis=-1)  # (B, V), most likely first
    rank = jnp.arange(v)[None, :]
    k = jnp.where(s.top_k > 0, s.top_k, v)[:, None]
    desc = jnp.where(rank < k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # HF TopPLogitsWarper drops tokens whose ascending cumulative mass <= 1 - p, i.e. keeps a token while
    # the mass strictly before it is < p; the most likely token is always kept.
    keep = (mass_before < s.top_p[:, None]) | (rank == 0)
    keep &= rank < k
    return jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1)  # smallest kept logit

  threshold = jax.lax.cond(needs_sort, sorted_threshold, lambda x: jnp.full(x.shape[:1], -jnp.inf), scaled)
  out = jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)
  # min-p: p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p), on the scaled logits.
  top = jnp.max(out, axis=-1, keepdims=True)
  floor = jnp.where(s.min_p > 0, jnp.log(jnp.maximum(s.min_p, 1e-30)), -jnp.inf)[:, None]
  out = jnp.where(out - top >= floor, out, -jnp.inf)
  return jnp.where(greedy[:, None], logits, out)


def next_token(logits: Float[Array, "B V"], s: Sampling, step: Int[Array, ""]) -> Int[Array, "B"]:
  """(B, V) float32 logits (disallowed tokens already at -inf) -> (B,) int32 token ids.

  Row b draws with key fold_in(key(seed_b), step): reproducible per seed, independent of the batch.
  """
  greedy = s.temperature <= 0
  greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw_all(logits):
    filtered = filter_logits(logits, s)
    draw = lambda seed, row: jax.random.categorical(jax.random.fold_in(jax.random.key(seed), step), row)
    return jnp.where(greedy, greedy_tok, jax.vmap(draw)(s.seed, filtered).astype(jnp.int32))

  # An all-greedy batch skips the filtering and the V random draws per row.
  return jax.lax.cond(jnp.all(greedy), lambda _: greedy_tok, draw_all, logits)

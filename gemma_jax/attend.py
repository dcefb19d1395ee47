"""Attention's core, from projected queries and stored keys/values to weighted values: two paths.

`exact` builds every score of a call as one float32 (B, T, K, G, S) tensor and takes one softmax over it;
`blockwise` (flash-style, Dao et al. 2022, "FlashAttention", Algorithm 1; Rabe & Staats 2021, "Self-attention
does not need O(n^2) memory") walks query blocks (lax.map) and, inside each, key blocks (lax.scan) with a
running maximum, denominator and output in float32, so it holds one (B, tq, K, G, tk) block of scores at a
time. Both compute the same thing: soft-cap, masks from positions (k_pos -1 = empty slot), sliding
windows, packed-row segments, int8 keys/values with their per-(row, slot, kv head) scales, GQA without
repeating k/v, and several key parts (the cache as it was + the chunk; one softmax over all of them).

attention.py chooses the path (BLOCKWISE_MIN_KEYS there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .cache import Stored
from .shapes import Array, Bool, Float, Int, Positions

# Large negative finite value for masked logits, as the official implementation (K_MASK): finite so a
# fully masked row (a padding query) gives a uniform softmax instead of NaN.
MASK_VALUE = -2.3819763e38

# One key part: keys/values as the cache stores them, their positions (B, S) (-1 = empty) and, for packed
# training rows, their segment ids (B, S) (None otherwise).
# (Plain arrays in the annotation: the parts of one call differ in S.)
Part = tuple[Stored, jax.Array, "jax.Array | None"]


def attention_mask(q_pos: Positions, k_pos: Int[Array, "B S"], window: int | None,
                   segments: Int[Array, "B T"] | None = None,
                   k_segments: Int[Array, "B S"] | None = None) -> Bool[Array, "B T S"]:
  """(B, T) query and (B, S) key positions -> (B, T, S) bool: key visible to query.

  A key is visible when its slot is filled (k_pos >= 0), it is not in the future, and on sliding-window
  layers q_pos - k_pos < window. segments (training with packed rows, no cache): a key is visible only
  within its own example, since positions restart per example and would let a later example see an
  earlier one's keys at lower positions. k_segments: the keys' segment ids (default: segments, S == T).
  """
  q = q_pos[:, :, None]
  k = k_pos[:, None, :]
  visible = (k >= 0) & (k <= q)
  if window is not None:
    visible &= q - k < window
  if segments is not None:
    k_segments = segments if k_segments is None else k_segments
    visible &= segments[:, :, None] == k_segments[:, None, :]
  return visible


def _scales(scale: Float[Array, "B S K"]) -> Float[Array, "B 1 K 1 S"]:
  return jnp.swapaxes(scale, 1, 2)[:, None, :, None, :]


def part_logits(qg: Float[Array, "B T K G H"], kv: Stored, q_pos: Positions, k_pos: Int[Array, "B S"],
                q_seg, k_seg, window: int | None, softcap: float | None
                ) -> tuple[Float[Array, "B T K G S"], Bool[Array, "B T S"]]:
  """Masked float32 logits of queries qg against one part's keys, and the (B, T, S) mask itself.

  int8 keys: the dot product runs on the integers (exact in bf16/f32) and each (row, slot, kv head) scale
  multiplies its logit afterwards: q . (k8 * s) = (q . k8) * s, without a dequantized copy.
  """
  keys = kv.k if kv.k_scale is None else kv.k.astype(qg.dtype)
  logits = jnp.einsum("BTKGH,BSKH->BTKGS", qg, keys, preferred_element_type=jnp.float32)
  if kv.k_scale is not None:
    logits = logits * _scales(kv.k_scale)
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  mask = attention_mask(q_pos, k_pos, window, q_seg, k_seg if q_seg is not None else None)
  return jnp.where(mask[:, :, None, None, :], logits, MASK_VALUE), mask


def part_values(p: Float[Array, "B T K G S"], kv: Stored, dtype, accumulate=None) -> Float[Array, "B T K G H"]:
  """sum_s p_s v_s for one part, the weights cast to `dtype` (the values' compute dtype) for the matmul.

  int8 values: sum_s p_s * (v8_s * s_s) = sum_s (p_s * s_s) * v8_s. accumulate: the result's dtype
  (default `dtype`).
  """
  values = kv.v
  if kv.v_scale is not None:
    p, values = p * _scales(kv.v_scale), values.astype(dtype)
  return jnp.einsum("BTKGS,BSKH->BTKGH", p.astype(dtype), values, preferred_element_type=accumulate)


def exact(qg: Float[Array, "B T K G H"], parts: list[Part], q_pos: Positions, q_seg, window: int | None,
          softcap: float | None, dtype) -> Float[Array, "B T K G H"]:
  """One softmax over the concatenated logits of every part: (B, T, K, G, H) in `dtype`."""
  logits = [part_logits(qg, kv, q_pos, k_pos, q_seg, k_seg, window, softcap)[0] for kv, k_pos, k_seg in parts]
  probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
  out, start = 0.0, 0
  for kv, _, _ in parts:
    s = kv.k.shape[1]
    out = out + part_values(probs[..., start:start + s], kv, dtype)
    start += s
  return out


def _blocks(x: jax.Array | None, size: int, axis: int, fill) -> jax.Array | None:
  """x with `axis` padded (by `fill`) to a multiple of size and split into blocks, the block index first:
  (..., n * size, ...) -> (n, ..., size, ...)."""
  if x is None:
    return None
  n = -(-x.shape[axis] // size)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n * size - x.shape[axis])
  x = jnp.pad(x, pad, constant_values=fill)
  x = x.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def blockwise(qg: Float[Array, "B T K G H"], parts: list[Part], q_pos: Positions, q_seg, window: int | None,
              softcap: float | None, dtype, block_q: int, block_k: int) -> Float[Array, "B T K G H"]:
  """exact()'s result with online softmax over blocks of block_q queries and block_k keys.

  Accumulators (running max m, denominator l, output) are float32 whatever `dtype`. A key block that no
  query of the query block can see (future keys, keys out of every query's window, empty cache slots) is
  skipped (lax.cond): for a query that sees any key it adds exp(MASK_VALUE - m) = 0 exactly, so skipping
  changes nothing; a query that sees no key at all (padding) then gets 0 instead of exact()'s uniform
  average -- finite either way, and padding outputs are never used. Each block's update is wrapped in
  jax.checkpoint, so the backward pass recomputes its scores instead of storing them all.
  """
  b, t, k, g, h = qg.shape
  qb = _blocks(qg, block_q, 1, 0)  # (nq, B, tq, K, G, H)
  qp = _blocks(q_pos, block_q, 1, -1)
  qs = _blocks(q_seg, block_q, 1, -1)
  kparts = []
  for kv, k_pos, k_seg in parts:
    stored = Stored(*(_blocks(x, block_k, 1, 0) for x in kv))  # (nk, B, tk, K, H) / (nk, B, tk, K)
    kparts.append((stored, _blocks(k_pos, block_k, 1, -1), _blocks(k_seg, block_k, 1, -1)))

  @jax.checkpoint
  def update(carry, q, q_p, q_s, kv, k_p, k_s):
    m, l, acc = carry
    logits, _ = part_logits(q, kv, q_p, k_p, q_s, k_s, window, softcap)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    p = jnp.exp(logits - m_new[..., None])
    corr = jnp.exp(m - m_new)
    return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + part_values(p, kv, dtype, jnp.float32)

  def query_block(args):
    q, q_p, q_s = args
    tq = q.shape[1]
    carry = (jnp.full((b, tq, k, g), MASK_VALUE, jnp.float32), jnp.zeros((b, tq, k, g), jnp.float32),
             jnp.zeros((b, tq, k, g, h), jnp.float32))
    for stored, k_p, k_s in kparts:
      def step(carry, blk):
        kv, kp, ks = blk
        seen = jnp.any(attention_mask(q_p, kp, window, q_s, ks if q_s is not None else None))
        return jax.lax.cond(seen, lambda c: update(c, q, q_p, q_s, kv, kp, ks), lambda c: c, carry), None
      carry, _ = jax.lax.scan(step, carry, (stored, k_p, k_s))
    _, l, acc = carry
    return (acc / jnp.where(l == 0, 1, l)[..., None]).astype(dtype)

  out = jax.lax.map(query_block, (qb, qp, qs))  # (nq, B, tq, K, G, H)
  return jnp.moveaxis(out, 0, 1).reshape(b, -1, k, g, h)[:, :t]

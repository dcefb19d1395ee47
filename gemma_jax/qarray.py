"""Quantized arrays: int8 or int4 values with a float scale per block of the contracting axis; the matmul.

A quantized weight is two arrays, values q (the weight's shape; int8, or jnp.int4) and scale s, with
w = q * s. Every weight here is contracted over its leading dims or its trailing ones (layers.weight_einsum):
`contract` = n > 0 says the first n dims are contracted (q_einsum (D, N, H): 1; attn_vec_einsum (N, H, D):
2), n < 0 the last -n (gating_einsum (F, 2, D), the embedding (V, D): -1). Seen as a 2-D matrix -- (C, O)
when leading, (O, C) when trailing, C the contracted size -- a block is `block` consecutive entries of C,
and s has the weight's shape with the contracted dims replaced by one dim of C / block entries:
leading (C/block, *free), trailing (*free, C/block). block = C gives one scale per output channel.

Symmetric, absmax scaling: s = absmax / 127 (int8) or absmax / 7 (int4), q = round(w / s), so every
element is within s / 2 of its weight: absmax / 254 and absmax / 14. (int4's -8 is never produced, but
GGUF's Q4_0 blocks use it, and they are stored as they are.)

The scale axis takes the logical name of the first contracted axis: block i covers contracted entries
[i * block, (i + 1) * block), so a mesh axis that divides both the weight's dim and the blocks splits
them alike, and where it does not the scales are replicated (sharding.py's fallback).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

BITS = {"int8": 8, "int4": 4}
DTYPES = {"int8": jnp.dtype(jnp.int8), "int4": jnp.dtype(jnp.int4)}
QMAX = {"int8": 127, "int4": 7}
# On CPU a quantized matmul dequantizes this many bytes of weight at a time (see matmul).
TILE_BYTES = 2 << 20


class QWeight(NamedTuple):
  """A quantized weight as weight_einsum takes it: values, scale and which dims are contracted."""

  values: jax.Array
  scale: jax.Array
  contract: int


def nbytes(shape: tuple[int, ...], dtype) -> int:
  """Bytes of an array as XLA holds it (and Orbax stores it): int4 packs two values to a byte (measured:
  a 2^24-entry int4 array takes 8 MiB on the CPU device and 7 MiB on disk, benchmarks/results/
  2026-12-05_quantize.md); numpy's itemsize says 1."""
  n = math.prod(shape)
  return (n + 1) // 2 if jnp.dtype(dtype) == DTYPES["int4"] else n * jnp.dtype(dtype).itemsize


def contracted_size(shape: tuple[int, ...], contract: int) -> int:
  return math.prod(shape[:contract] if contract > 0 else shape[contract:])


def scale_shape(shape: tuple[int, ...], contract: int, block: int | None) -> tuple[int, ...]:
  """The shape of the scale of a weight of `shape` (block None: one scale per output channel)."""
  c = contracted_size(shape, contract)
  blocks = c // (block or c)
  return (blocks, *shape[contract:]) if contract > 0 else (*shape[:contract], blocks)


def scale_axes(axes: tuple[str, ...], contract: int) -> tuple[str, ...]:
  """The scale's logical axes: the weight's, with the contracted ones replaced by the first of them."""
  return (axes[0], *axes[contract:]) if contract > 0 else (*axes[:contract], axes[contract])


def _blocked(w: jax.Array, contract: int, blocks: int) -> jax.Array:
  """w as (blocks, block, O) (leading) or (O, blocks, block) (trailing)."""
  c = contracted_size(w.shape, contract)
  return w.reshape(blocks, c // blocks, -1) if contract > 0 else w.reshape(-1, blocks, c // blocks)


def quantize(w: ArrayLike, contract: int, scheme: str, block: int | None) -> tuple[jax.Array, jax.Array]:
  """(values, float32 scale) of w: symmetric absmax scaling per block of the contracted dims."""
  c = contracted_size(w.shape, contract)
  blocks = c // (block or c)
  wb = _blocked(jnp.asarray(w, jnp.float32), contract, blocks)
  axis = 1 if contract > 0 else 2
  scale = jnp.max(jnp.abs(wb), axis=axis, keepdims=True) / QMAX[scheme]
  q = jnp.round(wb / jnp.where(scale == 0, 1.0, scale))
  q = jnp.clip(q, -QMAX[scheme], QMAX[scheme]).astype(DTYPES[scheme]).reshape(w.shape)
  return q, jnp.squeeze(scale, axis).reshape(scale_shape(w.shape, contract, block))


def from_scale(w: ArrayLike, scale: ArrayLike, contract: int, scheme: str) -> jax.Array:
  """The values of w for a given scale: round(w / scale), for weights that are exactly q * scale (GGUF's
  Q8_0 and Q4_0 blocks, dequantized in float32 and transposed to our layouts)."""
  blocks = scale.shape[0] if contract > 0 else scale.shape[-1]
  s = _blocked(jnp.asarray(scale, jnp.float32), contract, blocks)
  s = s.reshape(blocks, 1, -1) if contract > 0 else s.reshape(-1, blocks, 1)
  q = jnp.round(_blocked(jnp.asarray(w, jnp.float32), contract, blocks) / jnp.where(s == 0, 1.0, s))
  return jnp.clip(q, -QMAX[scheme] - 1, QMAX[scheme]).astype(DTYPES[scheme]).reshape(w.shape)


def dequantize(q: ArrayLike, scale: ArrayLike, contract: int, dtype=jnp.float32) -> jax.Array:
  """q * scale in `dtype` (the product taken in float32, rounded once), in q's shape."""
  blocks = scale.shape[0] if contract > 0 else scale.shape[-1]
  s = jnp.asarray(scale, jnp.float32)
  s = s.reshape(blocks, 1, -1) if contract > 0 else s.reshape(-1, blocks, 1)
  return (_blocked(q, contract, blocks).astype(jnp.float32) * s).astype(dtype).reshape(q.shape)


# ---- the matmul ------------------------------------------------------------------------------------

def _tile(q: jax.Array, contract: int, blocks: int, itemsize: int) -> int:
  """Entries of q's first dim per tile on CPU (0: no tiling) -- the largest divisor of it whose tile
  holds at most TILE_BYTES dequantized and, when leading dims are contracted, whole blocks (a scale per
  output channel serves every tile whole)."""
  if jax.default_backend() != "cpu" or q.size * itemsize <= TILE_BYTES:
    return 0
  per = math.prod(q.shape[1:]) * itemsize
  block = contracted_size(q.shape, contract) // blocks
  step = math.prod(q.shape[1:contract]) if contract > 0 else 0  # contracted entries per entry of dim 0
  best = 0
  for t in range(1, q.shape[0] + 1):
    if t * per > TILE_BYTES:
      break
    if q.shape[0] % t == 0 and (contract < 0 or blocks == 1 or (t * step) % block == 0):
      best = t
  return best if best < q.shape[0] else 0


def _product(x: jax.Array, w: QWeight, dtype, transpose: bool) -> jax.Array:
  """x (M, C) @ w as (C, O) -> (M, O); transpose: x (M, O) @ w.T -> (M, C). float32 accumulation.

  Without tiling the weight is dequantized whole and XLA fuses that into the dot where it can (GPU,
  TPU). XLA:CPU does not: it wrote the whole float weight to memory first (for Gemma 3 270M's embedding,
  642 MiB in float32 on every decode step; benchmarks/results/2026-12-05_quantize.md), slower than the
  float weight itself. So on CPU a large weight is dequantized a tile of its first dim at a time inside
  a loop, each tile small enough to stay in cache; a tile is never hoisted out of the decode loop,
  since its slice depends on the inner loop's counter.
  """
  q, s, contract = w
  x = x.astype(dtype)
  # The 2-D view W2: (C, O) when leading dims are contracted, else (O, C); each entry of q's first dim
  # is `per` rows of it.
  per = math.prod(q.shape[1:contract] if contract > 0 else q.shape[1:q.ndim + contract])
  rows = q.shape[0] * per
  # The product contracts W2's rows (forward with leading contraction, backward with trailing) or its
  # columns; tiles of rows are then summed, or each gives its own output columns.
  over_rows = (contract > 0) != transpose

  def deq(qt, st):
    wt = dequantize(qt, st, contract, dtype)
    return wt.reshape(qt.shape[0] * per, -1)

  def dot(a, wt):
    dims = (((1,), (0,)), ((), ())) if over_rows else (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(a, wt, dims, preferred_element_type=jnp.float32)

  blocks = s.shape[0] if contract > 0 else s.shape[-1]
  tile = _tile(q, contract, blocks, jnp.dtype(dtype).itemsize)
  if not tile:
    return dot(x, deq(q, s))
  n, tile_rows = q.shape[0] // tile, tile * per
  s_tile = s.shape[0] // n

  def body(i, y):
    st = s if contract > 0 and blocks == 1 else jax.lax.dynamic_slice_in_dim(s, i * s_tile, s_tile, 0)
    wt = deq(jax.lax.dynamic_slice_in_dim(q, i * tile, tile, 0), st)
    if over_rows:
      return y + dot(jax.lax.dynamic_slice_in_dim(x, i * tile_rows, tile_rows, 1), wt)
    return jax.lax.dynamic_update_slice_in_dim(y, dot(x, wt), i * tile_rows, 1)

  cols = q.size // rows if over_rows else rows
  return jax.lax.fori_loop(0, n, body, jnp.zeros((x.shape[0], cols), jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matmul(x: jax.Array, values: jax.Array, scale: jax.Array, contract: int) -> jax.Array:
  return _product(x, QWeight(values, scale, contract), x.dtype, False)


def _fwd(x, values, scale, contract):
  return _matmul(x, values, scale, contract), (values, scale, jnp.zeros((0,), x.dtype))


def _bwd(contract, res, dy):
  # Only x is differentiated (a quantized weight is frozen: QLoRA trains adapters). The residuals are
  # the quantized weight itself: a plain dot would keep every dequantized tile for the backward pass.
  values, scale, like = res
  dx = _product(dy, QWeight(values, scale, contract), like.dtype, True).astype(like.dtype)
  return dx, np.zeros(values.shape, jax.dtypes.float0), jnp.zeros_like(scale)


_matmul.defvjp(_fwd, _bwd)


def matmul(x: jax.Array, w: QWeight) -> jax.Array:
  """x (M, C) @ w seen as (C, O) (leading contracted) or its (O, C).T (trailing) -> (M, O) float32, with
  the weight dequantized in x's dtype (see _product for how, per backend)."""
  return _matmul(x, w.values, w.scale, w.contract)

"""Quantized arrays: int8 or int4 values with a float scale (int4: and an offset) per block of the
contracting axis; the matmul.

A quantized weight is values q (the weight's shape; int8, or jnp.int4), a scale s and, for the asymmetric
int4 scheme, an offset m: w = q * s (int8, int4-sym) or w = (q + 8) * s + m (int4). Every weight here is
contracted over its leading dims or its trailing ones (layers.weight_einsum): `contract` = n > 0 says the
first n dims are contracted (q_einsum (D, N, H): 1; attn_vec_einsum (N, H, D): 2), n < 0 the last -n
(gating_einsum (F, 2, D), the embedding (V, D): -1). Seen as a 2-D matrix -- (C, O) when leading, (O, C)
when trailing, C the contracted size -- a block is `block` consecutive entries of C, and s (and m) have the
weight's shape with the contracted dims replaced by one dim of C / block entries: leading
(C/block, *free), trailing (*free, C/block). block = C gives one scale per output channel.

int8 and int4-sym: symmetric absmax scaling, s = absmax / 127 or absmax / 7, q = round(w / s), so every
element is within s / 2 of its weight: absmax / 254 and absmax / 14. int4-sym is checkpoint format 4's
int4, kept so that those checkpoints load as they were.

int4 (asymmetric, as GGUF's Q4_1 / Q4_K): 16 levels from m in steps of s, s and m float16 (as GGUF stores
them; they keep an int4 model at 0.16x of float32's bytes, where float32 scale and offset would take
0.19x). Start from the block's min..max (every element within (max - min) / 30 <= absmax / 15 of its
weight), then search narrower ranges (SHRINK: the outermost weights clipped), keeping the candidate of least
squared error among those that still hold every element within absmax / 14 -- int4-sym's bound, which
the search may not break. Measured on Gemma 3 270M (benchmarks/results/2026-12-05_quantize.md), int8
embedding, first 1,200 tokens of the held-out text: symmetric +19.5% mean NLL, min..max +8.5%, with the
search +5.0% (the whole text: +6.75%). GGUF's Q4_0 (q * d, q in -8..7) is this scheme with m = -8 * d and Q4_1 (q * d + m) with its own d and
m, exactly (float16 both).
The bound holds where float16 resolves the scale: blocks whose range exceeds about 1e-3 (float16's normal
range starts at 6.1e-5 = range / 15); below, the error is at most about 1e-6 more. A range over float16's
maximum (65504 * 15) is an error (quantize.py names the param).

The scale (and offset) axis takes the logical name of the first contracted axis: block i covers contracted
entries [i * block, (i + 1) * block), so a mesh axis that divides both the weight's dim and the blocks
splits them alike, and where it does not the scales are replicated (sharding.py's fallback).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

BITS = {"int8": 8, "int4": 4, "int4-sym": 4}
DTYPES = {"int8": jnp.dtype(jnp.int8), "int4": jnp.dtype(jnp.int4), "int4-sym": jnp.dtype(jnp.int4)}
QMAX = {"int8": 127, "int4-sym": 7}  # the symmetric schemes
ASYMMETRIC = ("int4",)  # schemes with an offset per block: w = (q + OFFSET_LEVELS) * s + m
OFFSET_LEVELS = 8  # int4 values -8..7 are levels 0..15 above the offset
LEVELS = 15
# The dtype of an asymmetric scheme's scale and offset, in checkpoints and in memory (module docstring);
# the symmetric schemes' scales are float32 in checkpoints and the runtime dtype in memory.
OFFSET_SCALE_DTYPE = jnp.dtype(jnp.float16)
# Fractions of a block's range clipped at its low and at its high end, tried by the int4 search (each pair;
# past about 7% a clipped end breaks the absmax / 14 bound). Measured on the 270M (first 1,200 tokens of
# the held-out text, int8 embedding): 0, 2, 4, 6% gave +5.7% NLL, 0..7% in steps of 1% +5.0%, and a
# least-squares refit of (s, m) to each candidate's levels (llama.cpp's make_qkx2_quants) did not help
# (+5.7%, +5.3% with two rounds), so it is not done.
SHRINK = tuple(i / 100 for i in range(8))
# On CPU a quantized matmul dequantizes this many bytes of weight at a time (see matmul).
TILE_BYTES = 2 << 20


class QWeight(NamedTuple):
  """A quantized weight as weight_einsum takes it: values, scale, which dims are contracted, and the
  offset of an asymmetric scheme (None: symmetric)."""

  values: jax.Array
  scale: jax.Array
  contract: int
  offset: jax.Array | None = None


def nbytes(shape: tuple[int, ...], dtype) -> int:
  """Bytes of an array as XLA holds it (and Orbax stores it): int4 packs two values to a byte (measured:
  a 2^24-entry int4 array takes 8 MiB on the CPU device and 7 MiB on disk, benchmarks/results/
  2026-12-05_quantize.md); numpy's itemsize says 1."""
  n = math.prod(shape)
  return (n + 1) // 2 if jnp.dtype(dtype) == DTYPES["int4"] else n * jnp.dtype(dtype).itemsize


def contracted_size(shape: tuple[int, ...], contract: int) -> int:
  return math.prod(shape[:contract] if contract > 0 else shape[contract:])


def scale_shape(shape: tuple[int, ...], contract: int, block: int | None) -> tuple[int, ...]:
  """The shape of the scale (and offset) of a weight of `shape` (block None: one per output channel)."""
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


def _per_block(scale: ArrayLike, contract: int, blocks: int) -> jax.Array:
  """A scale (or offset) in float32, shaped to broadcast against _blocked's view."""
  s = jnp.asarray(scale, jnp.float32)
  return s.reshape(blocks, 1, -1) if contract > 0 else s.reshape(-1, blocks, 1)


def _asymmetric(wb: jax.Array, axis: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(levels 0..15, scale, offset) of blocked float32 weights (module docstring: min..max, then the search)."""
  lo, hi = jnp.min(wb, axis, keepdims=True), jnp.max(wb, axis, keepdims=True)
  bound = jnp.maximum(-lo, hi) / 14

  def candidate(a, b):  # the range [lo + a (hi - lo), hi - b (hi - lo)]: levels, scale, offset, squared error
    s = ((hi - lo) * (1 - a - b) / LEVELS).astype(OFFSET_SCALE_DTYPE).astype(jnp.float32)
    m = (lo + a * (hi - lo)).astype(OFFSET_SCALE_DTYPE).astype(jnp.float32)
    q = jnp.clip(jnp.round((wb - m) / jnp.where(s == 0, 1.0, s)), 0, LEVELS)
    d = q * s + m - wb
    return (q, s, m), jnp.sum(jnp.square(d), axis, keepdims=True), jnp.max(jnp.abs(d), axis, keepdims=True)

  best, err, _ = candidate(0.0, 0.0)
  pairs = jnp.asarray([(a, b) for a in SHRINK for b in SHRINK if a or b], jnp.float32)

  def step(carry, ab):  # a loop, not unrolled: one candidate's graph to compile
    best, err = carry
    cand, e, worst = candidate(ab[0], ab[1])
    better = (e < err) & (worst <= bound)
    return (tuple(jnp.where(better, c, x) for c, x in zip(cand, best)), jnp.where(better, e, err)), None

  return jax.lax.scan(step, (best, err), pairs)[0][0]


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def quantize(w: ArrayLike, contract: int, scheme: str, block: int | None
             ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(values, scale, offset) of w: symmetric absmax scaling per block of the contracted dims (int8,
  int4-sym: float32 scale, offset None) or int4's asymmetric search (float16 scale and offset)."""
  c = contracted_size(w.shape, contract)
  blocks = c // (block or c)
  wb = _blocked(jnp.asarray(w, jnp.float32), contract, blocks)
  axis = 1 if contract > 0 else 2
  shape = scale_shape(w.shape, contract, block)
  if scheme in ASYMMETRIC:
    q, scale, offset = _asymmetric(wb, axis)
    q = (q - OFFSET_LEVELS).astype(DTYPES[scheme]).reshape(w.shape)
    out = lambda x: jnp.squeeze(x, axis).astype(OFFSET_SCALE_DTYPE).reshape(shape)
    return q, out(scale), out(offset)
  scale = jnp.max(jnp.abs(wb), axis=axis, keepdims=True) / QMAX[scheme]
  q = jnp.round(wb / jnp.where(scale == 0, 1.0, scale))
  q = jnp.clip(q, -QMAX[scheme], QMAX[scheme]).astype(DTYPES[scheme]).reshape(w.shape)
  return q, jnp.squeeze(scale, axis).reshape(shape), None


def from_scale(w: ArrayLike, scale: ArrayLike, contract: int, scheme: str, offset: ArrayLike | None = None
               ) -> jax.Array:
  """The values of w for a given scale (and offset): round(w / scale) or round((w - offset) / scale) - 8,
  for weights that are exactly values times that scale (plus offset): GGUF's Q8_0, Q4_0 and Q4_1 blocks,
  dequantized in float32 and transposed to our layouts."""
  blocks = scale.shape[0] if contract > 0 else scale.shape[-1]
  s = _per_block(scale, contract, blocks)
  wb = _blocked(jnp.asarray(w, jnp.float32), contract, blocks)
  if offset is not None:
    wb = wb - _per_block(offset, contract, blocks)
  q = jnp.round(wb / jnp.where(s == 0, 1.0, s)) - (OFFSET_LEVELS if offset is not None else 0)
  lo, hi = (-OFFSET_LEVELS, LEVELS - OFFSET_LEVELS) if scheme in ASYMMETRIC else (-QMAX[scheme] - 1, QMAX[scheme])
  return jnp.clip(q, lo, hi).astype(DTYPES[scheme]).reshape(w.shape)


def dequantize(q: ArrayLike, scale: ArrayLike, contract: int, dtype=jnp.float32, offset: ArrayLike | None = None
               ) -> jax.Array:
  """q * scale, or (q + 8) * scale + offset, in `dtype` (taken in float32, rounded once), in q's shape."""
  blocks = scale.shape[0] if contract > 0 else scale.shape[-1]
  w = _blocked(q, contract, blocks).astype(jnp.float32)
  if offset is None:
    w = w * _per_block(scale, contract, blocks)
  else:  # (q + 8) * s is exact in float32 (4 by 11 bits), so this equals GGUF's q * d + m in float32
    w = (w + OFFSET_LEVELS) * _per_block(scale, contract, blocks) + _per_block(offset, contract, blocks)
  return w.astype(dtype).reshape(q.shape)


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
  q, s, contract, m = w
  x = x.astype(dtype)
  # The 2-D view W2: (C, O) when leading dims are contracted, else (O, C); each entry of q's first dim
  # is `per` rows of it.
  per = math.prod(q.shape[1:contract] if contract > 0 else q.shape[1:q.ndim + contract])
  rows = q.shape[0] * per
  # The product contracts W2's rows (forward with leading contraction, backward with trailing) or its
  # columns; tiles of rows are then summed, or each gives its own output columns.
  over_rows = (contract > 0) != transpose

  def deq(qt, st, mt):
    wt = dequantize(qt, st, contract, dtype, mt)
    return wt.reshape(qt.shape[0] * per, -1)

  def dot(a, wt):
    dims = (((1,), (0,)), ((), ())) if over_rows else (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(a, wt, dims, preferred_element_type=jnp.float32)

  blocks = s.shape[0] if contract > 0 else s.shape[-1]
  tile = _tile(q, contract, blocks, jnp.dtype(dtype).itemsize)
  if not tile:
    return dot(x, deq(q, s, m))
  n, tile_rows = q.shape[0] // tile, tile * per
  s_tile = s.shape[0] // n

  def body(i, y):
    whole = contract > 0 and blocks == 1
    st, mt = (a if a is None or whole else jax.lax.dynamic_slice_in_dim(a, i * s_tile, s_tile, 0) for a in (s, m))
    wt = deq(jax.lax.dynamic_slice_in_dim(q, i * tile, tile, 0), st, mt)
    if over_rows:
      return y + dot(jax.lax.dynamic_slice_in_dim(x, i * tile_rows, tile_rows, 1), wt)
    return jax.lax.dynamic_update_slice_in_dim(y, dot(x, wt), i * tile_rows, 1)

  cols = q.size // rows if over_rows else rows
  return jax.lax.fori_loop(0, n, body, jnp.zeros((x.shape[0], cols), jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _matmul(x: jax.Array, values: jax.Array, scale: jax.Array, offset: jax.Array | None, contract: int
            ) -> jax.Array:
  return _product(x, QWeight(values, scale, contract, offset), x.dtype, False)


def _fwd(x, values, scale, offset, contract):
  return _matmul(x, values, scale, offset, contract), (values, scale, offset, jnp.zeros((0,), x.dtype))


def _bwd(contract, res, dy):
  # Only x is differentiated (a quantized weight is frozen: QLoRA trains adapters). The residuals are
  # the quantized weight itself: a plain dot would keep every dequantized tile for the backward pass.
  values, scale, offset, like = res
  dx = _product(dy, QWeight(values, scale, contract, offset), like.dtype, True).astype(like.dtype)
  return (dx, np.zeros(values.shape, jax.dtypes.float0), jnp.zeros_like(scale),
          None if offset is None else jnp.zeros_like(offset))


_matmul.defvjp(_fwd, _bwd)


def matmul(x: jax.Array, w: QWeight) -> jax.Array:
  """x (M, C) @ w seen as (C, O) (leading contracted) or its (O, C).T (trailing) -> (M, O) float32, with
  the weight dequantized in x's dtype (see _product for how, per backend)."""
  return _matmul(x, w.values, w.scale, w.offset, w.contract)

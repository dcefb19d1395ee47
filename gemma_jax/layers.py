"""Einsum, RMSNorm and Embedder: the three parameterised building blocks.

Parameter names follow the official checkpoints (`w`, `scale`, `input_embedding`) so that importers are
short tables. Every Param carries `axes`, its logical dimension names in the alphabet of shapes.py,
which sharding rules map to mesh axes.

Quantized weights are a kind of weight here, not a new layer: a quantized Einsum holds int8 or int4
values in `w` and a float `w_scale` (the embedding: `input_embedding` and `input_embedding_scale`), and
for the asymmetric int4 scheme a float `w_offset` (`input_embedding_offset`); its matmul dequantizes them
in the compute dtype inside the jitted function (qarray.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .matmul import dot
from .qarray import ASYMMETRIC, OFFSET_SCALE_DTYPE, QWeight, dequantize, matmul, scale_axes, scale_shape
from .qarray import DTYPES as QDTYPES

_INIT = jax.nn.initializers.normal(stddev=0.02)


def weight_einsum(equation: str, x: jax.Array, w: jax.Array | QWeight, preferred_element_type=None) -> jax.Array:
  """jnp.einsum(equation, x, w) for an activation x and a weight w, computed as one rank-2 matmul.

  w may be a QWeight (qarray.py) whose `contract` matches the equation's; it computes as its dequantized
  weight in x's dtype, accumulating in float32.

  The contracted letters must end x's subscripts and either start w's ("BTD,DNH->BTNH") or end them
  ("BTD,FCD->BTFC"); the output is x's other letters followed by w's. Other equations go to jnp.einsum.
  Why: XLA:CPU (jax 0.12) lowers a dot whose weight has rank > 2, or whose contracted dims are not
  adjacent, with a transposed copy of the weight -- inside the decode while loop, on every step
  (benchmarks/decode_profile.py measured 330 MB of copies per step for Gemma 3 270M). Reshaping a
  row-major weight to 2-D is free, so this form reads each weight exactly once.

  The output may also start with a weight letter that x lacks and nothing contracts ("BTD,FCD->CBTF"):
  then each index of it is one such matmul on that slice of the weight (a copy of the slice), stacked in
  front. For many rows that copy is small next to the matmul, and it keeps a stacked axis of size 2 out
  of the activations' minor dimension, where XLA:CPU's elementwise code does not vectorise
  (the GeGLU of a bfloat16 training step, benchmarks/results/2026-12-06_train_layouts.md).
  """
  ins, out = equation.split("->")
  xs, ws = ins.split(",")
  if out and out[0] in ws and out[0] not in xs:
    axis = ws.index(out[0])
    sub = f"{xs},{ws.replace(out[0], '')}->{out[1:]}"
    size = (w.values if isinstance(w, QWeight) else w).shape[axis]
    return jnp.stack([weight_einsum(sub, x, _take(w, axis, i), preferred_element_type) for i in range(size)])
  contracted = "".join(c for c in xs if c in ws and c not in out)
  n = len(contracted)
  nn = ws.startswith(contracted) and out == xs[:-n] + ws[n:]
  nt = ws.endswith(contracted) and out == xs[:-n] + ws[:-n]
  if isinstance(w, QWeight) and not (n and xs.endswith(contracted) and w.contract == (n if nn else -n if nt else 0)):
    raise ValueError(f"{equation!r} does not contract the dims the quantized weight's scales are along "
                     f"(contract={w.contract})")
  if not n or not xs.endswith(contracted) or not (nn or nt):
    return jnp.einsum(equation, x, w, preferred_element_type=preferred_element_type)
  lead = x.shape[:x.ndim - n]
  size = math.prod(x.shape[x.ndim - n:])
  x2 = x.reshape(-1, size)
  rows = x2.shape[0]
  if rows == 1 and x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
    # XLA:CPU has no bfloat16 matrix-vector kernel: for one row it converts the whole weight to
    # float32 and hoists that copy out of the decode loop (3.6x the bf16 params of Gemma 3 270M held
    # for the whole generation). Two rows take the bfloat16 matmul path at the same speed.
    x2 = jnp.concatenate([x2, x2])
  if isinstance(w, QWeight):
    y = matmul(x2, w).astype(preferred_element_type or x.dtype)
    free = w.values.shape[n:] if nn else w.values.shape[:w.values.ndim - n]
  elif nn:
    y = dot(x2, w.reshape(size, -1), False, preferred_element_type)
    free = w.shape[n:]
  else:
    y = dot(x2, w.reshape(-1, size), True, preferred_element_type)
    free = w.shape[:w.ndim - n]
  return y[:rows].reshape(*lead, *free)


def _take(w: jax.Array | QWeight, axis: int, i: int) -> jax.Array | QWeight:
  """w's slice at index i of a dim that no equation contracts (a QWeight's values, scale and offset alike)."""
  if not isinstance(w, QWeight):
    return jax.lax.index_in_dim(w, i, axis, keepdims=False)
  # The scale keeps the weight's free dims in place; a leading contraction (contract = n > 0) is one dim.
  s_axis = axis if w.contract < 0 else axis - w.contract + 1
  pick = lambda a: None if a is None else jax.lax.index_in_dim(a, i, s_axis, keepdims=False)
  return QWeight(jax.lax.index_in_dim(w.values, i, axis, keepdims=False), pick(w.scale), w.contract, pick(w.offset))


def quantized_params(shape: tuple[int, ...], axes: tuple[str, ...], contract: int, quant: str, block: int | None,
                     dtype) -> tuple[nnx.Param, nnx.Param, nnx.Param | None]:
  """Zero values of the quant type, unit scales and (asymmetric schemes) zero offsets, which importers and
  quantize.py fill in. Scales are in `dtype`, an asymmetric scheme's scale and offset in float16 (qarray.py)."""
  s_shape, s_axes = scale_shape(shape, contract, block), scale_axes(axes, contract)
  if quant in ASYMMETRIC:
    return (nnx.Param(jnp.zeros(shape, QDTYPES[quant]), axes=axes),
            nnx.Param(jnp.ones(s_shape, OFFSET_SCALE_DTYPE), axes=s_axes),
            nnx.Param(jnp.zeros(s_shape, OFFSET_SCALE_DTYPE), axes=s_axes))
  return (nnx.Param(jnp.zeros(shape, QDTYPES[quant]), axes=axes), nnx.Param(jnp.ones(s_shape, dtype), axes=s_axes),
          None)


class Einsum(nnx.Module):
  """A weight `w` of `shape` contracted with the input by `equation` (e.g. "BTD,DNH->BTNH").

  contract: the weight dims every equation contracts, n > 0 for the first n, n < 0 for the last -n.
  quant: None, or a scheme of qarray.py: `w` holds values of its type and `w_scale` a float scale per
    block of `block` contracted entries (None: per output channel), and `w_offset` an offset per block for
    an asymmetric scheme (else None).
  adapter: None, or a module whose `adapter(equation, x)` is added to the output -- a LoRA adapter
  (lora.py attaches them; this module does not know their kind, so imports still point downwards). None
  has no params, so a plain model's state and checkpoint names are unchanged.
  """

  def __init__(self, shape: tuple[int, ...], axes: tuple[str, ...], contract: int, *, dtype, rngs: nnx.Rngs,
               quant: str | None = None, block: int | None = None):
    if len(shape) != len(axes):
      raise ValueError(f"shape {shape} and axes {axes} differ in rank")
    self.contract = contract
    if quant is None:
      self.w = nnx.Param(_INIT(rngs.params(), shape, dtype), axes=axes)
      self.w_scale = self.w_offset = None
    else:
      self.w, self.w_scale, self.w_offset = quantized_params(shape, axes, contract, quant, block, dtype)
    # nnx.data: the attribute may later hold a module (params); NNX refuses that for a static attribute.
    self.adapter = nnx.data(None)

  def weight(self) -> jax.Array | QWeight:
    """`w`, or the QWeight of `w`, `w_scale` (and `w_offset`): what weight_einsum takes."""
    if self.w_scale is None:
      return self.w[...]
    offset = None if self.w_offset is None else self.w_offset[...]
    return QWeight(self.w[...], self.w_scale[...], self.contract, offset)

  def __call__(self, equation: str, x: jax.Array) -> jax.Array:
    y = weight_einsum(equation, x, self.weight())
    if self.adapter is not None:
      y = y + self.adapter(equation, x)
    return y


class RMSNorm(nnx.Module):
  """`x * rsqrt(mean(x^2) + eps) * (1 + scale)`, statistics in float32; `scale` is zero-centred.

  The official implementation (gemma/layers.py) and Hugging Face both apply (1 + scale) in float32
  before casting back (litgpt#1031 lists the bf16 variant as a bug).
  """

  def __init__(self, dim: int, axis_name: str, *, eps: float, dtype, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.zeros((dim,), dtype), axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = x32 * jax.lax.rsqrt(var + self.eps)
    return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class Embedder(nnx.Module):
  """Token embedding (V, D), shared with the output logits (tied).

  quant: None, or a scheme of qarray.py: `input_embedding` holds values and `input_embedding_scale` a float
  scale per row (block None) or per block of `block` entries of D, the axis the logits contract, and
  `input_embedding_offset` an offset per block for an asymmetric scheme (else None).
  """

  def __init__(self, vocab_size: int, embed_dim: int, *, dtype, rngs: nnx.Rngs, quant: str | None = None,
               block: int | None = None):
    shape = (vocab_size, embed_dim)
    if quant is None:
      self.input_embedding = nnx.Param(_INIT(rngs.params(), shape, dtype), axes=("V", "D"))
      self.input_embedding_scale = self.input_embedding_offset = None
    else:
      self.input_embedding, self.input_embedding_scale, self.input_embedding_offset = quantized_params(
          shape, ("V", "D"), -1, quant, block, dtype)

  def encode(self, tokens: jax.Array) -> jax.Array:
    """(B, T) ids -> (B, T, D), scaled by sqrt(D) cast to the activation dtype first.

    In bf16 sqrt(3072) rounds to 55.5; the official model was trained with that value (litgpt#1031).
    A quantized table's rows are dequantized after the lookup, in the scale's dtype (float16 scales:
    in float32).
    """
    table = self.input_embedding[...]
    x = jnp.take(table, tokens, axis=0)
    if self.input_embedding_scale is not None:
      scale = self.input_embedding_scale[...]
      offset = self.input_embedding_offset
      offset = None if offset is None else jnp.take(offset[...], tokens, axis=0)
      dtype = jnp.float32 if scale.dtype == OFFSET_SCALE_DTYPE else scale.dtype
      x = dequantize(x, jnp.take(scale, tokens, axis=0), -1, dtype, offset)
    return x * jnp.sqrt(jnp.float32(table.shape[1])).astype(x.dtype)

  def decode(self, x: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, T, V) float32 logits."""
    table = self.input_embedding[...]
    if self.input_embedding_scale is not None:
      offset = None if self.input_embedding_offset is None else self.input_embedding_offset[...]
      table = QWeight(table, self.input_embedding_scale[...], -1, offset)
    return weight_einsum("BTD,VD->BTV", x, table, preferred_element_type=jnp.float32)

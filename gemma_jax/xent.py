"""The training loss's output layer: sum of weighted next-token NLLs through the tied embedding, in chunks.

The logits matmul (B*T, D) x (D, V) and the log-softmax over V = 262144 dominate a Gemma 3 270M training
step (benchmarks/train_profile.py). Plain autodiff of `logits -> logsumexp` holds the (B, T, V) float32
logits and their gradient (1 GiB each at B*T = 1024) and runs the backward matmuls with a float32
cotangent, i.e. in float32 even when the model computes in bfloat16 (jax's dot_general transpose multiplies
the f32 cotangent with the bf16 operand). Here, as in fused linear cross-entropy kernels (Liger-Kernel's
`fused_linear_cross_entropy`, Apple's Cut Cross-Entropy), the loss and its gradient with respect to the
hidden states (and the embedding, when it is trained) are computed together, a chunk of positions at a
time, in the forward pass of a custom VJP:

  z = h W^T (float32 accumulation) -> [Gemma 2: l = cap * tanh(z / cap)] -> nll = logsumexp(l) - l[target]
  dl = w * (softmax(l) - onehot(target)),  dz = dl * (1 - tanh^2)  [soft-cap],  dh = dz W,  dW += dz^T h

dz enters the two matmuls in the compute dtype with float32 accumulation (in bfloat16 the precision
mixed-precision training uses for every other cotangent, and Hugging Face's autocast for these matmuls);
in float32 it is the exact gradient. The backward pass only scales the stored gradients by the incoming
cotangent. No (B, T, V) array exists: peak memory grows with the chunk, not with T x V.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from .shapes import Array, Float, Int

# Logit elements per chunk (B * chunk positions * V): 64M float32 = 256 MiB, 4 chunks at B*T = 1024 for
# V = 262144: a memory bound (a chunk's logits, exp and gradient). Fewer, larger chunks are no faster:
# the loss and its gradients on (4, 256) bfloat16 hidden states took 2.93 / 2.82 / 3.03 s (hidden states
# only) and 5.67 / 5.49 / 5.70 s (with the table) in 4 / 2 / 1 chunks (2026-12-06_train_layouts.md).
CHUNK_ELEMENTS = 64 * 2**20


def chunk_positions(batch: int, length: int, vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
  """Positions per chunk: as many as keep batch * chunk * vocab <= elements (at least 1, at most length)."""
  return max(1, min(length, elements // max(1, batch * vocab)))


def _dot(x, w, contract):
  return jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=jnp.float32)


def _chunk(h, table, tgt, w, softcap, grads: bool, table_grad: bool):
  """One chunk: h (B, C, D), tgt (B, C), w (B, C) -> (sum of w * nll, dh (B, C, D) or None, dW (V, D) f32 or None)."""
  b, c, d = h.shape
  h2 = h.reshape(b * c, d)
  z = _dot(h2, table, ((1,), (1,)))  # (B*C, V) float32
  if softcap is not None:
    t = jnp.tanh(z / softcap)
    logits = t * softcap
  else:
    logits = z
  tgt2, w2 = tgt.reshape(-1), w.reshape(-1)
  top = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - top)
  s = jnp.sum(e, axis=-1)
  picked = jnp.take_along_axis(logits, tgt2[:, None], axis=-1)[:, 0]
  total = jnp.sum(w2 * (top[:, 0] + jnp.log(s) - picked))
  if not grads:
    return total, None, None
  # One elementwise pass (the one-hot as an iota compare fuses into it, a scatter would not).
  onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == tgt2[:, None]
  dl = e * (w2 / s)[:, None] - jnp.where(onehot, w2[:, None], 0.0)
  if softcap is not None:
    dl = dl * (1.0 - t * t)
  dz = dl.astype(h.dtype)
  dh = _dot(dz, table, ((1,), (0,))).astype(h.dtype).reshape(b, c, d)  # (B*C, V) x (V, D)
  dw = _dot(dz, h2, ((0,), (0,))) if table_grad else None  # (V, B*C) x (B*C, D) -> (V, D) float32
  return total, dh, dw


def _scan(hidden, table, targets, weights, softcap, chunk, grads: bool, table_grad: bool):
  b, t, d = hidden.shape
  n = math.ceil(t / chunk)
  pad = n * chunk - t
  if pad:  # padded positions weigh 0: they add nothing to the loss or the gradients
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)  # (n, B, chunk, ...)
  xs = (split(hidden), split(targets), split(weights))

  def body(carry, x):
    total, dw = carry
    h_c, tgt_c, w_c = x
    t_c, dh_c, dw_c = _chunk(h_c, table, tgt_c, w_c, softcap, grads, table_grad)
    return (total + t_c, None if dw_c is None else dw + dw_c), dh_c

  # The first chunk starts the sums (0 + x is x: the same bits), so no zero-filled (V, D) float32 table
  # gradient is written and added: 0.67 GB each for Gemma 3 270M.
  h0, tgt0, w0 = (x[0] for x in xs)
  total, dh0, dw = _chunk(h0, table, tgt0, w0, softcap, grads, table_grad)
  if n > 1:
    (total, dw), dh = jax.lax.scan(body, (total, dw), tuple(x[1:] for x in xs))
    dh = None if dh0 is None else jnp.concatenate([dh0[None], dh])
  else:
    dh = None if dh0 is None else dh0[None]
  if grads:
    dh = jnp.moveaxis(dh, 0, 1).reshape(b, n * chunk, d)[:, :t]
  return total, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def token_nll_sum(hidden: Float[Array, "B T D"], table: Float[Array, "V D"], targets: Int[Array, "B T"],
                  weights: Float[Array, "B T"], softcap: float | None, chunk: int) -> Float[Array, ""]:
  """sum(weights * -log softmax(softcap(hidden table^T))[targets]), () float32, `chunk` positions at a time.

  hidden and table in the compute dtype (float32 accumulation); softcap: Gemma 2's final logit cap or None;
  chunk: positions per chunk (chunk_positions). Differentiable in hidden and table (the tied embedding);
  targets and weights are data.
  """
  return _scan(hidden, table, targets, weights, softcap, chunk, False, False)[0]


def _fwd(hidden, table, targets, weights, softcap, chunk):
  # symbolic_zeros=True: each array comes as CustomVJPPrimal(value, perturbed); nondiff args as they are.
  table_grad = table.perturbed
  total, dh, dw = _scan(hidden.value, table.value, targets.value, weights.value, softcap, chunk, True, table_grad)
  if dw is not None:
    dw = dw.astype(table.value.dtype)  # the cotangent's dtype is the table's (as jax's own dot transpose)
  return total, (dh, dw)


def _bwd(softcap, chunk, res, g):
  del softcap, chunk
  dh, dw = res
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    g = jnp.float32(0)
  scale = lambda x, dtype: (x.astype(jnp.float32) * g).astype(dtype)
  # None: no cotangent (the table when it is frozen; targets are ints; weights are loss weights from the
  # data, never trained).
  return scale(dh, dh.dtype), None if dw is None else scale(dw, dw.dtype), None, None


token_nll_sum.defvjp(_fwd, _bwd, symbolic_zeros=True)

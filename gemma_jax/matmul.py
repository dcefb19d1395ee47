"""Matmuls whose backward passes are written out for XLA:CPU's kernels: a weight's 2-D matmul and LoRA's product.

Autodiff of a matmul gives the weight's gradient as a matmul that contracts the rows, the major dim of
both operands. XLA:CPU (jax 0.12) has no fast kernel for that form: it runs it in a generic one (108
GFLOP/s in bfloat16 on 2 Zen 4 cores, against 260-400 with one operand transposed first) or transposes
a large operand fused into its elementwise producer, which then runs unvectorised
(benchmarks/results/2026-12-06_train_layouts.md). The backward passes here transpose one operand
explicitly, behind an optimization barrier so that XLA does not fold the transpose back into the dot:
for `dot` the one whose transpose puts the gradient straight into the weight's layout, for
`lora_product` the small (M, R) ones. They compute the same products in the same dtypes as autodiff
(tests/test_weight_einsum.py, tests/test_lora.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dot(x: jax.Array, w: jax.Array, nt: bool, preferred_element_type) -> jax.Array:
  """x (M, K) @ w (K, N), or @ w.T for w (N, K) when nt, with a backward pass written out.

  Autodiff gives the weight's gradient as a matmul contracting M, the major dim of both x and the
  cotangent; XLA:CPU (jax 0.12) runs that form in a slow generic kernel (108 GFLOP/s in bfloat16 against
  260-400 for the same product with one operand transposed first). The backward
  here transposes one operand explicitly (the optimization barrier keeps XLA from folding the transpose
  back into the dot). Same products and dtypes as autodiff's; where the weight is not trained (LoRA's
  base, inference) the weight gradient is unused and XLA drops it.
  """
  return jax.lax.dot_general(x, w, (((1,), (1 if nt else 0,)), ((), ())), preferred_element_type=preferred_element_type)


def _dot_fwd(x, w, nt, preferred_element_type):
  return dot(x, w, nt, preferred_element_type), (x, w)


def _dot_bwd(nt, preferred_element_type, res, g):
  del preferred_element_type
  # A float32 cotangent of a bfloat16 product (preferred_element_type) meets the operands in float32, as
  # in jax's own transpose of dot_general.
  x0, w0 = res
  dtype = jnp.promote_types(g.dtype, x0.dtype)
  x, w, g = x0.astype(dtype), w0.astype(dtype), g.astype(dtype)
  dx = jax.lax.dot_general(g, w, (((1,), (0 if nt else 1,)), ((), ())))
  if nt:  # w (N, K): dw = g^T x
    dw = jax.lax.dot_general(jax.lax.optimization_barrier(g.T), x, (((1,), (0,)), ((), ())))
  else:  # w (K, N): dw = x^T g
    dw = jax.lax.dot_general(jax.lax.optimization_barrier(x.T), g, (((1,), (0,)), ((), ())))
  return dx.astype(x0.dtype), dw.astype(w0.dtype)


dot.defvjp(_dot_fwd, _dot_bwd)


@jax.custom_vjp
def lora_product(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """(x A_s) B_s for each stacked s: x (M, K), a (S, K, R), b (S, R, N) -> (S, M, N), in x's dtype.

  The backward pass is written out (_lora_product_bwd) so that every large operand -- x (M, K) and the
  cotangent g (S, M, N) -- enters its matmuls in the layout it has. Plain autodiff gives the A and B
  gradients as matmuls contracting M, the major dim of both operands; XLA:CPU (jax 0.12) has no fast
  kernel for that form and transposes g or x instead, fused into their elementwise producers
  (e.g. the GeGLU backward), which then run unvectorised: 22% of a float32 LoRA step on Gemma 3 270M
  (benchmarks/results/2026-12-06_train_layouts.md). Here the small operands (M, R) are transposed instead.
  """
  return jnp.einsum("SMR,SRN->SMN", jnp.einsum("MK,SKR->SMR", x, a), b)


def _lora_product_fwd(x, a, b):
  h = jnp.einsum("MK,SKR->SMR", x, a)
  return jnp.einsum("SMR,SRN->SMN", h, b), (x, a, b, h)


def _lora_product_bwd(res, g):
  x, a, b, h = res
  # A matmul batched over S, contracting lhs dim lc with rhs dim rc.
  bdot = lambda lhs, rhs, lc, rc: jax.lax.dot_general(lhs, rhs, (((lc,), (rc,)), ((0,), (0,))))
  gb = bdot(g, b, 2, 2)  # (S, M, R): g B^T
  dx = jnp.einsum("SMR,SKR->MK", gb, a)
  # The barriers keep XLA from folding these transposes back into the dots (which would contract M
  # as the major dim of both operands again); they are (S, R, M), small.
  gb_t = jax.lax.optimization_barrier(jnp.swapaxes(gb, 1, 2))
  h_t = jax.lax.optimization_barrier(jnp.swapaxes(h, 1, 2))
  da_t = bdot(gb_t, jnp.broadcast_to(x, (a.shape[0], *x.shape)), 2, 1)  # (S, R, K) = (g B^T)^T x
  db = bdot(h_t, g, 2, 1)  # (S, R, N) = (x A)^T g
  return dx, jnp.swapaxes(da_t, 1, 2), db


lora_product.defvjp(_lora_product_fwd, _lora_product_bwd)

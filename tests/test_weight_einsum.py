"""layers.weight_einsum computes jnp.einsum's result through one rank-2 matmul where it can."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.layers import weight_einsum

CASES = [
    ("BTD,DNH->BTNH", (2, 3, 5), (5, 4, 7)),      # q projection: contracted letters lead w
    ("BTD,DKCH->BTKCH", (2, 3, 5), (5, 1, 2, 7)),  # [k, v] projection
    ("BTNH,NHD->BTD", (2, 3, 4, 7), (4, 7, 5)),    # output projection: two contracted letters
    ("BTD,FCD->BTFC", (2, 3, 5), (6, 2, 5)),       # gate/up: contracted letters end w
    ("BTD,FCD->CBTF", (2, 3, 5), (6, 2, 5)),       # ... one matmul per slice of C, stacked in front
    ("BTD,DKCH->CBTKH", (2, 3, 5), (5, 1, 2, 7)),
    ("BTD,VD->BTV", (2, 3, 5), (11, 5)),
    ("BTD,NDH->BTNH", (2, 3, 5), (4, 5, 7)),       # not expressible as one 2-D matmul: jnp.einsum
]


@pytest.mark.parametrize("equation,xs,ws", CASES)
def test_weight_einsum_equals_jnp_einsum(equation, xs, ws):
  kx, kw = jax.random.split(jax.random.key(0))
  x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
  got = weight_einsum(equation, x, w)
  want = np.einsum(equation.lower(), np.asarray(x, np.float64), np.asarray(w, np.float64))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])
def test_bfloat16_rows_accumulate_in_float32_like_einsum(rows):
  # One bf16 row takes a two-row matmul on CPU (see weight_einsum); the products of bf16 values are
  # exact in float32, so both paths agree to float32 rounding of the sums.
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (rows, 1, 64)).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (300, 64)).astype(jnp.bfloat16)
  got = weight_einsum("BTD,VD->BTV", x, w, preferred_element_type=jnp.float32)
  want = np.einsum("btd,vd->btv", np.asarray(x, np.float64), np.asarray(w, np.float64))
  assert got.shape == (rows, 1, 300) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation,xs,ws", CASES[:5], ids=[c[0] for c in CASES[:5]])
def test_gradients_of_x_and_w_equal_the_float64_einsums(equation, xs, ws):
  # weight_einsum's matmul has a written-out backward pass (layers._dot: one operand transposed before
  # the weight's gradient, for XLA:CPU); both cotangents must still be the einsum's.
  kx, kw, kc = jax.random.split(jax.random.key(2), 3)
  x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
  (ins, out), (xl, wl) = equation.split("->"), equation.split("->")[0].split(",")
  cot = jax.random.normal(kc, weight_einsum(equation, x, w).shape)
  gx, gw = jax.grad(lambda x, w: jnp.sum(weight_einsum(equation, x, w) * cot), argnums=(0, 1))(x, w)
  x64, w64, c64 = (np.asarray(v, np.float64) for v in (x, w, cot))
  np.testing.assert_allclose(gx, np.einsum(f"{out},{wl}->{xl}".lower(), c64, w64), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, np.einsum(f"{out},{xl}->{wl}".lower(), c64, x64), rtol=1e-5, atol=1e-5)


def test_a_float32_cotangent_of_a_bfloat16_product_is_taken_as_autodiff_takes_it():
  # preferred_element_type=float32 on bfloat16 operands (the logits): the backward meets the float32
  # cotangent in float32, as jax's transpose of dot_general does: the same bfloat16 gradients up to the
  # rounding of float32 sums taken in another order (one bfloat16 ulp).
  kx, kw = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (2, 3, 16)).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (40, 16)).astype(jnp.bfloat16)
  f = lambda x, w: jnp.sum(jnp.sin(weight_einsum("BTD,VD->BTV", x, w, preferred_element_type=jnp.float32)))
  g = lambda x, w: jnp.sum(jnp.sin(jnp.einsum("BTD,VD->BTV", x, w, preferred_element_type=jnp.float32)))
  for got, want in zip(jax.grad(f, argnums=(0, 1))(x, w), jax.grad(g, argnums=(0, 1))(x, w)):
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2**-8, atol=1e-6)

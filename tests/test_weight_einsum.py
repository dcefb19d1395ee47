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

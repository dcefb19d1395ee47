"""Simple ops against hand-computed references (f32, 1e-5)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax.attention import attention_mask
from gemma_jax.layers import Embedder, RMSNorm
from gemma_jax.rope import apply_rope


def test_rmsnorm_matches_models_md_example():
  norm = RMSNorm(2, "D", eps=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(norm(jnp.array([[0.1, 0.2]])), [[0.6324429, 1.2648858]], rtol=1e-5)


def test_rmsnorm_scale_is_zero_centred():
  norm = RMSNorm(3, "D", eps=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(0))
  norm.scale[...] = jnp.array([0.5, -1.0, 2.0])
  x = np.array([[1.0, -2.0, 3.0]], np.float32)
  want = x / np.sqrt(np.mean(x ** 2) + 1e-6) * (1 + np.array([0.5, -1.0, 2.0]))
  np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-5)


def test_rope_rotates_halves_with_scaled_positions():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = np.array([[0, 1, 2, 3, 40], [7, 8, 9, 10, 11]])
  for base, scale in [(10_000.0, 1.0), (1_000_000.0, 8.0)]:
    inv = 1.0 / base ** (np.arange(0, 8, 2) / 8)
    ang = pos[..., None, None] / scale * inv  # (B, T, 1, H/2)
    x1, x2 = x[..., :4], x[..., 4:]
    want = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.asarray(pos), base=base, scale=scale), want,
                               rtol=1e-5, atol=1e-5)


def test_embedder_scales_by_sqrt_d_in_activation_dtype():
  emb = Embedder(4, 3072, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  emb.input_embedding[...] = jnp.ones((4, 3072), jnp.bfloat16)
  # sqrt(3072) = 55.43 rounds to 55.5 in bf16, the value the official model was trained with.
  assert float(emb.encode(jnp.array([[1]]))[0, 0, 0]) == 55.5


def test_attention_mask_causal_window_and_empty_slots():
  q = jnp.array([[5, 6]])
  k = jnp.array([[-1, 2, 3, 4, 5, 6, 7]])
  got = np.asarray(attention_mask(q, k, window=3))[0]
  assert got.tolist() == [[False, False, True, True, True, False, False],
                          [False, False, False, True, True, True, False]]
  assert np.asarray(attention_mask(q, k, window=None))[0, 1].tolist() == [False, True, True, True, True, True, False]

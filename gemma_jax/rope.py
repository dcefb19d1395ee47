"""Rotary position embedding (rotate-half layout), a pure function."""

from __future__ import annotations

import jax.numpy as jnp

from .shapes import Array, Float, Positions


def apply_rope(x: Float[Array, "B T heads H"], positions: Positions, *, base: float, scale: float = 1.0
               ) -> Float[Array, "B T heads H"]:
  """Rotates x (B, T, heads, H) by angles positions (B, T) * base^(-2i/H) / scale, in float32.

  heads is N for queries and K for keys. Rotate-half: the first and second halves of H form the (real,
  imaginary) pairs, as in the official gemma/positional_embeddings.py, not interleaved pairs. Gemma 3's
  global layers divide positions by `scale` (8 from 4B up). Inverse frequencies are computed as
  1 / base^(2i/H), as Hugging Face does, so that both implementations round alike.
  """
  h = x.shape[-1]
  inv_freq = 1.0 / (jnp.float32(base) ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles = positions.astype(jnp.float32)[..., None] * (inv_freq / jnp.float32(scale))  # (B, T, H/2)
  sin = jnp.sin(angles)[..., None, :]
  cos = jnp.cos(angles)[..., None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)

"""The one dimension alphabet used in einsums, shape annotations and sharding specs.

  B  batch                      T  query positions (tokens fed in this call)
  S  key/value positions        D  embedding (model) width
  F  MLP width per GeGLU branch N  query heads
  K  key/value heads            G  query heads per kv head (N // K)
  H  head dimension             V  vocabulary rows
  L  layers                     C  a stacked pair of weights: [k, v] or [gate, up] (axis name "_")

Shape annotations use jaxtyping with these letters, e.g. ``Float[Array, "B T D"]``.
"""

from jaxtyping import Array, Float, Int

Tokens = Int[Array, "B T"]
Positions = Int[Array, "B T"]
Hidden = Float[Array, "B T D"]
Logits = Float[Array, "B T V"]

__all__ = ["Array", "Float", "Int", "Tokens", "Positions", "Hidden", "Logits"]

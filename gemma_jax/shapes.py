"""The one dimension alphabet used in einsums, shape annotations and sharding specs.

  B  batch                      T  query positions (tokens fed in this call)
  S  key/value positions        D  embedding (model) width
  F  MLP width per GeGLU branch N  query heads
  K  key/value heads            G  query heads per kv head (N // K)
  H  head dimension             V  vocabulary rows
  L  layers                     C  a stacked pair of weights: [k, v] or [gate, up] (axis name "_")
  R  LoRA rank (lora.py: the inner dimension of an adapter's A (in..., R) and B (R, out...))

Shape annotations use jaxtyping with these letters, e.g. ``Float[Array, "B T D"]``; the test run checks
them (tests/conftest.py installs jaxtyping's import hook), under jit on the tracers' shapes too. Sharding
names array dimensions with the same letters (LOGICAL_AXES), and sharding.py maps them to mesh axes.
"""

from typing import TypeVar

from jaxtyping import Array, Bool, Float, Int

_T = TypeVar("_T")

# Logical axis names of array dimensions: every letter above, with "_" for C, a stacked dimension that has
# no sharding meaning. sharding.py's rule tables name exactly these.
LOGICAL_AXES: tuple[str, ...] = tuple("BTSDFNKGHVLR") + ("_",)

# Logical axes of each cache.LayerCache array: the one place that states the cache layout. cache.init_cache
# builds shapes from it and sharding.py places and constrains by it; it lives here so that both read it
# without importing each other (cache.py pins its writes with sharding.pin). k_scale and v_scale exist only
# in an int8 cache (one float32 scale per row, slot and kv head; None otherwise): they are split like k and v.
CACHE_AXES: dict[str, tuple[str, ...]] = {"k": ("B", "S", "K", "H"), "v": ("B", "S", "K", "H"), "pos": ("B", "S"),
                                          "k_scale": ("B", "S", "K"), "v_scale": ("B", "S", "K")}


def unchecked_fields(cls: type[_T]) -> type[_T]:
  """Keeps a pytree dataclass's fields unchecked when it is built (its annotations still say the shapes).

  JAX rebuilds pytrees with whatever sits at the leaves -- ShapeDtypeStructs under jax.eval_shape, shardings
  or None in tree maps -- so a check of the fields when the dataclass is built would reject JAX's own
  rebuilds; the functions that take and return the dataclass check its arrays instead. Apply it under the
  dataclass decorator: jaxtyping reads `__no_type_check__` on __init__ at call time.
  """
  cls.__init__.__no_type_check__ = True
  return cls


Tokens = Int[Array, "B T"]
Positions = Int[Array, "B T"]  # absolute positions, -1 marks padding
Hidden = Float[Array, "B T D"]
Logits = Float[Array, "B T V"]

__all__ = ["Array", "Bool", "Float", "Int", "CACHE_AXES", "LOGICAL_AXES", "Tokens", "Positions", "Hidden", "Logits",
           "unchecked_fields"]

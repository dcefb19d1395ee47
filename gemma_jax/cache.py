"""The KV cache: a typed pytree of per-layer keys, values and the position held in each slot.

Local (sliding-window) layers get a ring buffer of min(window, cache_len) slots: position p lives in
slot p % slots, so generation can run far past the window in constant memory. Global layers get
cache_len slots, position p in slot p. Each slot records the position it holds (-1 when empty); masks
are built from these positions, never from slot indices, which keeps ring buffers exact.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from .configs import LOCAL, ModelConfig
from .shapes import CACHE_AXES, Array, Float, Int, Positions, unchecked_fields
from .sharding import pin

EMPTY = -1


@unchecked_fields
@struct.dataclass
class LayerCache:
  """One layer's cache.

  Attributes:
    k: (B, S, K, H) keys, RoPE already applied.
    v: (B, S, K, H) values.
    pos: (B, S) int32 position held by each slot, EMPTY (-1) if none.
    ring: static; True for a sliding-window ring buffer.
    shardings: static; where k, v and pos live on a mesh ({field: Sharding}), None on one device.
  """

  k: Float[Array, "B S K H"]
  v: Float[Array, "B S K H"]
  pos: Int[Array, "B S"]
  ring: bool = struct.field(pytree_node=False, default=False)
  shardings: tuple[tuple[str, jax.sharding.Sharding], ...] | None = struct.field(pytree_node=False, default=None)

  def _placed(self, field: str, x: jax.Array) -> jax.Array:
    """x, laid out like this cache's `field`, pinned to where that array lives (sharding.pin says why)."""
    return pin(x, None if self.shardings is None else dict(self.shardings)[field])

  @property
  def num_slots(self) -> int:
    return self.k.shape[1]

  def write(self, k_new: Float[Array, "B T K H"], v_new: Float[Array, "B T K H"], positions: Positions) -> LayerCache:
    """Stores a chunk: k_new/v_new (B, T, K, H) at positions (B, T) (EMPTY marks padding).

    Global caches put position p in slot p; the caller guarantees p < S (decode checks lengths before
    tracing, so nothing is dropped silently). Ring caches put p in slot p % S and keep only each row's
    last S positions of the chunk, so no two tokens of one write land in the same slot.
    """
    s = self.num_slots
    valid = positions >= 0
    if self.ring:
      last = jnp.max(positions, axis=1, keepdims=True)
      keep = valid & (positions > last - s)
      slots = jnp.where(keep, positions % s, s)
    else:
      slots = jnp.where(valid, positions, s)
    rows = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)
    # mode="drop": slot index s is out of bounds on purpose for padding and superseded tokens. The
    # updates have the cache's layout (T in place of S), so they take the cache's sharding.
    return self.replace(
        k=self._placed("k", self.k).at[rows, slots].set(self._placed("k", k_new.astype(self.k.dtype)), mode="drop"),
        v=self._placed("v", self.v).at[rows, slots].set(self._placed("v", v_new.astype(self.v.dtype)), mode="drop"),
        pos=self._placed("pos", self.pos).at[rows, slots].set(self._placed("pos", positions), mode="drop"),
    )


Cache = tuple[LayerCache, ...]


def layer_slots(config: ModelConfig, cache_len: int) -> tuple[int, ...]:
  """Slots per layer: min(window, cache_len) for local layers, cache_len for global ones."""
  return tuple(min(config.sliding_window, cache_len) if t == LOCAL else cache_len
               for t in config.attention_types)


Placement = Callable[[tuple[str, ...], tuple[int, ...]], "jax.sharding.Sharding | None"]


def init_cache(config: ModelConfig, batch_size: int, cache_len: int, dtype=None, rolling: bool = False,
               place: Placement | None = None) -> Cache:
  """An empty cache for `batch_size` rows holding positions [0, cache_len) on global layers.

  rolling: global layers become ring buffers too, keeping the most recent cache_len tokens; attention
  to older tokens is lost (an explicit opt-in for conversations longer than the cache; see README).
  place: maps an array's logical axes (CACHE_AXES) and shape to the sharding it is created in
    (sharding.Layout.sharding), so a sharded cache is never whole on one device; default: the default device.
  """
  if cache_len < 1 or batch_size < 1:
    raise ValueError(f"cache needs batch_size >= 1 and cache_len >= 1, got {batch_size}, {cache_len}")
  dtype = jnp.dtype(dtype or config.dtype)

  def layer(slots: int, ring: bool) -> LayerCache:
    sizes = {"B": batch_size, "S": slots, "K": config.num_kv_heads, "H": config.head_dim}
    shapes = {f: tuple(sizes[a] for a in axes) for f, axes in CACHE_AXES.items()}
    where = {f: place(CACHE_AXES[f], shape) for f, shape in shapes.items()} if place else {}
    full = lambda f, value, dt: jnp.full(shapes[f], value, dt, device=where.get(f))
    return LayerCache(k=full("k", 0, dtype), v=full("v", 0, dtype), pos=full("pos", EMPTY, jnp.int32), ring=ring,
                      shardings=tuple(where.items()) if place else None)

  return tuple(layer(s, rolling or t == LOCAL) for s, t in zip(layer_slots(config, cache_len), config.attention_types))


def resize_cache(config: ModelConfig, cache: Cache, cache_len: int, rolling: bool = False,
                 place: Placement | None = None) -> Cache:
  """The same cached tokens in a cache of a new cache_len (growing a conversation's cache).

  Every filled slot moves to where its position belongs in the new layout (p on global layers, p % S
  on rings), so the result is what feeding the same tokens into a fresh cache of that size gives, as
  long as the new cache can hold them. place: as for init_cache.
  """
  batch = cache[0].pos.shape[0]
  fresh = init_cache(config, batch, cache_len, cache[0].k.dtype, rolling, place)
  out = []
  for old, new in zip(cache, fresh):
    s = new.num_slots
    # Keep each row's newest s positions (a ring that shrinks, or a rolling cache), no duplicate slots.
    newest = jnp.max(old.pos, axis=1, keepdims=True)
    keep = (old.pos >= 0) & (old.pos > newest - s)
    slots = jnp.where(keep, old.pos % s if new.ring else old.pos, s)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], old.pos.shape)
    out.append(new.replace(k=new.k.at[rows, slots].set(old.k, mode="drop"),
                           v=new.v.at[rows, slots].set(old.v, mode="drop"),
                           pos=new.pos.at[rows, slots].set(jnp.where(keep, old.pos, EMPTY), mode="drop")))
  return tuple(out)


def cache_bytes(config: ModelConfig, batch_size: int, cache_len: int, dtype=None) -> int:
  """Bytes the cache of init_cache(...) occupies, computed without allocating it."""
  itemsize = jnp.dtype(dtype or config.dtype).itemsize
  per_slot = 2 * config.num_kv_heads * config.head_dim * itemsize + 4
  return batch_size * per_slot * sum(layer_slots(config, cache_len))

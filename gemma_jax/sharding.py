"""Meshes and the partition rules for params, cache and batch.

The only module that builds meshes. JAX does the distribution (jax.sharding, GSPMD inside jit,
jax.distributed across hosts); this module says where every array goes:

  mesh = make_mesh("data=1,model=-1")        # 2 named axes over the devices; -1 takes the rest
  layout = Layout(mesh, GENERATION)          # a mesh plus a rule set
  layout.sharding(("B", "S", "K", "H"), shape)   # -> NamedSharding(mesh, P("data", None, "model", None))

Every parameter carries its logical axes (layers.py: `nnx.Param(..., axes=("V", "D"))`), every cache
array has them in shapes.CACHE_AXES, and a rule set maps each logical axis (shapes.py alphabet) to a mesh
axis or to None (replicated). A parameter with an axis the rules do not name is an error, never a
silent replication.

Fallback, the same for every array: a dimension whose size the mesh axis does not divide is replicated
along that axis (JAX shards only evenly), and a mesh axis already used by another dimension of the same
array is not used twice. What it means for the real models on a model axis of 8:
  - MQA (Gemma 1 2B, Gemma 3 270M/1B: one kv head): kv_einsum and the KV cache are replicated over
    `model`; the cache stays split over `data` by batch. Gemma 3 270M/1B also have N = 4 query heads, so
    q_einsum and attn_vec_einsum are replicated too; the MLP and the vocabulary stay split.
  - GQA with K < model (Gemma 2 27B on model=32: K = 16): kv weights and cache replicated over `model`.
Replication costs memory, never correctness: plan.py (`python -m gemma_jax.sample --plan`) shows the bytes.

Every sharding constraint of the library is made here: Layout.constrain / constrain / constrain_cache for
jitted outputs, and pin() for the cache's writes (cache.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING, Iterable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import GemmaError
from .shapes import CACHE_AXES, LOGICAL_AXES

if TYPE_CHECKING:  # cache.py places its writes with pin(), so it imports this module, not the reverse
  from .cache import Cache

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)
DEFAULT_MESH = "data=1,model=-1"


@dataclasses.dataclass(frozen=True)
class Rules:
  """A rule set: (logical axis, mesh axis or None) pairs, resolved in this order for each array.

  Order matters only when two dimensions of one array ask for the same mesh axis: the earlier pair wins
  and the later dimension is replicated.
  """

  name: str
  table: tuple[tuple[str, str | None], ...]

  def __post_init__(self):
    names = [a for a, _ in self.table]
    unknown = sorted({a for a in names if a not in LOGICAL_AXES} | {m for _, m in self.table
                                                                     if m not in (None, *MESH_AXES)})
    if unknown or len(set(names)) != len(names):
      raise ValueError(f"rules {self.name!r}: unknown or repeated axes {unknown or names}")

  def mesh_axis(self, logical: str) -> str | None:
    return dict(self.table)[logical]

  def covers(self, logical: str) -> bool:
    return any(a == logical for a, _ in self.table)


# Sampling: model parallel over heads (N, K), MLP width (F) and vocabulary (V) -- Megatron-style, so
# each block needs one all-reduce after attention and one after the MLP; params are replicated over
# `data`, which splits the batch (and with it the KV cache).
GENERATION = Rules("generation", (
    ("K", MODEL), ("N", MODEL), ("F", MODEL), ("V", MODEL), ("B", DATA),
    ("D", None), ("H", None), ("S", None), ("T", None), ("G", None), ("L", None), ("_", None), ("R", None)))

# Training: the same model parallelism plus FSDP, every parameter's D split over `data` (ZeRO-3: each
# device holds 1/(data*model) of most matrices and XLA gathers them per use), batch over `data`.
TRAINING = Rules("training", (
    ("K", MODEL), ("N", MODEL), ("F", MODEL), ("V", MODEL), ("B", DATA), ("D", DATA),
    ("H", None), ("S", None), ("T", None), ("G", None), ("L", None), ("_", None), ("R", None)))

# R (a LoRA adapter's rank, lora.py) is replicated in both: it is small (4 to 64), and an adapter's other axis
# (D, N, K, F) follows its weight's rule, so A and B split like the matrix they adapt.
RULES = {r.name: r for r in (GENERATION, TRAINING)}


def get_rules(rules: Rules | str) -> Rules:
  """A Rules object, or the rule set of that name ("generation", "training")."""
  if isinstance(rules, Rules):
    return rules
  if rules not in RULES:
    raise GemmaError(f"unknown rule set {rules!r}; known: {', '.join(RULES)}")
  return RULES[rules]


# ---- meshes ---------------------------------------------------------------------------------------

def parse_mesh_spec(spec: str, device_count: int | None) -> dict[str, int]:
  """"data=2,model=-1" -> {"data": 2, "model": device_count // 2}; axes left out have size 1.

  A size of -1 (at most one) takes the devices the others leave. The product must divide device_count
  (a mesh may use the first devices only); anything else is a GemmaError naming the problem.
  device_count None (a memory plan for devices this machine may not have): the sizes as written, and
  -1 takes this machine's devices.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise GemmaError(f"empty mesh spec; write e.g. {DEFAULT_MESH!r}")
  sizes: dict[str, int] = {}
  for part in spec.split(","):
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(-?\d+)\s*", part)
    if not m:
      raise GemmaError(f"mesh spec {spec!r}: {part.strip()!r} is not AXIS=SIZE (e.g. {DEFAULT_MESH!r})")
    name, size = m.group(1), int(m.group(2))
    if name not in MESH_AXES:
      raise GemmaError(f"mesh spec {spec!r}: unknown axis {name!r}; the axes are {' and '.join(MESH_AXES)}")
    if name in sizes:
      raise GemmaError(f"mesh spec {spec!r}: axis {name!r} is given twice")
    if size == 0 or size < -1:
      raise GemmaError(f"mesh spec {spec!r}: size of {name!r} must be a positive integer or -1, got {size}")
    sizes[name] = size
  if list(sizes.values()).count(-1) > 1:
    raise GemmaError(f"mesh spec {spec!r}: only one axis may be -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if device_count is None:
    device_count = jax.device_count() if -1 in sizes.values() else fixed
  for name, size in sizes.items():
    if size == -1:
      if device_count % fixed:
        raise GemmaError(f"mesh spec {spec!r}: the other axes ({fixed}) do not divide the {device_count} "
                         f"devices, so {name}=-1 has no size")
      sizes[name] = device_count // fixed
  total = math.prod(sizes.values())
  if device_count % total:
    raise GemmaError(f"mesh spec {spec!r} needs {total} devices, which does not divide the {device_count} "
                     "available")
  return {a: sizes.get(a, 1) for a in MESH_AXES}


def make_mesh(spec: str = DEFAULT_MESH, devices: Iterable[jax.Device] | None = None) -> Mesh:
  """A ("data", "model") mesh over the devices, e.g. make_mesh("data=2,model=4").

  Uses jax.make_mesh, which orders devices for the physical topology (rings on TPU). With more devices
  than the spec needs, the first ones are used -- in a single process only: across hosts every
  process's devices must be in the mesh. Axes are AxisType.Auto: XLA's partitioner propagates the
  shardings of params, cache and batch through the model, so the modules carry no annotations.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec, len(devices))
  used = math.prod(sizes.values())
  if used < len(devices) and jax.process_count() > 1:
    raise GemmaError(f"mesh spec {spec!r} uses {used} of the {len(devices)} devices; across "
                     f"{jax.process_count()} processes a mesh must use all of them")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=auto,
                       devices=devices[:used])


def mesh_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
  """{"data": ..., "model": ...} of a mesh (or of a dict of sizes, for plans without devices)."""
  shape = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
  return {a: int(shape.get(a, 1)) for a in MESH_AXES}


def describe_mesh(mesh: Mesh | Mapping[str, int]) -> str:
  """"data=1,model=8": the spec that builds this mesh."""
  return ",".join(f"{a}={s}" for a, s in mesh_sizes(mesh).items())


# ---- rules -> partition specs -----------------------------------------------------------------------

def partition_spec(axes: tuple[str, ...], shape: tuple[int, ...], rules: Rules,
                   sizes: Mapping[str, int], what: str = "array") -> PartitionSpec:
  """The PartitionSpec of an array with these logical axes and shape under the rules.

  Each dimension gets its logical axis's mesh axis, unless that mesh axis does not divide the size or
  an earlier rule of the table already used it in this array: then the dimension is replicated.
  """
  if len(axes) != len(shape):
    raise GemmaError(f"{what}: logical axes {axes} do not match its shape {tuple(shape)}")
  missing = [a for a in axes if not rules.covers(a)]
  if missing:
    raise GemmaError(f"{what} has logical axes {axes}, but the {rules.name} sharding rules cover no "
                     f"axis {missing[0]!r}; add it to the rules table (sharding.py)")
  spec: list[str | None] = [None] * len(axes)
  used: set[str] = set()
  for logical, mesh_axis in rules.table:
    for i, a in enumerate(axes):
      if a != logical or mesh_axis is None or mesh_axis in used:
        continue
      if shape[i] % sizes[mesh_axis] == 0:
        spec[i] = mesh_axis
        used.add(mesh_axis)
  return PartitionSpec(*spec)


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
  """The shape each device holds of an array of `shape` partitioned by `spec`."""
  out = []
  for i, n in enumerate(shape):
    entry = spec[i] if i < len(spec) else None
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    out.append(n // math.prod(sizes[a] for a in names))
  return tuple(out)


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_axes(state: nnx.State) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], np.dtype]]:
  """{flat path: (logical axes, shape, dtype)} of every Param in a (possibly abstract) state.

  A parameter without `axes` metadata is an error: the rules could not place it.
  """
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  for path, var in leaves:
    axes = var.get_metadata().get("axes") if isinstance(var, nnx.Variable) else None
    if axes is None:
      raise GemmaError(f"parameter {_path(path)} has no logical axes (`axes=` metadata), so no sharding "
                       "rule can place it")
    value = var.get_value()
    out[_path(path)] = (tuple(axes), tuple(value.shape), np.dtype(value.dtype))
  return out


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh and a rule set: the sharding of every param, cache array and batch input.

  Hashable, so the jitted functions take it as a static argument and constrain their outputs with it.
  """

  mesh: Mesh
  rules: Rules = GENERATION

  @classmethod
  def of(cls, mesh: Mesh | str, rules: Rules | str = GENERATION) -> "Layout":
    """A Layout from a Mesh or a mesh spec ("data=1,model=-1") and a rule set or its name."""
    return cls(make_mesh(mesh) if isinstance(mesh, str) else mesh, get_rules(rules))

  @property
  def sizes(self) -> dict[str, int]:
    return mesh_sizes(self.mesh)

  @property
  def batch_multiple(self) -> int:
    """Batches are padded to a multiple of this (the mesh axis that B is split over)."""
    axis = self.rules.mesh_axis("B")
    return self.sizes[axis] if axis else 1

  def spec(self, axes: tuple[str, ...], shape: tuple[int, ...], what: str = "array") -> PartitionSpec:
    return partition_spec(axes, shape, self.rules, self.sizes, what)

  def sharding(self, axes: tuple[str, ...], shape: tuple[int, ...], what: str = "array") -> NamedSharding:
    """NamedSharding for an array with these logical axes and shape (cache.init_cache's `place`)."""
    return NamedSharding(self.mesh, self.spec(axes, shape, what))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def param_shardings(self, state: nnx.State) -> dict[str, NamedSharding]:
    """{flat path: NamedSharding} for every param; GemmaError for a param the rules do not cover."""
    return {p: self.sharding(axes, shape, f"parameter {p}") for p, (axes, shape, _) in param_axes(state).items()}

  def shard_params(self, state: nnx.State) -> nnx.State:
    """A copy of the params placed as the rules say (for params already in memory, e.g. random ones)."""
    shardings = self.param_shardings(state)
    return jax.tree_util.tree_map_with_path(
        lambda path, var: var.replace(jax.device_put(var.get_value(), shardings[_path(path)])),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))

  def put(self, x, axes: tuple[str, ...] | None = None) -> jax.Array:
    """A host array placed as a batch input with these logical axes (None: replicated).

    Every process must pass the same values (multi-host programs are the same program everywhere).
    """
    x = np.asarray(x)
    return jax.device_put(x, self.replicated() if axes is None else self.sharding(axes, x.shape))

  # -- inside jit --
  def constrain(self, x: jax.Array, axes: tuple[str, ...] | None = None) -> jax.Array:
    """with_sharding_constraint to the rules' sharding (None: replicated, e.g. outputs hosts read)."""
    sharding = self.replicated() if axes is None else self.sharding(axes, x.shape)
    return jax.lax.with_sharding_constraint(x, sharding)

  def constrain_cache(self, cache: Cache) -> Cache:
    """Keeps the cache where the rules put it, so a donated cache is reused in place call after call.

    Every array of CACHE_AXES that the cache has (an int8 cache's scales too; a float cache has none).
    """
    return tuple(layer.replace(**{f: self.constrain(getattr(layer, f), axes) for f, axes in CACHE_AXES.items()
                                  if getattr(layer, f) is not None})
                 for layer in cache)


def constrain(layout: Layout | None, x: jax.Array, axes: tuple[str, ...] | None = None) -> jax.Array:
  """layout.constrain(x, axes), or x unchanged without a layout (one device)."""
  return x if layout is None else layout.constrain(x, axes)


def constrain_cache(layout: Layout | None, cache: Cache) -> Cache:
  """layout.constrain_cache(cache), or the cache unchanged without a layout (one device)."""
  return cache if layout is None else layout.constrain_cache(cache)


def pin(x: jax.Array, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """x constrained to `sharding` (inside jit), or x unchanged when there is none (one device).

  cache.LayerCache.write pins each update to where the cache array it goes into lives: without it XLA
  may compute a write split another way than the cache and gather the result back (for GQA with kv heads
  that do not divide the model axis it split the scatter over K and all-gathered the whole layer's cache
  on every decode step).
  """
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


__all__ = ["DATA", "MODEL", "DEFAULT_MESH", "GENERATION", "TRAINING", "Layout", "Rules", "constrain",
           "constrain_cache", "get_rules", "make_mesh", "mesh_sizes", "parse_mesh_spec", "partition_spec", "pin",
           "shard_shape"]

"""Memory plan: the bytes of params and KV cache on each device, from shapes alone, before anything loads.

  p = plan.for_model(get_preset("gemma2_27b"), "data=1,model=8", batch_size=4, cache_len=8192)
  p.rows[-1].device_bytes        # params + cache on each of the 8 devices, in bfloat16

`python -m gemma_jax.sample --plan` prints it. Replication (sharding.py's fallback for dimensions a mesh
axis does not divide) shows up here as bytes, so a plan tells whether a model fits before it is converted.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh

from . import checkpoint
from .cache import Cache, cache_dtype, init_cache
from .configs import ModelConfig, get_preset
from .errors import GemmaError
from .qarray import nbytes
from .shapes import CACHE_AXES
from .sharding import (DEFAULT_MESH, GENERATION, Rules, get_rules, mesh_sizes, param_axes, parse_mesh_spec,
                       partition_spec, shard_shape)
from .transformer import abstract_model


@dataclasses.dataclass(frozen=True)
class PlanRow:
  """One group of arrays: total bytes, and bytes on each device (the same on all: shards are even)."""

  name: str
  total_bytes: int
  device_bytes: int


def _group(path: str) -> str:
  if path.startswith("embedder/"):
    return "params: embedding"
  if "/attn/" in path and not path.endswith("norm/scale"):
    return "params: attention"
  if "/mlp/" in path:
    return "params: mlp"
  return "params: norms"


def memory_plan(params: nnx.State, cache: Cache, rules: Rules | str,
                mesh: Mesh | Mapping[str, int]) -> list[PlanRow]:
  """Per-device bytes of params and KV cache under the rules, from shapes alone (nothing allocated).

  Args:
    params: the model's (abstract) params, e.g. transformer.abstract_model(config)[1].
    cache: the (abstract) cache, e.g. jax.eval_shape(lambda: cache.init_cache(config, batch, cache_len)).
    mesh: a Mesh, or {"data": d, "model": m} to plan for devices this machine does not have.
  Returns:
    rows for the param groups, "params", "kv cache" and "total".
  """
  rules, sizes = get_rules(rules), mesh_sizes(mesh)
  rows: dict[str, list[int]] = {}

  def add(name, shape, dtype, axes, what):
    spec = partition_spec(axes, shape, rules, sizes, what)
    for key in (name, "params" if name.startswith("params") else None):
      if key:
        acc = rows.setdefault(key, [0, 0])
        acc[0] += nbytes(shape, dtype)  # int4 half a byte (qarray.py)
        acc[1] += nbytes(shard_shape(shape, spec, sizes), dtype)

  for path, (axes, shape, dtype) in param_axes(params).items():
    add(_group(path), shape, dtype, axes, f"parameter {path}")
  for i, layer in enumerate(cache):
    for f, axes in CACHE_AXES.items():
      x = getattr(layer, f)
      if x is not None:  # an int8 cache's scales; a float cache has none
        add("kv cache", x.shape, x.dtype, axes, f"cache layer {i} {f}")
  order = sorted(k for k in rows if k.startswith("params: ")) + ["params", "kv cache"]
  out = [PlanRow(k, *rows[k]) for k in order if k in rows]
  out.append(PlanRow("total", rows["params"][0] + rows.get("kv cache", [0, 0])[0],
                     rows["params"][1] + rows.get("kv cache", [0, 0])[1]))
  return out


@dataclasses.dataclass(frozen=True)
class Plan:
  """A memory plan for one model, batch and cache length on a mesh of `mesh` sizes.

  Attributes:
    model, dtype: the config's name and the dtype planned for.
    kv_cache_dtype: what the cache stores k and v as (dtype unless int8 or another float was asked for).
    mesh: {"data": d, "model": m}.
    rows: param groups, "params", "kv cache" and "total" (memory_plan's rows).
  """

  model: str
  dtype: str
  kv_cache_dtype: str
  mesh: dict[str, int]
  batch_size: int
  cache_len: int
  rules: str
  rows: tuple[PlanRow, ...]

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())

  def to_dict(self) -> dict[str, Any]:
    """The plan as JSON-ready data (what `sample --plan --json` prints)."""
    return {"model": self.model, "dtype": self.dtype, "kv_cache_dtype": self.kv_cache_dtype, "mesh": self.mesh, "batch_size": self.batch_size,
            "cache_len": self.cache_len, "rules": self.rules,
            "rows": [{"name": r.name, "total_bytes": r.total_bytes, "device_bytes": r.device_bytes}
                     for r in self.rows]}


def config_for(preset: str | None = None, ckpt: str | os.PathLike | None = None) -> ModelConfig:
  """The config to plan for: a preset by name, or the one stored in a checkpoint; exactly one of them.

  The errors name the sample CLI's flags, which carry these two arguments.
  """
  if preset is not None and ckpt is not None:
    raise GemmaError("--plan takes --preset or --ckpt, not both")
  if preset is not None:
    try:
      return get_preset(preset)
    except ValueError as e:
      raise GemmaError(str(e)) from None
  if ckpt is not None:
    return checkpoint.read_config(ckpt)
  raise GemmaError("--plan needs --preset NAME or --ckpt DIR")


def for_model(config: ModelConfig, mesh: str | Mesh | Mapping[str, int] | None = None, batch_size: int = 1,
              cache_len: int | None = None, dtype: str | None = None, rules: Rules | str = GENERATION,
              kv_cache_dtype: str | None = None) -> Plan:
  """The memory plan of `config` serving `batch_size` rows of `cache_len` tokens on a mesh.

  Args:
    mesh: a spec such as "data=1,model=8" (devices this machine need not have; default DEFAULT_MESH on
      this machine's devices), a Mesh, or {"data": d, "model": m}.
    cache_len: tokens the cache holds; default the model's context (config.max_seq_len).
    dtype: of params and cache; default bfloat16, what accelerators run (the CLIs' default there), so a
      plan is made for them wherever it runs.
    kv_cache_dtype: what the cache stores k and v as ("float32", "bfloat16", "int8"); default: dtype.
  Errors (GemmaError) name the sample CLI's flags (--cache-len, --batch-size, --mesh).
  """
  config = config.replace(dtype=dtype or "bfloat16")
  kv_dtype = cache_dtype(config, kv_cache_dtype)  # an unknown name is a GemmaError naming the known ones
  cache_len = config.max_seq_len if cache_len is None else cache_len
  if not 1 <= cache_len <= config.max_seq_len:
    raise GemmaError(f"--cache-len must be in [1, {config.max_seq_len}] (the model's context), got {cache_len}")
  if batch_size < 1:
    raise GemmaError(f"--batch-size must be >= 1, got {batch_size}")
  mesh = DEFAULT_MESH if mesh is None else mesh
  sizes = parse_mesh_spec(mesh, None) if isinstance(mesh, str) else mesh_sizes(mesh)
  rules = get_rules(rules)
  params = abstract_model(config)[1]
  cache = jax.eval_shape(lambda: init_cache(config, batch_size, cache_len, kv_dtype))
  rows = memory_plan(params, cache, rules, sizes)
  return Plan(config.name, config.dtype, kv_dtype.name, sizes, batch_size, cache_len, rules.name, tuple(rows))


__all__ = ["Plan", "PlanRow", "config_for", "for_model", "memory_plan"]

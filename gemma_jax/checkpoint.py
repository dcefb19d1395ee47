"""Our checkpoint format: one directory with Orbax params, the config and the tokenizer.

  DIR/config.json      {"format": "gemma_jax", "version": 1, "config": {...ModelConfig...}, "source": ...}
  DIR/params/          Orbax checkpoint of the nested param dict (official names, D-major projections: layer_0/attn/q_einsum/w (D, N, H))
  DIR/tokenizer.model  sentencepiece model (absent for checkpoints imported without one)

The only module that imports Orbax (with train.py's CheckpointManager). Restores go straight into the requested dtype and shardings after
the stored shapes are checked against the config, so a mismatch names the parameter and both shapes
instead of failing deep inside Orbax or, worse, restoring silently.

Arrays are stored in chunks of at most CHUNK_BYTES, so a sharded restore reads each device's slice
chunk by chunk: no parameter is ever whole in host memory or on one device (a single-chunk array
would be decoded whole for every slice).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from .configs import ModelConfig
from .errors import GemmaError
from .sharding import Layout
from .transformer import abstract_model, flat_params, param_shapes, set_flat_params, state_path
from .tree import flatten, unflatten

FORMAT = "gemma_jax"
# 2: D-major projection layouts (q (D, N, H), kv (D, K, 2, H), gating (F, 2, D)); 1 had the official ones.
VERSION = 2
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.model"
# Storage chunk size. Orbax splits the largest dimensions first (Gemma 3 270M's float32 (V, D) embedding
# becomes 16 chunks of 16384 rows), so a vocab-sharded slice reads only its own chunks. Measured on the
# 270M: restoring it 8-way took 12 s unchunked (each slice decodes the whole 671 MB array) and 2.6 s
# chunked; 16 MiB chunks raised the one-device restore peak from 1.26x to 1.5x the params, 64 MiB did not.
CHUNK_BYTES = 64 << 20
# Host bytes a restore may have in flight at least (Orbax's byte limiter); more when one slice needs it.
MIN_RESTORE_BYTES = 256 << 20


def check_params(config: ModelConfig, found: dict[str, tuple[int, ...]], where: str,
                 expected: dict[str, tuple[int, ...]] | None = None) -> None:
  """Raises GemmaError naming each missing, unexpected or mis-shaped parameter (official flat names).

  expected: transformer.param_shapes(config), when the caller already has it.
  """
  expected = param_shapes(config) if expected is None else expected
  problems = []
  for path, shape in expected.items():
    if path not in found:
      problems.append(f"missing parameter {path} (expected shape {shape})")
    elif tuple(found[path]) != shape:
      problems.append(f"parameter {path} has shape {tuple(found[path])} but the config "
                      f"({config.name}) expects {shape}")
  problems += [f"unexpected parameter {p} with shape {tuple(found[p])}" for p in found if p not in expected]
  if problems:
    raise GemmaError(f"{where}: checkpoint does not match the config: " + "; ".join(problems[:8])
                     + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))


def save(directory: str | os.PathLike, config: ModelConfig, params: dict[str, Any], *,
         tokenizer_proto: bytes | None = None, source: str = "", instruct: bool | None = None) -> pathlib.Path:
  """Writes a checkpoint into the new directory `directory`.

  Args:
    config: the model's config; params must match it (checked first).
    params: nested dict of arrays (numpy or jax) with the official names, e.g.
      params["layer_0"]["attn"]["q_einsum"]["w"] of shape (D, N, H).
    tokenizer_proto: serialized sentencepiece model, if the source had one.
    source: free text recorded in config.json (where the weights came from).
    instruct: whether the weights are instruction-tuned (None: unknown); chat warns unless True.
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and any(directory.iterdir()):
    raise GemmaError(f"output directory {directory} already exists and is not empty")
  check_params(config, {k: np.shape(v) for k, v in flatten(params).items()}, f"saving to {directory}")
  directory.mkdir(parents=True, exist_ok=True)
  # Orbax copies numpy leaves before writing (measured: +1 GB for the 270M); jax arrays it writes in
  # place, and on CPU device_put aliases aligned numpy buffers, so only one copy is ever held.
  params = jax.tree.map(jax.device_put, params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / PARAMS_DIR, params,
                    save_args=jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params))
  checkpointer.wait_until_finished()
  meta = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "source": source,
          "instruct": instruct}
  (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
  if tokenizer_proto is not None:
    (directory / TOKENIZER_FILE).write_bytes(tokenizer_proto)
  return directory


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
  """The checkpoint's config.json, checked to be ours, with clear errors for non-checkpoints."""
  directory = pathlib.Path(directory)
  if not directory.exists():
    raise GemmaError(f"checkpoint directory {directory} does not exist")
  config_path = directory / CONFIG_FILE
  if not directory.is_dir() or not config_path.is_file():
    raise GemmaError(f"{directory} is not a gemma_jax checkpoint (no {CONFIG_FILE}); "
                     "convert weights first with `python -m gemma_jax.convert SRC DST`")
  try:
    meta = json.loads(config_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise GemmaError(f"{config_path} is not valid JSON: {e}") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise GemmaError(f"{config_path} is not a gemma_jax checkpoint config (no \"format\": \"{FORMAT}\")")
  if meta.get("version") != VERSION:
    raise GemmaError(f"{config_path} has format version {meta.get('version')}, this library reads "
                     f"version {VERSION}; convert the weights again with `python -m gemma_jax.convert`")
  return meta


def config_from_meta(meta: dict[str, Any], directory: str | os.PathLike) -> ModelConfig:
  """The ModelConfig in a checkpoint's config.json (read_meta's result)."""
  try:
    return ModelConfig.from_dict(meta["config"])
  except (KeyError, TypeError, ValueError) as e:
    raise GemmaError(f"{pathlib.Path(directory) / CONFIG_FILE}: invalid model config: {e}") from None


def read_config(directory: str | os.PathLike) -> ModelConfig:
  """The ModelConfig stored in a checkpoint directory."""
  return config_from_meta(read_meta(directory), directory)


def stored_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """Flat {path: Orbax ArrayMetadata} of the params stored in a checkpoint (shape, dtype, chunk shape)."""
  path = pathlib.Path(directory).absolute() / PARAMS_DIR
  if not path.is_dir():
    raise GemmaError(f"{directory} has no {PARAMS_DIR}/ directory: not a complete gemma_jax checkpoint")
  try:
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
  except Exception as e:  # Orbax raises many types for corrupt metadata; name the file instead.
    raise GemmaError(f"cannot read the Orbax metadata in {path}: {e}") from None
  return flatten(tree)


def load_params(directory: str | os.PathLike, config: ModelConfig, layout: Layout | None = None
                ) -> tuple[nnx.GraphDef, nnx.State]:
  """Restores params into config.dtype, each directly into its target sharding.

  Args:
    layout: a mesh and rules (sharding.Layout); each device reads only its own slice of each param.
      Default: everything on the first device.
  Returns:
    (graphdef, params) for nnx.merge; params is an nnx.State of jax arrays.
  """
  directory = pathlib.Path(directory).absolute()
  stored = stored_metadata(directory)
  graphdef, state = abstract_model(config)
  abstract = flat_params(state)  # official names, as stored
  check_params(config, {k: tuple(v.shape) for k, v in stored.items()}, str(directory),
               {p: tuple(x.shape) for p, x in abstract.items()})
  dtype = jnp.dtype(config.dtype)
  if layout is not None:
    shardings = layout.param_shardings(state)  # keyed by module-tree paths
  else:
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {state_path(path): default for path in abstract}
  flat = {path: jax.ShapeDtypeStruct(x.shape, dtype, sharding=shardings[state_path(path)])
          for path, x in abstract.items()}
  # Orbax reserves, for each slice it reads, the bytes of the stored chunks that slice touches; the limit
  # is the largest such slice (or MIN_RESTORE_BYTES), so host memory holds one slice in flight at worst.
  # (+1: Orbax refuses a request that is not strictly below its limit.)
  limit = max([MIN_RESTORE_BYTES] + [_slice_read_bytes(flat[p], stored[p]) for p in flat]) + 1
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=limit / 1e9))
  restored: dict[str, Any] = {}
  for group in _restore_groups(flat):
    target = unflatten({path: flat[path] for path in group})
    args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype),
                        target)
    part = checkpointer.restore(directory / PARAMS_DIR, args=ocp.args.PyTreeRestore(
        item=target, restore_args=args, partial_restore=True))
    restored.update(flatten(part))
  set_flat_params(state, restored)
  return graphdef, state


def _slice_read_bytes(target: jax.ShapeDtypeStruct, stored) -> int:
  """The most bytes Orbax reserves to read one device's slice of this param: the slice rounded out to
  the stored chunk grid (serialization.estimate_read_memory_footprint), at the larger itemsize."""
  chunk = getattr(getattr(stored, "storage", None), "chunk_shape", None) or tuple(target.shape)
  item = max(jnp.dtype(target.dtype).itemsize, jnp.dtype(stored.dtype).itemsize)
  most = 0
  for index in target.sharding.devices_indices_map(tuple(target.shape)).values():
    n = item
    for sl, size, c in zip(index, target.shape, chunk):
      lo, hi, _ = sl.indices(size)
      n *= -(-hi // c) * c - lo // c * c
    most = max(most, n)
  return most


def _restore_groups(flat: dict[str, jax.ShapeDtypeStruct], parts: int = 8) -> list[list[str]]:
  """Params split into groups of about 1/parts of the bytes (a larger array alone), largest first.

  Orbax holds a read buffer beside each array it restores; restoring everything at once peaked at 1.7x
  the params for Gemma 3 270M, group by group at 1.24x (the embedding's own buffer being the rest).
  """
  size = lambda p: flat[p].size * flat[p].dtype.itemsize
  limit = sum(map(size, flat)) / parts
  groups: list[list[str]] = []
  current, total = [], 0
  for path in sorted(flat, key=size, reverse=True):
    if current and total + size(path) > limit:
      groups.append(current)
      current, total = [], 0
    current.append(path)
    total += size(path)
  return groups + [current] if current else groups


@dataclasses.dataclass(frozen=True)
class Loaded:
  """Everything a checkpoint directory holds, read once."""

  config: ModelConfig
  graphdef: nnx.GraphDef
  params: nnx.State
  tokenizer_proto: bytes | None
  meta: dict[str, Any]  # config.json: source, instruct, ...


def load(directory: str | os.PathLike, dtype: str | None = None, layout: Layout | None = None) -> Loaded:
  """Config, graphdef, params, tokenizer proto and metadata from a checkpoint directory.

  dtype: "float32" or "bfloat16" to override the stored config's runtime dtype.
  layout: restore each param straight into the mesh's sharding (see load_params).
  """
  meta = read_meta(directory)
  config = config_from_meta(meta, directory)
  if dtype is not None:
    try:
      config = config.replace(dtype=dtype)
    except ValueError as e:
      raise GemmaError(str(e)) from None
  graphdef, params = load_params(directory, config, layout)
  tok_path = pathlib.Path(directory) / TOKENIZER_FILE
  return Loaded(config, graphdef, params, tok_path.read_bytes() if tok_path.is_file() else None, meta)


def read_orbax_tree(path: str | os.PathLike) -> tuple[dict[str, Any], Callable[[], dict[str, Any]]]:
  """Any Orbax PyTree checkpoint (e.g. an official Kaggle one): its metadata now, its arrays on demand.

  Returns:
    ({flat path: shape}, restore) where restore() gives the nested dict of numpy arrays. Paths join
    the stored keys with "/", so the official key "transformer/layer_0/attn/q_einsum" with leaf "w"
    becomes "transformer/layer_0/attn/q_einsum/w".
  """
  path = pathlib.Path(path).absolute()
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    tree = checkpointer.metadata(path).item_metadata.tree
  except Exception as e:  # Orbax raises many types for a folder that is not a checkpoint
    raise GemmaError(f"{path} is not a readable Orbax checkpoint: {e}") from None
  shapes = {k: tuple(v.shape) for k, v in flatten(tree).items()}
  return shapes, lambda: checkpointer.restore(path)


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
  """True for a folder that looks like an Orbax checkpoint (has _METADATA or _CHECKPOINT_METADATA)."""
  path = pathlib.Path(path)
  return path.is_dir() and ((path / "_METADATA").is_file() or (path / "_CHECKPOINT_METADATA").is_file())

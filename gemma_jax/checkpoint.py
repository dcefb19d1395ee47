"""Our checkpoint format: one directory with Orbax params, the config, the tokenizer and a completion marker.

  DIR/config.json      {"format": "gemma_jax", "version": 5, "config": {...ModelConfig...}, "source": ...}
  DIR/params/          Orbax checkpoint of the nested param dict (official names, D-major projections:
                       layer_0/attn/q_einsum/w (D, N, H); quantized: int8/int4 values there and a
                       layer_0/attn/q_einsum/w_scale beside them, and for int4 a w_offset, quantize.py)
  DIR/tokenizer.model  sentencepiece model (absent for checkpoints imported without one)
  DIR/COMPLETE.json    written last: every param's shape, dtype and checksums

Writes are atomic (atomic.py): the directory is built under a temporary name and renamed into place once
complete, so a directory without COMPLETE.json is an interrupted or foreign write, and every reader says so.
Restores go straight into the requested dtype and shardings after the stored shapes are checked against
the config, so a mismatch names the parameter and both shapes instead of failing deep inside Orbax or,
worse, restoring silently; then each restored param is checked against its recorded checksum (`verify`).

Arrays are stored in chunks of at most CHUNK_BYTES, so a sharded restore reads each device's slice
chunk by chunk: no parameter is ever whole in host memory or on one device (a single-chunk array
would be decoded whole for every slice).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import integrity
from .quantize import check_dtypes
from .atomic import atomic_directory
from .configs import ModelConfig
from .errors import GemmaError
from .sharding import Layout


def _orbax():
  """orbax.checkpoint, imported on first use: it costs ~0.3 s, a third of `import jax, flax.nnx`, and
  `import gemma_jax` should not pay it before a checkpoint is read or written (issue 12, cold start)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  return ocp
from .transformer import abstract_model, flat_params, param_shapes, set_flat_params, state_path
from .tree import flatten, unflatten

FORMAT = "gemma_jax"
# 5: int4 is asymmetric (values, a float16 `_scale` and `_offset` beside each; qarray.py); format 4's
# symmetric int4 is read as the scheme "int4-sym", which it is;
# 4: quantized params (int8/int4 values and a float32 `_scale` beside each; config.json's quant fields);
# 3: atomic writes with COMPLETE.json (checksums); 2: D-major projection layouts (q (D, N, H),
# kv (D, K, 2, H), gating (F, 2, D)); 1 had the official ones. Version 4 reads version 3 unchanged (a
# config without quant fields is a float model), so both are read.
VERSION = 5
READABLE = (3, 4, 5)
CONFIG_FILE = "config.json"
COMPLETE_FILE = "COMPLETE.json"
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
         tokenizer_proto: bytes | None = None, source: str = "", instruct: bool | None = None,
         overwrite: bool = False) -> pathlib.Path:
  """Writes a checkpoint into `directory` (new, or empty; overwrite=True replaces an existing one).

  Atomic: everything is written under a temporary name beside `directory`, checked (every param listed
  by Orbax with its shape and dtype), then COMPLETE.json is written and the directory renamed into
  place. A failure (permission, disk full) raises a GemmaError naming the path and the cause and leaves
  nothing behind; so does KeyboardInterrupt (re-raised).

  Args:
    config: the model's config; params must match it (checked first).
    params: nested dict of arrays (numpy or jax) with the official names, e.g.
      params["layer_0"]["attn"]["q_einsum"]["w"] of shape (D, N, H).
    tokenizer_proto: serialized sentencepiece model, if the source had one.
    source: free text recorded in config.json (where the weights came from).
    instruct: whether the weights are instruction-tuned (None: unknown); chat warns unless True.
  """
  directory = pathlib.Path(directory).absolute()
  flat = flatten(params)
  check_params(config, {k: np.shape(v) for k, v in flat.items()}, f"saving to {directory}")
  check_dtypes(config, {k: v.dtype for k, v in flat.items()}, f"saving to {directory}")
  with atomic_directory(directory, overwrite=overwrite) as tmp:
    # Orbax copies numpy leaves before writing (measured: +1 GB for the 270M); jax arrays it writes in
    # place, and on CPU device_put aliases aligned numpy buffers, so only one copy is ever held.
    params = jax.tree.map(jax.device_put, params)
    sums = integrity.record(flatten(params))
    _write_orbax(tmp / PARAMS_DIR, params, directory)
    stored = {k: (tuple(v.shape), str(jnp.dtype(v.dtype))) for k, v in stored_metadata(tmp).items()}
    written = {k: (tuple(s["shape"]), s["dtype"]) for k, s in sums.items()}
    if stored != written:
      bad = sorted(set(stored.items()) ^ set(written.items()))[:4]
      raise GemmaError(f"writing {directory}: Orbax stored other params than were given: {bad}")
    meta = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "source": source,
            "instruct": instruct}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if tokenizer_proto is not None:
      (tmp / TOKENIZER_FILE).write_bytes(tokenizer_proto)
    integrity.write_marker(tmp / COMPLETE_FILE, sums)
  return directory


def _write_orbax(path: pathlib.Path, params: dict[str, Any], directory: pathlib.Path) -> None:
  """Orbax's synchronous save of the param tree, chunked; any failure is one GemmaError naming `directory`.

  Synchronous (not StandardCheckpointer's async save): after a failed async save Orbax's signalling
  threads kept the process from exiting.
  """
  integrity.check_free_space(path.parent, sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                                              for x in jax.tree.leaves(params)), directory)
  ocp = _orbax()
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params)
  try:
    with integrity.quiet_workers(str(path.parent)):
      checkpointer.save(path, args=ocp.args.PyTreeSave(params, save_args=save_args))
  except GemmaError:
    raise
  except Exception as e:  # OSError, or tensorstore's ValueError/RuntimeError wrapping one
    raise GemmaError(f"cannot write checkpoint {directory}: {integrity.cause(e)}") from None
  finally:
    checkpointer.close()


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
  """The checkpoint's config.json, checked to be ours, with clear errors for non-checkpoints."""
  directory = pathlib.Path(directory)
  if not directory.exists():
    raise GemmaError(f"checkpoint directory {directory} does not exist")
  config_path = directory / CONFIG_FILE
  if directory.is_dir() and not config_path.is_file() and (directory / PARAMS_DIR).exists():
    raise GemmaError(incomplete(directory))
  if not directory.is_dir() or not config_path.is_file():
    raise GemmaError(f"{directory} is not a gemma_jax checkpoint (no {CONFIG_FILE}); "
                     "convert weights first with `python -m gemma_jax.convert SRC DST`")
  try:
    meta = json.loads(config_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise GemmaError(f"{config_path} is not valid JSON: {e}") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise GemmaError(f"{config_path} is not a gemma_jax checkpoint config (no \"format\": \"{FORMAT}\")")
  if meta.get("version") not in READABLE:
    raise GemmaError(f"{config_path} has format version {meta.get('version')}, this library reads "
                     f"versions {', '.join(map(str, READABLE[:-1]))} and {READABLE[-1]}; convert the weights again "
                     "with `python -m gemma_jax.convert`")
  if not (directory / COMPLETE_FILE).is_file():
    raise GemmaError(incomplete(directory))
  return meta


def incomplete(directory: str | os.PathLike) -> str:
  return (f"{directory} is an incomplete checkpoint (interrupted write?): delete it or convert again "
          "(`python -m gemma_jax.convert SRC DST --overwrite` replaces it)")


def config_from_meta(meta: dict[str, Any], directory: str | os.PathLike) -> ModelConfig:
  """The ModelConfig in a checkpoint's config.json (read_meta's result)."""
  try:
    fields = dict(meta["config"])
    if meta.get("version") == 4:  # format 4's int4 was symmetric (see VERSION)
      fields.update({k: "int4-sym" for k in ("quant", "quant_embedding") if fields.get(k) == "int4"})
    return ModelConfig.from_dict(fields)
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
    meta = _orbax().StandardCheckpointer().metadata(path)
    if meta is None or meta.item_metadata is None:
      raise ValueError("no readable _METADATA")
    tree = meta.item_metadata.tree
  except Exception as e:  # Orbax raises many types for corrupt metadata; name the file instead.
    raise GemmaError(f"{directory} is damaged: cannot read the Orbax metadata in {path} ({integrity.cause(e)}); "
                     "convert again") from None
  return flatten(tree)


def load_params(directory: str | os.PathLike, config: ModelConfig, layout: Layout | None = None, *,
                verify: bool = True) -> tuple[nnx.GraphDef, nnx.State]:
  """Restores params into config.dtype, each directly into its target sharding.

  Args:
    layout: a mesh and rules (sharding.Layout); each device reads only its own slice of each param.
      Default: everything on the first device.
    verify: check every restored param against the checksums in COMPLETE.json (a mismatch names it).
  Returns:
    (graphdef, params) for nnx.merge; params is an nnx.State of jax arrays.
  """
  directory = pathlib.Path(directory).absolute()
  stored = stored_metadata(directory)
  graphdef, state = abstract_model(config)
  abstract = flat_params(state)  # official names, as stored
  check_params(config, {k: tuple(v.shape) for k, v in stored.items()}, str(directory),
               {p: tuple(x.shape) for p, x in abstract.items()})
  check_dtypes(config, {k: v.dtype for k, v in stored.items()}, str(directory))
  if layout is not None:
    shardings = layout.param_shardings(state)  # keyed by module-tree paths
  else:
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {state_path(path): default for path in abstract}
  # The abstract model's dtypes: config.dtype for float params and symmetric scales, the values' int
  # types, and float16 for int4's scales and offsets (qarray.py); Orbax casts what is stored to them.
  flat = {path: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[state_path(path)])
          for path, x in abstract.items()}
  # Orbax reserves, for each slice it reads, the bytes of the stored chunks that slice touches; the limit
  # is the largest such slice (or MIN_RESTORE_BYTES), so host memory holds one slice in flight at worst.
  # (+1: Orbax refuses a request that is not strictly below its limit.)
  limit = max([MIN_RESTORE_BYTES] + [_slice_read_bytes(flat[p], stored[p]) for p in flat]) + 1
  ocp = _orbax()
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=limit / 1e9))
  sums = integrity.read_marker(directory / COMPLETE_FILE) if verify else None
  restored: dict[str, Any] = {}
  for group in _restore_groups(flat):
    part = _restore(checkpointer, directory, {path: flat[path] for path in group})
    if sums is not None:
      integrity.verify(part, sums, directory)
    restored.update(part)
  set_flat_params(state, restored)
  return graphdef, state


def _restore(checkpointer, directory: pathlib.Path, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
  """{path: array} of these params; a param Orbax cannot read (missing or truncated files) is named."""
  ocp = _orbax()

  def read(paths):
    target = unflatten({p: targets[p] for p in paths})
    args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype),
                        target)
    return flatten(checkpointer.restore(directory / PARAMS_DIR, args=ocp.args.PyTreeRestore(
        item=target, restore_args=args, partial_restore=True)))

  try:
    return read(list(targets))
  except Exception as e:  # tensorstore/Orbax errors of many types; find which param and say so
    first = e
  for path in targets:  # only on failure: one at a time, to name the damaged one
    try:
      read([path])
    except Exception as e:
      raise GemmaError(f"{directory} is damaged: parameter {path} cannot be read ({integrity.cause(e)}); "
                       "convert again") from None
  raise GemmaError(f"{directory} is damaged: {integrity.cause(first)}; convert again") from None


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


def load(directory: str | os.PathLike, dtype: str | None = None, layout: Layout | None = None, *,
         verify: bool = True) -> Loaded:
  """Config, graphdef, params, tokenizer proto and metadata from a checkpoint directory.

  dtype: "float32" or "bfloat16" to override the stored config's runtime dtype.
  layout: restore each param straight into the mesh's sharding (see load_params).
  verify: check each param against its recorded checksum (see integrity.py).
  """
  meta = read_meta(directory)
  config = config_from_meta(meta, directory)
  if dtype is not None:
    try:
      config = config.replace(dtype=dtype)
    except ValueError as e:
      raise GemmaError(str(e)) from None
  graphdef, params = load_params(directory, config, layout, verify=verify)
  tok_path = pathlib.Path(directory) / TOKENIZER_FILE
  return Loaded(config, graphdef, params, tok_path.read_bytes() if tok_path.is_file() else None, meta)

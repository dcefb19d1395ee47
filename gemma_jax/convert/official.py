"""Import the official Gemma Flax/Orbax checkpoints (Kaggle layout).

Flat keys such as "transformer/layer_0/attn/q_einsum" -> {"w"}, "transformer/embedder" ->
{"input_embedding"}: after dropping the "transformer/" prefix they are exactly our parameter paths
(../shared/models.md). The checkpoint stores no config: the family comes from which norms exist, the
dimensions from the shapes, and the rest from the matching official preset (or one named by the user).
The official layouts are transposed to ours (D-major projections, see attention.py): q_einsum
(N, D, H) -> (D, N, H); kv_einsum (2, K, D, H) and the fused qkv_einsum (3, N, D, H) of MHA models ->
q_einsum and kv_einsum (D, K, 2, H); gating_einsum (2, F, D) -> (F, 2, D) (Gemma 2 2B stores (2, D, F)).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import numpy as np
import orbax.checkpoint as ocp

from .. import checkpoint
from ..tree import flatten
from ..configs import ModelConfig, get_preset
from ..errors import GemmaError
from .common import DeviceParams, Imported, looks_instruct, matching_preset

PREFIX = "transformer/"


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


def infer_config(shapes: dict[str, tuple[int, ...]], where: str) -> ModelConfig:
  """The official preset whose family and dimensions match these (flat, prefix-free) shapes."""
  try:
    v, d = shapes["embedder/input_embedding"]
    num_layers = len({p.split("/")[0] for p in shapes if p.startswith("layer_")})
    f = shapes["layer_0/mlp/linear/w"][0]
    if "layer_0/attn/qkv_einsum/w" in shapes:
      _, n, _, h = shapes["layer_0/attn/qkv_einsum/w"]
      k = n
    else:
      n, _, h = shapes["layer_0/attn/q_einsum/w"]
      k = shapes["layer_0/attn/kv_einsum/w"][1]
  except (KeyError, ValueError) as e:
    raise GemmaError(f"{where}: not an official Gemma checkpoint (missing or odd parameter {e})") from None
  family = 3 if "layer_0/attn/_query_norm/scale" in shapes else 2 if "layer_0/post_ffw_norm/scale" in shapes else 1
  preset = matching_preset(family, num_layers, d, f, n, k, h)
  if preset is None:
    raise GemmaError(f"{where}: no official preset matches Gemma {family} with L={num_layers} D={d} F={f} "
                     f"N={n} K={k} H={h}; name one with --preset")
  return preset.replace(vocab_size=v)


def import_official(path: str | os.PathLike, preset: str | None = None, progress: bool = False) -> Imported:
  """Reads an official Orbax checkpoint folder into our flat params (stored dtype kept)."""
  del progress  # one Orbax restore; nothing to count
  where = str(path)
  if not pathlib.Path(path).exists():
    raise GemmaError(f"{path} does not exist")
  raw_shapes, restore = read_orbax_tree(path)
  if not any(p.startswith(PREFIX) for p in raw_shapes):
    raise GemmaError(f"{where}: an Orbax checkpoint, but without the official '{PREFIX}...' keys")
  shapes = {p[len(PREFIX):]: s for p, s in raw_shapes.items() if p.startswith(PREFIX)}
  if preset is not None:
    try:
      cfg = get_preset(preset)
    except ValueError as e:
      raise GemmaError(str(e)) from None
    cfg = cfg.replace(vocab_size=shapes.get("embedder/input_embedding", (cfg.vocab_size,))[0])
  else:
    cfg = infer_config(shapes, where)
  params = DeviceParams()
  for p, value in flatten(restore()).items():
    if p.startswith(PREFIX):
      for ours, array in to_ours(p[len(PREFIX):], np.asarray(value), cfg, where):
        params[ours] = array
  checkpoint.check_params(cfg, {p: v.shape for p, v in params.items()}, where)
  name = pathlib.Path(path).absolute()
  instruct = True if looks_instruct(name.name, name.parent.name) else None  # Kaggle: gemma-2-2b-it/...
  return Imported(cfg, params, None, source=f"official:{name.name}", instruct=instruct)


def to_ours(path: str, value: np.ndarray, cfg: ModelConfig, where: str) -> list[tuple[str, np.ndarray]]:
  """One official tensor -> [(our path, our array)]: the layout transposes listed in the module doc."""
  def need(rank):
    if value.ndim != rank:
      raise GemmaError(f"{where}: tensor {PREFIX}{path} has shape {value.shape}; the official layout has "
                       f"rank {rank}")
  out = lambda name, x: (name, np.ascontiguousarray(x))
  if path.endswith("attn/qkv_einsum/w"):
    need(4)
    base = path[:-len("qkv_einsum/w")]
    return [out(base + "q_einsum/w", value[0].transpose(1, 0, 2)),
            out(base + "kv_einsum/w", value[1:].transpose(2, 1, 0, 3))]
  if path.endswith("attn/q_einsum/w"):
    need(3)
    return [out(path, value.transpose(1, 0, 2))]
  if path.endswith("attn/kv_einsum/w"):
    need(4)
    return [out(path, value.transpose(2, 1, 0, 3))]
  if path.endswith("mlp/gating_einsum/w"):
    need(3)
    if value.shape == (2, cfg.embed_dim, cfg.hidden_dim) and cfg.embed_dim != cfg.hidden_dim:
      return [out(path, value.transpose(2, 0, 1))]  # Gemma 2 2B: (2, D, F)
    return [out(path, value.transpose(1, 0, 2))]
  return [(path, value)]

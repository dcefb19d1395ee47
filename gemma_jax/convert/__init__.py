"""Importers of foreign weights into our checkpoint format: GGUF, Hugging Face safetensors, official Orbax.

`convert(src, dst)` picks the importer from what src is and writes a gemma_jax checkpoint to dst.
"""

from __future__ import annotations

import os
import pathlib

from .. import checkpoint
from ..tree import unflatten
from ..errors import GemmaError
from .common import Imported


def import_any(src: str | os.PathLike, *, preset: str | None = None, progress: bool = False) -> Imported:
  """Reads src (a .gguf file, an HF folder or an official Orbax folder) into memory, once."""
  from . import gguf, official, safetensors  # noqa: PLC0415 (keeps `import gemma_jax` light)

  src = pathlib.Path(src)
  if not src.exists():
    raise GemmaError(f"{src} does not exist")
  if src.is_file():
    if gguf.is_gguf(src):
      return gguf.import_gguf(src, progress=progress)
    raise GemmaError(f"{src} is not a model file gemma_jax can import (expected a .gguf file, a Hugging "
                     "Face folder with config.json and *.safetensors, or an official Orbax checkpoint folder)")
  if safetensors.is_hf_folder(src):
    return safetensors.import_hf(src, progress=progress)
  if official.is_orbax_checkpoint(src):
    return official.import_official(src, preset=preset, progress=progress)
  raise GemmaError(f"{src} is a folder but not a model gemma_jax can import (no config.json with "
                   "*.safetensors, no Orbax _METADATA)")


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, preset: str | None = None,
            progress: bool = False, overwrite: bool = False) -> pathlib.Path:
  """Imports src and writes a gemma_jax checkpoint directory dst (atomically, see checkpoint.save).

  dst must not exist or be empty, unless overwrite=True: then it is replaced once the new one is complete
  (an incomplete one left by an interrupted write included).
  """
  dst = pathlib.Path(dst)
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not (overwrite and dst.is_dir()):
    hint = " (pass overwrite=True / --overwrite to replace it)" if dst.is_dir() else ""
    raise GemmaError(f"output {dst} already exists and is not an empty directory{hint}")
  imported = import_any(src, preset=preset, progress=progress)
  return checkpoint.save(dst, imported.config, unflatten(imported.params),
                         tokenizer_proto=imported.tokenizer_proto, source=imported.source,
                         instruct=imported.instruct, overwrite=overwrite)

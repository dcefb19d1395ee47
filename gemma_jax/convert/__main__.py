"""python -m gemma_jax.convert SRC DST: import a .gguf file, an HF folder or an official checkpoint.

  python -m gemma_jax.convert model.gguf out/ckpt
"""

from __future__ import annotations

import argparse

from ..cli import main_wrapper, run


@main_wrapper
def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m gemma_jax.convert", description=__doc__.splitlines()[0])
  p.add_argument("src", help="a .gguf file, a Hugging Face folder (config.json + *.safetensors) or an "
                             "official Orbax checkpoint folder")
  p.add_argument("dst", help="new output directory")
  p.add_argument("--preset", help="official checkpoints only: the preset to use when the shapes match none")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--overwrite", action="store_true",
                 help="replace dst if it exists (an incomplete checkpoint left by an interrupted write too); "
                      "the old one is removed only once the new one is complete")
  args = p.parse_args(argv)
  from . import convert  # noqa: PLC0415 (keep --help fast)

  out = convert(args.src, args.dst, preset=args.preset, progress=not args.no_progress, overwrite=args.overwrite)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  run(main)

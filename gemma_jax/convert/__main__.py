"""python -m gemma_jax.convert SRC DST: import a .gguf file, an HF folder or an official checkpoint.

  python -m gemma_jax.convert model.gguf out/ckpt
  python -m gemma_jax.convert out/ckpt out/ckpt-int4 --quantize int4 [--block-size 64] [--calibration calib.txt]
"""

from __future__ import annotations

import argparse

from ..cli import main_wrapper, run

EMBEDDING_CHOICES = {"int8": "int8", "int4": "int4", "int4-sym": "int4-sym", "float": None}


@main_wrapper
def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m gemma_jax.convert", description=__doc__.splitlines()[0])
  p.add_argument("src", help="a .gguf file, a Hugging Face folder (config.json + *.safetensors), an "
                             "official Orbax checkpoint folder or a gemma_jax checkpoint")
  p.add_argument("dst", help="new output directory")
  p.add_argument("--preset", help="official checkpoints only: the preset to use when the shapes match none")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--overwrite", action="store_true",
                 help="replace dst if it exists (an incomplete checkpoint left by an interrupted write too); "
                      "the old one is removed only once the new one is complete")
  p.add_argument("--quantize", metavar="int8|int4|int4-sym",
                 help="store the weights quantized: int8 (a scale per output channel), int4 (a float16 scale and "
                      "offset per block of the contracting axis) or int4-sym (a scale per block, no offset); a GGUF "
                      "file's Q8_0 / Q4_0 / Q4_1 blocks are kept as they are")
  p.add_argument("--block-size", type=int, metavar="N",
                 help="entries of the contracting axis per scale: 32 (int4's default, and GGUF's), 64 or 128")
  p.add_argument("--embedding", metavar="int8|int4|int4-sym|float",
                 help="the embedding's scheme (default: the --quantize scheme's, see the README)")
  p.add_argument("--calibration", metavar="TEXT_FILE",
                 help="with --quantize: a UTF-8 text (a few thousand tokens like the model's use) on which GPTQ "
                      "chooses the quantized weights to keep each projection's outputs close to float's, "
                      "instead of rounding each weight to nearest")
  args = p.parse_args(argv)
  from . import KEEP, convert  # noqa: PLC0415 (keep --help fast)
  from ..errors import GemmaError  # noqa: PLC0415

  embedding = KEEP
  if args.embedding is not None:
    if args.embedding not in EMBEDDING_CHOICES:
      raise GemmaError(f"--embedding must be one of {', '.join(EMBEDDING_CHOICES)}, got {args.embedding!r}")
    embedding = EMBEDDING_CHOICES[args.embedding]
  out = convert(args.src, args.dst, preset=args.preset, progress=not args.no_progress, overwrite=args.overwrite,
                quantize=args.quantize, block_size=args.block_size, embedding=embedding,
                calibration=args.calibration)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  run(main)

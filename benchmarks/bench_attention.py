"""Exact vs blockwise (flash-style) attention on Gemma 3 270M shapes (K=1, G=4, H=256), CPU: time and memory.

  python benchmarks/bench_attention.py                 # the table behind attention.BLOCKWISE_MIN_KEYS
  python benchmarks/bench_attention.py --blocks        # block sizes of the blockwise path at T = S = 4096
  python benchmarks/bench_attention.py --prefill       # 270M prefill temporaries by chunk (compile only)
  python benchmarks/bench_attention.py --rss CKPT 16384 [--chunk 16384]   # peak RSS of one 270M prefill

Memory is XLA's own figure for the compiled call (memory_analysis: temporaries + outputs, the inputs not
counted), so it does not depend on the machine's load. Time: best of --repeats runs, the two paths
interleaved run by run so that a change of load hits both alike; on a shared machine treat it as rough.
Each case is one attention call of a first prefill (no cache: T = S, causal) on a global layer, or on a
local layer (window 512), or a chunk of T queries after a cache of S - T keys (a chunked prefill's last
chunk on a global layer).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemma_jax import attend  # noqa: E402
from gemma_jax.cache import Stored  # noqa: E402

K, G, H = 1, 4, 256


def inputs(t: int, s: int, dtype):
  rng = np.random.default_rng(0)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  qg = arr(1, t, K, G, H) / 16
  q_pos = jnp.arange(s - t, s, dtype=jnp.int32)[None]
  chunk = (Stored(arr(1, t, K, H), arr(1, t, K, H)), q_pos, None)
  parts = [chunk]
  if s > t:
    parts.insert(0, (Stored(arr(1, s - t, K, H), arr(1, s - t, K, H)), jnp.arange(s - t, dtype=jnp.int32)[None], None))
  return qg, parts, q_pos


def fns(window, dtype, bq, bk):
  ex = jax.jit(lambda qg, parts, q_pos: attend.exact(qg, parts, q_pos, None, window, None, dtype))
  bw = jax.jit(lambda qg, parts, q_pos: attend.blockwise(qg, parts, q_pos, None, window, None, dtype, bq, bk))
  return {"exact": ex, "blockwise": bw}


def measure(cases, repeats, bq, bk, dtype=jnp.float32, run_limit=8192):
  rows = []
  for name, t, s, window in cases:
    args = inputs(t, s, dtype)
    res = {}
    compiled = {}
    for path, f in fns(window, dtype, bq, bk).items():
      c = f.lower(*args).compile()
      m = c.memory_analysis()
      res[path] = {"mib": (m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20, "s": float("inf")}
      compiled[path] = c
    for _ in range(repeats):
      for path, c in compiled.items():
        if path == "exact" and t > run_limit:
          continue
        t0 = time.perf_counter()
        jax.block_until_ready(c(*args))
        res[path]["s"] = min(res[path]["s"], time.perf_counter() - t0)
    ex, bw = res["exact"], res["blockwise"]
    row = (f"| {name} | {t} | {s} | {ex['s'] * 1e3:.0f} | {bw['s'] * 1e3:.0f} | {ex['s'] / bw['s']:.2f} | "
           f"{ex['mib']:.0f} | {bw['mib']:.0f} |")
    print(row, flush=True)
    rows.append(row)
  return rows


def prefill_memory(lengths, chunks):
  """XLA's temporaries of one Decoder.prefill call on the 270M (abstract params: nothing is run)."""
  from gemma_jax import attention
  from gemma_jax.cache import init_cache
  from gemma_jax.configs import get_preset
  from gemma_jax.decode import Decoder
  from gemma_jax.transformer import abstract_model
  cfg = get_preset("gemma3_270m")
  graphdef, params = abstract_model(cfg)
  dec = Decoder(graphdef)
  print("| call | T (chunk) | cache slots | path | temporaries MiB |\n|---|---|---|---|---|")

  def temp(t, cache_len, fresh):
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, cache_len))
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    c = Decoder.prefill.lower(dec, params, ids, ids, cache, fresh=fresh).compile().memory_analysis()
    return c.temp_size_in_bytes / 2**20

  for n in lengths:
    for path, threshold in (("exact", 1 << 30), ("blockwise", attention.BLOCKWISE_MIN_KEYS)):
      attention.BLOCKWISE_MIN_KEYS, saved = threshold, attention.BLOCKWISE_MIN_KEYS
      jax.clear_caches()  # the threshold is read while tracing: no trace made under the other may be reused
      try:
        print(f"| one-shot prefill | {n} | {n} | {path} | {temp(n, n, True):.0f} |", flush=True)
      finally:
        attention.BLOCKWISE_MIN_KEYS = saved
  jax.clear_caches()
  for c in chunks:
    print(f"| a later chunk | {c} | 16384 | blockwise | {temp(c, 16384, False):.0f} |", flush=True)


def prefill_rss(ckpt: str, n: int, chunk: int | None):
  """Peak RSS of a process that loads the 270M and prefills one n-token prompt (chunk: tokens per call;
  None: engine.prefill_chunk's choice), and the time of that prefill (compilation included)."""
  import resource

  import gemma_jax as gj
  from gemma_jax import engine
  model = gj.load(ckpt, dtype="float32")
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  text = model.encode((REPO / "tests" / "data" / "heldout_en.txt").read_text(), add_bos=False)
  ids = ([2] + text * (n // len(text) + 1))[:n]
  if chunk is not None:
    engine.prefill_chunk = lambda cfg, rows: chunk
  t0 = time.perf_counter()
  state = model.start([ids], max_new_tokens=8)
  jax.block_until_ready(state.logits)
  took = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"| {n} | {chunk or engine.prefill_chunk(model.config, 1)} | {before:.2f} | {peak:.2f} | {took:.0f} |")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--blocks", action="store_true")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--prefill", action="store_true", help="prefill temporaries of the 270M (compile only)")
  ap.add_argument("--rss", nargs=2, metavar=("CKPT", "TOKENS"), help="peak RSS of one 270M prefill")
  ap.add_argument("--chunk", type=int, default=None, help="with --rss: tokens per prefill call")
  a = ap.parse_args()
  if a.rss:
    return prefill_rss(a.rss[0], int(a.rss[1]), a.chunk)
  print(f"load average {os.getloadavg()}, jax {jax.__version__}, {jax.devices()[0].platform}")
  if a.prefill:
    prefill_memory((2048, 4096, 16384), (1024, 2048, 4096, 8192))
    return
  if a.blocks:
    print("| block_q | block_k | blockwise ms | MiB |\n|---|---|---|---|")
    args = inputs(4096, 4096, jnp.float32)
    for bq, bk in [(256, 256), (512, 512), (1024, 1024), (512, 1024), (1024, 512), (2048, 512)]:
      c = fns(None, jnp.float32, bq, bk)["blockwise"].lower(*args).compile()
      m = c.memory_analysis()
      best = float("inf")
      for _ in range(a.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(c(*args))
        best = min(best, time.perf_counter() - t0)
      print(f"| {bq} | {bk} | {best * 1e3:.0f} | {(m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20:.0f} |",
            flush=True)
    return
  from gemma_jax.attention import BLOCK_K, BLOCK_Q
  print("| case | T | S | exact ms | blockwise ms | exact / blockwise | exact MiB | blockwise MiB |")
  print("|---|---|---|---|---|---|---|---|")
  cases = [("global, first prefill", n, n, None) for n in (256, 512, 1024, 2048, 4096, 8192)]
  cases += [("local (window 512), first prefill", n, n, 512) for n in (1024, 2048, 4096)]
  cases += [("global, chunk after cache", 1024, n, None) for n in (2048, 4096, 8192)]
  measure(cases, a.repeats, BLOCK_Q, BLOCK_K)


if __name__ == "__main__":
  main()

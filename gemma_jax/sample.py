"""python -m gemma_jax.sample: generate text from one prompt or a file of prompts.

  python -m gemma_jax.sample --prompt "The capital of France is" --max-new-tokens 32 --json
  python -m gemma_jax.sample --batch-file prompts.txt --temperature 0.7 --top-p 0.95 --seed 1 --stream
  python -m gemma_jax.sample --ckpt out/27b --mesh data=1,model=-1 --prompt "..."     # over every device
  python -m gemma_jax.sample --preset gemma2_27b --mesh data=1,model=8 --plan        # will it fit?
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from .cli import (add_model_flags, add_sampling_flags, load_model, main_wrapper, run, sampling_kwargs,
                  start_processes)
from .errors import GemmaError


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m gemma_jax.sample", description=__doc__.splitlines()[0])
  add_model_flags(p)
  src = p.add_mutually_exclusive_group()
  src.add_argument("--prompt", help="the prompt text (BOS is added)")
  src.add_argument("--batch-file", help="UTF-8 file with one prompt per line, generated as one batch")
  add_sampling_flags(p, default_max_new=64)
  p.add_argument("--stream", action="store_true", help="print text as it is generated")
  p.add_argument("--json", action="store_true",
                 help='print {"prompt_tokens": [...], "tokens": [...], "text": "..."} (for --batch-file a list, '
                      'each with its "line" in the file; with --stream, one JSON line per piece: '
                      '{"row": i, "text": ...})')
  plan = p.add_argument_group("memory plan (nothing is loaded)")
  plan.add_argument("--plan", action="store_true",
                    help="print the bytes of params and KV cache per device for --preset (or --ckpt's config) "
                         "on --mesh, then exit")
  plan.add_argument("--preset", help="the model to plan for, e.g. gemma2_27b")
  plan.add_argument("--cache-len", type=int, help="tokens the cache holds (default: the model's context)")
  plan.add_argument("--batch-size", type=int, default=1, help="rows of the cache (default 1)")
  args = p.parse_args(argv)
  if not args.plan:
    if args.prompt is None and args.batch_file is None:
      p.error("one of the arguments --prompt --batch-file is required")
    if args.preset is not None:
      p.error("--preset goes with --plan (to generate, convert the model and pass --ckpt)")
  return args


def human(n: int) -> str:
  """Bytes in the largest binary unit that keeps the number >= 1 (1.50 GiB, 213.0 MiB)."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def print_plan(args) -> int:
  """The memory plan (plan.py): per-device bytes of params and KV cache, from shapes only."""
  from . import plan  # noqa: PLC0415 (keep --help fast)
  from .sharding import describe_mesh  # noqa: PLC0415

  config = plan.config_for(args.preset, args.ckpt)
  p = plan.for_model(config, args.mesh or None, batch_size=args.batch_size, cache_len=args.cache_len, dtype=args.dtype,
                     kv_cache_dtype=args.kv_cache_dtype)
  if args.json:
    print(json.dumps(p.to_dict()))
    return 0
  kv = "" if p.kv_cache_dtype == p.dtype else f", {p.kv_cache_dtype} KV cache"
  print(f"{p.model} ({p.dtype}{kv}) on mesh {describe_mesh(p.mesh)} ({p.devices} devices), "
        f"batch {p.batch_size}, cache {p.cache_len} tokens, {p.rules} rules")
  print(f"{'':<20}{'total':>14}{'per device':>14}{'per device, bytes':>20}")
  for r in p.rows:
    print(f"{r.name:<20}{human(r.total_bytes):>14}{human(r.device_bytes):>14}{r.device_bytes:>20,}")
  print("params and KV cache only: activations, logits and XLA's temporaries come on top")
  return 0


def read_prompts(args) -> tuple[list[str], list[int] | None]:
  """The prompts, and for --batch-file the line number of each (blank lines are skipped, and said so)."""
  if args.prompt is not None:
    if not args.prompt:
      raise GemmaError("empty prompt: give some text with --prompt")
    return [args.prompt], None
  try:
    lines = pathlib.Path(args.batch_file).read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise GemmaError(f"{args.batch_file} is not UTF-8 text: {e}") from None
  numbers = [i + 1 for i, line in enumerate(lines) if line.strip()]
  if not numbers:
    raise GemmaError(f"{args.batch_file} holds no prompts (one per line)")
  blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
  if blank:  # results are numbered by row: say which lines have none
    shown = ", ".join(map(str, blank[:10])) + (", ..." if len(blank) > 10 else "")
    print(f"note: {args.batch_file}: skipped {len(blank)} blank line{'s' * (len(blank) > 1)} ({shown}); "
          "each result names its line", file=sys.stderr)
  return [lines[i - 1] for i in numbers], numbers


@main_wrapper
def main(argv=None) -> int:
  args = parse_args(argv)
  if args.plan:
    return print_plan(args)
  start_processes(args)
  prompts, lines = read_prompts(args)
  batch = lines is not None
  model = load_model(args)
  kwargs = sampling_kwargs(args, model)
  if args.stream:
    for deltas in model.stream(prompts, args.max_new_tokens, **kwargs):
      for row, delta in enumerate(deltas):
        if not delta:
          continue
        if args.json:
          line = {"line": lines[row]} if batch else {}
          print(json.dumps({"row": row, **line, "text": delta}, ensure_ascii=False), flush=True)
        elif batch:
          print(f"[{row}] (line {lines[row]}) {delta!r}", flush=True)
        else:
          print(delta, end="", flush=True)
    if not args.json and not batch:
      print()
    return 0
  done = model.complete(prompts, args.max_new_tokens, **kwargs)
  if args.json:
    objs = [{**({"line": lines[i]} if batch else {}), "prompt_tokens": c.prompt_ids, "tokens": c.ids, "text": c.text}
            for i, c in enumerate(done)]
    print(json.dumps(objs if batch else objs[0], ensure_ascii=False))
  else:
    for i, c in enumerate(done):
      print(f"[{i}] (line {lines[i]}) {c.text}" if batch else c.text)
  return 0


if __name__ == "__main__":
  run(main)

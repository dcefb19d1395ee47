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

from .cli import add_model_flags, add_sampling_flags, load_model, main_wrapper, sampling_kwargs, start_processes
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
                 help='print {"prompt_tokens": [...], "tokens": [...], "text": "..."} (a list for --batch-file; '
                      "with --stream, one JSON line per piece: {\"row\": i, \"text\": ...})")
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
  """The memory plan: per-device bytes of params and KV cache, from shapes only."""
  import jax  # noqa: PLC0415 (keep --help fast)

  from . import checkpoint, sharding  # noqa: PLC0415
  from .transformer import abstract_model  # noqa: PLC0415
  from .cache import init_cache  # noqa: PLC0415
  from .configs import get_preset  # noqa: PLC0415

  if args.preset is not None and args.ckpt is not None:
    raise GemmaError("--plan takes --preset or --ckpt, not both")
  if args.preset is not None:
    try:
      config = get_preset(args.preset)
    except ValueError as e:
      raise GemmaError(str(e)) from None
  elif args.ckpt is not None:
    config = checkpoint.read_config(args.ckpt)
  else:
    raise GemmaError("--plan needs --preset NAME or --ckpt DIR")
  # Accelerators run bfloat16 (the CLI's default there); a plan is made for them, wherever it runs.
  config = config.replace(dtype=args.dtype or "bfloat16")
  cache_len = config.max_seq_len if args.cache_len is None else args.cache_len
  if not 1 <= cache_len <= config.max_seq_len:
    raise GemmaError(f"--cache-len must be in [1, {config.max_seq_len}] (the model's context), got {cache_len}")
  if args.batch_size < 1:
    raise GemmaError(f"--batch-size must be >= 1, got {args.batch_size}")
  spec = args.mesh or sharding.DEFAULT_MESH
  sizes = sharding.parse_mesh_spec(spec, None)
  params = abstract_model(config)[1]
  cache = jax.eval_shape(lambda: init_cache(config, args.batch_size, cache_len))
  rows = sharding.memory_plan(params, cache, sharding.GENERATION, sizes)
  devices = sizes["data"] * sizes["model"]
  if args.json:
    print(json.dumps({"model": config.name, "dtype": config.dtype, "mesh": sizes, "batch_size": args.batch_size,
                      "cache_len": cache_len, "rules": sharding.GENERATION.name,
                      "rows": [{"name": r.name, "total_bytes": r.total_bytes, "device_bytes": r.device_bytes}
                               for r in rows]}))
    return 0
  print(f"{config.name} ({config.dtype}) on mesh {sharding.describe_mesh(sizes)} ({devices} devices), "
        f"batch {args.batch_size}, cache {cache_len} tokens, {sharding.GENERATION.name} rules")
  print(f"{'':<20}{'total':>14}{'per device':>14}{'per device, bytes':>20}")
  for r in rows:
    print(f"{r.name:<20}{human(r.total_bytes):>14}{human(r.device_bytes):>14}{r.device_bytes:>20,}")
  print("params and KV cache only: activations, logits and XLA's temporaries come on top")
  return 0


def read_prompts(args) -> tuple[list[str], bool]:
  if args.prompt is not None:
    if not args.prompt:
      raise GemmaError("empty prompt: give some text with --prompt")
    return [args.prompt], False
  try:
    lines = pathlib.Path(args.batch_file).read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise GemmaError(f"{args.batch_file} is not UTF-8 text: {e}") from None
  prompts = [line for line in lines if line.strip()]
  if not prompts:
    raise GemmaError(f"{args.batch_file} holds no prompts (one per line)")
  return prompts, True


@main_wrapper
def main(argv=None) -> int:
  args = parse_args(argv)
  if args.plan:
    return print_plan(args)
  start_processes(args)
  prompts, batch = read_prompts(args)
  model = load_model(args)
  kwargs = sampling_kwargs(args, model)
  if args.stream:
    for deltas in model.stream(prompts, args.max_new_tokens, **kwargs):
      for row, delta in enumerate(deltas):
        if not delta:
          continue
        if args.json:
          print(json.dumps({"row": row, "text": delta}, ensure_ascii=False), flush=True)
        elif batch:
          print(f"[{row}] {delta!r}", flush=True)
        else:
          print(delta, end="", flush=True)
    if not args.json and not batch:
      print()
    return 0
  done = model.complete(prompts, args.max_new_tokens, **kwargs)
  if args.json:
    objs = [{"prompt_tokens": c.prompt_ids, "tokens": c.ids, "text": c.text} for c in done]
    print(json.dumps(objs if batch else objs[0], ensure_ascii=False))
  else:
    for i, c in enumerate(done):
      print(f"[{i}] {c.text}" if batch else c.text)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""python -m gemma_jax.sample: generate text from one prompt or a file of prompts.

  python -m gemma_jax.sample --prompt "The capital of France is" --max-new-tokens 32 --json
  python -m gemma_jax.sample --batch-file prompts.txt --temperature 0.7 --top-p 0.95 --seed 1 --stream
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from .cli import add_model_flags, add_sampling_flags, load_model, main_wrapper, sampling_kwargs
from .errors import GemmaError


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m gemma_jax.sample", description=__doc__.splitlines()[0])
  add_model_flags(p)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="the prompt text (BOS is added)")
  src.add_argument("--batch-file", help="UTF-8 file with one prompt per line, generated as one batch")
  add_sampling_flags(p, default_max_new=64)
  p.add_argument("--stream", action="store_true", help="print text as it is generated")
  p.add_argument("--json", action="store_true",
                 help='print {"prompt_tokens": [...], "tokens": [...], "text": "..."} (a list for --batch-file; '
                      "with --stream, one JSON line per piece: {\"row\": i, \"text\": ...})")
  return p.parse_args(argv)


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

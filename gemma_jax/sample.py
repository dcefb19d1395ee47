"""python -m gemma_jax.sample: generate text from a prompt.

  python -m gemma_jax.sample --prompt "The capital of France is" --max-new-tokens 32 --greedy --json
"""

from __future__ import annotations

import argparse
import json
import sys

from .cli import add_model_flags, load_model, main_wrapper
from .errors import GemmaError


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m gemma_jax.sample", description=__doc__.splitlines()[0])
  add_model_flags(p)
  p.add_argument("--prompt", required=True, help="the prompt text (BOS is added)")
  p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
  p.add_argument("--greedy", action="store_true", default=True,
                 help="pick the most likely token at each step (the only mode in this version)")
  p.add_argument("--json", action="store_true",
                 help='print {"prompt_tokens": [...], "tokens": [...], "text": "..."}')
  return p.parse_args(argv)


@main_wrapper
def main(argv=None) -> int:
  args = parse_args(argv)
  if not args.prompt:
    raise GemmaError("empty prompt: give some text with --prompt")
  model = load_model(args)
  prompt_ids = model.encode(args.prompt)
  new_ids = model.generate_ids([prompt_ids], max_new_tokens=args.max_new_tokens)[0]
  stops = set(model.stop_ids())
  text = model.decode_text([i for i in new_ids if i not in stops])
  if args.json:
    print(json.dumps({"prompt_tokens": prompt_ids, "tokens": new_ids, "text": text}, ensure_ascii=False))
  else:
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""python -m gemma_jax.chat: talk to an instruct model; the answer streams, the cache carries over.

  python -m gemma_jax.chat --ckpt out/gemma3-1b-it --system "Answer briefly." --temperature 0.7
Type a message and press Enter. /reset starts over, /quit (or end of input) leaves. A message that cannot
be answered (too long for the cache, say) prints an error and the session goes on; Ctrl-C stops an answer
(the turn is dropped). Across several hosts (--distributed), process 0 reads the input and sends each
line to the others.
"""

from __future__ import annotations

import argparse
import sys

from .cli import (add_model_flags, add_sampling_flags, load_model, main_wrapper, run, sampling_kwargs,
                  start_processes)
from .errors import GemmaError


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m gemma_jax.chat", description=__doc__.splitlines()[0])
  add_model_flags(p)
  p.add_argument("--system", help="system prompt (folded into the first user turn, as Gemma does)")
  p.add_argument("--max-cache-len", type=int, help="cache size in tokens (default: the model's context)")
  p.add_argument("--rolling", action="store_true",
                 help="when the cache is full, forget the oldest tokens instead of stopping")
  add_sampling_flags(p, default_max_new=512)
  return p.parse_args(argv)


@main_wrapper
def main(argv=None) -> int:
  args = parse_args(argv)
  start_processes(args)
  model = load_model(args)
  import jax  # noqa: PLC0415

  from .distributed import broadcast_text  # noqa: PLC0415
  from .session import ChatSession  # noqa: PLC0415

  kwargs = sampling_kwargs(args, model)
  stop, stop_ids, forbidden = kwargs.pop("stop"), kwargs.pop("stop_ids"), kwargs.pop("forbidden_ids")

  def new_session():
    return ChatSession(model, system=args.system, max_cache_len=args.max_cache_len,
                       cache_policy="rolling" if args.rolling else "error", max_new_tokens=args.max_new_tokens,
                       **kwargs)

  session = new_session()
  interactive = sys.stdin is not None and sys.stdin.isatty()
  while True:
    line = None
    if jax.process_index() == 0 and sys.stdin is not None:  # process 0 reads, every host runs the turn
      try:
        line = input("> " if interactive else "")
      except EOFError:
        pass
      except UnicodeDecodeError as e:
        print(f"error: the input is not UTF-8 text ({e.reason}); type the message again", file=sys.stderr)
        line = ""
    line = broadcast_text(line)
    if line is None:
      break
    if line.strip() in ("/quit", "/exit"):
      break
    if line.strip() == "/reset":
      session = new_session()
      continue
    if not line.strip():
      continue
    try:
      for piece in session.stream(line, stop=stop, stop_ids=stop_ids, forbidden_ids=forbidden):
        print(piece, end="", flush=True)
    except GemmaError as e:  # this message only: the conversation so far is kept
      print(f"error: {e}", file=sys.stderr, flush=True)
      continue
    except KeyboardInterrupt:
      print(" (interrupted)", flush=True)
      continue
    print()
  return 0


if __name__ == "__main__":
  run(main)

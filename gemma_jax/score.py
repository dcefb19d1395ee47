"""python -m gemma_jax.score: the log-probability of every token given its prefix, and the perplexity.

  python -m gemma_jax.score --text "The capital of France is Paris." --json
"""

from __future__ import annotations

import argparse
import json
import pathlib

from .cli import add_model_flags, load_model, main_wrapper, run, start_processes
from .engine import SCORE_CHUNK
from .errors import GemmaError
from .evaluate import perplexity


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m gemma_jax.score", description=__doc__.splitlines()[0])
  add_model_flags(p)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--text", help="text to score (BOS is added)")
  src.add_argument("--text-file", help="UTF-8 file whose text is scored (BOS is added)")
  src.add_argument("--tokens-file", help="JSON list of token ids, scored as given (works without a tokenizer)")
  p.add_argument("--chunk", type=int, metavar="N",
                 help="score through the KV cache, N tokens per call (memory of one chunk's attention); with "
                      "--kv-cache-dtype the scores always come through the cache (default: one forward up to "
                      f"{SCORE_CHUNK} tokens, then {SCORE_CHUNK} per call)")
  p.add_argument("--json", action="store_true", help='print {"tokens": [...], "logprobs": [...]}')
  return p.parse_args(argv)


def read_tokens_file(path: str) -> list[int]:
  try:
    data = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
  except UnicodeDecodeError as e:
    raise GemmaError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
  except json.JSONDecodeError as e:
    raise GemmaError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(data, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in data):
    raise GemmaError(f"{path} must hold a JSON list of integer token ids")
  return data


@main_wrapper
def main(argv=None) -> int:
  args = parse_args(argv)
  start_processes(args)
  if args.tokens_file is not None:
    ids = read_tokens_file(args.tokens_file)
    model = load_model(args)
  else:
    if args.text_file is not None:
      try:
        text = pathlib.Path(args.text_file).read_text(encoding="utf-8")
      except UnicodeDecodeError as e:
        raise GemmaError(f"{args.text_file} is not UTF-8 text: {e}") from None
    else:
      text = args.text
    if not text:
      raise GemmaError("empty text: nothing to score")
    model = load_model(args)
    ids = model.encode(text)
  logprobs = model.logprobs(ids, chunk=args.chunk).tolist()
  if args.json:
    print(json.dumps({"tokens": ids, "logprobs": logprobs}))
    return 0
  pieces = (model.tokenizer.id_to_piece if model.tokenizer else str)
  for i, lp in zip(ids[1:], logprobs):
    print(f"{i}\t{pieces(i)!r}\t{lp:.4f}")
  summary = perplexity(logprobs)
  print(f"tokens: {summary['tokens']}  mean logprob: {summary['mean_logprob']:.4f}  "
        f"perplexity: {summary['perplexity']:.4f}")
  return 0


if __name__ == "__main__":
  run(main)

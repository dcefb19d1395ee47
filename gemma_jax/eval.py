"""python -m gemma_jax.eval: a benchmark task or the perplexity of a text, from local files.

  python -m gemma_jax.eval --task hellaswag --data hellaswag_val.jsonl --num-fewshot 10 \\
      --fewshot-data hellaswag_train.jsonl
  python -m gemma_jax.eval --task multiple_choice --data my_questions.jsonl --json
  python -m gemma_jax.eval --task perplexity --data held_out.txt --window 1024 --stride 512
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from .cli import add_model_flags, load_model, main_wrapper, run, start_processes
from .errors import GemmaError
from .tasks import DEFAULT_SEED, TASKS


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m gemma_jax.eval", description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[2:]))
  add_model_flags(p)
  p.add_argument("--task", required=True, choices=TASKS, metavar="NAME",
                 help=f"one of {', '.join(TASKS)}: multiple_choice is the generic layout "
                      '{"context": str, "choices": [str, ...], "answer": int}; perplexity scores a text file')
  p.add_argument("--data", required=True, metavar="F", help="the task's JSONL file in its public layout (a UTF-8 "
                 "text file for perplexity); see the README for where each comes from")
  p.add_argument("--num-fewshot", type=int, metavar="K", help="solved examples before each question (default 0; "
                 "gsm8k 5)")
  p.add_argument("--fewshot-data", metavar="F", help="draw the examples from this file (e.g. the train split) "
                 "instead of --data (where the document being evaluated is left out)")
  p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N documents")
  p.add_argument("--batch-size", type=int, default=8, metavar="B", help="requests per batch (default 8)")
  p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"few-shot draws (default {DEFAULT_SEED}, as "
                 "lm-evaluation-harness)")
  p.add_argument("--max-gen-toks", type=int, default=256, metavar="N", help="generation tasks: tokens at most "
                 "(default 256)")
  p.add_argument("--window", type=int, metavar="W", help="perplexity: tokens per forward (default min(2048, "
                 "the model's context))")
  p.add_argument("--stride", type=int, metavar="S", help="perplexity: new tokens scored per window after the "
                 "first (default: the window; less gives each token more context)")
  p.add_argument("--json", action="store_true", help='print one JSON object {"results": ..., "samples": ...}')
  return p.parse_args(argv)


def read_text(path: str) -> str:
  p = pathlib.Path(path)
  if not p.is_file():
    raise GemmaError(f"{p}: no such text file" + (" (it is a directory)" if p.is_dir() else ""))
  try:
    text = p.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise GemmaError(f"{p} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
  if not text:
    raise GemmaError(f"{p} is empty: nothing to score")
  return text


def table(results: dict[str, dict]) -> str:
  rows = [("task", "metric", "value", "stderr")]
  for task, metrics in results.items():
    for name, value in metrics.items():
      if not name.endswith("_stderr"):
        err = metrics.get(f"{name}_stderr")
        rows.append((task, name, f"{value:.4f}" if isinstance(value, float) else str(value),
                     "" if err is None else f"{err:.4f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                   for r in rows)


@main_wrapper
def main(argv=None) -> int:
  args = parse_args(argv)
  from tqdm import tqdm  # noqa: PLC0415 (keep --help fast)

  from . import evaluate, readers, tasks  # noqa: PLC0415

  start_processes(args)
  # Read and check the data before loading the model: a bad line fails at once.
  if args.task == "perplexity":
    text = read_text(args.data)
  else:
    docs = readers.read_docs(args.task, args.data)
    shots = None if args.fewshot_data is None else readers.read_docs(args.task, args.fewshot_data)
  model = load_model(args)
  import jax  # noqa: PLC0415

  bar = tqdm(desc=args.task, unit="req", file=sys.stderr, dynamic_ncols=True, disable=jax.process_index() != 0)

  def progress(done: int, total: int) -> None:  # requests (windows for perplexity), known once encoded
    if bar.total != total:
      bar.reset(total)
    bar.update(done)

  try:
    if args.task == "perplexity":
      got = evaluate.text_perplexity(model, text, args.window, args.stride, args.batch_size, progress)
      out = {"results": {"perplexity": got}}
    else:
      out = tasks.run_task(model, args.task, docs, num_fewshot=args.num_fewshot, fewshot_docs=shots, seed=args.seed,
                           limit=args.limit, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks,
                           progress=progress)
  finally:
    bar.close()
  if args.json:
    print(json.dumps(out))
  else:
    print(table(out["results"]))
  return 0


if __name__ == "__main__":
  run(main)

"""What the thin CLIs share: common flags, loading, and turning errors into one clear line."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from typing import Callable

from .errors import GemmaError

EXIT_USAGE = 2


def add_model_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--ckpt", help="converted checkpoint directory (default: the embedded Gemma 3 270M)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      help="runtime dtype of params and activations (default: float32 on CPU, "
                           "bfloat16 on accelerators)")
  # No argparse `choices`: an unknown name is then one `error:` line (exit 2) like every other bad input.
  parser.add_argument("--kv-cache-dtype", metavar="DTYPE",
                      help="what the KV cache stores keys and values as: float32, bfloat16 or int8 (a float32 "
                           "scale per token and kv head: about half a bfloat16 cache; default: --dtype)")
  parser.add_argument("--mesh", metavar="SPEC",
                      help="spread the model over devices, e.g. data=1,model=-1 (-1 takes the rest): params "
                           "are restored straight into their shards (default: one device; with several "
                           "processes, data=1,model=-1)")
  parser.add_argument("--no-verify", action="store_true",
                      help="skip checking each param against the checksums recorded when the checkpoint was "
                           "written (they cost a few percent of the load time)")
  parser.add_argument("--distributed", action="store_true",
                      help="start jax.distributed first (one process per host, all running the same command; "
                           "automatic with JAX_COORDINATOR_ADDRESS, SLURM or Open MPI); only process 0 prints")


def start_processes(args: argparse.Namespace) -> None:
  """Joins the other hosts when asked (--distributed) or when the environment says so, and silences
  stdout on every process but 0, so a multi-host run prints its results once. Call before anything
  touches the devices. Errors still reach stderr from every process."""
  from . import distributed  # noqa: PLC0415 (keep --help fast)

  if getattr(args, "distributed", False) or distributed.cluster_detected():
    distributed.initialize_distributed()
    import jax  # noqa: PLC0415

    if jax.process_index() != 0:  # at the file-descriptor level: native libraries' output too
      sys.stdout.flush()
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def add_sampling_flags(parser: argparse.ArgumentParser, default_max_new: int) -> None:
  parser.add_argument("--max-new-tokens", type=int, default=default_max_new,
                      help=f"tokens to generate at most (default {default_max_new})")
  parser.add_argument("--greedy", action="store_true", help="always pick the most likely token (the default)")
  parser.add_argument("--temperature", type=float, help="sample at this temperature (0 = greedy)")
  parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
  parser.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the smallest set with this mass")
  parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
  parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same tokens)")
  parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                      help="stop when this text appears (repeatable); the output ends before it")
  parser.add_argument("--stop-token", action="append", default=[], metavar="PIECE_OR_ID",
                      help="also stop at this token, e.g. '<end_of_turn>' or 106 (EOS and <end_of_turn> "
                           "always stop)")
  parser.add_argument("--forbid", action="append", default=[], metavar="PIECE_OR_ID",
                      help="never generate this token (repeatable)")


def sampling_kwargs(args: argparse.Namespace, model) -> dict:
  """generate() keyword arguments from the sampling flags; token names resolved with the tokenizer."""
  if args.greedy and args.temperature not in (None, 0):
    raise GemmaError("--greedy and --temperature > 0 contradict each other; pick one")

  def token(spec: str, flag: str) -> int:
    if spec.lstrip("-").isdigit():
      return int(spec)
    tok = model.tokenizer
    if tok is None:
      raise GemmaError(f"{flag} {spec!r}: this checkpoint has no tokenizer; give a token id")
    try:
      return tok.piece_to_id(spec)
    except Exception:  # the tokenizer raises GemmaError/KeyError for unknown pieces
      raise GemmaError(f"unknown token {spec!r} for {flag}: not a piece of this tokenizer") from None

  return dict(temperature=args.temperature or 0.0, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              seed=args.seed, stop=args.stop,
              stop_ids=model.stop_ids() + [token(s, "--stop-token") for s in args.stop_token],
              forbidden_ids=[token(s, "--forbid") for s in args.forbid])


def load_model(args: argparse.Namespace):
  """The Model named by --ckpt (or the default model) in the dtype of --dtype, on the --mesh."""
  import jax  # noqa: PLC0415 (keep --help fast)

  from .cache import check_kv_cache_dtype  # noqa: PLC0415
  from .compile_cache import enable_compilation_cache  # noqa: PLC0415
  from .default_model import default_checkpoint  # noqa: PLC0415
  from .model import load  # noqa: PLC0415
  from .sharding import DEFAULT_MESH, make_mesh  # noqa: PLC0415

  enable_compilation_cache()
  dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  kv_cache_dtype = check_kv_cache_dtype(args.kv_cache_dtype)  # before the checkpoint is looked for
  spec = args.mesh or (DEFAULT_MESH if jax.process_count() > 1 else None)
  mesh = make_mesh(spec) if spec else None  # before the checkpoint: a bad spec fails at once
  path = args.ckpt or default_checkpoint(progress=sys.stderr.isatty() and jax.process_index() == 0)
  return load(path, dtype=dtype, mesh=mesh, verify=not getattr(args, "no_verify", False),
              kv_cache_dtype=kv_cache_dtype)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of our output went away (e.g. `| head`)


def main_wrapper(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
  """Runs a CLI main so that a user error prints one `error:` line on stderr and exits 2, never a traceback;
  Ctrl-C prints `interrupted` (130), and a closed output pipe ends quietly (141)."""

  @functools.wraps(main)
  def wrapped(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("GEMMA_JAX_LOGLEVEL", "WARNING"))
    try:
      return main(argv)
    except BrokenPipeError:
      # Further writes (and Python's own flush at exit) would fail again: send them nowhere.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      return EXIT_BROKEN_PIPE
    except (GemmaError, OSError) as e:  # OSError: files the user named (missing, a directory, no permission)
      print(f"error: {e}", file=sys.stderr)
      return EXIT_USAGE
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      return EXIT_INTERRUPTED

  return wrapped


def run(main: Callable[[], int]) -> None:
  """The program's exit: `python -m gemma_jax.X` ends here with main()'s code.

  After an error the process ends at once (os._exit, output flushed): worker threads a failed write left
  behind (Orbax's) cannot then hang the interpreter's shutdown or print into the user's terminal.
  """
  code = main()
  try:
    sys.stdout.flush()
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    code = code or EXIT_BROKEN_PIPE
  sys.stderr.flush()
  if code:
    os._exit(code)
  sys.exit(0)

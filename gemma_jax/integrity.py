"""Per-parameter checksums: recorded when a checkpoint is written, verified when it is restored.

The checksum of an array is the sum, modulo 2**32, of its elements' bit patterns (float32 as uint32,
bfloat16 as uint16). It changes whenever any one element does (the difference of two different 16- or
32-bit words is never a multiple of 2**32), a random corruption of many elements goes unnoticed with
probability 2**-32, and a sum is exact in any order, so the shards of a sharded array add up to the same
number. It is not a cryptographic hash: it detects damage, not tampering. numpy sums at memory speed
(about 30 GB/s here), so verifying costs a few percent of a restore (README, "Failure behaviour").

Restores go straight into the requested dtype, so the marker records each param's checksum in both
runtime dtypes: float32 exactly, and bfloat16 as round-to-nearest-even of the stored values (what Orbax's
cast and ml_dtypes both do).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import threading
from typing import Any, Iterator

import jax
import ml_dtypes
import numpy as np

from .configs import DTYPES
from .errors import GemmaError

_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32}
# Quantized values and int4's float16 scales and offsets (quantize.py) are restored as they are stored, so
# they get one checksum, of their dtype.
KEPT_DTYPES = ("int8", "int4", "float16")


def sum32(x: np.ndarray) -> int:
  """Sum of the elements' bit patterns modulo 2**32 (8-, 16- or 32-bit dtypes; numpy holds an int4 in a
  byte)."""
  x = np.ascontiguousarray(x)
  return int(np.add.reduce(x.reshape(-1).view(_WORDS[x.dtype.itemsize]), dtype=np.uint32))


def array_sum32(x: jax.Array) -> int:
  """sum32 of a (possibly sharded) jax array, from its addressable shards, each element counted once."""
  total = 0
  for shard in x.addressable_shards:
    if shard.replica_id == 0:
      total += sum32(np.asarray(shard.data))
  return total % (1 << 32)


def _renderings(x) -> dict[str, int]:
  x = np.asarray(x)  # a view of a CPU jax array, no copy
  if str(x.dtype) in KEPT_DTYPES:
    return {str(x.dtype): sum32(x)}
  # copy=False: a float32 param is summed in place (the 270M's embedding would otherwise be copied whole).
  f32 = sum32(x.astype(np.float32, copy=False))
  return {"float32": f32, "bfloat16": sum32(x.astype(ml_dtypes.bfloat16, copy=False))}


def record(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """{path: {"shape", "dtype", "sum32": {dtype: checksum}}} for each array of a flat param dict."""
  return {path: {"shape": list(np.shape(x)), "dtype": str(np.dtype(x.dtype)), "sum32": _renderings(x)}
          for path, x in flat.items()}


def write_marker(path: pathlib.Path, sums: dict[str, dict[str, Any]]) -> None:
  """Writes the completion marker (the last file of a checkpoint) and flushes it to disk."""
  with open(path, "w") as f:
    json.dump({"params": sums}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())


def read_marker(path: pathlib.Path) -> dict[str, dict[str, Any]]:
  try:
    sums = json.loads(path.read_text())["params"]
    if not isinstance(sums, dict):
      raise TypeError("'params' is not an object")
    return sums
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise GemmaError(f"{path} is damaged ({e}); convert again") from None


def verify(restored: dict[str, jax.Array], sums: dict[str, dict[str, Any]], directory: os.PathLike) -> None:
  """Raises a GemmaError naming the first restored param whose checksum differs from the recorded one.

  Several processes each hold only part of an array: they skip the check (it would need a collective).
  """
  if jax.process_count() > 1:
    return
  for path, x in restored.items():
    dtype = str(np.dtype(x.dtype))
    want = sums.get(path, {}).get("sum32", {}).get(dtype)
    if dtype not in (*DTYPES, *KEPT_DTYPES) or want is None:
      raise GemmaError(f"{directory} is damaged: COMPLETE.json has no {dtype} checksum for parameter {path}; "
                       "convert again")
    if array_sum32(x) != want:
      raise GemmaError(f"{directory} is damaged: parameter {path} does not match its checksum (the stored data "
                       "changed after it was written); convert again, or pass --no-verify / verify=False to "
                       "load it anyway")


def cause(e: BaseException) -> str:
  """A one-line cause: the OS error's text ("no space left on device") where there is one, else the first
  line of the message (tensorstore's run to pages)."""
  code = getattr(e, "errno", None)
  found = re.search(r"os_error_code='?(\d+)", str(e))
  if not code and found:
    code = int(found.group(1))
  if code:
    return os.strerror(code).lower()
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[0][:300] if lines else type(e).__name__


# Bytes a save needs beyond the arrays themselves (Orbax's metadata, config.json, the tokenizer).
SPACE_MARGIN = 64 << 20


def check_free_space(where: pathlib.Path, nbytes: int, directory: os.PathLike) -> None:
  """A GemmaError before writing if the file system of `where` has less room than the arrays need.

  Stored chunks are compressed, so this asks for at most what is needed: a save that passes can still
  fail later (quota, another writer), and then fails with the same kind of message.
  """
  free = shutil.disk_usage(where).free
  if free < nbytes + SPACE_MARGIN:
    raise GemmaError(f"cannot write checkpoint {directory}: no space left on device (the params need "
                     f"{nbytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free)")


class _DropMentions(logging.Filter):
  """Drops log records that mention `tag` (the temporary directory of a save; "" drops every record)."""

  def __init__(self, tag: str):
    super().__init__()
    self.tag = tag

  def filter(self, record: logging.LogRecord) -> bool:
    return self.tag not in record.getMessage()


@contextlib.contextmanager
def quiet_workers(tag: str) -> Iterator[None]:
  """Holds back what Orbax's worker threads print about a failing save of `tag` (for one full disk, 700
  lines of absl errors and asyncio tracebacks); the failure still reaches the caller as one exception.

  While the save runs, the absl (Orbax's own errors) and asyncio loggers drop every record, and uncaught
  exceptions of threads and unraisable ones are not printed. After a failure, a filter that drops only
  records naming `tag` stays on both: asyncio logs "exception was never retrieved" for each failed write
  whenever its future is collected, possibly long after. For the same reason a hook that drops only
  "Event loop is closed" errors stays on: writes still in flight when the save gave up finish later and
  post their results to the loop Orbax has closed by then (tensorstore reports that as an unraisable
  exception, printed into the user's terminal after the one clean error; seen on Python 3.13 under load).
  """
  loggers, everything, mentions = [logging.getLogger(n) for n in ("absl", "asyncio")], _DropMentions(""), \
      _DropMentions(tag)
  hooks = sys.unraisablehook, threading.excepthook
  for logger in loggers:
    logger.addFilter(everything)  # while the save runs: its workers log errors without naming the path
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None
  try:
    yield
  except BaseException:
    for logger in loggers:
      logger.addFilter(mentions)
    hooks = _without_closed_loop_errors(hooks[0]), hooks[1]
    raise
  finally:
    for logger in loggers:
      logger.removeFilter(everything)
    sys.unraisablehook, threading.excepthook = hooks


def _closed_loop_error(unraisable) -> bool:
  return isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"


def _without_closed_loop_errors(hook):
  """`hook`, except that it drops the "Event loop is closed" errors of a failed save's late writes."""
  if getattr(hook, "drops_closed_loop_errors", False):
    return hook

  def drop(unraisable):
    if not _closed_loop_error(unraisable):
      hook(unraisable)

  drop.drops_closed_loop_errors = True
  return drop

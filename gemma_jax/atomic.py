"""Atomic directory writes: build a directory under a temporary name, rename it into place when complete.

Every checkpoint writer (convert, the default model's cache, and the training, quantization and LoRA
exports built on checkpoint.save) goes through `atomic_directory`, so a reader never sees a half-written
directory under the final name: an interrupted or failed write leaves nothing there, and its temporary
directory is removed on the way out (or, after a SIGKILL, by the next write to the same place).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from typing import Iterator

from .errors import GemmaError
from .integrity import cause

PARTIAL = ".partial-"  # temporary siblings are named .<name>.partial-<pid> (a write in progress)
OLD = ".old-"  # .<name>.old-<pid>: a directory being replaced by an overwrite


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def remove_stale_partials(target: pathlib.Path) -> list[pathlib.Path]:
  """Removes the temporary directories that killed writes to `target` left behind; returns them.

  A temporary directory whose writer is still running (its pid is alive) is left alone.
  """
  removed = []
  if not target.parent.is_dir():
    return removed
  for path in target.parent.iterdir():
    for prefix in (f".{target.name}{PARTIAL}", f".{target.name}{OLD}"):
      pid = path.name[len(prefix):] if path.name.startswith(prefix) else None
      if pid is not None and not (pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
  return removed


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[pathlib.Path]:
  """Yields an empty temporary directory beside `target`; renames it to `target` when the block succeeds.

  target must not exist, or be an empty directory, unless overwrite=True (then it is replaced only after
  the new one is complete). On any exception, KeyboardInterrupt included, the temporary directory is
  removed and the exception propagates; OSErrors (permission, disk full, quota) become a GemmaError
  naming the target and the cause.
  """
  target = pathlib.Path(target).absolute()
  if target.exists() and not target.is_dir():
    raise GemmaError(f"output {target} exists and is not a directory")
  if target.is_dir() and any(target.iterdir()) and not overwrite:
    raise GemmaError(f"output directory {target} already exists and is not empty (pass overwrite=True / "
                     "--overwrite to replace it)")
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = target.parent / f".{target.name}{PARTIAL}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
  except OSError as e:
    raise GemmaError(f"cannot write {target}: {cause(e)}") from None
  try:
    yield tmp
    _replace(tmp, target)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):
      raise GemmaError(f"cannot write {target}: {cause(e)}") from None
    raise


def _replace(tmp: pathlib.Path, target: pathlib.Path) -> None:
  """Renames tmp to target; an existing target (empty, or being overwritten) is moved aside first."""
  if target.exists():
    old = target.parent / f".{target.name}{OLD}{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    try:
      os.rename(tmp, target)
    except BaseException:
      os.rename(old, target)
      raise
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, target)

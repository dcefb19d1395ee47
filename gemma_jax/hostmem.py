"""Host memory: glibc malloc settings under which buffers XLA frees go back to the system.

glibc serves a large allocation with its own mmap (unmapped again on free) only above a threshold that
starts at 128 KiB and, after the first such buffer is freed, rises with it up to 32 MiB (mallopt(3),
M_MMAP_THRESHOLD); from then on weight-sized and activation-sized buffers come from malloc arenas (one per
thread that allocates, up to 8 per core), which keep the memory of freed buffers: the checkpoint reader's
buffers, XLA's compile-time memory and each program's temporaries stay in the process's RSS and add up.
Measured on Gemma 3 270M in bfloat16 (params 511 MiB, cache at batch 8 36 MiB), benchmarks/bench_sample.py
on a quiet 2-core machine (2026-12-06): glibc's defaults peak at 1904 MiB beyond the runtime (3.5x params +
cache) and run prefill at 1024 tok/s, decode b1 28.3 and b8 129.2 tok/s; fixed 64 KiB mmap and trim
thresholds with 2 arenas peak at 1310 MiB (2.4x) but cost 20-30% of the speed (730, 22.8, 101.7: every
buffer over 64 KiB XLA allocates per call is a fresh mmap, page-faulted in); 4 MiB thresholds with 2 arenas
peak at 1552 MiB (2.8x) at the defaults' speed within 5% (970, 28.7, 128.4). These are the settings.

Set once per process before the weights are loaded (model.load). A variable the user set
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_ARENA_MAX) is left as it is, and
GEMMA_JAX_MALLOC=0 leaves all three alone. On a C library other than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import os

# mallopt(3) parameter numbers (glibc malloc.h) and the values measured above.
SETTINGS = (("MALLOC_TRIM_THRESHOLD_", -1, 4 << 20), ("MALLOC_MMAP_THRESHOLD_", -3, 4 << 20),
            ("MALLOC_ARENA_MAX", -8, 2))
_applied: list[str] | None = None


def tune_malloc() -> list[str]:
  """Applies SETTINGS with mallopt once per process; returns the names applied (empty where none were)."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = []
  if os.environ.get("GEMMA_JAX_MALLOC", "1") == "0":
    return _applied
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and others lack it)
  except (OSError, AttributeError):
    return _applied
  for name, param, value in SETTINGS:
    if name not in os.environ and libc.mallopt(param, value) == 1:
      _applied.append(name)
  return _applied

"""Checks of the arguments users pass to Model and ChatSession, each a GemmaError naming the problem.

A module at the user-input boundary: its functions take anything a caller passes and say what is wrong
with it (so tests/conftest.py leaves it out of the annotation checks, like model.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import GemmaError

CACHE_POLICIES = ("error", "rolling")


def is_int(x) -> bool:
  """An int or numpy integer, not a bool (True is an int to Python, never a token or a count here)."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_max_new_tokens(max_new_tokens) -> int:
  """max_new_tokens as a Python int; a GemmaError unless it is an integer >= 1 (numpy integers count)."""
  if not is_int(max_new_tokens) or max_new_tokens < 1:
    raise GemmaError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  return int(max_new_tokens)


def check_cache_policy(cache_policy: str) -> None:
  if cache_policy not in CACHE_POLICIES:
    raise GemmaError(f"cache_policy must be 'error' or 'rolling', got {cache_policy!r}")


def check_stop_strings(stop: Sequence[str] | str) -> tuple[str, ...]:
  stop = (stop,) if isinstance(stop, str) else tuple(stop)
  for s in stop:
    if not isinstance(s, str) or not s:
      raise GemmaError(f"stop strings must be non-empty strings, got {s!r}")
  return stop


__all__ = ["CACHE_POLICIES", "check_cache_policy", "check_max_new_tokens", "check_stop_strings", "is_int"]

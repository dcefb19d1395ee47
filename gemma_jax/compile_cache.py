"""A persistent XLA compilation cache, so a second process skips compiling what the first one compiled.

Compiling the prefill and decode programs is most of a CLI's time to the first token on CPU (issue 12, cold
start). JAX can keep compiled executables on disk, keyed by the program, the backend and the compile
options (jax/_src/compilation_cache.py), so a stale entry is never used: a changed model, dtype, shape or
JAX version is a different key.
"""

from __future__ import annotations

import os
import pathlib

import jax

from .default_model import cache_dir

ENV = "GEMMA_JAX_COMPILE_CACHE"  # "0" turns the cache off; a path puts it there


def enable_compilation_cache() -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache in <gemma_jax cache dir>/xla (README "Cold start").

  Left alone when the user set JAX's own `jax_compilation_cache_dir` (JAX_COMPILATION_CACHE_DIR), and off
  with GEMMA_JAX_COMPILE_CACHE=0. Every program is cached, not only those over JAX's default 1 s of
  compile time: on a 2-core CPU the many sub-second ones add up to seconds. Returns the directory in use.
  """
  setting = os.environ.get(ENV, "")
  if setting == "0":
    return None
  if jax.config.jax_compilation_cache_dir:
    return pathlib.Path(jax.config.jax_compilation_cache_dir)
  path = pathlib.Path(setting) if setting else cache_dir() / "xla"
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path

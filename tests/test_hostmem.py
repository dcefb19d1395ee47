"""hostmem.tune_malloc: applied once per process, never over a setting the user made, and switched off by
GEMMA_JAX_MALLOC=0. Each case in a fresh interpreter (mallopt settings last for the process)."""

import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

HOSTMEM = pathlib.Path(__file__).parent.parent / "gemma_jax" / "hostmem.py"
# hostmem.py imports nothing from gemma_jax: loaded alone, so the case needs no JAX start-up.
SCRIPT = f"""
import importlib.util, json
spec = importlib.util.spec_from_file_location("hostmem", {str(HOSTMEM)!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
print(json.dumps([m.tune_malloc(), m.tune_malloc()]))
"""


def applied(**env) -> list[list[str]]:
  clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GEMMA_JAX_MALLOC"}
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=dict(clean, **env), capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_settings_are_applied_once_and_respect_the_users():
  first, again = applied()
  assert first == ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX"] and again == first
  assert applied(MALLOC_ARENA_MAX="4")[0] == ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"]
  assert applied(GEMMA_JAX_MALLOC="0")[0] == []

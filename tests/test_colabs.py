"""colabs/: every notebook matches its jupytext source, opens with the install cell, and runs end to end on
CPU with the real Gemma 3 270M, failing the run if a cell raises. Cells tagged needs-accelerator or
needs-download are kept in the notebooks and skipped here (their source is replaced before execution).

Regenerate the .ipynb files after editing a source: jupytext --to ipynb colabs/*.py (colabs/README.md).
"""

import os
import pathlib

import pytest

COLABS = pathlib.Path(__file__).parent.parent / "colabs"
SOURCES = sorted(COLABS.glob("*.py"))
SKIP_TAGS = {"needs-accelerator", "needs-download"}
# Notebooks that must exist (colabs/README.md lists them); a renamed or lost one fails here.
EXPECTED = {"quickstart", "sampling", "evaluation", "sharding", "finetuning"}

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")


def cells(nb) -> list[tuple[str, str, list[str]]]:
  return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


def test_every_expected_notebook_is_there():
  assert {p.stem for p in SOURCES} == EXPECTED
  assert {p.stem for p in COLABS.glob("*.ipynb")} == EXPECTED


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_is_in_sync_with_its_source_and_has_no_outputs(source):
  nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
  assert cells(nb) == cells(jupytext.read(source)), f"run: jupytext --to ipynb {source.relative_to(COLABS.parent)}"
  assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_opens_with_the_install_cell(source):
  first = next(c.source for c in jupytext.read(source).cells if c.cell_type == "code")
  for needle in ('"pip", "install"', "jax[tpu]", "jax[cuda12]", 'find_spec("gemma_jax") is None'):
    assert needle in first
  tags = {t for _, _, ts in cells(jupytext.read(source)) for t in ts}
  assert tags <= SKIP_TAGS, f"unknown tags {tags - SKIP_TAGS}: the runner would execute those cells"


@pytest.fixture(scope="module")
def default_model_cache(ckpt_270m, tmp_path_factory):
  """A GEMMA_JAX_CACHE in which gj.default_checkpoint() finds the session's converted 270M."""
  from gemma_jax import default_model

  cache = tmp_path_factory.mktemp("gemma_jax_cache")
  (cache / default_model.checkpoint_dir().name).symlink_to(pathlib.Path(ckpt_270m).resolve())
  return cache


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_runs_on_cpu(source, default_model_cache, tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
  skipped = 0
  for c in nb.cells:
    tags = SKIP_TAGS & set(c.metadata.get("tags", []))
    if c.cell_type == "code" and tags:
      c.source, skipped = f"# skipped on CPU in the test suite: {', '.join(sorted(tags))}", skipped + 1
  monkeypatch.setenv("GEMMA_JAX_CACHE", str(default_model_cache))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # The kernel (and the commands it starts) imports this checkout's gemma_jax, installed or not.
  root = str(COLABS.parent)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell raises
  ran = [c for c in nb.cells if c.cell_type == "code" and not c.source.startswith("# skipped on CPU")]
  assert ran and all(o.get("output_type") != "error" for c in ran for o in c.get("outputs", []))

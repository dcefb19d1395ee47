"""The package's shape (design.md, "Layout"): imports point downwards, with the CLIs on top; flag parsing,
printing and sharding constraints each in their one place; no module longer than 350 lines.

Read from the source with `ast`, so a lazy import inside a function counts as much as a top-level one.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parent.parent / "gemma_jax"
# The thin CLIs: they parse flags, call the library and print. Any other `__main__` is one too.
CLI_MODULES = {"gemma_jax.cli", "gemma_jax.sample", "gemma_jax.chat", "gemma_jax.score", "gemma_jax.convert.__main__",
               "gemma_jax.train", "gemma_jax.eval"}
MAX_LINES = 350
# Modules allowed over MAX_LINES. Keep it empty: split a module that grows past the limit instead.
LONG_MODULES_ALLOWED: set[str] = set()


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_cli(name: str) -> bool:
  return name in CLI_MODULES or name.endswith(".__main__")


def trees() -> dict[str, ast.Module]:
  return {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def walk(node: ast.AST):
  """ast.walk without `if TYPE_CHECKING:` blocks (imports for annotations only, never run)."""
  yield node
  for child in ast.iter_child_nodes(node):
    if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
      continue
    yield from walk(child)


def imports(name: str, tree: ast.Module) -> set[str]:
  """The gemma_jax modules `name` imports when it runs, anywhere in its code (`from . import x` names x)."""
  package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
  out = set()
  for node in walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        source = f"{base}.{node.module}" if node.module else base
      else:
        source = node.module or ""
      submodules = {f"{source}.{a.name}" for a in node.names} & set(MODULES)
      out |= submodules if len(submodules) == len(node.names) else submodules | {source}
  return {m for m in out if m in MODULES and m != name}


def test_the_cli_list_names_real_modules():
  assert CLI_MODULES <= set(MODULES)


def test_imports_point_downwards():
  """No import cycle between gemma_jax modules (a package's __init__ counts as the module it is)."""
  graph = {name: imports(name, tree) for name, tree in trees().items()}
  done, path = set(), []

  def visit(name):
    if name in path:
      return path[path.index(name):] + [name]
    if name in done:
      return None
    path.append(name)
    for dep in sorted(graph[name]):
      cycle = visit(dep)
      if cycle:
        return cycle
    path.pop()
    done.add(name)
    return None

  cycles = [c for c in map(visit, sorted(graph)) if c]
  assert cycles == [], " -> ".join(cycles[0])


def test_no_library_module_imports_a_cli_module():
  found = {name: sorted(m for m in imports(name, tree) if is_cli(m))
           for name, tree in trees().items() if not is_cli(name)}
  assert {name: clis for name, clis in found.items() if clis} == {}


def test_cli_py_is_imported_only_by_cli_modules():
  importers = {name for name, tree in trees().items() if "gemma_jax.cli" in imports(name, tree)}
  assert importers and {name for name in importers if not is_cli(name)} == set()


def test_flag_parsing_and_printing_only_in_the_clis():
  found = []
  for name, tree in trees().items():
    if is_cli(name):
      continue
    for node in ast.walk(tree):
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
        found.append(f"{name}:{node.lineno} print")
      if isinstance(node, (ast.Import, ast.ImportFrom)) and "argparse" in (
          [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]):
        found.append(f"{name}:{node.lineno} argparse")
  assert found == []


def test_every_sharding_constraint_is_in_sharding_py():
  users = {name for name, path in MODULES.items() if "with_sharding_constraint" in path.read_text()}
  assert users == {"gemma_jax.sharding"}


def long_modules() -> dict[str, int]:
  lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
  return {name: n for name, n in lengths.items() if n > MAX_LINES and name not in LONG_MODULES_ALLOWED}


def test_no_module_is_over_350_lines():
  assert LONG_MODULES_ALLOWED == set()
  assert long_modules() == {}


def test_import_gemma_jax_leaves_the_heavy_readers_unloaded():
  # `import gemma_jax` should cost about `import jax, flax.nnx` (issue 12, cold start): Orbax (~0.3 s),
  # tensorstore and gguf load when a checkpoint or a GGUF file is first read or written.
  import subprocess
  import sys

  code = ("import sys, gemma_jax; print(' '.join(m for m in ('orbax.checkpoint', 'tensorstore', 'gguf', 'torch') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=PACKAGE.parent)
  assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr

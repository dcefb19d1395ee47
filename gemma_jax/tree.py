"""Nested param dicts <-> flat {"a/b/c": leaf} dicts: how checkpoints, importers and tests name params."""

from __future__ import annotations

from typing import Any


def flatten(tree: dict[Any, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf} (integer keys, e.g. of an nnx.List, become their decimal text)."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dict (string keys; nnx.replace_by_pure_dict accepts "0" for list index 0)."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree

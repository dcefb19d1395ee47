"""A fine-tuning run's settings: one frozen dataclass, read from YAML recipes (configs/) and flags.

Precedence: the dataclass defaults < the YAML file < explicit flags. The resolved recipe is written to
the run directory (RUN/recipe.yaml); resuming compares it with the new one and refuses any difference
that would change the trained parameters, naming it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping

import yaml

from .configs import QUANT_SCHEMES
from .errors import GemmaError

METHODS = ("lora", "full")
DTYPES = ("float32", "bfloat16")
# Settings that do not change the trained parameters: a resumed run may change them. (The mesh changes
# float summation order only: sharded training equals one device within 1e-5, tests/sharded.)
RESUMABLE = frozenset({"save_every", "keep", "eval_every", "eval_data", "mesh"})


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Everything that defines a fine-tuning run (the flags of `python -m gemma_jax.train`).

  Attributes:
    ckpt: the base checkpoint directory (None: the embedded default model).
    data / eval_data: JSONL files (data.py); eval_data is optional.
    method: "lora" (adapters on `lora_targets`, base frozen) or "full" (every param trained).
    quantize: None, or "int8" / "int4": the base is quantized in memory when loaded and its adapters
      train over the frozen int values (QLoRA; quantize.py's defaults). A base checkpoint that is
      already quantized needs no setting: LoRA over it is QLoRA too.
    steps: optimizer updates; each takes grad_accum batches of batch_size rows of seq_len tokens at most.
    pack: several examples per row (data.py); truncate: cut examples longer than seq_len instead of
      refusing them.
    dtype: compute dtype; master weights and optimizer state are float32 either way.
    remat: recompute each block's activations in the backward pass (less memory, ~1/3 more compute).
  """

  data: str = ""
  ckpt: str | None = None
  eval_data: str | None = None
  method: str = "lora"
  quantize: str | None = None
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("q_einsum", "kv_einsum", "attn_vec_einsum", "gating_einsum", "linear")
  steps: int = 200
  batch_size: int = 4
  seq_len: int = 256
  grad_accum: int = 1
  pack: bool = False
  truncate: bool = False
  learning_rate: float = 1e-4
  warmup: int = 0
  weight_decay: float = 0.0
  clip: float = 1.0
  adam_eps: float = 1e-8
  save_every: int = 100
  keep: int = 3
  eval_every: int = 50
  seed: int = 0
  dtype: str = "float32"
  remat: bool = False
  mesh: str | None = None

  def __post_init__(self):
    if isinstance(self.lora_targets, list):
      object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    for f in dataclasses.fields(self):
      _check_type(f.name, getattr(self, f.name), f.type)
    if not self.data:
      raise GemmaError("no training data: pass --data FILE.jsonl (or `data:` in the recipe)")
    if self.method not in METHODS:
      raise GemmaError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
    if self.quantize not in (None, *QUANT_SCHEMES):
      raise GemmaError(f"unknown quantize scheme {self.quantize!r}; known: {', '.join(QUANT_SCHEMES)}")
    if self.quantize is not None and self.method != "lora":
      raise GemmaError(f"quantize ({self.quantize}) needs method lora: a quantized base is frozen (QLoRA), "
                       "only adapters train")
    if self.dtype not in DTYPES:
      raise GemmaError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
    positive = ("steps", "batch_size", "seq_len", "grad_accum", "lora_rank", "save_every", "keep", "eval_every")
    for name in positive:
      if getattr(self, name) < 1:
        raise GemmaError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
    for name in ("learning_rate", "lora_alpha", "clip", "adam_eps"):
      if not getattr(self, name) > 0:
        raise GemmaError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
    if self.warmup < 0 or self.weight_decay < 0:
      raise GemmaError("warmup and weight-decay cannot be negative")
    if self.warmup >= self.steps:
      raise GemmaError(f"warmup ({self.warmup}) must be shorter than steps ({self.steps})")

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["lora_targets"] = list(self.lora_targets)
    return d

  def changes_from(self, saved: Recipe) -> list[str]:
    """The settings that differ from `saved` and would change the trained params, as "name: a -> b"."""
    return [f"{k}: {v!r} -> {getattr(self, k)!r}" for k, v in sorted(saved.to_dict().items())
            if k not in RESUMABLE and v != self.to_dict()[k]]


_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_type(name: str, value: Any, annotation: str) -> None:
  base = annotation.replace(" | None", "")
  if value is None and "None" in annotation:
    return
  if base.startswith("tuple"):
    ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
  else:
    want = _TYPES[base]
    ok = isinstance(value, want) and not (isinstance(value, bool) and base in ("int", "float"))
  if not ok:
    raise GemmaError(f"{name.replace('_', '-')} must be {base}, got {value!r}")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
  """The settings of a YAML recipe, checked against Recipe's fields (an unknown key names the file)."""
  path = pathlib.Path(path)
  try:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
  except yaml.YAMLError as e:
    raise GemmaError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
  if loaded is None:
    return {}
  if not isinstance(loaded, dict):
    raise GemmaError(f"{path}: a recipe is a mapping of settings, got {type(loaded).__name__}")
  known = {f.name for f in dataclasses.fields(Recipe)}
  unknown = sorted(str(k) for k in loaded if str(k).replace("-", "_") not in known)
  if unknown:
    raise GemmaError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
  return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def resolve(file: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None, *,
            saved: Recipe | None = None) -> Recipe:
  """Recipe from the defaults (or a resumed run's `saved` recipe), then the YAML file's settings, then
  `overrides` (None values are unset)."""
  settings = saved.to_dict() if saved is not None else {}
  settings.update(read_yaml(file) if file is not None else {})
  settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
  return Recipe(**settings)


def write(recipe: Recipe, path: pathlib.Path) -> None:
  path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=True))


def read_saved(path: pathlib.Path) -> Recipe:
  """The recipe a run directory was started with."""
  if not path.is_file():
    raise GemmaError(f"{path.parent} is not a training run (no {path.name}); start a new run with another --out")
  try:
    return Recipe(**read_yaml(path))
  except GemmaError as e:
    raise GemmaError(f"{path} is damaged: {e}") from None

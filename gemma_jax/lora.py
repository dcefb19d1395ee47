"""LoRA adapters (Hu et al. 2021, arXiv:2106.09685) on the projection Einsums: apply, split, merge, save, load.

An adapter adds scale * (x A) B to one Einsum's output, scale = alpha / rank (Hugging Face PEFT's default,
`LoraLayer.update_layer`; no rsLoRA). Adapters sit on each weight that PEFT adapts, under our names:

  ours              PEFT           A                 B                  contracted (TARGETS)
  q_einsum          q_proj         (D, R)            (R, N, H)          D
  kv_einsum         k_proj, v_proj (C, D, R)         (C, R, K, H)       D
  attn_vec_einsum   o_proj         (N, H, R)         (R, D)             N, H
  gating_einsum     gate_proj, up  (C, D, R)         (C, R, F)          D
  linear            down_proj      (F, R)            (R, D)             F

kv_einsum and gating_einsum stack two matrices on C ([k, v], [gate, up]), so A and B carry C too: each
of the two gets its own adapter, as in PEFT. All five follow one rule: A holds w's stacked axis, the axes
the input contracts and R; B holds the stacked axis, R and w's other axes. A and B are nnx.LoRAParams
(a Param subclass with logical `axes`), so `split` separates them from the frozen base (QLoRA: a quantized one).

  lora.apply(model, LoraConfig(rank=8, alpha=16))     # in place; B = 0: the model computes what it did
  graphdef, lora_params, base = lora.split(model)     # train.loss_fn(lora_params, graphdef, b, frozen=base)
  lora.save_adapter("runs/x/adapter", model, source=...)  and  lora.load_adapter("runs/x/adapter", model)
  lora.save_merged("runs/x/merged", model)            # a plain checkpoint: gj.load and every CLI read it
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from . import checkpoint
from .atomic import atomic_directory
from .configs import DTYPES
from .errors import GemmaError
from .layers import Einsum
from .matmul import lora_product
from .quantize import dequantize_params, float_config
from .shapes import unchecked_fields
from .transformer import Transformer, flat_params, official_path
from .tree import unflatten

# target -> the logical axes of its weight that the input contracts (attention.py, transformer.py layouts).
TARGETS: dict[str, tuple[str, ...]] = {"q_einsum": ("D",), "kv_einsum": ("D",), "attn_vec_einsum": ("N", "H"),
                                       "gating_einsum": ("D",), "linear": ("F",)}
DEFAULT_TARGETS: tuple[str, ...] = tuple(TARGETS)
STACKED = "_"  # the logical name of C
EMBEDDING_NAMES = ("embedder", "input_embedding", "embedding", "embed_tokens", "lm_head")
FORMAT, VERSION = "gemma_jax_lora", 1
CONFIG_FILE, WEIGHTS_FILE = "adapter.json", "adapter.safetensors"
# ModelConfig fields that fix the adapters' shapes (and the family, which fixes what they mean); a base
# that differs in one of them cannot take the adapter.
BASE_FIELDS = ("family", "num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim",
               "vocab_size")


# Unchecked by the test run's type hook: __post_init__ checks every field itself and names the problem.
@unchecked_fields
@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which Einsums get adapters, and their rank and alpha (scale = alpha / rank).

  Attributes:
    rank: R, a positive integer.
    alpha: a positive number; PEFT's lora_alpha.
    targets: names from TARGETS (every layer's copy of each). The embedding cannot be a target: it is tied
      to the logits, so an adapter there would have to act in both uses.
  """

  rank: int
  alpha: float
  targets: tuple[str, ...] = DEFAULT_TARGETS

  def __post_init__(self):
    if isinstance(self.targets, str) or not isinstance(self.targets, (tuple, list)):
      raise GemmaError(f"LoRA targets must be a tuple of names, got {self.targets!r}")
    object.__setattr__(self, "targets", tuple(self.targets))
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
      raise GemmaError(f"LoRA rank must be a positive integer, got {self.rank!r}")
    if (not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha)
        or self.alpha <= 0):
      raise GemmaError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
    object.__setattr__(self, "alpha", float(self.alpha))
    for t in self.targets:
      if t in EMBEDDING_NAMES:
        raise GemmaError(f"LoRA target {t!r}: the embedding is tied to the output logits, so an adapter on it "
                         "would have to be applied in both uses; that is not supported")
      if t not in TARGETS:
        raise GemmaError(f"unknown LoRA target {t!r}; known: {', '.join(TARGETS)}")
    if not self.targets or len(set(self.targets)) != len(self.targets):
      raise GemmaError(f"LoRA targets must be distinct and not empty, got {self.targets!r}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def ab_dims(w_dims: tuple, w_axes: tuple[str, ...], target: str, r) -> tuple[tuple, tuple]:
  """A's and B's dims from w's: A = (stacked, contracted..., r), B = (stacked, r, others...).

  The one rule for every target, applied to w's shape (r = rank), logical axes (r = "R") or einsum
  letters (r = "R").
  """
  con = TARGETS[target]
  pick = lambda keep: tuple(d for d, a in zip(w_dims, w_axes, strict=True) if keep(a))
  stack = pick(lambda a: a == STACKED)
  return stack + pick(lambda a: a in con) + (r,), stack + (r,) + pick(lambda a: a != STACKED and a not in con)


class LoraAdapter(nnx.Module):
  """scale * (x A) B for one Einsum, in the letters of its equation (module docstring), from the values of A
  and B (init_adapter draws fresh ones), cast to the activations' dtype (float32 masters, bf16 compute)."""

  def __init__(self, a: jax.Array, b: jax.Array, w_axes: tuple[str, ...], target: str, alpha: float):
    axes = ab_dims(w_axes, w_axes, target, "R")
    self.lora_a, self.lora_b = nnx.LoRAParam(a, axes=axes[0]), nnx.LoRAParam(b, axes=axes[1])
    self.w_axes, self.target, self.rank, self.alpha = tuple(w_axes), target, a.shape[-1], float(alpha)
    self.scale = self.alpha / self.rank

  def __call__(self, equation: str, x: jax.Array) -> jax.Array:
    ins, out = equation.split("->")
    xs, ws = ins.split(",")
    con = "".join(c for c, ax in zip(ws, self.w_axes) if ax in TARGETS[self.target])
    if len(ws) != len(self.w_axes) or "R" in equation or not xs.endswith(con):
      raise ValueError(f"LoRA adapter on {self.target} (weight axes {self.w_axes}) cannot follow {equation!r}")
    stack = "".join(c for c, ax in zip(ws, self.w_axes) if ax == STACKED)
    lead, others = xs[:len(xs) - len(con)], "".join(c for c in ws if c not in con + stack)
    a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
    s = a.shape[0] if stack else 1  # x (lead..., con...) as 2-D: one product (matmul.lora_product)
    y = lora_product(x.reshape(-1, math.prod(x.shape[len(lead):])), a.reshape(s, -1, a.shape[-1]),
                     b.reshape(s, b.shape[len(stack)], -1))
    y = y.reshape((*((s,) if stack else ()), *x.shape[:len(lead)], *b.shape[len(stack) + 1:]))
    return jnp.einsum(f"{stack + lead + others}->{out}", y) * jnp.asarray(self.scale, x.dtype)

  def delta(self) -> jax.Array:
    """scale * A B in the layout of the weight it adapts, float32: w + delta() computes w and the adapter."""
    ws = "".join("C" if a == STACKED else a for a in self.w_axes)
    a_letters, b_letters = ("".join(t) for t in ab_dims(tuple(ws), self.w_axes, self.target, "R"))
    a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
    return jnp.einsum(f"{a_letters},{b_letters}->{ws}", a, b, precision=jax.lax.Precision.HIGHEST) * self.scale


def init_adapter(w: jax.Array, w_axes: tuple[str, ...], target: str, config: LoraConfig, key: jax.Array,
                 dtype) -> LoraAdapter:
  """A fresh adapter: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and B = 0, so it adds exactly nothing.

  PEFT initialises A with kaiming_uniform_(a=sqrt(5)), whose bound is 1/sqrt(fan_in) (`LoraLayer.
  reset_lora_parameters`); fan_in is the contracted size (N * H for attn_vec_einsum).
  """
  a_shape, b_shape = ab_dims(tuple(w.shape), w_axes, target, config.rank)
  fan_in = math.prod(n for n, a in zip(w.shape, w_axes) if a in TARGETS[target])
  a = jax.random.uniform(key, a_shape, jnp.float32, -fan_in ** -0.5, fan_in ** -0.5).astype(dtype)
  return LoraAdapter(a, jnp.zeros(b_shape, dtype), w_axes, target, config.alpha)


# ---- the adapters of a model ----------------------------------------------------------------------

def targets_of(model: Transformer, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, Einsum]:
  """{official name ("layer_0/attn/q_einsum"): Einsum} of every Einsum named in targets."""
  found = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Einsum) and path and path[-1] in targets:
      found[official_path("/".join(map(str, path)))] = node
  return found


def adapters(model: Transformer) -> dict[str, LoraAdapter]:
  """{official name of the adapted Einsum: its adapter}; empty for a plain model."""
  return {p: e.adapter for p, e in targets_of(model).items() if e.adapter is not None}


def config_of(model: Transformer) -> LoraConfig:
  """The LoraConfig the model's adapters were made with."""
  found = adapters(model)
  if not found:
    raise GemmaError("the model has no LoRA adapters (lora.apply adds them)")
  first = next(iter(found.values()))
  targets = tuple(t for t in DEFAULT_TARGETS if any(a.target == t for a in found.values()))
  return LoraConfig(first.rank, first.alpha, targets)


def apply(model: Transformer, config: LoraConfig, *, seed: int = 0, rngs: nnx.Rngs | None = None,
          dtype="float32") -> Transformer:
  """Adds a fresh adapter (B = 0) to every target Einsum of every layer, in place; returns the model.

  dtype: of A and B ("float32" by default: the trained masters; the product runs in the activations'
  dtype, like PEFT's autocast_adapter_dtype). rngs draws A (default nnx.Rngs(seed)).
  """
  if adapters(model):
    raise GemmaError("the model already has LoRA adapters; lora.strip(model) removes them")
  rngs = nnx.Rngs(seed) if rngs is None else rngs
  for name, einsum in targets_of(model, config.targets).items():
    w_axes = tuple(einsum.w.get_metadata()["axes"])
    einsum.adapter = init_adapter(einsum.w[...], w_axes, name.rsplit("/", 1)[1], config, rngs.params(),
                                  jnp.dtype(dtype))
  return model


def strip(model: Transformer) -> Transformer:
  """Removes every adapter, in place (the base model is left as it was); returns the model."""
  for einsum in targets_of(model).values():
    einsum.adapter = None
  return model


def split(model: Transformer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, lora params, base params): train the first, pass the second as train.loss_fn's frozen."""
  if not adapters(model):
    raise GemmaError("the model has no LoRA adapters to train (lora.apply adds them)")
  return nnx.split(model, nnx.LoRAParam, ...)


def merge(model: Transformer) -> dict[str, jax.Array]:
  """{official name: array} of the base params with every adapter folded in: w + scale * A B.

  The sum is taken in float32 and cast to w's dtype. A quantized base (QLoRA) is dequantized first, to
  float32: the result is the float model of float_config(model.config). The model is not
  changed; checkpoint.save takes tree.unflatten of the result (or use save_merged).
  """
  _, _, base = nnx.split(model, nnx.LoRAParam, ...)
  flat = flat_params(base)
  dequantize_params(model.config, flat)  # nothing to do for a float base
  for name, adapter in adapters(model).items():
    w = flat[f"{name}/w"]
    flat[f"{name}/w"] = (w.astype(jnp.float32) + adapter.delta()).astype(w.dtype)
  return flat


def save_merged(directory: str | os.PathLike, model: Transformer, *, source: str = "",
                tokenizer_proto: bytes | None = None, instruct: bool | None = None,
                overwrite: bool = False) -> pathlib.Path:
  """Writes merge(model) as a plain checkpoint (checkpoint.save): gj.load and every CLI read it."""
  return checkpoint.save(directory, float_config(model.config), unflatten(merge(model)),
                         tokenizer_proto=tokenizer_proto, source=source, instruct=instruct, overwrite=overwrite)


# ---- adapter-only files -----------------------------------------------------------------------------

def adapter_arrays(model: Transformer) -> dict[str, jax.Array]:
  """{"layer_0/attn/q_einsum/lora_a": A, ...../lora_b": B} of every adapter (the adapter file's keys)."""
  return {f"{n}/lora_{x}": getattr(a, f"lora_{x}")[...] for n, a in adapters(model).items() for x in "ab"}


def save_adapter(directory: str | os.PathLike, model: Transformer, *, source: str = "",
                 overwrite: bool = False) -> pathlib.Path:
  """Writes only the adapters: DIR/adapter.safetensors (A and B, float32) and DIR/adapter.json.

  adapter.json records the format, rank, alpha, targets, the adapters' dtype and the base they belong to
  (its ModelConfig and `source`, e.g. the base checkpoint's config.json source). Atomic (atomic.py).
  """
  config = config_of(model)
  # float32 holds bfloat16 exactly, and safetensors.numpy has no bfloat16: the file is float32 either way.
  arrays = {k: np.asarray(v.astype(jnp.float32)) for k, v in adapter_arrays(model).items()}
  dtype = str(next(iter(adapters(model).values())).lora_a[...].dtype)
  meta = {"format": FORMAT, "version": VERSION, "rank": config.rank, "alpha": config.alpha,
          "targets": list(config.targets), "dtype": dtype,
          "base": {"config": model.config.to_dict(), "source": source}}
  directory = pathlib.Path(directory).absolute()
  with atomic_directory(directory, overwrite=overwrite) as tmp:
    save_file(arrays, tmp / WEIGHTS_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
  return directory


def read_adapter_meta(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, Any]]:
  """(LoraConfig, the whole adapter.json) of an adapter directory; GemmaError naming the file if bad."""
  path = pathlib.Path(directory) / CONFIG_FILE
  try:
    meta = json.loads(path.read_text())
  except FileNotFoundError:
    raise GemmaError(f"{path} does not exist: {directory} is not a LoRA adapter directory") from None
  except OSError as e:
    raise GemmaError(f"cannot read {path}: {e}") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise GemmaError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise GemmaError(f"{path} is not a gemma_jax LoRA adapter config (no \"format\": \"{FORMAT}\")")
  if meta.get("version") != VERSION:
    raise GemmaError(f"{path} has format version {meta.get('version')!r}; this library reads version {VERSION}")
  try:
    config = LoraConfig(meta["rank"], meta["alpha"], tuple(meta["targets"]))
    base = meta["base"]["config"]
    if not isinstance(base, dict):
      raise TypeError("base config is not a mapping")
    if meta.get("dtype", "float32") not in DTYPES:
      raise TypeError(f"dtype must be one of {DTYPES}, got {meta.get('dtype')!r}")
  except (KeyError, TypeError, GemmaError) as e:
    raise GemmaError(f"{path}: invalid adapter config: {e}") from None
  return config, meta


def attach(model: Transformer, config: LoraConfig, arrays: dict[str, Any], *, where: str = "adapter arrays",
           dtype=None) -> Transformer:
  """Adds adapters with the given values to a model without adapters, in place; returns the model.

  arrays: {"layer_0/attn/q_einsum/lora_a": A, ...} (adapter_arrays' names and layouts), exactly the arrays
  config gives for this model; a missing, extra or misshapen one is a GemmaError naming it and `where`.
  dtype: of A and B (default: the arrays' own).
  """
  if adapters(model):
    raise GemmaError("the model already has LoRA adapters; lora.strip(model) removes them first")
  built = []
  for name, einsum in targets_of(model, config.targets).items():
    target, w_axes = name.rsplit("/", 1)[1], tuple(einsum.w.get_metadata()["axes"])
    a_shape, b_shape = ab_dims(tuple(einsum.w[...].shape), w_axes, target, config.rank)
    for key, shape in ((f"{name}/lora_a", a_shape), (f"{name}/lora_b", b_shape)):
      if key not in arrays:
        raise GemmaError(f"{where}: missing array {key} (expected shape {shape})")
      if tuple(np.shape(arrays[key])) != shape:
        raise GemmaError(f"{where}: array {key} has shape {tuple(np.shape(arrays[key]))}, expected {shape}")
    a, b = (jnp.asarray(arrays[f"{name}/lora_{x}"], dtype) for x in "ab")
    built.append((einsum, LoraAdapter(a, b, w_axes, target, config.alpha)))
  extra = sorted(set(arrays) - {f"{n}/lora_{x}" for n in targets_of(model, config.targets) for x in "ab"})
  if extra:
    raise GemmaError(f"{where}: unexpected array {extra[0]} (the adapter config targets "
                     f"{', '.join(config.targets)})" + (f"; and {len(extra) - 1} more" if len(extra) > 1 else ""))
  for einsum, adapter in built:  # only after every check: a failed attach leaves the model as it was
    einsum.adapter = adapter
  return model


def load_adapter(directory: str | os.PathLike, model: Transformer) -> LoraConfig:
  """Adds the adapters saved in `directory` to a model without adapters, in place; returns their config.

  The model's config must match the base the adapter was saved from in every field of BASE_FIELDS, and
  the file must hold exactly the arrays those shapes give; each mismatch is a GemmaError naming it.
  """
  config, meta = read_adapter_meta(directory)
  base = meta["base"]["config"]
  for field in BASE_FIELDS:
    if base.get(field) != getattr(model.config, field):
      raise GemmaError(f"{pathlib.Path(directory) / CONFIG_FILE}: the adapter was made for a base model with "
                       f"{field}={base.get(field)!r}, but this model has {field}={getattr(model.config, field)!r}")
  weights = pathlib.Path(directory) / WEIGHTS_FILE
  try:
    arrays = load_file(weights)
  except FileNotFoundError:
    raise GemmaError(f"{weights} does not exist: the adapter directory is incomplete") from None
  except (OSError, SafetensorError) as e:
    raise GemmaError(f"{weights} is not a valid safetensors file: {e}") from None
  attach(model, config, arrays, where=str(weights), dtype=jnp.dtype(meta.get("dtype", "float32")))
  return config

"""What every importer shares: the result type, config matching against presets, weight reshapes."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from ..configs import PRESETS, ModelConfig
from ..errors import GemmaError


class DeviceParams(dict):
  """A flat {path: array} dict that moves each array to a JAX array as it is stored.

  The numpy original (and the temporaries that made it) can then be freed at once, and Orbax writes
  JAX arrays without copying them (it copies numpy leaves), so an import holds one copy of the weights.
  """

  def __setitem__(self, key: str, value) -> None:
    super().__setitem__(key, jax.device_put(np.ascontiguousarray(value)))

  def update(self, other=(), **kwargs) -> None:
    for key, value in dict(other, **kwargs).items():
      self[key] = value


@dataclasses.dataclass
class Imported:
  """An importer's output: everything checkpoint.save needs."""

  config: ModelConfig
  params: dict[str, Any]  # flat {"layer_0/attn/q_einsum/w": array}, usually a DeviceParams
  tokenizer_proto: bytes | None
  source: str
  instruct: bool | None = None  # instruction-tuned? None when the source does not say
  # {weight name: (scheme, scale)}: blocks the source already holds quantized (GGUF's Q8_0 and Q4_0), which
  # `convert --quantize` keeps exactly when its scheme and block size match (quantize.quantize_params).
  block_scales: dict[str, tuple[str, Any]] = dataclasses.field(default_factory=dict)


def looks_instruct(*names: str | None) -> bool:
  """True if a model name says instruction-tuned ("gemma-2-2b-it", "Gemma 3 270m It", "...instruct")."""
  import re  # noqa: PLC0415

  return any(re.search(r"(^|[-_ ./])(it|instruct)($|[-_ ./])", n.lower()) for n in names if n)


def matching_preset(family: int, num_layers: int, embed_dim: int, hidden_dim: int, num_heads: int,
                    num_kv_heads: int, head_dim: int) -> ModelConfig | None:
  """The official preset with these dimensions, if any (it supplies what files do not store, such as
  the 27B models' query scale 1/sqrt(D/N))."""
  for cfg in PRESETS.values():
    if (cfg.family, cfg.num_layers, cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads,
        cfg.head_dim) == (family, num_layers, embed_dim, hidden_dim, num_heads, num_kv_heads, head_dim):
      return cfg
  return None


def expect_shape(name: str, array: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
  """Returns array if it has `shape`, else a GemmaError naming the tensor and both shapes."""
  if tuple(array.shape) != tuple(shape):
    raise GemmaError(f"{where}: tensor {name} has shape {tuple(array.shape)} but the config expects "
                     f"{tuple(shape)}")
  return array


def attention_params(cfg: ModelConfig, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                     o: np.ndarray) -> dict[str, np.ndarray]:
  """Row-major projection matrices -> our attention params.

  Args:
    q: (N*H, D), k and v: (K*H, D), o: (D, N*H) -- the torch/GGUF "out_features x in_features" layout.
  Returns:
    {"q_einsum/w": (D, N, H), "kv_einsum/w": (D, K, 2, H), "attn_vec_einsum/w": (N, H, D)}.
  """
  n, kh, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim
  out = {"attn_vec_einsum/w": o.reshape(d, n, h).transpose(1, 2, 0),
         "q_einsum/w": q.reshape(n, h, d).transpose(2, 0, 1),
         "kv_einsum/w": np.stack([k.reshape(kh, h, d), v.reshape(kh, h, d)], axis=1).transpose(3, 0, 1, 2)}
  return {key: np.ascontiguousarray(val) for key, val in out.items()}


def mlp_params(gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> dict[str, np.ndarray]:
  """gate, up (F, D) and down (D, F) -> {"gating_einsum/w": (F, 2, D), "linear/w": (F, D)}."""
  return {"gating_einsum/w": np.stack([gate, up], axis=1), "linear/w": np.ascontiguousarray(down.T)}


@dataclasses.dataclass(frozen=True)
class BlockNames:
  """One format's tensor names in block i (templates formatted with i) and the norms it stores.

  norms: {format's norm name template: our norm} (e.g. HF Gemma 1's post_attention_layernorm is our
  pre_ffw_norm); a norm the config does not use is not read.
  """

  q: str
  k: str
  v: str
  o: str
  gate: str
  up: str
  down: str
  q_norm: str
  k_norm: str
  norms: dict[str, str]


Take = Callable[[str, tuple[int, ...]], np.ndarray]


def block_params(cfg: ModelConfig, i: int, names: BlockNames, take: Take, take_norm: Take) -> dict[str, np.ndarray]:
  """Our params of block i under their official names ("layer_{i}/attn/q_einsum/w", ...).

  take(name, shape) reads one projection in the torch/GGUF "out_features x in_features" layout;
  take_norm(name, shape) one norm weight, zero-centred as ours are (GGUF's stored +1 removed by the caller).
  """
  d, f, h, n, k = cfg.embed_dim, cfg.hidden_dim, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
  name = lambda template: template.format(i=i)
  attn = attention_params(cfg, take(name(names.q), (n * h, d)), take(name(names.k), (k * h, d)),
                          take(name(names.v), (k * h, d)), take(name(names.o), (d, n * h)))
  mlp = mlp_params(take(name(names.gate), (f, d)), take(name(names.up), (f, d)), take(name(names.down), (d, f)))
  out = {f"layer_{i}/attn/{key}": val for key, val in attn.items()}
  out.update({f"layer_{i}/mlp/{key}": val for key, val in mlp.items()})
  unused = {"post_attention_norm"} if not cfg.use_post_attn_norm else set()
  unused |= {"post_ffw_norm"} if not cfg.use_post_ffw_norm else set()
  for template, ours in names.norms.items():
    if ours not in unused:
      out[f"layer_{i}/{ours}/scale"] = take_norm(name(template), (d,))
  if cfg.use_qk_norm:
    out[f"layer_{i}/attn/_query_norm/scale"] = take_norm(name(names.q_norm), (h,))
    out[f"layer_{i}/attn/_key_norm/scale"] = take_norm(name(names.k_norm), (h,))
  return out

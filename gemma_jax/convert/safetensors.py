"""Import Hugging Face Gemma, Gemma2 and Gemma3 text checkpoints (config.json + *.safetensors).

Both transformers config styles are read: v4 (`rope_theta`, `rope_local_base_freq`, `rope_scaling`,
`sliding_window_pattern`) and v5 (`rope_parameters` per layer type, `layer_types`). Multimodal Gemma 3
folders are read for their language model. HF norms are stored zero-centred, like ours; HF Gemma 1's
`post_attention_layernorm` is the pre-FFW norm (there is no post-attention norm in Gemma 1).
Tensors are read one at a time from the memory-mapped files in their stored dtype (bf16 stays bf16).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from ..configs import GLOBAL, LOCAL, OWN_LOCAL_ROPE_BASE, ModelConfig, family_defaults
from ..errors import GemmaError
from .common import BlockNames, DeviceParams, Imported, block_params, expect_shape, looks_instruct, matching_preset

MODEL_TYPES = {"gemma": 1, "gemma2": 2, "gemma3_text": 3, "gemma3": 3}
TOKENIZER_FILE = "tokenizer.model"
_P = "layers.{i}."
_HF = dict(q=_P + "self_attn.q_proj.weight", k=_P + "self_attn.k_proj.weight", v=_P + "self_attn.v_proj.weight",
           o=_P + "self_attn.o_proj.weight", gate=_P + "mlp.gate_proj.weight", up=_P + "mlp.up_proj.weight",
           down=_P + "mlp.down_proj.weight", q_norm=_P + "self_attn.q_norm.weight",
           k_norm=_P + "self_attn.k_norm.weight")
# HF Gemma 1's post_attention_layernorm is the pre-FFW norm (Gemma 1 has no post-attention norm).
BLOCK_NAMES = {
    1: BlockNames(**_HF, norms={_P + "input_layernorm.weight": "pre_attention_norm",
                                _P + "post_attention_layernorm.weight": "pre_ffw_norm"}),
    2: BlockNames(**_HF, norms={_P + "input_layernorm.weight": "pre_attention_norm",
                                _P + "post_attention_layernorm.weight": "post_attention_norm",
                                _P + "pre_feedforward_layernorm.weight": "pre_ffw_norm",
                                _P + "post_feedforward_layernorm.weight": "post_ffw_norm"}),
}


def is_hf_folder(path: str | os.PathLike) -> bool:
  path = pathlib.Path(path)
  return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _rope(hf: dict[str, Any], layer_type: str, default_base: float) -> tuple[float, float]:
  """(base, linear scale) for "full_attention" or "sliding_attention" layers, v4 or v5 config."""
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and layer_type in params:  # v5, per layer type
    params = params[layer_type]
  if isinstance(params, dict) and "rope_theta" in params:
    base = float(params["rope_theta"])
    scaling = params
  else:  # v4
    base = float(hf.get("rope_local_base_freq" if layer_type == "sliding_attention" else "rope_theta",
                        default_base))
    scaling = (hf.get("rope_scaling") or {}) if layer_type == "full_attention" else {}
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind not in ("default", "linear"):
    raise GemmaError(f"unsupported RoPE scaling {kind!r} (Gemma uses none or linear)")
  return base, float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0


def read_config(hf: dict[str, Any], vocab_size: int, where: str) -> ModelConfig:
  """A ModelConfig from an HF config dict; vocab_size comes from the embedding's rows."""
  model_type = hf.get("model_type")
  if model_type == "gemma3" and "text_config" in hf:
    hf = {**hf["text_config"], "model_type": "gemma3_text"}
    model_type = "gemma3_text"
  if model_type not in MODEL_TYPES:
    raise GemmaError(f"{where}: unsupported model_type {model_type!r}; gemma_jax imports "
                     f"{', '.join(MODEL_TYPES)}")
  family = MODEL_TYPES[model_type]
  act = hf.get("hidden_activation") or hf.get("hidden_act")
  if act not in (None, "gelu_pytorch_tanh", "gelu"):
    raise GemmaError(f"{where}: unsupported activation {act!r}")
  try:
    d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    dims = dict(num_layers=int(hf["num_hidden_layers"]), embed_dim=d, hidden_dim=int(hf["intermediate_size"]),
                num_heads=n, num_kv_heads=int(hf.get("num_key_value_heads", n)),
                head_dim=int(hf.get("head_dim") or d // n))
  except (KeyError, TypeError, ValueError) as e:
    raise GemmaError(f"{where}: config.json lacks a usable {e}") from None
  preset = matching_preset(family, **dims)
  fam = family_defaults(family)
  # The family gives what config.json does not state (norms, QK-norm, the layer pattern's period); what it
  # states overrides. Kept as the importer always read them: absent soft-caps are None and an absent
  # rope_theta is 10k, in every family.
  local_base, _ = _rope(hf, "sliding_attention", fam["rope_base_local"])
  global_base, global_scale = _rope(hf, "full_attention", 10_000.0)
  fields: dict[str, Any] = dict(
      fam, name=preset.name if preset else f"hf_{model_type}", vocab_size=vocab_size, **dims,
      norm_eps=float(hf.get("rms_norm_eps", fam["norm_eps"])),
      max_seq_len=int(hf.get("max_position_embeddings", fam["max_seq_len"])),
      query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
      attn_logits_softcap=hf.get("attn_logit_softcapping"),
      final_logits_softcap=hf.get("final_logit_softcapping"),
      rope_base_global=global_base, rope_scale_global=global_scale,
      rope_base_local=local_base if family in OWN_LOCAL_ROPE_BASE else global_base)
  if LOCAL in fam["attention_pattern"]:
    types = hf.get("layer_types")
    if types is None:  # v4: sliding_window_pattern (global every Nth), by default the family's period
      every = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", len(fam["attention_pattern"]))))
      types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(dims["num_layers"])]
    fields.update(attention_pattern=tuple(GLOBAL if t == "full_attention" else LOCAL for t in types),
                  sliding_window=int(hf["sliding_window"]))
  try:
    return ModelConfig(**fields)
  except (TypeError, ValueError) as e:
    raise GemmaError(f"{where}: {e}") from None


def _open_tensors(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """tensor name -> file, from model.safetensors.index.json or from every *.safetensors file."""
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise GemmaError(f"{index} is not a valid safetensors index: {e}") from None
    files = {name: folder / fname for name, fname in weight_map.items()}
    missing = sorted({str(p) for p in files.values() if not p.is_file()})
    if missing:
      raise GemmaError(f"{index} names shard files that do not exist: {missing}")
    return files
  files = {}
  for path in sorted(folder.glob("*.safetensors")):
    try:
      with safe_open(path, "numpy") as f:
        files.update({name: path for name in f.keys()})
    except Exception as e:  # safetensors raises its own error type for bad headers
      raise GemmaError(f"{path} is not a valid safetensors file: {e}") from None
  return files


def import_hf(folder: str | os.PathLike, progress: bool = False) -> Imported:
  """Reads an HF folder into our flat params, config and (when present) tokenizer.model."""
  folder = pathlib.Path(folder)
  where = str(folder)
  try:
    hf = json.loads((folder / "config.json").read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise GemmaError(f"{folder / 'config.json'}: cannot read: {e}") from None
  files = _open_tensors(folder)
  embed_names = [n for n in files if n.endswith("embed_tokens.weight")]
  if len(embed_names) != 1:
    raise GemmaError(f"{where}: expected one embed_tokens.weight tensor, found {embed_names}")
  prefix = embed_names[0][:-len("embed_tokens.weight")]  # "model." or "model.language_model." ...
  handles: dict[pathlib.Path, Any] = {}

  def read(name: str) -> np.ndarray:
    full = prefix + name
    if full not in files:
      raise GemmaError(f"{where}: tensor {full} is missing")
    path = files.pop(full)
    if path not in handles:
      handles[path] = safe_open(path, "numpy")
    return handles[path].get_tensor(full)

  embedding = read("embed_tokens.weight")
  cfg = read_config(hf, int(embedding.shape[0]), where)
  d = cfg.embed_dim
  expect_shape("embed_tokens.weight", embedding, (cfg.vocab_size, d), where)
  take = lambda name, shape: expect_shape(prefix + name, read(name), shape, where)
  params = DeviceParams()
  params["embedder/input_embedding"] = embedding
  params["final_norm/scale"] = take("norm.weight", (d,))
  names = BLOCK_NAMES[1 if cfg.family == 1 else 2]
  for i in tqdm(range(cfg.num_layers), desc="converting", unit="layer", disable=not progress):
    params.update(block_params(cfg, i, names, take, take))
  # lm_head is tied to the embedding in every Gemma; other towers (vision) are not ours to import.
  leftover = sorted(n for n in files if n.startswith(prefix) and not n.startswith(prefix + "lm_head"))
  if leftover:
    raise GemmaError(f"{where}: unexpected tensors for a {cfg.name} model: {leftover[:8]}")
  tok = folder / TOKENIZER_FILE
  instruct = True if looks_instruct(folder.name, hf.get("_name_or_path")) else None
  return Imported(cfg, params, tok.read_bytes() if tok.is_file() else None, source=f"hf:{folder.name}",
                  instruct=instruct)

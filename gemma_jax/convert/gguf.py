"""Import llama.cpp GGUF files of Gemma, Gemma 2 and Gemma 3 text models.

Tensor names and shapes: ../shared/models.md ("GGUF layout"). llama.cpp's converter stores RMSNorm
weights with the +1 already added (convert_hf_to_gguf.py, GemmaModel.modify_tensors), so 1 is
subtracted here; q/k are not permuted for Gemma (NEOX rope, rotate-half), so they load as they are.
Quantized tensors are dequantized to float32 with the gguf package, one tensor at a time from the
memory-mapped file, so only one full copy of the weights is ever held.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import gguf as gguf_lib
import numpy as np
from tqdm import tqdm

from ..configs import OWN_LOCAL_ROPE_BASE, ModelConfig, family_defaults
from ..errors import GemmaError
from .common import BlockNames, DeviceParams, Imported, block_params, expect_shape, looks_instruct, matching_preset
from .gguf_tokenizer import tokenizer_from_gguf

T = gguf_lib.GGMLQuantizationType
SUPPORTED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K,
                   T.Q5_K, T.Q6_K)
ARCHITECTURES = {"gemma": 1, "gemma2": 2, "gemma3": 3}
# Tensor names of block i in llama.cpp's layout (../shared/models.md, "GGUF layout").
BLOCK_NAMES = BlockNames(
    q="blk.{i}.attn_q.weight", k="blk.{i}.attn_k.weight", v="blk.{i}.attn_v.weight", o="blk.{i}.attn_output.weight",
    gate="blk.{i}.ffn_gate.weight", up="blk.{i}.ffn_up.weight", down="blk.{i}.ffn_down.weight",
    q_norm="blk.{i}.attn_q_norm.weight", k_norm="blk.{i}.attn_k_norm.weight",
    norms={"blk.{i}.attn_norm.weight": "pre_attention_norm",
           "blk.{i}.post_attention_norm.weight": "post_attention_norm",
           "blk.{i}.ffn_norm.weight": "pre_ffw_norm", "blk.{i}.post_ffw_norm.weight": "post_ffw_norm"})


def is_gguf(path: str | os.PathLike) -> bool:
  """True if path is a file that starts with the GGUF magic."""
  path = pathlib.Path(path)
  if not path.is_file():
    return False
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def open_reader(path: str | os.PathLike) -> gguf_lib.GGUFReader:
  """A GGUFReader with clear errors for missing, foreign and truncated files."""
  path = pathlib.Path(path)
  if not path.exists():
    raise GemmaError(f"{path} does not exist")
  if not is_gguf(path):
    raise GemmaError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
  try:
    reader = gguf_lib.GGUFReader(path)
  except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged headers
    raise GemmaError(f"{path} is not a readable GGUF file (truncated or damaged?): {e}") from None
  size = path.stat().st_size
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size:
      raise GemmaError(f"{path} is truncated: tensor {t.name} needs bytes up to "
                       f"{t.data_offset + t.n_bytes} but the file has {size}")
  return reader


def _where(reader: gguf_lib.GGUFReader) -> str:
  """The file a reader reads, for error messages (GGUFReader keeps only its memory map)."""
  return str(getattr(reader.data, "filename", None) or "GGUF file")


def _field(reader: gguf_lib.GGUFReader, key: str, default: Any = None, required: bool = False) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if required:
      raise GemmaError(f"{_where(reader)}: GGUF metadata key {key!r} is missing")
    return default
  return field.contents()


def _f32(value: Any) -> float:
  """A float32 metadata value as the shortest decimal that rounds to it (1e-6, not 9.99999997e-07)."""
  return float(str(np.float32(value)))


def read_config(reader: gguf_lib.GGUFReader) -> ModelConfig:
  """A ModelConfig from GGUF metadata, completed by the matching official preset when there is one."""
  arch = _field(reader, "general.architecture", required=True)
  if arch not in ARCHITECTURES:
    raise GemmaError(f"{_where(reader)}: unsupported architecture {arch!r}; gemma_jax imports "
                     f"{', '.join(ARCHITECTURES)}")
  family = ARCHITECTURES[arch]
  get = lambda key, default=None, required=False: _field(reader, f"{arch}.{key}", default, required)
  embd = _tensor(reader, "token_embd.weight")
  vocab_size = int(embd.shape[1])  # GGUF lists dims fastest-first: (D, V)
  d = int(get("embedding_length", required=True))
  n = int(get("attention.head_count", required=True))
  dims = dict(num_layers=int(get("block_count", required=True)), embed_dim=d,
              hidden_dim=int(get("feed_forward_length", required=True)), num_heads=n,
              num_kv_heads=int(get("attention.head_count_kv", n)),
              head_dim=int(get("attention.key_length", d // n)))
  preset = matching_preset(family, **dims)
  fam = family_defaults(family)
  # What llama.cpp does not store for Gemma (the layer pattern, the norms, Gemma 3's local RoPE base of 10k,
  # which it hard-codes) comes from the family; what it stores overrides the family's values.
  base = _f32(get("rope.freq_base", 10_000.0))  # llama.cpp's value for a file without one, in every family
  fields: dict[str, Any] = dict(
      fam, name=preset.name if preset else f"{arch}_gguf", vocab_size=vocab_size, **dims,
      norm_eps=_f32(get("attention.layer_norm_rms_epsilon", fam["norm_eps"])),
      max_seq_len=int(get("context_length", fam["max_seq_len"])),
      query_pre_attn_scalar=preset.query_pre_attn_scalar if preset else None)
  if fam["sliding_window"] is not None:
    fields["sliding_window"] = int(get("attention.sliding_window", fam["sliding_window"]))
  # Soft-cap keys count only for a family that soft-caps (Gemma 2): llama.cpp reads them for gemma2 only.
  for ours, key in (("attn_logits_softcap", "attn_logit_softcapping"),
                    ("final_logits_softcap", "final_logit_softcapping")):
    if fam[ours] is not None:
      fields[ours] = _f32(get(key, fam[ours]))
  if family in OWN_LOCAL_ROPE_BASE:  # the file's base and position scale are the global layers'
    fields.update(rope_base_global=base, rope_scale_global=_f32(get("rope.scaling.factor", fam["rope_scale_global"])))
  else:  # one RoPE on every layer, which ModelConfig does not scale
    fields.update(rope_base_local=base, rope_base_global=base)
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise GemmaError(f"{_where(reader)}: {e}") from None


def _tensor(reader: gguf_lib.GGUFReader, name: str):
  for t in reader.tensors:
    if t.name == name:
      return t
  raise GemmaError(f"{_where(reader)}: tensor {name!r} is missing")


# Rows dequantized at a time: bounds the gguf package's float32 temporaries (several times the chunk)
# instead of several times the 168M-entry Gemma 3 embedding.
_CHUNK_VALUES = 1 << 22


def dequantize(tensor, where: str) -> np.ndarray:
  """One GGUF tensor as a float32 numpy array in numpy (row-major) shape, dequantized in row chunks."""
  if tensor.tensor_type not in SUPPORTED_TYPES:
    raise GemmaError(f"{where}: tensor {tensor.name} has type {tensor.tensor_type.name}, which gemma_jax "
                     f"does not import (supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
  shape = tuple(int(x) for x in reversed(tensor.shape))
  data = tensor.data  # (rows, bytes per row) for quantized types, (rows, cols) for float types
  if data.ndim < 2 or tensor.tensor_type in (T.F32, T.F16, T.BF16):
    return np.asarray(gguf_lib.quants.dequantize(data, tensor.tensor_type), np.float32).reshape(shape)
  rows = data.shape[0]
  out = np.empty((rows, shape[-1] if len(shape) > 1 else 1), np.float32)
  step = max(1, _CHUNK_VALUES // max(1, out.shape[1]))
  for start in range(0, rows, step):
    out[start:start + step] = gguf_lib.quants.dequantize(data[start:start + step], tensor.tensor_type)
  return out.reshape(shape)


def import_gguf(path: str | os.PathLike, progress: bool = False) -> Imported:
  """Reads a Gemma GGUF file into our params (flat, float32), config and tokenizer."""
  reader = open_reader(path)
  where = str(path)
  cfg = read_config(reader)
  for t in reader.tensors:  # fail on an unsupported type before spending minutes dequantizing
    if t.tensor_type not in SUPPORTED_TYPES:
      dequantize(t, where)
  d, v = cfg.embed_dim, cfg.vocab_size
  names = {t.name for t in reader.tensors}
  bar = tqdm(total=len(reader.tensors), desc="converting", unit="tensor", disable=not progress)

  def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
    names.discard(name)
    bar.update()
    return expect_shape(name, dequantize(_tensor(reader, name), where), shape, where)

  params = DeviceParams()
  params["embedder/input_embedding"] = take("token_embd.weight", (v, d))
  params["final_norm/scale"] = take("output_norm.weight", (d,)) - 1.0
  for i in range(cfg.num_layers):
    params.update(block_params(cfg, i, BLOCK_NAMES, take, lambda name, shape: take(name, shape) - 1.0))
  bar.close()
  names.discard("output.weight")  # an untied copy of the embedding some converters write; Gemma ties it
  names.discard("rope_freqs.weight")
  if names:
    raise GemmaError(f"{where}: unexpected tensors for a {cfg.name} model: {sorted(names)[:8]}")
  # A weights-only GGUF (no tokenizer.ggml.* keys) still imports; its checkpoint scores token ids.
  proto = tokenizer_from_gguf(reader, where) if "tokenizer.ggml.model" in reader.fields else None
  # GGUF names instruct models in general.name / general.finetune ("Gemma 3 270m It"); a file that
  # names itself without either is a base model.
  names = [_field(reader, k) for k in ("general.name", "general.finetune", "general.basename")]
  instruct = looks_instruct(*names, pathlib.Path(path).stem)
  return Imported(cfg, params, proto, source=f"gguf:{pathlib.Path(path).name}", instruct=instruct)

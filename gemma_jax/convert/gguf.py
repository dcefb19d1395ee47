"""Import llama.cpp GGUF files of Gemma, Gemma 2 and Gemma 3 text models.

Tensor names and shapes: ../shared/models.md ("GGUF layout"). llama.cpp's converter stores RMSNorm
weights with the +1 already added (convert_hf_to_gguf.py, GemmaModel.modify_tensors), so 1 is
subtracted here; q/k are not permuted for Gemma (NEOX rope, rotate-half), so they load as they are.
Quantized tensors are dequantized to float32 with the gguf package, one tensor at a time from the
memory-mapped file, so only one full copy of the weights is ever held.

Q8_0 and Q4_0 tensors are int8 / int4 values with one float16 scale per 32 consecutive weights along a
row (GGUF's innermost dim), which is the input dim of every matrix: after our transposes, the contracting
axis of each weight (the embedding's D included); Q4_1 adds a float16 offset (min) per block, w = q * d + m
with q in 0..15. block_scales=True also returns those scales (and offsets) in our layouts
(Imported.block_scales), so that `convert --quantize int8|int4|int4-sym` keeps the blocks exactly as they
are (values = (the dequantized weight - its offset) / its scale, exact): Q8_0 as int8, Q4_0 as int4 or
int4-sym, Q4_1 as int4 (qarray.py). A weight built from tensors of two types (k and
v, gate and up) has no one kind and is requantized, as is every other type (Q4_K, Q5_0, Q6_K, ...).
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
from ..quantize import quantized_weights

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


# GGUF types kept as blocks by `convert --quantize`: the scheme they are, and their bytes per block of 32
# (ggml-common.h: block_q8_0 {d; qs[32]}, block_q4_0 {d; qs[16]}, block_q4_1 {d; m; qs[16]}, d and m float16).
KEPT_TYPES = {T.Q8_0: ("int8", 34), T.Q4_0: ("int4-sym", 18), T.Q4_1: ("int4", 20)}
BLOCK = 32
_KINDS = {"int8": 8, "int4-sym": 4, "int4": 5}  # kind codes of the kind pass (int8 arrays)


def expanded_scales(tensor, field: int = 0) -> np.ndarray:
  """A Q8_0 / Q4_0 / Q4_1 tensor's float16 block scales d (field 0; Q4_1's offsets m: field 1), each
  repeated over its 32 weights: numpy shape."""
  shape = tuple(int(x) for x in reversed(tensor.shape))
  raw = np.asarray(tensor.data).reshape(-1, KEPT_TYPES[tensor.tensor_type][1])  # one row per block, d first
  d = raw[:, 2 * field:2 * field + 2].copy().view(np.float16)[:, 0]
  return np.repeat(d, BLOCK).reshape(shape)


def collapse(expanded: np.ndarray, contract: int) -> np.ndarray | None:
  """Our-layout expanded scales -> the scale (qarray.py's shape for blocks of 32), None unless each block
  of our contracting axis holds one value (else the GGUF blocks did not run along it)."""
  from .. import qarray  # noqa: PLC0415
  c = qarray.contracted_size(expanded.shape, contract)
  if c % BLOCK:
    return None
  blocked = expanded.reshape(c // BLOCK, BLOCK, -1) if contract > 0 else expanded.reshape(-1, c // BLOCK, BLOCK)
  first = blocked[:, :1] if contract > 0 else blocked[..., :1]
  if not np.array_equal(blocked, np.broadcast_to(first, blocked.shape)):
    return None
  return np.ascontiguousarray(first.astype(np.float32)).reshape(qarray.scale_shape(expanded.shape, contract, BLOCK))


def import_gguf(path: str | os.PathLike, progress: bool = False, block_scales: bool = False) -> Imported:
  """Reads a Gemma GGUF file into our params (flat, float32), config and tokenizer; block_scales: also the
  block scales of Q8_0 / Q4_0 weights (module docstring)."""
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

  scales: dict[str, tuple[str, np.ndarray, np.ndarray | None]] = {}

  def keep(kinds: dict[str, np.ndarray], expanded: dict[str, np.ndarray], offsets: dict[str, np.ndarray]) -> None:
    """Records the scales (and offsets) of each weight whose tensors are all of one kept type (kinds: their
    codes)."""
    contracts = quantized_weights(cfg.replace(quant="int8", quant_embedding="int8"))
    for name, kind in kinds.items():
      codes = np.unique(kind)
      if name in contracts and len(codes) == 1 and codes[0]:
        scale = collapse(expanded[name], contracts[name])
        scheme = next(k for k, c in _KINDS.items() if c == codes[0])
        offset = collapse(offsets[name], contracts[name]) if scheme == "int4" else None
        if scale is not None and (offset is not None or scheme != "int4"):
          scales[name] = (scheme, scale, offset)

  def kind_of(name, shape):
    t = _tensor(reader, name)
    return np.full(shape, _KINDS[KEPT_TYPES[t.tensor_type][0]] if t.tensor_type in KEPT_TYPES else 0, np.int8)

  def scale_of(name, shape, field=0):
    t = _tensor(reader, name)
    kept = t.tensor_type in KEPT_TYPES and (field == 0 or t.tensor_type == T.Q4_1)
    return expanded_scales(t, field) if kept else np.zeros(shape, np.float16)

  offset_of = lambda name, shape: scale_of(name, shape, 1)

  params = DeviceParams()
  params["embedder/input_embedding"] = take("token_embd.weight", (v, d))
  params["final_norm/scale"] = take("output_norm.weight", (d,)) - 1.0
  if block_scales:
    embd = "embedder/input_embedding"
    keep({embd: kind_of("token_embd.weight", (v, d))}, {embd: scale_of("token_embd.weight", (v, d))},
         {embd: offset_of("token_embd.weight", (v, d))})
  for i in range(cfg.num_layers):
    params.update(block_params(cfg, i, BLOCK_NAMES, take, lambda name, shape: take(name, shape) - 1.0))
    if block_scales:
      keep(block_params(cfg, i, BLOCK_NAMES, kind_of, kind_of), block_params(cfg, i, BLOCK_NAMES, scale_of, kind_of),
           block_params(cfg, i, BLOCK_NAMES, offset_of, kind_of))
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
  return Imported(cfg, params, proto, source=f"gguf:{pathlib.Path(path).name}", instruct=instruct,
                  block_scales=scales)

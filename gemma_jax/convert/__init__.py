"""Importers of foreign weights into our checkpoint format: GGUF, Hugging Face safetensors, official Orbax.

`convert(src, dst)` picks the importer from what src is and writes a gemma_jax checkpoint to dst;
`convert(src, dst, quantize="int8")` stores it quantized (quantize.py), also from one of our checkpoints.
"""

from __future__ import annotations

import json
import os
import pathlib

from .. import checkpoint
from ..errors import GemmaError
from ..quantize import KEEP, check_scheme, quantize_params
from ..transformer import flat_params
from ..tree import unflatten
from .common import DeviceParams, Imported


def is_ours(path: pathlib.Path) -> bool:
  """True for a folder whose config.json says it is a gemma_jax checkpoint (of any version)."""
  try:
    return json.loads((path / checkpoint.CONFIG_FILE).read_text()).get("format") == checkpoint.FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def import_ours(src: pathlib.Path) -> Imported:
  """One of our checkpoints (to quantize it): its params as stored, floats in float32, verified."""
  loaded = checkpoint.load(src, dtype="float32")
  return Imported(loaded.config, DeviceParams(flat_params(loaded.params)), loaded.tokenizer_proto,
                  source=f"gemma_jax:{src.absolute().name}", instruct=loaded.meta.get("instruct"))


def import_any(src: str | os.PathLike, *, preset: str | None = None, progress: bool = False,
               block_scales: bool = False) -> Imported:
  """Reads src (a .gguf file, an HF folder, an official Orbax folder or one of our checkpoints) into memory,
  once. block_scales: also the blocks a GGUF file holds quantized (gguf.import_gguf)."""
  from . import gguf, official, safetensors  # noqa: PLC0415 (keeps `import gemma_jax` light)

  src = pathlib.Path(src)
  if not src.exists():
    raise GemmaError(f"{src} does not exist")
  if src.is_file():
    if gguf.is_gguf(src):
      return gguf.import_gguf(src, progress=progress, block_scales=block_scales)
    raise GemmaError(f"{src} is not a model file gemma_jax can import (expected a .gguf file, a Hugging "
                     "Face folder with config.json and *.safetensors, or an official Orbax checkpoint folder)")
  if is_ours(src):
    return import_ours(src)
  if safetensors.is_hf_folder(src):
    return safetensors.import_hf(src, progress=progress)
  if official.is_orbax_checkpoint(src):
    return official.import_official(src, preset=preset, progress=progress)
  raise GemmaError(f"{src} is a folder but not a model gemma_jax can import (no config.json with "
                   "*.safetensors, no Orbax _METADATA)")


def read_calibration(path: str | os.PathLike) -> str:
  """The text of a calibration file: a GemmaError naming the file when it is missing, not UTF-8 or empty."""
  path = pathlib.Path(path)
  try:
    text = path.read_bytes().decode("utf-8")
  except OSError as e:
    raise GemmaError(f"cannot read the calibration text {path}: {e.strerror or e}") from None
  except UnicodeDecodeError as e:
    raise GemmaError(f"calibration text {path} is not UTF-8 (byte {e.start}: {e.reason})") from None
  if not text.strip():
    raise GemmaError(f"calibration text {path} is empty")
  return text


def _hessians(imported: Imported, text: str, scheme: str, block_size, embedding, where: str) -> dict:
  """gptq.hessians of the imported (float) model on `text`, tokenized with the model's own tokenizer."""
  from ..quantize import calibration_hessians  # noqa: PLC0415
  from ..tokenizer import Tokenizer  # noqa: PLC0415
  from ..transformer import abstract_model, set_flat_params  # noqa: PLC0415

  if imported.tokenizer_proto is None:
    raise GemmaError(f"{where} has no tokenizer, which a calibration text needs")
  graphdef, state = abstract_model(imported.config)
  set_flat_params(state, dict(imported.params))
  return calibration_hessians(graphdef, state, imported.config, Tokenizer(imported.tokenizer_proto), text,
                              scheme, block_size, embedding, where=where)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, preset: str | None = None,
            progress: bool = False, overwrite: bool = False, quantize: str | None = None,
            block_size: int | None = None, embedding: str | None = KEEP,
            calibration: str | os.PathLike | None = None) -> pathlib.Path:
  """Imports src and writes a gemma_jax checkpoint directory dst (atomically, see checkpoint.save).

  dst must not exist or be empty, unless overwrite=True: then it is replaced once the new one is complete
  (an incomplete one left by an interrupted write included).
  quantize: "int8" or "int4" stores the weights quantized (quantize.quantize; block_size and embedding as
  there). A GGUF file's Q8_0 / Q4_0 blocks are kept exactly when the scheme is theirs and the block size
  32 -- the default block size for a file that holds such blocks (gguf.py); all else is quantized anew.
  calibration: a UTF-8 text file; the weights quantized anew are then chosen by GPTQ on its tokens
  (quantize.quantize's calibration, gptq.py).
  """
  dst = pathlib.Path(dst)
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not (overwrite and dst.is_dir()):
    hint = " (pass overwrite=True / --overwrite to replace it)" if dst.is_dir() else ""
    raise GemmaError(f"output {dst} already exists and is not an empty directory{hint}")
  if quantize is None and (block_size is not None or embedding != KEEP):
    raise GemmaError("a block size or an embedding scheme is given but no quantization scheme (--quantize)")
  if calibration is not None and quantize is None:
    raise GemmaError("a calibration text is given but no quantization scheme (--quantize)")
  if quantize is not None:
    check_scheme(quantize, block_size, embedding)  # before minutes of importing
  text = None if calibration is None else read_calibration(calibration)
  imported = import_any(src, preset=preset, progress=progress, block_scales=quantize is not None)
  config = imported.config
  if quantize is not None:
    if block_size is None and any(kind == quantize for kind, *_ in imported.block_scales.values()):
      block_size = 32  # GGUF's block: the file's Q8_0 / Q4_0 blocks are kept exactly
    hessians = None
    if text is not None:
      hessians = _hessians(imported, text, quantize, block_size, embedding, where=str(src))
    config = quantize_params(config, imported.params, quantize, block_size, embedding,
                             block_scales=imported.block_scales, hessians=hessians, where=str(src))
  return checkpoint.save(dst, config, unflatten(imported.params), tokenizer_proto=imported.tokenizer_proto,
                         source=imported.source, instruct=imported.instruct, overwrite=overwrite)

"""Rebuild a sentencepiece `tokenizer.model` from the tokenizer metadata of a GGUF file.

GGUF files carry no tokenizer.model, only llama.cpp's `tokenizer.ggml.*` keys: the pieces, their BPE scores
and types, and the special ids. For a sentencepiece vocabulary (`tokenizer.ggml.model == "llama"`, which
every Gemma 1/2/3 GGUF uses) that is everything sentencepiece needs; `gemma_jax.tokenizer.build_model_proto`
turns it into the model and undoes the few things llama.cpp's converter changes (../shared/models.md,
"Rebuilding the tokenizer from GGUF metadata").
"""

from __future__ import annotations

from typing import Any

import gguf as gguf_lib

from ..errors import GemmaError
from ..tokenizer import build_model_proto

_PREFIX = "tokenizer.ggml."
_REQUIRED = ("tokens", "scores", "token_type")
_UNKNOWN_TYPE = 2  # GGUF token type of the unknown piece


def tokenizer_from_gguf(reader: gguf_lib.GGUFReader, path_for_errors: str) -> bytes:
  """The serialized sentencepiece model (the bytes of a `tokenizer.model`) described by a GGUF's metadata.

  Args:
    reader: an open `gguf.GGUFReader`.
    path_for_errors: the file's name, used in error messages.

  Raises:
    GemmaError (a ValueError): the file has no tokenizer metadata, its tokenizer is not a sentencepiece
      one (`tokenizer.ggml.model` other than "llama"), or a field is missing or malformed.
  """
  fields = reader.fields
  model = _get(fields, "model", path_for_errors)
  if model is None:
    raise GemmaError(f"{path_for_errors} has no tokenizer metadata (no {_PREFIX}model key); it cannot be used "
                     f"for text. Convert it with a tokenizer.model from the same model instead")
  if model != "llama":
    raise GemmaError(f"{path_for_errors}: {_PREFIX}model is {model!r}; gemma_jax rebuilds only sentencepiece "
                     f"vocabularies ('llama'), which is what Gemma 1, 2 and 3 GGUF files use")
  missing = [_PREFIX + k for k in _REQUIRED if _PREFIX + k not in fields]
  if missing:
    raise GemmaError(f"{path_for_errors}: the tokenizer metadata is incomplete; missing {', '.join(missing)}")

  tokens = _get(fields, "tokens", path_for_errors)
  scores = _get(fields, "scores", path_for_errors)
  token_types = _get(fields, "token_type", path_for_errors)
  for key, value in (("tokens", tokens), ("scores", scores), ("token_type", token_types)):
    if not isinstance(value, list):
      raise GemmaError(f"{path_for_errors}: {_PREFIX}{key} is not an array")

  unk_id = _get(fields, "unknown_token_id", path_for_errors)
  if unk_id is None:  # older files: fall back to the piece typed unknown, then to the conventional name
    typed = [i for i, t in enumerate(token_types) if t == _UNKNOWN_TYPE]
    unk_id = typed[0] if typed else (tokens.index("<unk>") if "<unk>" in tokens else None)
  if unk_id is None:
    raise GemmaError(f"{path_for_errors}: the tokenizer has no unknown piece ({_PREFIX}unknown_token_id is "
                     f"missing and no token is typed unknown or named <unk>); sentencepiece needs one")
  # llama.cpp adds a space before the text of a sentencepiece vocab unless the file says otherwise.
  add_space_prefix = _get(fields, "add_space_prefix", path_for_errors)
  try:
    return build_model_proto(
        tokens, scores, token_types,
        unk_id=unk_id,
        bos_id=_get(fields, "bos_token_id", path_for_errors),
        eos_id=_get(fields, "eos_token_id", path_for_errors),
        pad_id=_get(fields, "padding_token_id", path_for_errors),
        add_dummy_prefix=True if add_space_prefix is None else bool(add_space_prefix))
  except GemmaError as e:
    raise GemmaError(f"{path_for_errors}: cannot rebuild the tokenizer: {e}") from None


def _get(fields: dict[str, Any], key: str, path_for_errors: str) -> Any:
  """The value of `tokenizer.ggml.<key>` (a list for arrays), or None if absent."""
  field = fields.get(_PREFIX + key)
  if field is None:
    return None
  try:
    return field.contents()
  except UnicodeDecodeError as e:
    raise GemmaError(f"{path_for_errors}: {_PREFIX}{key} holds a string that is not UTF-8: {e}") from None

"""Rebuild a sentencepiece `tokenizer.model` from the tokenizer metadata of a GGUF file.

GGUF files carry no tokenizer.model, only llama.cpp's `tokenizer.ggml.*` keys: the pieces, their BPE scores
and types, and the special ids. For a sentencepiece vocabulary (`tokenizer.ggml.model == "llama"`, which
every Gemma 1/2/3 GGUF uses) that is everything sentencepiece needs; `build_model_proto` below
turns it into the model and undoes the few things llama.cpp's converter changes (../shared/models.md,
"Rebuilding the tokenizer from GGUF metadata").
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Any

import gguf as gguf_lib
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from ..errors import GemmaError
from ..tokenizer import END_OF_TURN, START_OF_TURN

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


_Piece = sp_pb2.ModelProto.SentencePiece
_PIECE_TYPES = frozenset(_Piece.Type.values())
# GGUF token types (llama.cpp's llama_token_type) are sentencepiece's piece types by number.
assert (_Piece.NORMAL, _Piece.UNKNOWN, _Piece.CONTROL, _Piece.USER_DEFINED, _Piece.UNUSED, _Piece.BYTE) == (
    1, 2, 3, 4, 5, 6)

# Pieces that chat text must be able to spell: user-defined in the official Gemma tokenizer.model (so the
# instruct template, written as text, encodes each to one id), but marked control in GGUF files, because
# llama.cpp's converter flags every added token that Hugging Face lists as "special" as control.
# Every other piece keeps the GGUF's type. That includes `<mask>` and `<unusedN>`, which llama.cpp's converter
# marks control by their names whatever the source said: we keep them control on purpose, so that user text
# can never produce them.
_USER_DEFINED_IN_OFFICIAL_MODEL = (START_OF_TURN, END_OF_TURN)

_SPACE_SYMBOL = "\u2581"  # sentencepiece's meta symbol for a space
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def build_model_proto(tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int], *,
                      unk_id: int, bos_id: int | None, eos_id: int | None, pad_id: int | None,
                      add_dummy_prefix: bool = False) -> bytes:
  """Builds a serialized sentencepiece BPE model from a GGUF-style vocabulary (llama.cpp's "llama" tokenizer).

  The result is what the official Gemma `tokenizer.model` is: BPE with byte fallback, identity normalization,
  no dummy prefix, no removal of extra whitespace, spaces escaped to `▁`. Three things the GGUF files get
  "wrong" for sentencepiece are put back:

  * the piece at `unk_id` becomes sentencepiece's UNKNOWN piece (GGUF files mark `<unk>` as control, and
    sentencepiece refuses a model with no unknown piece);
  * `<start_of_turn>` and `<end_of_turn>` become user-defined, so chat text encodes each to one id, as the
    official model does; every other control piece (`<bos>`, `<eos>`, `<mask>`, `<unusedN>`, ...) stays
    control, so text that spells one is ordinary text and cannot inject the control id;
  * user-defined pieces written with plain spaces (Gemma's whitespace runs, ids 138-167 in Gemma 3) are
    spelled with `▁` again (see the comment in the code).

  The bos, eos and pad pieces are made control pieces if they are not already: sentencepiece reports those
  ids only for control pieces.

  Args:
    tokens: the pieces, by id (GGUF `tokenizer.ggml.tokens`).
    scores: one BPE score per piece (`tokenizer.ggml.scores`); higher merges first.
    token_types: one type per piece (`tokenizer.ggml.token_type`): 1 normal, 2 unknown, 3 control,
      4 user-defined, 5 unused, 6 byte.
    unk_id, bos_id, eos_id, pad_id: the special ids; bos, eos and pad may be None when the vocab has none.
    add_dummy_prefix: prepend a space to the text before encoding (llama.cpp's `add_space_prefix`; False
      for every Gemma model).

  Returns:
    The serialized `ModelProto`, the bytes of a `tokenizer.model` file.

  Raises:
    GemmaError (a ValueError): lengths differ, an id is out of range, a type is unknown, a byte piece is
      misnamed or missing, or two pieces end up spelled the same.
  """
  n = len(tokens)
  if n == 0:
    raise GemmaError("build_model_proto: the vocabulary is empty")
  if len(scores) != n or len(token_types) != n:
    raise GemmaError(f"build_model_proto: tokens, scores and token_types must have the same length; "
                     f"got {n}, {len(scores)} and {len(token_types)}")
  specials = {"unk_id": unk_id, "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id}
  for name, value in specials.items():
    if value is None and name != "unk_id":
      continue
    try:
      index = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
      index = None
    if index is None or not 0 <= index < n:
      raise GemmaError(f"build_model_proto: {name}={value!r} is not a piece id in [0, {n})")
    specials[name] = index
  unk_id, bos_id, eos_id, pad_id = specials.values()

  # GGUF token types are sentencepiece's piece types by number, so only the exceptions need work; the loops
  # below touch the few thousand non-normal pieces, not all 262144.
  types = list(token_types)
  type_set = set(types)
  bad_types = type_set - _PIECE_TYPES
  if bad_types:
    i = next(i for i, t in enumerate(types) if t in bad_types)
    raise GemmaError(f"build_model_proto: token {i} ({tokens[i]!r}) has type {types[i]!r}; expected one of "
                     f"1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte")
  pieces = list(tokens)
  if not all(isinstance(p, str) and p for p in pieces):
    i = next(i for i, p in enumerate(pieces) if not (isinstance(p, str) and p))
    raise GemmaError(f"build_model_proto: token {i} is {pieces[i]!r}; every piece must be a non-empty string")
  for i in (i for i, t in enumerate(types) if t == _Piece.UNKNOWN) if _Piece.UNKNOWN in type_set else ():
    if i != unk_id:
      raise GemmaError(f"build_model_proto: token {i} ({pieces[i]!r}) is marked unknown, but unk_id is "
                       f"{unk_id} ({pieces[unk_id]!r}); sentencepiece allows one unknown piece")
  types[unk_id] = _Piece.UNKNOWN
  for i in (bos_id, eos_id, pad_id):
    if i is not None:
      if i == unk_id:
        raise GemmaError(f"build_model_proto: id {i} cannot be both the unknown piece and bos/eos/pad")
      types[i] = _Piece.CONTROL

  special = [i for i, t in enumerate(types) if t != _Piece.NORMAL]
  for i in special:
    piece = pieces[i]
    if types[i] == _Piece.CONTROL and piece in _USER_DEFINED_IN_OFFICIAL_MODEL:
      types[i] = _Piece.USER_DEFINED
    if types[i] == _Piece.USER_DEFINED and " " in piece:
      # llama.cpp's converter (convert_hf_to_gguf.py, "pre-normalize user-defined spaces") rewrites `▁` as a
      # plain space in every user-defined token, because llama.cpp matches those against the raw text.
      # Sentencepiece matches user-defined pieces against the normalized text, where escape_whitespaces has
      # already turned every space into `▁`, so a piece with a plain space could never match: "  " would be
      # cut into other pieces instead of becoming id 138. Undoing the rewrite is exact, because the rewrite
      # only ever touched user-defined tokens, and a sentencepiece vocab has no other way to hold a space.
      # In Gemma 3 this is exactly the 30 space runs "  " .. 31 spaces (ids 138-167); normal pieces already
      # use `▁`, and the newline and tab runs (ids 107-137, 255968-255998) hold no space.
      pieces[i] = piece.replace(" ", _SPACE_SYMBOL)
    if types[i] == _Piece.BYTE and not _BYTE_PIECE.fullmatch(piece):
      raise GemmaError(f"build_model_proto: token {i} ({piece!r}) is marked as a byte piece, but byte pieces "
                       f"must be named <0x00> .. <0xFF>")

  byte_pieces = {pieces[i] for i in special if types[i] == _Piece.BYTE}
  if byte_pieces and len(byte_pieces) != 256:
    missing = sorted(f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in byte_pieces)
    raise GemmaError(f"build_model_proto: byte fallback needs all 256 byte pieces; missing {len(missing)}, "
                     f"e.g. {missing[:4]}")

  piece_set = set(pieces)
  if len(piece_set) != n:
    seen: dict[str, int] = {}
    for i, piece in enumerate(pieces):
      j = seen.setdefault(piece, i)
      if j != i:
        raise GemmaError(f"build_model_proto: tokens {j} and {i} are both spelled {piece!r}; sentencepiece "
                         f"needs every piece to be unique")

  proto = sp_pb2.ModelProto()
  proto.pieces.extend(_Piece(piece=p, score=s) if t == _Piece.NORMAL else _Piece(piece=p, score=s, type=t)
                      for p, s, t in zip(pieces, scores, types))

  trainer = proto.trainer_spec
  trainer.model_type = sp_pb2.TrainerSpec.BPE
  trainer.vocab_size = n
  trainer.byte_fallback = bool(byte_pieces)
  trainer.allow_whitespace_only_pieces = True
  # Sentencepiece finds its special ids by piece name (bos_id() is PieceToId(trainer_spec.bos_piece)), so
  # the names matter; the *_id fields only document them (-1 means none).
  trainer.unk_id, trainer.unk_piece = unk_id, pieces[unk_id]
  for name, i in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
    setattr(trainer, f"{name}_id", -1 if i is None else i)
    if i is None:  # a name no piece has: an empty name means sentencepiece's default ("<s>", "</s>", "<pad>")
      absent = f"<no {name}>"
      while absent in piece_set:
        absent += "_"
      setattr(trainer, f"{name}_piece", absent)
    else:
      setattr(trainer, f"{name}_piece", pieces[i])

  norm = proto.normalizer_spec
  norm.name = "identity"
  norm.precompiled_charsmap = b""
  norm.add_dummy_prefix = bool(add_dummy_prefix)
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True
  norm.normalization_rule_tsv = ""
  return proto.SerializeToString()

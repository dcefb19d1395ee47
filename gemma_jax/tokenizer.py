"""The Gemma tokenizer: a thin wrapper around sentencepiece, and the builder of its model from a GGUF vocab.

This is the only module of gemma_jax that imports sentencepiece. It has no JAX import, so data pipelines can
use it without pulling in an accelerator runtime.

Special ids (bos, eos, pad, unk, `<start_of_turn>`, `<end_of_turn>`) are always read from the model, never
hard-coded: Gemma 1/2 and Gemma 3 number them differently.
"""

from __future__ import annotations

import operator
import os
import pathlib
import re
from collections.abc import Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from .errors import GemmaError

__all__ = ["Tokenizer", "build_model_proto", "TOKENIZER_FILE"]

TOKENIZER_FILE = "tokenizer.model"

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

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


class Tokenizer:
  """A sentencepiece tokenizer with the special ids read from its model.

  Build one from the bytes of a `tokenizer.model` (`Tokenizer(proto)`) or from the file
  (`Tokenizer.from_file(path)`). Encoding text never produces a control id (`<bos>` typed as text is text);
  `<start_of_turn>` and `<end_of_turn>` typed as text do become their ids, as with the official model.
  """

  def __init__(self, model_proto: bytes, *, _where: str = "model_proto"):
    """Loads a serialized sentencepiece `ModelProto`.

    Raises:
      GemmaError (a ValueError): the bytes are not a sentencepiece model.
    """
    if not isinstance(model_proto, (bytes, bytearray, memoryview)):
      raise TypeError(f"Tokenizer expects the bytes of a tokenizer.model, got {type(model_proto).__name__}; "
                      f"use Tokenizer.from_file(path) to read a file")
    model_proto = bytes(model_proto)
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(model_proto)
    except Exception as e:  # sentencepiece raises RuntimeError or OSError, depending on the failure
      raise GemmaError(f"{_where} is not a sentencepiece model: {e}") from None
    if sp.get_piece_size() == 0:
      raise GemmaError(f"{_where} is not a sentencepiece model: it has no pieces")
    self._sp = sp
    self._proto = model_proto
    self._start_of_turn_id = self._lookup(START_OF_TURN)
    self._end_of_turn_id = self._lookup(END_OF_TURN)

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> Tokenizer:
    """Reads a `tokenizer.model` file (or a directory holding one).

    Raises:
      FileNotFoundError: nothing is at `path`.
      GemmaError (a ValueError): the file is not a sentencepiece model.
    """
    p = pathlib.Path(path)
    if p.is_dir():
      p = p / TOKENIZER_FILE
    if not p.is_file():
      raise FileNotFoundError(f"no tokenizer model at {p}")
    return cls(p.read_bytes(), _where=str(p))

  def _lookup(self, piece: str) -> int | None:
    i = self._sp.piece_to_id(piece)
    return i if self._sp.id_to_piece(i) == piece else None

  def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
    """Token ids of `text`, with `<bos>` first (by default) and optionally `<eos>` last."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids = self._sp.encode(text)
    if add_bos:
      ids.insert(0, self._require("bos_id", self.bos_id))
    if add_eos:
      ids.append(self._require("eos_id", self.eos_id))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`. Control ids (`<bos>`, `<eos>`, `<pad>`, ...) are dropped, as sentencepiece does.

    Raises:
      GemmaError (a ValueError): an id is outside [0, vocab_size).
    """
    checked = [self._check_id(i, where=f"decode: position {k}") for k, i in enumerate(ids)]
    return self._sp.decode(checked)

  def id_to_piece(self, i: int) -> str:
    """The piece (vocabulary string) of id `i`, with `▁` for spaces as sentencepiece spells it."""
    return self._sp.id_to_piece(self._check_id(i, where="id_to_piece"))

  def piece_to_id(self, piece: str) -> int:
    """The id of `piece`.

    Raises:
      GemmaError (a ValueError): the vocabulary has no such piece.
    """
    i = self._lookup(piece)
    if i is None:
      raise GemmaError(f"piece {piece!r} is not in the vocabulary")
    return i

  @property
  def vocab_size(self) -> int:
    """Number of pieces in the model (262144 for Gemma 3, 256000 for Gemma 1 and 2)."""
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int | None:
    """Id of `<bos>`, or None if the model has no bos piece."""
    return _or_none(self._sp.bos_id())

  @property
  def eos_id(self) -> int | None:
    """Id of `<eos>`, or None if the model has no eos piece."""
    return _or_none(self._sp.eos_id())

  @property
  def pad_id(self) -> int | None:
    """Id of `<pad>`, or None if the model has no pad piece."""
    return _or_none(self._sp.pad_id())

  @property
  def unk_id(self) -> int:
    """Id of the unknown piece (every sentencepiece model has one)."""
    return self._sp.unk_id()

  @property
  def start_of_turn_id(self) -> int | None:
    """Id of `<start_of_turn>`, or None if the vocabulary lacks it."""
    return self._start_of_turn_id

  @property
  def end_of_turn_id(self) -> int | None:
    """Id of `<end_of_turn>`, or None if the vocabulary lacks it."""
    return self._end_of_turn_id

  def chat_turn(self, text: str, *, first: bool, system: str | None = None,
                close_previous: bool = False) -> list[int]:
    """Ids of one user turn in the Gemma instruct format, ending with the model's turn opened.

    First turn: `<bos><start_of_turn>user\n{system}\n\n{text}<end_of_turn>\n<start_of_turn>model\n`; the
    system prompt is folded into the first user turn, as the official template does (Gemma has no
    system role). Later turns start with the `\n` that follows the model's `<end_of_turn>`;
    close_previous=True first adds that `<end_of_turn>` when the model's answer was cut short. Text is
    stripped as the official chat template does. The special ids come from this tokenizer.
    """
    sot = self._require("start_of_turn_id", self.start_of_turn_id)
    eot = self._require("end_of_turn_id", self.end_of_turn_id)
    body = text.strip()
    if system and system.strip():
      if not first:
        raise GemmaError("a system prompt goes in the first turn only")
      body = f"{system.strip()}\n\n{body}"
    ids = [self._require("bos_id", self.bos_id)] if first else []
    if not first:
      ids += ([eot] if close_previous else []) + self.encode("\n", add_bos=False)
    ids += [sot] + self.encode(f"user\n{body}", add_bos=False) + [eot] + self.encode("\n", add_bos=False)
    return ids + [sot] + self.encode("model\n", add_bos=False)

  def serialized_model_proto(self) -> bytes:
    """The bytes of the `tokenizer.model` this tokenizer was built from."""
    return self._proto

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes the model as a `tokenizer.model` file; `path` is the file, or a directory to write it into.

    Returns the path written.
    """
    p = pathlib.Path(path)
    if p.is_dir():
      p = p / TOKENIZER_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(self._proto)
    return p

  def _check_id(self, i, *, where: str) -> int:
    try:
      j = operator.index(i)
    except TypeError:
      raise GemmaError(f"{where}: token id {i!r} is not an integer") from None
    if not 0 <= j < self.vocab_size:
      raise GemmaError(f"{where}: token id {j} is outside the vocabulary [0, {self.vocab_size})")
    return j

  def _require(self, name: str, value: int | None) -> int:
    if value is None:
      raise GemmaError(f"this tokenizer's model has no {name.removesuffix('_id')} piece")
    return value

  def __reduce__(self):
    return (Tokenizer, (self._proto,))

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, unk_id={self.unk_id})")


def _or_none(i: int) -> int | None:
  return None if i < 0 else i

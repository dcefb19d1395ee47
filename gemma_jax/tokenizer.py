"""The Gemma tokenizer: a thin wrapper around sentencepiece.

This is the only module of gemma_jax that imports sentencepiece (besides the GGUF rebuild of its model in
convert/gguf_tokenizer.py). It has no JAX import, so data pipelines can
use it without pulling in an accelerator runtime.

Special ids (bos, eos, pad, unk, `<start_of_turn>`, `<end_of_turn>`) are always read from the model, never
hard-coded: Gemma 1/2 and Gemma 3 number them differently.
"""

from __future__ import annotations

import os
import pathlib
import operator
from collections.abc import Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from .errors import GemmaError

__all__ = ["Tokenizer", "TOKENIZER_FILE"]

TOKENIZER_FILE = "tokenizer.model"

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
# Pieces that mark structure, not text: user-defined in the official model (so sentencepiece matches them
# in raw text), but text from a user, a document or training data must never become them. The HTML tags
# and whitespace runs that are also user-defined stay as they are: they are ordinary text to the model.
CONTROL_TEXT = (START_OF_TURN, END_OF_TURN, "<start_of_image>", "<end_of_image>")

class Tokenizer:
  """A sentencepiece tokenizer with the special ids read from its model.

  Build one from the bytes of a `tokenizer.model` (`Tokenizer(proto)`) or from the file
  (`Tokenizer.from_file(path)`). Encoding text never produces a control id: `<bos>` typed as text is text,
  and so are the turn markers (`<start_of_turn>`, `<end_of_turn>`, see CONTROL_TEXT) unless the caller
  asks for them with `encode(text, parse_control=True)` (what the official model and Hugging Face do by
  default); the chat template (`chat_turn`) inserts their ids itself.
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
    self._sp_text: spm.SentencePieceProcessor | None = None  # built on first use, see _text_processor
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

  def _text_processor(self) -> spm.SentencePieceProcessor:
    """This model with the CONTROL_TEXT pieces made control pieces, which sentencepiece never matches in
    input: text that spells them is encoded as ordinary text, everything else exactly as before."""
    if self._sp_text is None:
      proto = sp_pb2.ModelProto()
      proto.ParseFromString(self._proto)
      changed = False
      for piece in proto.pieces:
        if piece.piece in CONTROL_TEXT and piece.type == sp_pb2.ModelProto.SentencePiece.USER_DEFINED:
          piece.type = sp_pb2.ModelProto.SentencePiece.CONTROL
          changed = True
      sp = self._sp
      if changed:
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(proto.SerializeToString())
      self._sp_text = sp
    return self._sp_text

  def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False, parse_control: bool = False
             ) -> list[int]:
    """Token ids of `text`, with `<bos>` first (by default) and optionally `<eos>` last.

    parse_control: let `<start_of_turn>`, `<end_of_turn>` (and the image markers) written in the text
      become their ids. Off by default, so that text from users, documents or training data cannot
      inject turn markers; on, it matches the official tokenizer and Hugging Face.
    Raises:
      TypeError: text is not a str. GemmaError: it holds lone surrogates (no UTF-8 encoding).
    """
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise GemmaError(f"text is not valid Unicode: {e.reason} at character {e.start} "
                       f"({text[e.start:e.end]!r}); pass a str of proper characters") from None
    ids = (self._sp if parse_control else self._text_processor()).encode(text)
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

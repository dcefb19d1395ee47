"""Training data: JSONL examples -> masked, optionally packed (B, T) numpy batches, and the data position.

Each line of a JSONL file is one example, in one of three shapes:
  {"text": ...}                          language modelling: loss on every token after <bos>
  {"prompt": ..., "response": ...}       loss on the response and the <eos> after it
  {"messages": [{"role": ..., "content": ...}, ...]}   the instruct template ChatSession uses; loss on the
                                                        model turns and their <end_of_turn>
Extra keys (an "id", say) are ignored. Every problem is a GemmaError starting with `file:line:`; nothing is
silently dropped or cut (an example longer than seq_len is an error unless truncate=True keeps its start).

Numpy only: the train step turns batches into device arrays. The example stream is the infinite
concatenation of per-epoch shuffles `np.random.default_rng([seed, epoch]).permutation(n)`, so a `Position`
(epoch, examples consumed) saved in a checkpoint resumes it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from jaxtyping import Bool, Float32, Int32

from .errors import GemmaError
from .tokenizer import Tokenizer

__all__ = ["Batch", "Example", "Loader", "Position", "bucket_length", "count_targets", "eval_batches",
           "read_examples"]

MIN_BUCKET = 16
ROLES = ("system", "user", "model")
# The keys that make each example shape; a line with keys of two shapes is ambiguous.
SHAPES = {"text": ("text",), "prompt/response": ("prompt", "response"), "messages": ("messages",)}


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized example. ids[t] is trained on (predicted from position t-1) where targets[t]."""
  ids: Int32[np.ndarray, "T"]  # starts with <bos>
  targets: Bool[np.ndarray, "T"]  # targets[0] is False: nothing predicts <bos>
  where: str  # "file:line", for messages about this example


@dataclasses.dataclass(frozen=True)
class Batch:
  """A (B, T) batch. The loss is the mean over targets == 1 of -log p(tokens[b, t] | the row's prefix),
  with attention only between tokens of the same segment, at positions <= the query's."""
  tokens: Int32[np.ndarray, "B T"]  # the pad id at padding
  positions: Int32[np.ndarray, "B T"]  # 0, 1, ... restarting at each example in the row; -1 at padding
  segments: Int32[np.ndarray, "B T"]  # 1, 2, ... numbering the examples within a row; 0 at padding
  targets: Float32[np.ndarray, "B T"]  # loss weight: 1.0 where tokens[b, t] is a target, else 0.0


class Position(NamedTuple):
  """Where the example stream stands: saved in training checkpoints, passed to Loader to resume."""
  epoch: int
  index: int  # examples of this epoch's order already consumed


def read_examples(path: str | os.PathLike, tokenizer: Tokenizer, *, seq_len: int, truncate: bool = False
                  ) -> list[Example]:
  """The examples of a JSONL file, in file order (blank lines skipped).

  truncate: keep the first seq_len tokens of a longer example (and their targets) instead of raising.
  Raises:
    GemmaError: the file is missing, not UTF-8, or has no examples; a line is not a JSON object of one of
      the three shapes; an example is longer than seq_len (without truncate) or has no target within it.
  """
  _check_int("seq_len", seq_len, 2)
  p = pathlib.Path(path)
  if not p.is_file():
    raise GemmaError(f"{p}: no such data file" + (" (it is a directory)" if p.is_dir() else ""))
  examples, offset = [], 0
  for lineno, raw in enumerate(p.read_bytes().split(b"\n"), 1):
    where = f"{p}:{lineno}"
    try:
      line = _decode(raw, offset)
      if line.strip():
        examples.append(_example(line, tokenizer, where, seq_len, truncate))
    except GemmaError as e:  # one place adds file:line to every problem of the line, the tokenizer's too
      raise GemmaError(f"{where}: {e}") from None
    offset += len(raw) + 1
  if not examples:
    raise GemmaError(f"{p}: no examples (the file is empty or holds only blank lines)")
  return examples


def _decode(raw: bytes, offset: int) -> str:
  try:
    return raw.decode("utf-8").removeprefix("\ufeff")  # a BOM some editors write first is not text
  except UnicodeDecodeError as e:
    raise GemmaError(f"not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start} of the line "
                     f"({offset + e.start} of the file): {e.reason}") from None


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
  """json's object hook: a repeated key would silently keep only its last value."""
  keys = [k for k, _ in pairs]
  if len(set(keys)) < len(keys):
    raise GemmaError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r} in a JSON object")
  return dict(pairs)


def _example(line: str, tok: Tokenizer, where: str, seq_len: int, truncate: bool) -> Example:
  try:
    obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
  except json.JSONDecodeError as e:
    raise GemmaError(f"not valid JSON: {e.msg} at column {e.colno}") from None
  if not isinstance(obj, dict):
    raise GemmaError(f"expected a JSON object, got {_json_type(obj)}")
  shapes = [name for name, keys in SHAPES.items() if any(k in obj for k in keys)]
  if len(shapes) > 1:
    raise GemmaError(f"ambiguous example: it has keys of the {' and '.join(shapes)} shapes; use one")
  if not shapes:
    raise GemmaError(f"no example field among keys {sorted(obj)}: expected 'text', 'prompt' and "
                     f"'response', or 'messages'")
  parts = {"text": _text, "prompt/response": _prompt_response, "messages": _messages}[shapes[0]](obj, tok)
  ids, targets = [i for p, _ in parts for i in p], [t for p, t in parts for _ in p]
  return _fit(ids, targets, where, seq_len, truncate)


# Each shape's builder returns its ids in parts: (ids, whether they are targets).
def _text(obj: dict, tok: Tokenizer) -> list[tuple[list[int], bool]]:
  return [([_special(tok, "bos")], False), (tok.encode(_string(obj, "text"), add_bos=False), True)]


def _prompt_response(obj: dict, tok: Tokenizer) -> list[tuple[list[int], bool]]:
  prompt, response = _string(obj, "prompt"), _string(obj, "response")
  return [([_special(tok, "bos")] + tok.encode(prompt, add_bos=False), False),
          (tok.encode(response, add_bos=False) + [_special(tok, "eos")], True)]


def _messages(obj: dict, tok: Tokenizer) -> list[tuple[list[int], bool]]:
  """The ChatSession template, built with its tokenizer calls: chat_turn for user turns (the first holding
  the system prompt), encode(content.strip()) + <end_of_turn> for the model turns, which are the targets."""
  turns = _turns(obj.get("messages"))
  system = turns.pop(0)["content"] if turns[0]["role"] == "system" else None
  eot = _special(tok, "end_of_turn")
  parts = []
  for k, m in enumerate(turns):
    if m["role"] == "user":
      parts.append((tok.chat_turn(m["content"], first=k == 0, system=system if k == 0 else None), False))
    else:
      parts.append((tok.encode(m["content"].strip(), add_bos=False) + [eot], True))
  return parts


def _turns(messages) -> list[dict]:
  """Checks the messages list: an optional system message, then user/model alternating, ending with model."""
  if not isinstance(messages, list) or not messages:
    raise GemmaError(f"'messages' must be a non-empty list of messages, got {_json_type(messages)}")
  for k, m in enumerate(messages):
    if not isinstance(m, dict):
      raise GemmaError(f"messages[{k}] must be an object with 'role' and 'content', got {_json_type(m)}")
    role = _string(m, "role", f"messages[{k}]")
    if role not in ROLES:
      hint = " (Gemma calls the assistant 'model')" if role == "assistant" else ""
      raise GemmaError(f"messages[{k}]: unknown role {role!r}{hint}; known roles: {', '.join(ROLES)}")
    _string(m, "content", f"messages[{k}]")
  first = 1 if messages[0]["role"] == "system" else 0
  for k, m in enumerate(messages[first:], first):
    expected = ("user", "model")[(k - first) % 2]
    if m["role"] != expected:
      raise GemmaError(f"messages[{k}]: expected a {expected!r} message, got {m['role']!r}: an optional system "
                       f"message comes first, then turns alternate user, model, user, ...")
  if len(messages) - first < 2:
    raise GemmaError("messages has no 'model' turn: nothing to train on")
  if messages[-1]["role"] == "user":
    raise GemmaError(f"messages ends with a 'user' turn (messages[{len(messages) - 1}]) that no 'model' turn "
                     f"answers: nothing to train on after it; remove it or add the answer")
  return list(messages)


def _string(obj: dict, key: str, owner: str = "") -> str:
  name = f"{owner}: field {key!r}" if owner else f"field {key!r}"
  if key not in obj:
    raise GemmaError(f"{name} is missing")
  if not isinstance(value := obj[key], str):
    raise GemmaError(f"{name} must be a string, got {_json_type(value)}")
  if not value.strip():
    raise GemmaError(f"{name} is empty")
  return value


def _special(tok: Tokenizer, name: str) -> int:
  if (i := getattr(tok, f"{name}_id")) is None:
    raise GemmaError(f"the tokenizer has no <{name}> piece, which this example needs")
  return i


def _fit(ids: list[int], targets: list[bool], where: str, seq_len: int, truncate: bool) -> Example:
  if len(ids) > seq_len:
    if not truncate:
      raise GemmaError(f"the example is {len(ids)} tokens, longer than seq_len {seq_len}; raise seq_len, "
                       f"shorten it, or pass --truncate (truncate=True) to keep its first {seq_len} tokens")
    ids, targets = ids[:seq_len], targets[:seq_len]
    if not any(targets):
      raise GemmaError(f"no target tokens within the first {seq_len} (seq_len) tokens: truncating leaves "
                       f"nothing to train on; raise seq_len or shorten the prompt")
  return Example(np.asarray(ids, np.int32), np.asarray(targets, bool), where)


def _json_type(value) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
          type(None): "null"}[type(value)]


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise GemmaError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def bucket_length(n: int, seq_len: int) -> int:
  """The padded length of an unpacked batch whose longest example has n tokens: the smallest of the buckets
  (powers of two from 16 below seq_len, and seq_len itself) that holds n, so few shapes ever compile."""
  if not 0 <= n <= seq_len:
    raise GemmaError(f"an example of {n} tokens does not fit seq_len {seq_len}")
  return min(seq_len, max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


def count_targets(batch: Batch) -> int:
  """The number of target tokens in the batch (the loss's denominator)."""
  return int(batch.targets.sum())


def _batch(rows: Sequence[Sequence[Example]], length: int, pad_id: int) -> Batch:
  """Lays rows of examples end to end into (len(rows), length) arrays; an empty row is all padding."""
  shape = (len(rows), length)
  tokens = np.full(shape, pad_id, np.int32)
  positions = np.full(shape, -1, np.int32)
  segments = np.zeros(shape, np.int32)
  targets = np.zeros(shape, np.float32)
  for r, row in enumerate(rows):
    t = 0
    for s, ex in enumerate(row, 1):
      n = len(ex.ids)
      tokens[r, t:t + n] = ex.ids
      positions[r, t:t + n] = np.arange(n)
      segments[r, t:t + n] = s
      targets[r, t:t + n] = ex.targets  # targets[0] is False, so a packed example's <bos> is never a target
      t += n
  return Batch(tokens, positions, segments, targets)


def _check_examples(examples: Sequence[Example], seq_len: int) -> None:
  if not examples:
    raise GemmaError("no examples to batch")
  if ex := next((ex for ex in examples if len(ex.ids) > seq_len), None):
    raise GemmaError(f"{ex.where}: the example is {len(ex.ids)} tokens, longer than seq_len {seq_len}")


class Loader:
  """Training batches from a shuffled, endlessly repeated stream of examples, resumable from a Position.

  Unpacked: batch_size examples per batch, one per row, padded to bucket_length of the longest. Packed:
  rows of seq_len filled greedily in stream order (an example that does not fit starts the next row, or
  the next batch once batch_size rows are full); no example is split. Batches may cross epochs.

    loader = Loader(examples, batch_size=8, seq_len=1024, seed=0, pack=True, position=saved)
    batch = loader.next_batch(); saved = loader.position
  """

  def __init__(self, examples: Sequence[Example], *, batch_size: int, seq_len: int, seed: int, pack: bool = False,
               position: tuple[int, int] = Position(0, 0), pad_id: int = 0):
    """pad_id: the token at padding (tokenizer.pad_id, or 0 when it has none); padding is never a target."""
    self.batch_size = _check_int("batch_size", batch_size, 1)
    self.seq_len = _check_int("seq_len", seq_len, 2)
    self.seed = _check_int("seed", seed, 0)  # a negative seed is no numpy SeedSequence
    _check_examples(examples, self.seq_len)
    self.examples, self.pack, self.pad_id = examples, pack, pad_id
    self._epoch, self._index = (_check_int(f"position.{f}", v, 0) for f, v in zip(Position._fields, position))
    if self._index > len(examples):
      raise GemmaError(f"position.index {self._index} is past the {len(examples)} examples of an epoch: the "
                       f"position was saved for other data")
    self._order = self._order_of(self._epoch)
    self._roll()

  @property
  def position(self) -> Position:
    """The position after the last batch returned: a Loader made with it yields the batches that follow."""
    return Position(self._epoch, self._index)

  def _order_of(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

  def _roll(self) -> None:
    """Keeps index < len(examples), so a position always names the next example's own epoch."""
    if self._index == len(self.examples):
      self._epoch, self._index = self._epoch + 1, 0
      self._order = self._order_of(self._epoch)

  def _peek(self) -> Example:
    return self.examples[self._order[self._index]]

  def _take(self) -> Example:
    ex, self._index = self._peek(), self._index + 1
    self._roll()
    return ex

  def next_batch(self) -> Batch:
    """The next (batch_size, T) batch: T = seq_len packed, else the bucket of the longest example."""
    if not self.pack:
      rows = [[self._take()] for _ in range(self.batch_size)]
      return _batch(rows, bucket_length(max(len(r[0].ids) for r in rows), self.seq_len), self.pad_id)
    rows, row, used = [], [], 0
    while True:
      n = len(self._peek().ids)
      if used + n > self.seq_len:
        rows.append(row)
        if len(rows) == self.batch_size:
          return _batch(rows, self.seq_len, self.pad_id)  # the example that did not fit starts the next batch
        row, used = [], 0
      row.append(self._take())
      used += n

  def __iter__(self) -> Iterator[Batch]:
    while True:
      yield self.next_batch()


def eval_batches(examples: Sequence[Example], *, batch_size: int, seq_len: int, pack: bool = False, pad_id: int = 0
                 ) -> list[Batch]:
  """Every example exactly once, in order, as batches of batch_size rows; the last is filled up with empty
  (all padding) rows. Unpacked rows hold one example each (T = its batch's bucket); packed rows are filled
  greedily to seq_len."""
  _check_int("batch_size", batch_size, 1)
  _check_int("seq_len", seq_len, 2)
  _check_examples(examples, seq_len)
  if pack:
    rows, used = [[]], 0
    for ex in examples:
      if used + len(ex.ids) > seq_len:
        rows.append([])
        used = 0
      rows[-1].append(ex)
      used += len(ex.ids)
  else:
    rows = [[ex] for ex in examples]
  rows += [[]] * (-len(rows) % batch_size)
  chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
  return [_batch(c, seq_len if pack else bucket_length(max(len(r[0].ids) for r in c if r), seq_len), pad_id)
          for c in chunks]

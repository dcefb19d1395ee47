"""Detokenizing rows as they grow: final text only, stop strings, held-back UTF-8.

A row's text is released only once it is final: an incomplete UTF-8 sequence (a character spread over
byte-fallback tokens) and any suffix that may begin a stop string are held back, so joining the pieces
gives exactly the text of the whole row. No JAX here: the model hands in a `step` function.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Detokenizer(Protocol):
  def decode(self, ids: Sequence[int]) -> str: ...


class TextRow:
  """One row's detokenized text while streaming: what is final, and where a stop string ends it."""

  def __init__(self, tokenizer: Detokenizer, stop_ids: set[int], stop: tuple[str, ...]):
    self.tokenizer, self.stop_ids, self.stop = tokenizer, stop_ids, stop
    self.ids: list[int] = []
    self.sent = 0  # characters already yielded
    self.stopped = False

  def _text(self, ids: list[int] | None = None) -> str:
    return self.tokenizer.decode([i for i in (self.ids if ids is None else ids) if i not in self.stop_ids])

  def add(self, ids: list[int]) -> str:
    """Appends ids; returns the text that became final ("" once a stop string was seen)."""
    if self.stopped:
      return ""
    self.ids += ids
    text = self._text()
    cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
    if cut >= 0:
      self.stopped = True
      # Keep the ids up to the token that completes the stop string, not the rest of the chunk.
      while len(self.ids) > 1 and any(s in self._text(self.ids[:-1]) for s in self.stop):
        self.ids.pop()
      delta = text[self.sent:cut]
      self.sent = cut
      return delta
    end = len(text)
    # An incomplete UTF-8 sequence decodes to U+FFFD for now; hold it back until the rest arrives.
    while end > self.sent and text[end - 1] == "\ufffd":
      end -= 1
    # Hold back a suffix that could be the start of a stop string.
    for s in self.stop:
      for k in range(min(len(s) - 1, end - self.sent), 0, -1):
        if text[end - k:end] == s[:k]:
          end -= k
          break
    delta = text[self.sent:end]
    self.sent = end
    return delta

  def flush(self) -> str:
    """The rest of the text at the end of generation (nothing is held back any more)."""
    if self.stopped:
      return ""
    text = self._text()
    delta = text[self.sent:]
    self.sent = len(text)
    return delta


# step(state, steps) -> (new ids per row, state); mark_done(state, rows (B,) bool) -> state.
Step = Callable[[Any, int], tuple[list[list[int]], Any]]
MarkDone = Callable[[Any, np.ndarray], Any]


class TextStream:
  """Iterates, per compiled chunk of tokens, the new text of each of the first `num_rows` rows.

  After the iteration ends, `state` is the final decode state and `ids` each row's new ids (a stop
  token included; ids after a stop string's last token dropped). Rows past num_rows (padding of a
  sharded batch) are run but never yielded.
  """

  def __init__(self, tokenizer: Detokenizer, step: Step, mark_done: MarkDone, state: Any, *,
               max_new_tokens: int, chunk: int, stop: tuple[str, ...] = (), stop_ids: set[int] = frozenset(),
               num_rows: int = 1):
    self._step, self._mark_done = step, mark_done
    self.state = state
    self.max_new_tokens, self.chunk, self.num_rows = max_new_tokens, chunk, num_rows
    self._rows = [TextRow(tokenizer, set(stop_ids), stop) for _ in range(state.pos.shape[0])]
    self.ids: list[list[int]] | None = None  # set when the stream is exhausted

  def __iter__(self) -> Iterator[list[str]]:
    produced, state, rows = 0, self.state, self._rows
    while produced < self.max_new_tokens and not bool(np.all(np.asarray(state.done))):
      steps = min(self.chunk, self.max_new_tokens - produced)
      out, state = self._step(state, steps)
      produced += steps
      deltas = [row.add(ids) for row, ids in zip(rows, out)]
      hit = np.array([row.stopped for row in rows])
      if hit.any():
        state = self._mark_done(state, hit)
      self.state = state
      yield deltas[:self.num_rows]
    final = [row.flush() for row in rows[:self.num_rows]]
    if any(final):
      yield final
    self.state, self.ids = state, [row.ids for row in rows[:self.num_rows]]

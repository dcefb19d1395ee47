"""ChatSession: a multi-turn conversation in the Gemma instruct format that keeps its KV cache.

Written against Model's public methods only (start, feed, resize_cache, stream_state, tokenizer).
"""

from __future__ import annotations

import threading
import warnings
from typing import Iterator, Sequence

from .decode import DecodeState
from .engine import bucket
from .errors import GemmaError
from .checks import check_cache_policy, check_max_new_tokens, is_int
from .model import Model
from .sampling import make_sampling


class ChatSession:
  """A multi-turn conversation in the Gemma instruct format that keeps its KV cache across turns.

  Each turn feeds only its own tokens (the earlier turns stay in the cache); the cache grows as the
  conversation does, up to max_cache_len (default: the model's context). Past that, cache_policy
  "error" raises and "rolling" makes global layers forget the oldest tokens.

  One conversation is one sequence of turns: a session answers one message at a time, and a second
  thread that sends while an answer is being generated gets a GemmaError (use one session per thread;
  Model itself may be shared).

    chat = gj.ChatSession(model, system="Answer briefly.")
    print(chat.send("What is the capital of France?"))
    for piece in chat.stream("And of Spain?"): print(piece, end="")
  """

  def __init__(self, model: Model, *, system: str | None = None, max_cache_len: int | None = None,
               cache_policy: str = "error", max_new_tokens: int = 512, **sampling):
    tok = model.tokenizer
    if tok is None:
      raise GemmaError("this checkpoint has no tokenizer.model; pass token ids instead of text")
    if tok.start_of_turn_id is None or tok.end_of_turn_id is None:
      raise GemmaError("this tokenizer has no <start_of_turn>/<end_of_turn> pieces: not a chat model")
    check_cache_policy(cache_policy)
    if max_cache_len is not None and (not is_int(max_cache_len) or max_cache_len < 1):
      raise GemmaError(f"max_cache_len must be an integer >= 1, got {max_cache_len!r}")
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    if model.instruct is not True:  # after the checks: a bad setting is one error, not a warning and an error
      warnings.warn("chatting with a model not known to be instruction-tuned (a base model continues "
                    "text rather than answering); use an -it checkpoint for chat", stacklevel=2)
    self.model, self.system, self.cache_policy = model, system, cache_policy
    self.max_cache_len = min(max_cache_len or model.config.max_seq_len, model.config.max_seq_len)
    self.max_new_tokens = max_new_tokens
    self.sampling = sampling
    self.ids: list[int] = []  # the whole conversation so far, as fed to the model
    self.last_fed = 0  # tokens the last turn ran through the model before answering
    self._state: DecodeState | None = None
    self._cache_len = 0
    self._rolling = False
    self._busy = threading.Lock()

  def send(self, text: str, **kwargs) -> str:
    """The model's whole answer to `text` (see stream for the keyword arguments)."""
    return "".join(self.stream(text, **kwargs))

  def stream(self, text: str, *, max_new_tokens: int | None = None, stop: Sequence[str] = (),
             chunk: int = 8, stop_ids: Sequence[int] | None = None, forbidden_ids: Sequence[int] | None = None,
             **sampling) -> Iterator[str]:
    """Yields the answer's text as it is generated. Sampling settings override the session's."""
    if not self._busy.acquire(blocking=False):
      raise GemmaError("this ChatSession is already answering a message (in another thread, or a stream not "
                       "yet finished); a session takes one message at a time")
    try:
      yield from self._turn(text, max_new_tokens, stop, chunk, stop_ids, forbidden_ids, sampling)
    finally:
      self._busy.release()

  def _turn(self, text, max_new_tokens, stop, chunk, stop_ids, forbidden_ids, sampling) -> Iterator[str]:
    if not isinstance(text, str) or not text.strip():
      raise GemmaError("empty message: say something")
    model, tok = self.model, self.model.tokenizer
    max_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
    check_max_new_tokens(max_new)
    first = not self.ids
    closed = first or self.ids[-1] == tok.end_of_turn_id
    new = tok.chat_turn(text, first=first, system=self.system if first else None, close_previous=not closed)
    needed = len(self.ids) + len(new) + max_new
    if needed > model.config.max_seq_len:
      raise GemmaError(f"the conversation would reach {needed} tokens, past the model's context of "
                       f"{model.config.max_seq_len}")
    sampling = make_sampling(1, **{**self.sampling, **sampling})
    if needed > self.max_cache_len and self.cache_policy == "error":
      raise GemmaError(f"the conversation would reach {needed} tokens but the cache holds "
                       f"{self.max_cache_len}; start a new session, raise max_cache_len, or pass "
                       "cache_policy='rolling' (global layers then forget the oldest tokens)")
    cache_len = min(bucket(needed), self.max_cache_len)
    rolling = self._rolling or needed > self.max_cache_len
    if self._state is None:  # the first turn, or a replay after an interrupted turn
      state = model.start([self.ids + new], max_new, cache_len=cache_len,
                          cache_policy="rolling" if rolling else "error")
      self.last_fed = len(self.ids) + len(new)
    else:
      state = self._state
      if cache_len != self._cache_len or rolling != self._rolling:
        state = model.resize_cache(state, cache_len, rolling)
      state = model.feed(state, [new])
      self.last_fed = len(new)
    self._state, self._cache_len, self._rolling = None, cache_len, rolling
    answer = model.stream_state(state, max_new, sampling, stop=stop, chunk=chunk, stop_ids=stop_ids,
                                forbidden_ids=forbidden_ids, num_rows=1)
    yield from (d[0] for d in answer)
    # Only a completed answer joins the conversation; if the caller stops iterating early, the turn is
    # dropped and the next one replays the history into a fresh cache.
    self._state = answer.state
    self.ids += new + answer.ids[0]

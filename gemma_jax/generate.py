"""Text in, text out: the Model object, prompt validation, bucket padding and greedy generation."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from . import checkpoint, decode
from .cache import init_cache, resize_cache
from .configs import ModelConfig
from .errors import GemmaError
from .sampling import Sampling, make_sampling
from .sharding import GENERATION, Layout, Rules, get_rules, make_mesh
from .tokenizer import Tokenizer
from .transformer import abstract_model, flat_params, set_flat_params

MIN_BUCKET = 32


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """The padded length for n: the next power of two, at least `minimum`.

  Prompts are padded to these lengths so that prefill compiles once per bucket, not per length.
  """
  return max(minimum, 1 << max(n - 1, 0).bit_length())


def check_max_new_tokens(max_new_tokens) -> None:
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise GemmaError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def _check_stop_strings(stop: Sequence[str] | str) -> tuple[str, ...]:
  stop = (stop,) if isinstance(stop, str) else tuple(stop)
  for s in stop:
    if not isinstance(s, str) or not s:
      raise GemmaError(f"stop strings must be non-empty strings, got {s!r}")
  return stop


def _pad(rows: Sequence[Sequence[int]], starts: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads id rows to `length`: tokens and positions (B, length), positions -1 on padding."""
  tokens = np.zeros((len(rows), length), np.int32)
  positions = np.full((len(rows), length), -1, np.int32)
  for r, (row, start) in enumerate(zip(rows, starts)):
    tokens[r, :len(row)] = row
    positions[r, :len(row)] = start + np.arange(len(row))
  return tokens, positions


def _drive(gen):
  """Iterates a Model.run generator, sending each state straight back."""
  try:
    item = next(gen)
    while True:
      yield item
      item = gen.send(item[1])
  except StopIteration:
    return


class _TextRow:
  """One row's detokenized text while streaming: what is final, and where a stop string ends it."""

  def __init__(self, tokenizer: Tokenizer, stop_ids: set[int], stop: tuple[str, ...]):
    self.tokenizer, self.stop_ids, self.stop = tokenizer, stop_ids, stop
    self.ids: list[int] = []
    self.sent = 0  # characters already yielded
    self.stopped = False

  def _text(self) -> str:
    return self.tokenizer.decode([i for i in self.ids if i not in self.stop_ids])

  def add(self, ids: list[int]) -> str:
    if self.stopped:
      return ""
    self.ids += ids
    text = self._text()
    cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
    if cut >= 0:
      self.stopped = True
      # Keep the ids up to the token that completes the stop string, not the rest of the chunk.
      while len(self.ids) > 1 and any(s in self.tokenizer.decode(
          [i for i in self.ids[:-1] if i not in self.stop_ids]) for s in self.stop):
        self.ids.pop()
      delta = text[self.sent:cut]
      self.sent = cut
      return delta
    end = len(text)
    # An incomplete UTF-8 sequence (a character split across byte-fallback tokens) decodes to U+FFFD
    # for now; hold it back until the rest arrives.
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
    if self.stopped:
      return ""
    text = self._text()
    delta = text[self.sent:]
    self.sent = len(text)
    return delta


@dataclasses.dataclass(frozen=True)
class Completion:
  """One prompt's result: its ids (BOS first), the new ids (a stop token included) and the new text."""

  prompt_ids: list[int]
  ids: list[int]
  text: str


@dataclasses.dataclass
class Model:
  """A Gemma model ready to run: config, params (nnx.State), graph definition and tokenizer.

  Build one with `load(path)` (a converted checkpoint) or `Model.random(config)` (tests); `load(path,
  mesh=...)` or `model.shard(mesh)` spread it over devices. With a layout, params, cache and batch are
  placed by its rules and a batch is padded with idle rows to a multiple of the `data` axis (the padding
  rows draw nothing and are never returned).
  """

  config: ModelConfig
  graphdef: nnx.GraphDef
  params: nnx.State
  tokenizer: Tokenizer | None = None
  instruct: bool | None = None  # an instruction-tuned checkpoint? None: the source did not say
  layout: Layout | None = None  # mesh and sharding rules; None: one device

  @classmethod
  def random(cls, config: ModelConfig, seed: int = 0, tokenizer: Tokenizer | None = None) -> "Model":
    """A model with random weights (normal(0.02) matrices, zero norms), for tests and benchmarks.

    Drawn with numpy: compiling JAX's threefry for every parameter takes longer than the tests.
    """
    graphdef, state = abstract_model(config)
    rng = np.random.default_rng(seed)
    draw = lambda path, x: (np.zeros(x.shape) if path.endswith("/scale") else 0.02 * rng.standard_normal(x.shape))
    # In sorted official-name order: the draws do not depend on how the module tree orders its params.
    abstract = flat_params(state)
    set_flat_params(state, {p: jnp.asarray(draw(p, abstract[p]), abstract[p].dtype) for p in sorted(abstract)})
    return cls(config, graphdef, state, tokenizer)

  def shard(self, mesh: Mesh | str, rules: Rules | str = GENERATION) -> "Model":
    """This model with its params copied onto a mesh (a Mesh or a spec like "data=1,model=-1")."""
    layout = Layout(make_mesh(mesh) if isinstance(mesh, str) else mesh, get_rules(rules))
    return dataclasses.replace(self, params=layout.shard_params(self.params), layout=layout)

  def _padded(self, rows: int) -> int:
    """Rows a batch of `rows` occupies: rounded up to a multiple of the data axis."""
    m = self.layout.batch_multiple if self.layout else 1
    return -(-rows // m) * m

  def _put(self, x, axes: tuple[str, ...] | None = None) -> jax.Array:
    """A host value as a jit input: placed by the layout's rules (None: replicated), else on one device."""
    return jnp.asarray(x) if self.layout is None else self.layout.put(x, axes)

  @property
  def decoder(self) -> decode.Decoder:
    """The static half of this model's compiled programs (graph definition and layout)."""
    return decode.Decoder(self.graphdef, self.layout)

  @property
  def _place(self):
    return None if self.layout is None else self.layout.sharding

  def _batch_sampling(self, sampling: Sampling, rows: int) -> Sampling:
    """Per-row settings for the padded batch (padding rows copy row 0) placed like the batch."""
    def fit(x):
      x, n = np.asarray(x), np.shape(x)[0]
      if n != rows and self._padded(n) != rows:
        raise GemmaError(f"sampling settings are for {n} rows but the batch has {rows}")
      return self._put(np.concatenate([x, np.repeat(x[:1], rows - n, axis=0)]), ("B",))
    return jax.tree.map(fit, sampling)

  @property
  def vocab_limit(self) -> int:
    """Ids the model may emit: the tokenizer's pieces (Gemma 1/2 pad the embedding to 256128 rows)."""
    return min(self.config.vocab_size, self.tokenizer.vocab_size if self.tokenizer else self.config.vocab_size)

  def _require_tokenizer(self) -> Tokenizer:
    if self.tokenizer is None:
      raise GemmaError("this checkpoint has no tokenizer.model; pass token ids instead of text")
    return self.tokenizer

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    """Text -> ids (BOS first unless add_bos=False)."""
    return self._require_tokenizer().encode(text, add_bos=add_bos)

  def decode_text(self, ids: Sequence[int]) -> str:
    """Ids -> text; control tokens are dropped, -1 (no token) entries skipped."""
    return self._require_tokenizer().decode([i for i in ids if i >= 0])

  def check_ids(self, ids: Sequence[int], what: str = "prompt") -> list[int]:
    """Validates one token-id sequence: non-empty and every id inside the vocabulary."""
    ids = [int(i) for i in ids]
    if not ids:
      raise GemmaError(f"empty {what}: give at least one token")
    for pos, i in enumerate(ids):
      if not 0 <= i < self.config.vocab_size:
        raise GemmaError(f"token id {i} at position {pos} of the {what} is outside the vocabulary "
                         f"[0, {self.config.vocab_size})")
    return ids

  def stop_ids(self) -> list[int]:
    """EOS and <end_of_turn>, read from the tokenizer."""
    if self.tokenizer is None:
      return []
    return [i for i in (self.tokenizer.eos_id, self.tokenizer.end_of_turn_id) if i is not None and i >= 0]

  def _allowed(self, forbidden_ids: Sequence[int] | None) -> jax.Array:
    """(V,) bool: the tokenizer's ids minus the forbidden ones."""
    allowed = np.arange(self.config.vocab_size) < self.vocab_limit
    for i in forbidden_ids or ():
      if not 0 <= int(i) < self.config.vocab_size:
        raise GemmaError(f"forbidden token id {i} is outside the vocabulary [0, {self.config.vocab_size})")
      allowed[int(i)] = False
    return jnp.asarray(allowed)

  def _stop_array(self, stop_ids: Sequence[int] | None) -> jax.Array:
    ids = self.stop_ids() if stop_ids is None else [int(i) for i in stop_ids]
    for i in ids:
      if not 0 <= i < self.config.vocab_size:
        raise GemmaError(f"stop token id {i} is outside the vocabulary [0, {self.config.vocab_size})")
    return jnp.asarray(ids or [-2], jnp.int32)  # -2 is never drawn: "no stop id"

  def start(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, cache_len: int | None = None,
            cache_policy: str = "error") -> decode.DecodeState:
    """Validates prompts (ids, BOS included) and runs their prefill; the state decode_loop continues.

    cache_len: global-layer slots; default: prompt + max_new_tokens rounded up to a bucket.
    cache_policy: "error" (a cache too small for prompt + max_new_tokens is an error) or "rolling"
      (global layers keep the most recent cache_len tokens and forget older ones: quality drops once
      the model needs tokens that fell out; sliding-window layers are unaffected).
    """
    check_max_new_tokens(max_new_tokens)
    if cache_policy not in ("error", "rolling"):
      raise GemmaError(f"cache_policy must be 'error' or 'rolling', got {cache_policy!r}")
    if not prompts:
      raise GemmaError("no prompts given")
    rows = [self.check_ids(p, f"prompt {i}" if len(prompts) > 1 else "prompt") for i, p in enumerate(prompts)]
    longest = max(map(len, rows))
    total = longest + max_new_tokens
    if total > self.config.max_seq_len:
      raise GemmaError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = {total} exceeds the "
                       f"model's context of {self.config.max_seq_len} tokens")
    rolling = cache_policy == "rolling"
    if cache_len is None:
      cache_len = min(bucket(total), self.config.max_seq_len)
    elif cache_len < total and not rolling:
      raise GemmaError(f"the cache holds {cache_len} tokens but prompt ({longest}) + max_new_tokens "
                       f"({max_new_tokens}) needs {total}; raise cache_len or pass cache_policy='rolling' "
                       "(global layers then forget the oldest tokens)")
    t_pad = bucket(longest) if rolling else min(bucket(longest), cache_len)
    b = self._padded(len(rows))
    idle = b - len(rows)  # padding rows: no tokens (positions -1), done from the start
    tokens, positions = _pad(rows + [[]] * idle, [0] * b, t_pad)
    cache = init_cache(self.config, b, cache_len, rolling=rolling, place=self._place)
    logits, cache = self.decoder.prefill(self.params, self._put(tokens, ("B", "T")),
                                         self._put(positions, ("B", "T")), cache, fresh=True)
    return decode.DecodeState(logits=logits, pos=self._put(np.array([len(r) for r in rows] + [0] * idle, np.int32)),
                              done=self._put(np.arange(b) >= len(rows)), step=self._put(np.int32(0)), cache=cache)

  def run(self, state: decode.DecodeState, max_new_tokens: int, sampling: Sampling, *,
          stop_ids: Sequence[int] | None = None, forbidden_ids: Sequence[int] | None = None,
          chunk: int | None = None) -> Iterator[tuple[list[list[int]], decode.DecodeState]]:
    """Continues generation from `state`, yielding (new ids per row, state) after each compiled call.

    chunk: tokens per call (streaming, stop strings); None: one call for all max_new_tokens. A caller
    may set rows done in the yielded state (e.g. on a stop string) before asking for more.
    """
    check_max_new_tokens(max_new_tokens)
    stops, allowed = self._stop_array(stop_ids), self._allowed(forbidden_ids)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
      raise GemmaError(f"chunk must be an integer >= 1, got {chunk!r}")
    capacity = chunk or bucket(max_new_tokens)
    sampling = self._batch_sampling(sampling, state.pos.shape[0])
    stops, allowed = self._put(stops), self._put(allowed)
    produced = 0
    while produced < max_new_tokens and not bool(jnp.all(state.done)):
      steps = min(capacity, max_new_tokens - produced)
      out, state = self.decoder.with_capacity(capacity).decode_loop(self.params, state, sampling,
                                                                    self._put(np.int32(steps)), stops, allowed)
      out = np.asarray(out)
      produced += steps
      state = yield [row[row >= 0].tolist() for row in out], state
      if state is None:
        raise RuntimeError("send() the state back, or iterate with next()")

  def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                   temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0,
                   stop_ids: Sequence[int] | None = None, forbidden_ids: Sequence[int] | None = None,
                   cache_len: int | None = None, cache_policy: str = "error") -> list[list[int]]:
    """New ids for each prompt (lists of ids, BOS included); rows stop on their own.

    Sampling settings are one value or one per prompt (see sampling.make_sampling); temperature 0 is
    greedy. stop_ids default to EOS and <end_of_turn>; a stop id is kept in the output.
    """
    sampling = make_sampling(len(prompts), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             seed=seed)
    state = self.start(prompts, max_new_tokens, cache_len=cache_len, cache_policy=cache_policy)
    rows: list[list[int]] = [[] for _ in prompts]
    for out, state in _drive(self.run(state, max_new_tokens, sampling, stop_ids=stop_ids,
                                      forbidden_ids=forbidden_ids)):
      for row, ids in zip(rows, out):  # padding rows (a sharded batch) are dropped
        row += ids
    return rows

  def feed(self, state: decode.DecodeState, ids: Sequence[Sequence[int]]) -> decode.DecodeState:
    """Appends ids to every row of a state (e.g. the next chat turn): only these tokens are run.

    The cache must have room (global layers hold positions < cache_len unless rolling). A sharded
    batch's padding rows stay idle.
    """
    rows = [self.check_ids(r, "continuation") for r in ids]
    b = state.pos.shape[0]
    if self._padded(len(rows)) != b:
      raise GemmaError(f"feed needs one id list per row ({b}), got {len(rows)}")
    rows += [[]] * (b - len(rows))
    lengths = np.array([len(r) for r in rows], np.int32)
    fixed = [c.num_slots for c in state.cache if not c.ring]
    end = int(np.max(np.asarray(state.pos) + lengths))
    if fixed and end > min(fixed):
      raise GemmaError(f"the cache holds {min(fixed)} positions but feeding these ids reaches {end}; resize it "
                       "(cache.resize_cache) or use a rolling cache")
    tokens, positions = _pad(rows, np.asarray(state.pos), bucket(int(lengths.max())))
    logits, cache = self.decoder.prefill(self.params, self._put(tokens, ("B", "T")),
                                         self._put(positions, ("B", "T")), state.cache)
    return state.replace(logits=logits, pos=self._put(np.asarray(state.pos) + lengths),
                         done=self._put(lengths == 0), cache=cache)

  def stream(self, prompts: str | Sequence[str], max_new_tokens: int = 64, *, stop: Sequence[str] = (),
             chunk: int = 8, **kwargs) -> Iterator[list[str]]:
    """Yields, per compiled chunk of tokens, the new text of every row ("" for rows with none).

    Text is only released once it is final: incomplete UTF-8 from byte-fallback tokens and any suffix
    that may begin a stop string are held back, so joining the pieces gives exactly generate()'s text.
    Keyword arguments are generate_ids()'s (sampling, stop_ids, forbidden_ids, cache).
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    tok = self._require_tokenizer()
    for i, t in enumerate(texts):
      if not t:
        raise GemmaError(f"empty prompt{'' if isinstance(prompts, str) else f' {i}'}: give some text")
    sampling_kw = {k: kwargs.pop(k) for k in ("temperature", "top_k", "top_p", "min_p", "seed") if k in kwargs}
    state_kw = {k: kwargs.pop(k) for k in ("cache_len", "cache_policy") if k in kwargs}
    sampling = make_sampling(len(texts), **sampling_kw)
    stop = _check_stop_strings(stop)
    result = kwargs.pop("_result", None)
    state = self.start([tok.encode(t) for t in texts], max_new_tokens, **state_kw)
    yield from self._stream_from(state, max_new_tokens, sampling, stop=stop, chunk=chunk, result=result,
                                 num_rows=len(texts), **kwargs)

  def _stream_from(self, state, max_new_tokens, sampling, *, stop=(), chunk=8, stop_ids=None,
                   forbidden_ids=None, result: list | None = None, num_rows: int = 1) -> Iterator[list[str]]:
    """stream() from an existing state of num_rows prompts (any further rows are padding, never
    yielded); the final state and ids are appended to `result` if given."""
    tok = self._require_tokenizer()
    stop_set = set(self.stop_ids() if stop_ids is None else stop_ids)
    rows = [_TextRow(tok, stop_set, stop) for _ in range(state.pos.shape[0])]
    gen = self.run(state, max_new_tokens, sampling, stop_ids=stop_ids, forbidden_ids=forbidden_ids, chunk=chunk)
    try:
      out, state = next(gen)
      while True:
        deltas = [row.add(ids) for row, ids in zip(rows, out)]
        hit = np.array([row.stopped for row in rows])
        if hit.any():
          state = state.replace(done=self._put(np.asarray(state.done) | hit))
        yield deltas[:num_rows]
        out, state = gen.send(state)
    except StopIteration:
      pass
    final = [row.flush() for row in rows[:num_rows]]
    if any(final):
      yield final
    if result is not None:
      result += [state, [row.ids for row in rows[:num_rows]]]

  def complete(self, prompts: Sequence[str], max_new_tokens: int = 64, *, stop: Sequence[str] = (),
               **kwargs) -> list[Completion]:
    """Prompt ids, new ids and new text for each prompt (see generate)."""
    texts = list(prompts)
    pieces = [""] * len(texts)
    result: list = []
    chunk = 16 if stop else bucket(max_new_tokens)
    for deltas in self.stream(texts, max_new_tokens, stop=stop, chunk=chunk, _result=result, **kwargs):
      pieces = [p + d for p, d in zip(pieces, deltas)]
    tok = self._require_tokenizer()
    return [Completion(tok.encode(t), ids, text) for t, ids, text in zip(texts, result[1], pieces)]

  def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, *, stop: Sequence[str] = (),
               **kwargs) -> str | list[str]:
    """Text continuation of one prompt (returns a str) or a list of prompts (returns a list).

    stop: strings that end a row; the text ends before the first one. Other keyword arguments are
    generate_ids()'s (temperature, top_k, top_p, min_p, seed, stop_ids, forbidden_ids, cache_len,
    cache_policy). Stop tokens are not part of the text.
    """
    single = isinstance(prompts, str)
    done = self.complete([prompts] if single else prompts, max_new_tokens, stop=stop, **kwargs)
    return done[0].text if single else [c.text for c in done]

  def logprobs(self, ids: Sequence[int]) -> np.ndarray:
    """Teacher-forced log-probability of each token after the first: (len(ids) - 1,) float32."""
    ids = self.check_ids(ids, "token sequence")
    if len(ids) < 2:
      raise GemmaError("scoring needs at least two tokens (BOS and one more)")
    if len(ids) > self.config.max_seq_len:
      raise GemmaError(f"sequence of {len(ids)} tokens exceeds the model's context of "
                       f"{self.config.max_seq_len} tokens")
    tokens, positions = _pad([ids], [0], min(bucket(len(ids)), self.config.max_seq_len))
    out = self.decoder.token_logprobs(self.params, self._put(tokens, ("B", "T")), self._put(positions, ("B", "T")))
    return np.asarray(out)[0, :len(ids) - 1]

  def logits(self, ids: Sequence[int]) -> np.ndarray:
    """Full-sequence logits (len(ids), V) float32 for one unpadded sequence (tests, analysis)."""
    ids = self.check_ids(ids, "token sequence")
    tokens = self._put(np.asarray([ids], np.int32), ("B", "T"))
    positions = self._put(np.arange(len(ids), dtype=np.int32)[None], ("B", "T"))
    return np.asarray(self.decoder.forward(self.params, tokens, positions))[0]


class ChatSession:
  """A multi-turn conversation in the Gemma instruct format that keeps its KV cache across turns.

  Each turn feeds only its own tokens (the earlier turns stay in the cache); the cache grows as the
  conversation does, up to max_cache_len (default: the model's context). Past that, cache_policy
  "error" raises and "rolling" makes global layers forget the oldest tokens.

    chat = gj.ChatSession(model, system="Answer briefly.")
    print(chat.send("What is the capital of France?"))
    for piece in chat.stream("And of Spain?"): print(piece, end="")
  """

  def __init__(self, model: Model, *, system: str | None = None, max_cache_len: int | None = None,
               cache_policy: str = "error", max_new_tokens: int = 512, **sampling):
    tok = model._require_tokenizer()
    if tok.start_of_turn_id is None or tok.end_of_turn_id is None:
      raise GemmaError("this tokenizer has no <start_of_turn>/<end_of_turn> pieces: not a chat model")
    if model.instruct is not True:
      warnings.warn("chatting with a model not known to be instruction-tuned (a base model continues "
                    "text rather than answering); use an -it checkpoint for chat", stacklevel=2)
    if cache_policy not in ("error", "rolling"):
      raise GemmaError(f"cache_policy must be 'error' or 'rolling', got {cache_policy!r}")
    self.model, self.system, self.cache_policy = model, system, cache_policy
    self.max_cache_len = min(max_cache_len or model.config.max_seq_len, model.config.max_seq_len)
    self.max_new_tokens = max_new_tokens
    self.sampling = sampling
    self.ids: list[int] = []  # the whole conversation so far, as fed to the model
    self.last_fed = 0  # tokens the last turn ran through the model before answering
    self._state: decode.DecodeState | None = None
    self._cache_len = 0
    self._rolling = False

  def send(self, text: str, **kwargs) -> str:
    """The model's whole answer to `text` (see stream for the keyword arguments)."""
    return "".join(self.stream(text, **kwargs))

  def stream(self, text: str, *, max_new_tokens: int | None = None, stop: Sequence[str] = (),
             chunk: int = 8, stop_ids: Sequence[int] | None = None, forbidden_ids: Sequence[int] | None = None,
             **sampling) -> Iterator[str]:
    """Yields the answer's text as it is generated. Sampling settings override the session's."""
    if not text or not text.strip():
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
        state = state.replace(cache=resize_cache(model.config, state.cache, cache_len, rolling, model._place))
      state = model.feed(state, [new])
      self.last_fed = len(new)
    self._state, self._cache_len, self._rolling = None, cache_len, rolling
    result: list = []
    yield from (d[0] for d in model._stream_from(state, max_new, sampling, stop=_check_stop_strings(stop),
                                                 chunk=chunk, stop_ids=stop_ids, forbidden_ids=forbidden_ids,
                                                 result=result))
    # Only a completed answer joins the conversation; if the caller stops iterating early, the turn is
    # dropped and the next one replays the history into a fresh cache.
    self._state = result[0]
    self.ids += new + result[1][0]


def load(path: str | os.PathLike, dtype: str | None = None, mesh: Mesh | str | None = None,
         rules: Rules | str = GENERATION) -> Model:
  """Loads a converted checkpoint directory (see checkpoint.py) into a Model.

  dtype: "float32" or "bfloat16"; default: the checkpoint's config (float32 for imports).
  mesh: a Mesh (sharding.make_mesh) or a spec such as "data=1,model=-1": each param is restored
    straight into its sharding under `rules` (each device reads only its slice); None: one device.
  """
  layout = None if mesh is None else Layout(make_mesh(mesh) if isinstance(mesh, str) else mesh, get_rules(rules))
  loaded = checkpoint.load(path, dtype, layout)
  proto = loaded.tokenizer_proto
  return Model(loaded.config, loaded.graphdef, loaded.params, Tokenizer(proto) if proto is not None else None,
               instruct=loaded.meta.get("instruct"), layout=layout)

"""The Model facade (text in, text out) and load().

Text is tokenized once and every id is validated here, in one place, before anything runs; engine.py
does the batching and decoding, streaming.py the detokenizing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from . import checkpoint, engine
from .cache import check_kv_cache_dtype
from .checks import check_cache_policy, check_max_new_tokens, check_stop_strings, is_int
from .configs import ModelConfig
from .decode import DecodeState, Decoder
from .errors import GemmaError
from .hostmem import tune_malloc
from .sampling import Sampling, make_sampling
from .sharding import GENERATION, Layout, Rules
from .streaming import TextStream
from .tokenizer import Tokenizer
from .transformer import abstract_model, flat_params, set_flat_params

SAMPLING_ARGS = ("temperature", "top_k", "top_p", "min_p", "seed")


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
  rows draw nothing and are never returned). kv_cache_dtype: what its KV caches store k and v as --
  "float32", "bfloat16" or "int8" (one float32 scale per token and kv head; cache.py); None: the model's dtype.
  """

  config: ModelConfig
  graphdef: nnx.GraphDef
  params: nnx.State
  tokenizer: Tokenizer | None = None
  instruct: bool | None = None  # an instruction-tuned checkpoint? None: the source did not say
  layout: Layout | None = None  # mesh and sharding rules; None: one device
  kv_cache_dtype: str | None = None

  def __post_init__(self):
    check_kv_cache_dtype(self.kv_cache_dtype)

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
    layout = Layout.of(mesh, rules)
    return dataclasses.replace(self, params=layout.shard_params(self.params), layout=layout)

  @property
  def decoder(self) -> Decoder:
    """The static half of this model's compiled programs (graph definition and layout)."""
    return Decoder(self.graphdef, self.layout)

  @property
  def engine(self) -> engine.Engine:
    return engine.Engine(self.config, self.params, self.decoder, self.kv_cache_dtype)

  # ---- ids: the one place they are checked ----

  @property
  def vocab_limit(self) -> int:
    """Ids the model may emit: the tokenizer's pieces (Gemma 1/2 pad the embedding to 256128 rows)."""
    return min(self.config.vocab_size, self.tokenizer.vocab_size if self.tokenizer else self.config.vocab_size)

  def _require_tokenizer(self) -> Tokenizer:
    if self.tokenizer is None:
      raise GemmaError("this checkpoint has no tokenizer.model; pass token ids instead of text")
    return self.tokenizer

  def _check_id(self, i, what: str) -> int:
    """i as an int inside the vocabulary; a GemmaError naming `what` otherwise (floats and strings too)."""
    if not is_int(i):
      raise GemmaError(f"{what} is not an integer token id ({type(i).__name__})")
    if not 0 <= i < self.config.vocab_size:
      raise GemmaError(f"{what} is outside the vocabulary [0, {self.config.vocab_size})")
    return int(i)

  def check_ids(self, ids: Sequence[int], what: str = "prompt") -> list[int]:
    """Validates one token-id sequence: non-empty and every id an integer inside the vocabulary."""
    if is_int(ids):
      raise GemmaError(f"the {what} is one id ({ids}); give a list of ids per prompt")
    if isinstance(ids, (str, bytes)):
      raise GemmaError(f"the {what} is text ({ids[:20]!r}); give token ids, or use generate() for text")
    ids = list(np.asarray(ids).reshape(-1)) if isinstance(ids, np.ndarray) else list(ids)
    if not ids:
      raise GemmaError(f"empty {what}: give at least one token")
    return [self._check_id(i, f"token id {i!r} at position {pos} of the {what}") for pos, i in enumerate(ids)]

  def encode(self, text: str, add_bos: bool = True, parse_control: bool = False) -> list[int]:
    """Text -> ids (BOS first unless add_bos=False); turn markers in the text stay text unless
    parse_control=True (see Tokenizer.encode)."""
    return self._require_tokenizer().encode(text, add_bos=add_bos, parse_control=parse_control)

  def decode_text(self, ids: Sequence[int]) -> str:
    """Ids -> text; control tokens are dropped, -1 (no token) entries skipped."""
    return self._require_tokenizer().decode([i for i in ids if i >= 0])

  def stop_ids(self) -> list[int]:
    """EOS and <end_of_turn>, read from the tokenizer."""
    if self.tokenizer is None:
      return []
    return [i for i in (self.tokenizer.eos_id, self.tokenizer.end_of_turn_id) if i is not None and i >= 0]

  def _stops_and_allowed(self, stop_ids: Sequence[int] | None, forbidden_ids: Sequence[int] | None,
                         eng: engine.Engine) -> tuple[jax.Array, jax.Array]:
    """(X,) int32 stop ids (default: stop_ids()) and the (V,) bool allowed mask, placed for a run."""
    ids = [self._check_id(i, f"stop token id {i}") for i in (self.stop_ids() if stop_ids is None else stop_ids)]
    allowed = np.arange(self.config.vocab_size) < self.vocab_limit
    for i in forbidden_ids if forbidden_ids is not None else ():
      allowed[self._check_id(i, f"forbidden token id {i}")] = False
    if not allowed.any():
      raise GemmaError("every token is forbidden: nothing could be generated")
    return eng.put(np.asarray(ids or [-2], np.int32)), eng.put(allowed)  # -2 is never drawn: "no stop id"

  # ---- token ids in, token ids out ----

  def start(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, cache_len: int | None = None,
            cache_policy: str = "error") -> DecodeState:
    """Validates prompts (ids, BOS included) and runs their prefill; the state run() continues.

    cache_len: global-layer slots; default: prompt + max_new_tokens rounded up to a bucket.
    cache_policy: "error" (a cache too small for prompt + max_new_tokens is an error) or "rolling"
      (global layers keep the most recent cache_len tokens and forget older ones: quality drops once
      the model needs tokens that fell out; sliding-window layers are unaffected).
    """
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    check_cache_policy(cache_policy)
    if cache_len is not None and (not is_int(cache_len) or cache_len < 1):
      raise GemmaError(f"cache_len must be an integer >= 1, got {cache_len!r}")
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
      raise GemmaError("no prompts given" if len(prompts) == 0 else
                       "prompts must be a list of token-id lists; for text use generate()")
    rows = [self.check_ids(p, f"prompt {i}" if len(prompts) > 1 else "prompt") for i, p in enumerate(prompts)]
    return engine.start(self.engine, rows, max_new_tokens, cache_len=None if cache_len is None else int(cache_len),
                        rolling=cache_policy == "rolling")

  def feed(self, state: DecodeState, ids: Sequence[Sequence[int]]) -> DecodeState:
    """Appends ids to every row of a state (e.g. the next chat turn): only these tokens are run."""
    return engine.feed(self.engine, state, [self.check_ids(r, "continuation") for r in ids])

  def resize_cache(self, state: DecodeState, cache_len: int, rolling: bool = False) -> DecodeState:
    """The state with its cache moved into one of cache_len global slots (rolling: global layers forget
    the oldest tokens past it)."""
    return engine.resize(self.engine, state, cache_len, rolling)

  def run(self, state: DecodeState, max_new_tokens: int, sampling: Sampling, *,
          stop_ids: Sequence[int] | None = None, forbidden_ids: Sequence[int] | None = None
          ) -> tuple[list[list[int]], DecodeState]:
    """Draws up to max_new_tokens more tokens per row in one compiled call: (new ids per row, state).

    Rows stop on their own at a stop id (default: EOS and <end_of_turn>; kept in the output). Padding
    rows of a sharded batch come back as empty lists.
    """
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    eng = self.engine
    stops, allowed = self._stops_and_allowed(stop_ids, forbidden_ids, eng)
    return engine.run(eng, state, max_new_tokens, eng.batch_sampling(sampling, state.pos.shape[0]), stops,
                      allowed)

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
    eng = self.engine
    stops, allowed = self._stops_and_allowed(stop_ids, forbidden_ids, eng)  # checked before any prefill
    state = self.start(prompts, max_new_tokens, cache_len=cache_len, cache_policy=cache_policy)
    rows, _ = engine.run(eng, state, check_max_new_tokens(max_new_tokens),
                         eng.batch_sampling(sampling, state.pos.shape[0]), stops, allowed)
    return rows[:len(prompts)]  # padding rows (a sharded batch) are dropped

  # ---- text ----

  def stream_state(self, state: DecodeState, max_new_tokens: int, sampling: Sampling, *, stop: Sequence[str] = (),
                   chunk: int = 8, stop_ids: Sequence[int] | None = None,
                   forbidden_ids: Sequence[int] | None = None, num_rows: int | None = None) -> TextStream:
    """A TextStream continuing `state` for its first num_rows rows (default: all), `chunk` tokens per call.

    After iterating it, `.state` is the final state and `.ids` each row's new ids.
    """
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    if not is_int(chunk) or chunk < 1:
      raise GemmaError(f"chunk must be an integer >= 1, got {chunk!r}")
    tok, eng = self._require_tokenizer(), self.engine
    stops, allowed = self._stops_and_allowed(stop_ids, forbidden_ids, eng)
    sampling = eng.batch_sampling(sampling, state.pos.shape[0])
    step = lambda st, steps: engine.run(eng, st, steps, sampling, stops, allowed, capacity=chunk)
    return TextStream(tok, step, lambda st, rows: engine.mark_done(eng, st, rows), state,
                      max_new_tokens=max_new_tokens, chunk=chunk, stop=check_stop_strings(stop),
                      stop_ids=set(self.stop_ids() if stop_ids is None else stop_ids),
                      num_rows=state.pos.shape[0] if num_rows is None else num_rows)

  def _text_stream(self, texts: Sequence[str], max_new_tokens: int, stop: Sequence[str], chunk: int,
                   kwargs: dict) -> tuple[list[list[int]], TextStream]:
    """Prompt ids (tokenized once) and the stream of their continuations; kwargs as generate_ids()'s."""
    tok = self._require_tokenizer()
    for i, t in enumerate(texts):
      if not isinstance(t, str) or not t:
        raise GemmaError(f"empty prompt{'' if len(texts) == 1 else f' {i}'}: give some text")
    kwargs = dict(kwargs)
    sampling = make_sampling(len(texts), **{k: kwargs.pop(k) for k in SAMPLING_ARGS if k in kwargs})
    state_kw = {k: kwargs.pop(k) for k in ("cache_len", "cache_policy") if k in kwargs}
    stop = check_stop_strings(stop)
    parse = bool(kwargs.pop("parse_control", False))
    ids = [tok.encode(t, parse_control=parse) for t in texts]
    state = self.start(ids, max_new_tokens, **state_kw)
    return ids, self.stream_state(state, max_new_tokens, sampling, stop=stop, chunk=chunk, num_rows=len(texts),
                                  **kwargs)

  def stream(self, prompts: str | Sequence[str], max_new_tokens: int = 64, *, stop: Sequence[str] = (),
             chunk: int = 8, **kwargs) -> Iterator[list[str]]:
    """Yields, per compiled chunk of tokens, the new text of every row ("" for rows with none).

    Text is only released once it is final: incomplete UTF-8 from byte-fallback tokens and any suffix
    that may begin a stop string are held back, so joining the pieces gives exactly generate()'s text.
    Keyword arguments are generate_ids()'s (sampling, stop_ids, forbidden_ids, cache), and
    parse_control=True to let turn markers written in the prompts become their ids (Tokenizer.encode).
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    _, pieces = self._text_stream(texts, max_new_tokens, stop, chunk, kwargs)
    yield from pieces

  def complete(self, prompts: Sequence[str], max_new_tokens: int = 64, *, stop: Sequence[str] = (),
               **kwargs) -> list[Completion]:
    """Prompt ids, new ids and new text for each prompt (see generate)."""
    texts = list(prompts)
    chunk = 16 if stop else engine.bucket(max_new_tokens)
    ids, stream = self._text_stream(texts, max_new_tokens, stop, chunk, kwargs)
    pieces = [""] * len(texts)
    for deltas in stream:
      pieces = [p + d for p, d in zip(pieces, deltas)]
    return [Completion(p, new, text) for p, new, text in zip(ids, stream.ids, pieces)]

  def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, *, stop: Sequence[str] = (),
               **kwargs) -> str | list[str]:
    """Text continuation of one prompt (returns a str) or a list of prompts (returns a list).

    stop: strings that end a row; the text ends before the first one. Other keyword arguments are
    generate_ids()'s (temperature, top_k, top_p, min_p, seed, stop_ids, forbidden_ids, cache_len,
    cache_policy), and parse_control (see stream). Stop tokens are not part of the text.
    """
    single = isinstance(prompts, str)
    done = self.complete([prompts] if single else prompts, max_new_tokens, stop=stop, **kwargs)
    return done[0].text if single else [c.text for c in done]

  # ---- scoring ----

  def logprobs(self, ids: Sequence[int], chunk: int | None = None) -> np.ndarray:
    """Teacher-forced log-probability of each token after the first: (len(ids) - 1,) float32.

    chunk: score through the KV cache, this many tokens per call (the memory of one chunk's attention).
    A model with a kv_cache_dtype always scores through its cache, so the scores are those its generation
    sees; otherwise the default is one forward without a cache up to engine.SCORE_CHUNK tokens, and
    through the cache SCORE_CHUNK tokens per call beyond. Logits are computed a few hundred positions at
    a time (decode.SCORE_ROWS), so memory does not grow with tokens x vocabulary.
    """
    ids = self.check_ids(ids, "token sequence")
    if len(ids) < 2:
      raise GemmaError("scoring needs at least two tokens (BOS and one more)")
    if len(ids) > self.config.max_seq_len:
      raise GemmaError(f"sequence of {len(ids)} tokens exceeds the model's context of "
                       f"{self.config.max_seq_len} tokens")
    if chunk is not None and (not is_int(chunk) or chunk < 1):
      raise GemmaError(f"chunk must be an integer >= 1, got {chunk!r}")
    out = engine.score(self.engine, ids, chunk)
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
      raise GemmaError(f"the model produced a non-finite log-probability (nan or inf) for token {bad[0] + 1} "
                       f"(id {ids[bad[0] + 1]}): the weights may be damaged, or bfloat16 overflowed (try float32)")
    return out

  def logits(self, ids: Sequence[int]) -> np.ndarray:
    """Full-sequence logits (len(ids), V) float32 for one unpadded sequence (tests, analysis): one forward
    without a cache, so a kv_cache_dtype plays no part."""
    ids, eng = self.check_ids(ids, "token sequence"), self.engine
    tokens = eng.put(np.asarray([ids], np.int32), ("B", "T"))
    positions = eng.put(np.arange(len(ids), dtype=np.int32)[None], ("B", "T"))
    return np.asarray(self.decoder.forward(self.params, tokens, positions))[0]


def load(path: str | os.PathLike, dtype: str | None = None, mesh: Mesh | str | None = None,
         rules: Rules | str = GENERATION, *, verify: bool = True, kv_cache_dtype: str | None = None) -> Model:
  """Loads a converted checkpoint directory (see checkpoint.py) into a Model.

  dtype: "float32" or "bfloat16"; default: the checkpoint's config (float32 for imports).
  mesh: a Mesh (sharding.make_mesh) or a spec such as "data=1,model=-1": each param is restored
    straight into its sharding under `rules` (each device reads only its slice); None: one device.
  verify: check every param against the checksums recorded when the checkpoint was written.
  kv_cache_dtype: "float32", "bfloat16" or "int8": what generation's KV caches store (default: dtype).
  """
  check_kv_cache_dtype(kv_cache_dtype)  # before anything is read
  tune_malloc()  # before the weights: freed buffers go back to the system (hostmem.py)
  layout = None if mesh is None else Layout.of(mesh, rules)
  loaded = checkpoint.load(path, dtype, layout, verify=verify)
  proto = loaded.tokenizer_proto
  return Model(loaded.config, loaded.graphdef, loaded.params, Tokenizer(proto) if proto is not None else None,
               instruct=loaded.meta.get("instruct"), layout=layout, kv_cache_dtype=kv_cache_dtype)

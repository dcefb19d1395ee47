"""Batches of token ids through the compiled Decoder: start, feed, run.

Plain functions over an `Engine` (config, params, decoder) and a `DecodeState`: each takes a state and
returns the next one (run also the ids it drew), so a caller drives generation with an ordinary loop.
Ids arrive validated (model.py checks them once); what is checked here is what only the engine knows:
lengths against the context and the cache.

Shapes are bucketed so each compiled program serves many calls: prompts are padded to a power of two
(at least MIN_BUCKET), caches to the bucket of prompt + new tokens, and a run's output buffer (the
Decoder's capacity) to the bucket of its steps. A prompt longer than prefill_chunk(...) tokens is fed in
chunks of that many (each chunk attends to the cache plus itself, so the result is one-shot prefill's). With a layout, a batch is padded with idle rows to a
multiple of the `data` axis; those rows draw nothing and are never returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .cache import init_cache, resize_cache
from .configs import ModelConfig
from .decode import NONFINITE, DecodeState, Decoder
from .errors import GemmaError
from .sampling import Sampling

MIN_BUCKET = 32
# Activation bytes one prefill call may hold (prefill_chunk). 384 MiB is 0.3 x the 270M's float32 params
# plus a 16K-token cache (1.07 GB + 0.1 GB), the headroom issue 12 allows a prefill above params + cache.
PREFILL_BUDGET_BYTES = 384 << 20
# XLA's temporaries per token of a 270M float32 prefill chunk against prefill_chunk's count of the widest
# activations (4 * (3F + 4D + 2(N + K)H) = 55 KB): 92-171 KB between chunks of 1024 and 8192 tokens
# (benchmarks/bench_attention.py --prefill; results/2026-12-05_attention.md), so 2.5x.
XLA_TEMP_FACTOR = 2.5


def prefill_chunk(cfg: ModelConfig, rows: int) -> int:
  """Tokens per row one prefill call takes: the largest power of two (>= MIN_BUCKET) whose activations
  fit PREFILL_BUDGET_BYTES (270M: 2048 in float32, 4096 in bfloat16, at one row).

  Per token a block holds, at its widest, the MLP's [gate, up] (2F) and gelu(gate) * up (F), the residual
  and normed inputs (~4D) and q, k, v, the attention output ((2N + 2K) H), times XLA_TEMP_FACTOR (what XLA
  keeps besides); attention's own scores stay within one block of queries x keys (attention.py).
  """
  item = jnp.dtype(cfg.dtype).itemsize
  per_token = item * (3 * cfg.hidden_dim + 4 * cfg.embed_dim + 2 * (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim)
  fit = int(PREFILL_BUDGET_BYTES / (rows * per_token * XLA_TEMP_FACTOR))
  return max(MIN_BUCKET, 1 << max(fit.bit_length() - 1, 0))
# score() feeds a text longer than this through the KV cache, this many tokens per call: a chunk's attention
# is (SCORE_CHUNK, cache slots) per layer, where one forward's would be (T, T) (16K tokens: 4 GiB of float32
# scores per layer for the 270M's 4 heads). Measured on the 270M with a 16K-slot cache (compiled
# temporaries of score_chunk, memory_analysis): chunks of 512 hold 356 MiB, of 1024 910 MiB, of 2048 1825 MiB.
SCORE_CHUNK = 512


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """The padded length for n: the next power of two, at least `minimum`.

  Prompts are padded to these lengths so that prefill compiles once per bucket, not per length.
  """
  return max(minimum, 1 << max(n - 1, 0).bit_length())


def pad_rows(rows: Sequence[Sequence[int]], starts: Sequence[int] | np.ndarray, length: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads id rows to `length`: tokens and positions (B, length), positions -1 on padding."""
  tokens = np.zeros((len(rows), length), np.int32)
  positions = np.full((len(rows), length), -1, np.int32)
  for r, (row, start) in enumerate(zip(rows, starts)):
    tokens[r, :len(row)] = row
    positions[r, :len(row)] = start + np.arange(len(row))
  return tokens, positions


@contextlib.contextmanager
def memory_guard(what: str) -> Iterator[None]:
  """Turns XLA's out-of-memory error (a page of allocator state) into one line that says what to reduce."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
      raise
    raise GemmaError(f"out of memory {what}: reduce the batch size, the prompt length or the cache length "
                     "(max_new_tokens / cache_len / --max-cache-len), or use bfloat16") from None


def check_finite(out: np.ndarray) -> None:
  """Raises if decode_loop marked a row whose logits were nan or inf (see decode.NONFINITE)."""
  rows, steps = np.nonzero(out == NONFINITE)
  if rows.size:
    raise GemmaError(f"the model produced non-finite logits (nan or inf) for row {rows[0]} at new token "
                     f"{steps[0]}: the weights may be damaged (load them with verification on) or bfloat16 "
                     "overflowed (try float32)")


@dataclasses.dataclass(frozen=True)
class Engine:
  """What generation needs of a model: its config, params and Decoder (graph definition and layout), and
  what its KV caches store k and v as (cache.KV_CACHE_DTYPES; None: the config's dtype)."""

  config: ModelConfig
  params: nnx.State
  decoder: Decoder
  kv_dtype: str | None = None

  @property
  def layout(self):
    return self.decoder.layout

  def padded(self, rows: int) -> int:
    """Rows a batch of `rows` occupies: rounded up to a multiple of the data axis."""
    m = self.layout.batch_multiple if self.layout else 1
    return -(-rows // m) * m

  def put(self, x, axes: tuple[str, ...] | None = None) -> jax.Array:
    """A host value as a jit input: placed by the layout's rules (None: replicated), else on one device."""
    return jnp.asarray(x) if self.layout is None else self.layout.put(x, axes)

  @property
  def place(self):
    """cache.init_cache's `place`: the layout's sharding for an array's logical axes (None: one device)."""
    return None if self.layout is None else self.layout.sharding

  def batch_sampling(self, sampling: Sampling, rows: int) -> Sampling:
    """Per-row settings for the padded batch (padding rows copy row 0), placed like the batch."""
    def fit(x):
      x, n = np.asarray(x), np.shape(x)[0]
      if n != rows and self.padded(n) != rows:
        raise GemmaError(f"sampling settings are for {n} rows but the batch has {rows}")
      return self.put(np.concatenate([x, np.repeat(x[:1], rows - n, axis=0)]), ("B",))
    return jax.tree.map(fit, sampling)


def start(eng: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, cache_len: int | None = None,
          rolling: bool = False) -> DecodeState:
  """Prefills a batch of prompts (ids, BOS included) into a new cache: the state run() continues.

  cache_len: global-layer slots; default: prompt + max_new_tokens rounded up to a bucket. A cache too
    small for prompt + max_new_tokens is an error unless rolling (global layers then keep the most
    recent cache_len tokens; sliding-window layers are unaffected).
  """
  cfg = eng.config
  longest = max(map(len, prompts))
  total = longest + max_new_tokens
  if total > cfg.max_seq_len:
    raise GemmaError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = {total} exceeds the "
                     f"model's context of {cfg.max_seq_len} tokens")
  if cache_len is None:
    cache_len = min(bucket(total), cfg.max_seq_len)
  elif cache_len < total and not rolling:
    raise GemmaError(f"the cache holds {cache_len} tokens but prompt ({longest}) + max_new_tokens "
                     f"({max_new_tokens}) needs {total}; raise cache_len or pass cache_policy='rolling' "
                     "(global layers then forget the oldest tokens)")
  b = eng.padded(len(prompts))
  idle = b - len(prompts)  # padding rows: no tokens (positions -1), done from the start
  rows = list(prompts) + [[]] * idle
  # A rolling cache shorter than the prompt would forget prompt tokens between chunks that one call keeps
  # (its chunk attends to the whole prompt), so such a prompt is prefilled in one call, as before.
  chunked = not rolling or longest <= cache_len
  with memory_guard(f"prefilling {len(prompts)} prompts of up to {longest} tokens into a cache of {cache_len}"):
    cache = init_cache(cfg, b, cache_len, eng.kv_dtype, rolling=rolling, place=eng.place)
    width = bucket(longest) if rolling else min(bucket(longest), cache_len)
    logits, cache = prefill(eng, rows, [0] * b, cache, width, chunked, fresh=True)
  return DecodeState(logits=logits, pos=eng.put(np.array([len(r) for r in prompts] + [0] * idle, np.int32)),
                     done=eng.put(np.arange(b) >= len(prompts)), step=eng.put(np.int32(0)), cache=cache)


def prefill(eng: Engine, rows: Sequence[Sequence[int]], starts: Sequence[int] | np.ndarray, cache, width: int,
            chunked: bool = True, fresh: bool = False, logits: jax.Array | None = None):
  """Feeds id rows (one per cache row) at positions starts[r] onward into the cache: (logits (B, V) at each
  row's last id, the cache).

  width: the padded length of one call. chunked: calls of at most prefill_chunk(...) tokens, each
  attending to the cache (what earlier chunks wrote) plus itself -- equal to one call, in the memory of
  one chunk. A row with no ids in a chunk keeps its logits from the earlier chunk (or from `logits`, the
  state's, when a row gets no ids at all). fresh: the cache is empty (the first call skips reading it).
  """
  longest = max(map(len, rows))
  if chunked:
    width = min(width, prefill_chunk(eng.config, len(rows)))
  for i in range(0, max(longest, 1), width):
    piece = [list(r[i:i + width]) for r in rows]
    tokens, positions = pad_rows(piece, np.asarray(starts) + i, width)
    new, cache = eng.decoder.prefill(eng.params, eng.put(tokens, ("B", "T")), eng.put(positions, ("B", "T")), cache,
                                     fresh=fresh and i == 0)
    fed = np.array([len(p) > 0 for p in piece])
    logits = new if logits is None or fed.all() else jnp.where(eng.put(fed, ("B",))[:, None], new, logits)
  return logits, cache


def feed(eng: Engine, state: DecodeState, rows: Sequence[Sequence[int]]) -> DecodeState:
  """Appends ids to every row of a state (e.g. the next chat turn): only these tokens are run.

  The cache must have room (global layers hold positions < cache_len unless rolling). A sharded batch's
  padding rows stay idle.
  """
  b = state.pos.shape[0]
  if eng.padded(len(rows)) != b:
    raise GemmaError(f"feed needs one id list per row ({b}), got {len(rows)}")
  rows = list(rows) + [[]] * (b - len(rows))
  lengths = np.array([len(r) for r in rows], np.int32)
  fixed = [c.num_slots for c in state.cache if not c.ring]
  end = int(np.max(np.asarray(state.pos) + lengths))
  if fixed and end > min(fixed):
    raise GemmaError(f"the cache holds {min(fixed)} positions but feeding these ids reaches {end}; resize it "
                     "(cache.resize_cache) or use a rolling cache")
  rolling = not fixed
  with memory_guard(f"feeding {int(lengths.max())} tokens to {b} rows"):
    # As in start: a rolling cache is fed in one call unless the whole text fits it.
    chunked = not rolling or end <= max(c.num_slots for c in state.cache)
    logits, cache = prefill(eng, rows, np.asarray(state.pos), state.cache, bucket(int(lengths.max())), chunked,
                            logits=state.logits)
  return state.replace(logits=logits, pos=eng.put(np.asarray(state.pos) + lengths), done=eng.put(lengths == 0),
                       cache=cache)


def run(eng: Engine, state: DecodeState, steps: int, sampling: Sampling, stop_ids: jax.Array, allowed: jax.Array,
        capacity: int | None = None) -> tuple[list[list[int]], DecodeState]:
  """Draws up to `steps` tokens per row in one compiled call: (new ids per row, the next state).

  sampling: per-row settings, already fitted to the batch (Engine.batch_sampling); stop_ids (X,) and
  allowed (V,) placed arrays. capacity: the output buffer (>= steps; default bucket(steps)), part of
  what is compiled. Rows that drew a stop id are done; a done row draws nothing. Padding rows of a
  sharded batch come back too (callers drop them).
  """
  capacity = bucket(steps) if capacity is None else capacity
  with memory_guard(f"generating for {state.pos.shape[0]} rows"):
    out, state = eng.decoder.with_capacity(capacity).decode_loop(eng.params, state, sampling,
                                                                 eng.put(np.int32(steps)), stop_ids, allowed)
    out = np.asarray(out)
  check_finite(out)
  if eng.layout is not None:
    # XLA may return the replicated pos/done/step as P(None,) rather than P(): the same placement, but a
    # different jit cache key, so the next call would compile the loop again. device_put to the
    # equivalent sharding moves no data.
    rep = eng.layout.replicated()
    state = state.replace(pos=jax.device_put(state.pos, rep), done=jax.device_put(state.done, rep),
                          step=jax.device_put(state.step, rep))
  return [row[row >= 0].tolist() for row in out], state


def mark_done(eng: Engine, state: DecodeState, rows: np.ndarray) -> DecodeState:
  """The state with these rows (B,) bool also done (e.g. a stop string appeared in their text)."""
  return state.replace(done=eng.put(np.asarray(state.done) | rows))


def resize(eng: Engine, state: DecodeState, cache_len: int, rolling: bool = False) -> DecodeState:
  """The state with its cache moved into one of cache_len slots (growing a conversation's cache)."""
  return state.replace(cache=resize_cache(eng.config, state.cache, cache_len, rolling, eng.place))


def score(eng: Engine, ids: Sequence[int], chunk: int | None = None) -> np.ndarray:
  """Teacher-forced log p(ids[t+1] | ids[:t+1]) for one sequence (ids checked, BOS first): (len - 1,) float32.

  chunk None, no kv_dtype and at most SCORE_CHUNK tokens fed: one forward without a cache. Otherwise
  through the KV cache, `chunk` tokens per call (default SCORE_CHUNK): the scores generation with that
  cache gives (an int8 cache's keys and values are quantized; chunking changes nothing else), with the
  memory of one chunk's attention. Logits are computed decode.SCORE_ROWS positions at a time either way,
  so memory never grows with tokens x vocabulary.
  """
  n, cfg = len(ids), eng.config
  if chunk is None and eng.kv_dtype is None and n - 1 <= SCORE_CHUNK:
    tokens, positions = pad_rows([ids], [0], min(bucket(n), cfg.max_seq_len))
    with memory_guard(f"scoring {n} tokens"):
      out = eng.decoder.token_logprobs(eng.params, eng.put(tokens, ("B", "T")), eng.put(positions, ("B", "T")))
      return np.asarray(out)[0, :n - 1]
  fed, targets = list(ids[:-1]), list(ids[1:])  # the last token is scored, never fed
  chunk = SCORE_CHUNK if chunk is None else chunk
  width, rows, out = bucket(min(chunk, len(fed))), eng.padded(1), []
  put = lambda x: eng.put(x, ("B", "T"))
  with memory_guard(f"scoring {n} tokens in chunks of {chunk} through the cache"):
    cache = init_cache(cfg, rows, min(bucket(len(fed)), cfg.max_seq_len), eng.kv_dtype, place=eng.place)
    for start in range(0, len(fed), chunk):
      piece = [fed[start:start + chunk]] + [[]] * (rows - 1)  # a sharded batch's idle rows feed nothing
      tokens, positions = pad_rows(piece, [start] * rows, width)
      target, _ = pad_rows([targets[start:start + chunk]] + [[]] * (rows - 1), [0] * rows, width)
      logprobs, cache = eng.decoder.score_chunk(eng.params, put(tokens), put(positions), put(target), cache,
                                                fresh=start == 0)
      out.append(np.asarray(logprobs)[0, :len(piece[0])])
  return np.concatenate(out)

"""Text in, text out: the Model object, prompt validation, bucket padding and greedy generation."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import checkpoint, decode
from .cache import init_cache
from .configs import ModelConfig
from .errors import GemmaError
from .tokenizer import Tokenizer

MIN_BUCKET = 32


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """The padded length for n: the next power of two, at least `minimum`.

  Prompts are padded to these lengths so that prefill compiles once per bucket, not per length.
  """
  return max(minimum, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass
class Model:
  """A Gemma model ready to run: config, params (nnx.State), graph definition and tokenizer.

  Build one with `load(path)` (a converted checkpoint) or `Model.random(config)` (tests).
  """

  config: ModelConfig
  graphdef: nnx.GraphDef
  params: nnx.State
  tokenizer: Tokenizer | None = None

  @classmethod
  def random(cls, config: ModelConfig, seed: int = 0, tokenizer: Tokenizer | None = None) -> "Model":
    """A model with random weights (normal(0.02) matrices, zero norms), for tests and benchmarks.

    Drawn with numpy: compiling JAX's threefry for every parameter takes longer than the tests.
    """
    graphdef, state = checkpoint.abstract_model(config)
    rng = np.random.default_rng(seed)
    flat = checkpoint.flatten(nnx.to_pure_dict(state))
    draw = lambda path, x: (np.zeros(x.shape) if path.endswith("/scale") else 0.02 * rng.standard_normal(x.shape))
    values = {path: jnp.asarray(draw(path, x), x.dtype) for path, x in flat.items()}
    nnx.replace_by_pure_dict(state, checkpoint.unflatten(values))
    return cls(config, graphdef, state, tokenizer)

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

  def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                   stop_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt (lists of ids, BOS included): the new ids per prompt.

    Rows stop on their own at a stop id (kept in the output) or after max_new_tokens.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
        or max_new_tokens < 1:
      raise GemmaError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not prompts:
      raise GemmaError("no prompts given")
    rows = [self.check_ids(p, f"prompt {i}" if len(prompts) > 1 else "prompt") for i, p in enumerate(prompts)]
    longest = max(map(len, rows))
    total = longest + max_new_tokens
    if total > self.config.max_seq_len:
      raise GemmaError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = {total} exceeds the "
                       f"model's context of {self.config.max_seq_len} tokens")
    cache_len = min(bucket(total), self.config.max_seq_len)
    t_pad = min(bucket(longest), cache_len)
    tokens = np.zeros((len(rows), t_pad), np.int32)
    positions = np.full((len(rows), t_pad), -1, np.int32)
    for r, ids in enumerate(rows):
      tokens[r, :len(ids)] = ids
      positions[r, :len(ids)] = np.arange(len(ids))
    cache = init_cache(self.config, len(rows), cache_len)
    logits, cache = decode.prefill(self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(positions),
                                   cache)
    stops = self.stop_ids() if stop_ids is None else [int(s) for s in stop_ids]
    out, lengths, _ = decode.greedy_loop(
        self.graphdef, self.params, logits, jnp.asarray([len(r) for r in rows], jnp.int32), cache,
        jnp.int32(max_new_tokens), jnp.asarray(stops or [-2], jnp.int32), jnp.int32(self.vocab_limit),
        bucket(max_new_tokens))
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[r, :lengths[r]].tolist() for r in range(len(rows))]

  def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64) -> str | list[str]:
    """Greedy text continuation of one prompt (returns a str) or a list of prompts (returns a list)."""
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    for i, t in enumerate(texts):
      if not t:
        raise GemmaError(f"empty prompt{'' if single else f' {i}'}: give some text")
    outs = self.generate_ids([self.encode(t) for t in texts], max_new_tokens)
    stops = set(self.stop_ids())
    texts_out = [self.decode_text([i for i in o if i not in stops]) for o in outs]
    return texts_out[0] if single else texts_out

  def logprobs(self, ids: Sequence[int]) -> np.ndarray:
    """Teacher-forced log-probability of each token after the first: (len(ids) - 1,) float32."""
    ids = self.check_ids(ids, "token sequence")
    if len(ids) < 2:
      raise GemmaError("scoring needs at least two tokens (BOS and one more)")
    if len(ids) > self.config.max_seq_len:
      raise GemmaError(f"sequence of {len(ids)} tokens exceeds the model's context of "
                       f"{self.config.max_seq_len} tokens")
    t_pad = min(bucket(len(ids)), self.config.max_seq_len)
    tokens = np.zeros((1, t_pad), np.int32)
    positions = np.full((1, t_pad), -1, np.int32)
    tokens[0, :len(ids)] = ids
    positions[0, :len(ids)] = np.arange(len(ids))
    out = decode.token_logprobs(self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(positions))
    return np.asarray(out[0, :len(ids) - 1])

  def logits(self, ids: Sequence[int]) -> np.ndarray:
    """Full-sequence logits (len(ids), V) float32 for one unpadded sequence (tests, analysis)."""
    ids = self.check_ids(ids, "token sequence")
    tokens = jnp.asarray([ids], jnp.int32)
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    return np.asarray(decode.forward(self.graphdef, self.params, tokens, positions)[0])


def load(path: str | os.PathLike, dtype: str | None = None) -> Model:
  """Loads a converted checkpoint directory (see checkpoint.py) into a Model.

  dtype: "float32" or "bfloat16"; default: the checkpoint's config (float32 for imports).
  """
  config, graphdef, params, proto = checkpoint.load(path, dtype)
  return Model(config, graphdef, params, Tokenizer(proto) if proto is not None else None)

"""Evaluation: log-likelihoods of continuations, perplexity of texts, greedy generation until stop strings,
and the statistics over them, with lm-evaluation-harness's semantics (lm_eval/api/model.py, TemplateLM;
lm_eval/models/huggingface.py, HFLM). tasks.py builds benchmark tasks on these; lm_eval_adapter.py lets
lm-eval itself call them.

Every score goes through one jitted program, Decoder.score: a request becomes a row of tokens whose last n
tokens are scored; rows are sorted longest first (as lm-eval), cut into batches of `batch_size` (the last
one padded with idle rows), padded to a bucket length T and a bucket of scored positions C (engine.bucket),
so a run compiles once per (T, C) bucket pair, never per request. Only scored positions reach the output
layer, a few hundred at a time (decode.SCORE_ROWS), so no (T, V) logits of a long text are ever held.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

from . import engine
from .errors import GemmaError
from .sampling import make_sampling

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None] | None  # called with (requests just finished, requests in all)
DEFAULT_WINDOW = 2048  # perplexity windows: attention is quadratic in a window (no blockwise path yet)


class LogLikelihood(NamedTuple):
  """One request's result: the summed log-probability of its continuation tokens, and whether every one of
  them was the most likely token given what came before (lm-eval's is_greedy)."""

  logprob: float
  is_greedy: bool


@dataclasses.dataclass(frozen=True)
class Row:
  """Token ids (BOS first, or a window of a longer text) of which the last n are scored, each given all
  ids before it in the row."""

  ids: tuple[int, ...]
  n: int


def encode_pair(model, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """lm-eval's tokenization of a request: (context ids, continuation ids).

  BOS first; whitespace at the end of the context moves to the start of the continuation; context +
  continuation are encoded together and split at len(encode(context)), so the continuation's first token
  is the one the model really sees after the context (TemplateLM._encode_pair). An empty context is BOS
  alone and the continuation is encoded without BOS (TemplateLM.loglikelihood).
  """
  if context == "":
    ids = model.encode(continuation, add_bos=False)
    bos = model.tokenizer.bos_id
    return ([bos], ids) if ids[:1] != [bos] else (ids[:1], ids[1:])
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole, ctx = model.encode(context + continuation), model.encode(context)
  return ctx, whole[len(ctx):]


def request_row(model, i: int, context: str, continuation: str, max_length: int) -> Row:
  """Request i as a Row; ids past max_length + 1 are dropped from the left, as lm-eval does."""
  if not isinstance(context, str) or not isinstance(continuation, str):
    raise GemmaError(f"request {i}: context and continuation must be strings, got {type(context).__name__} and "
                     f"{type(continuation).__name__}")
  ctx, cont = encode_pair(model, context, continuation)
  if not cont:
    raise GemmaError(f"request {i}: the continuation {continuation!r} has no tokens of its own after the context")
  if len(cont) > max_length:
    raise GemmaError(f"request {i}: the continuation has {len(cont)} tokens, more than the {max_length} the model "
                     "can score at once")
  ids = ctx + cont
  if len(ids) > max_length + 1:
    log.warning("request %d: context + continuation is %d tokens; the first %d are dropped to fit %d", i, len(ids),
                len(ids) - max_length - 1, max_length)
    ids = ids[-(max_length + 1):]
  return Row(tuple(ids), len(cont))


def check_batch_size(batch_size: int) -> None:
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
    raise GemmaError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def score_rows(model, rows: Sequence[Row], batch_size: int = 8, progress: Progress = None
               ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(log-probs (n,) float32, greedy (n,) bool) of the scored ids of each row, in the order given.

  Rows run longest first in batches of batch_size (lm-eval's order: the first batch is the largest, so an
  out-of-memory error comes at once), padded with idle rows (to batch_size, a power of two for a short last
  batch, a multiple of a mesh's data axis) and to bucket lengths: the program compiles once per (T, C)
  bucket pair and batch shape, never per request.
  """
  check_batch_size(batch_size)
  eng, limit = model.engine, model.config.max_seq_len
  order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].ids), rows[i].ids))
  out: list = [None] * len(rows)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    # A short last batch (or a lone window) is padded to a power of two, not to batch_size: idle rows cost
    # as much as real ones. At most log2(batch_size) more programs per bucket pair.
    b = eng.padded(min(batch_size, engine.bucket(len(chunk), 1)))
    feeds = [list(rows[i].ids[:-1]) for i in chunk]
    t = min(engine.bucket(max(map(len, feeds))), limit)
    c = min(engine.bucket(max(rows[i].n for i in chunk), 8), t)
    tokens, positions = engine.pad_rows(feeds + [[]] * (b - len(chunk)), [0] * b, t)
    at, targets = np.zeros((b, c), np.int32), np.zeros((b, c), np.int32)
    for r, i in enumerate(chunk):
      n, length = rows[i].n, len(feeds[r])
      at[r, :n] = np.arange(length - n, length)
      targets[r, :n] = rows[i].ids[-n:]
    with engine.memory_guard(f"scoring {b} rows of up to {t} tokens"):
      lp, greedy = model.decoder.score(model.params, eng.put(tokens, ("B", "T")), eng.put(positions, ("B", "T")),
                                       eng.put(at, ("B", "T")), eng.put(targets, ("B", "T")))
      lp, greedy = np.asarray(lp), np.asarray(greedy)
    for r, i in enumerate(chunk):
      n = rows[i].n
      bad = np.flatnonzero(~np.isfinite(lp[r, :n]))
      if bad.size:
        raise GemmaError(f"the model produced a non-finite log-probability (nan or inf) for scored token "
                         f"{bad[0]} of request {i}: the weights may be damaged, or bfloat16 overflowed (try float32)")
      out[i] = (lp[r, :n].copy(), greedy[r, :n].copy())
    if progress is not None:
      progress(len(chunk), len(rows))
  return out


def loglikelihood(model, requests: Sequence[tuple[str, str]], batch_size: int = 8, *, progress: Progress = None,
                  max_length: int | None = None) -> list[LogLikelihood]:
  """lm-eval's loglikelihood: for each (context, continuation), log p(continuation | context) summed over the
  continuation's tokens and whether each of them was the greedy choice (see encode_pair).

  Batched results equal one request at a time within float32 rounding (1e-5), whatever the batch size.
  max_length: tokens the model sees at once (default: its context); a longer request loses its first
  tokens, as in lm-eval.
  """
  max_length = model.config.max_seq_len if max_length is None else min(max_length, model.config.max_seq_len)
  rows = [request_row(model, i, ctx, cont, max_length) for i, (ctx, cont) in enumerate(requests)]
  return [LogLikelihood(float(np.sum(lp, dtype=np.float64)), bool(g.all()))
          for lp, g in score_rows(model, rows, batch_size, progress)]


def check_window(model, window: int | None, stride: int | None) -> tuple[int, int]:
  window = min(DEFAULT_WINDOW, model.config.max_seq_len) if window is None else window
  stride = window if stride is None else stride
  for name, v in (("window", window), ("stride", stride)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise GemmaError(f"{name} must be an integer >= 1, got {v!r}")
  if window > model.config.max_seq_len:
    raise GemmaError(f"window {window} exceeds the model's context of {model.config.max_seq_len} tokens")
  if stride > window:
    raise GemmaError(f"stride {stride} exceeds the window {window}: tokens between windows would go unscored")
  return window, stride


def rolling_windows(ids: Sequence[int], window: int, stride: int) -> list[Row]:
  """The windows that score ids[1:] (ids: BOS first) exactly once, each window feeding at most `window` ids.

  The first window scores its first `window` tokens given every id before them. Each later one scores the
  next `stride` tokens (fewer at the end) given the ids before them up to the window's size, its oldest id
  replaced by BOS: Gemma's outputs at a sequence start without BOS are far off (the held-out text of the
  README: perplexity 1095 in 128-token windows without BOS at their starts, 62.5 in one window), so every
  window starts as the model was trained (llama.cpp's perplexity tool does the same). With stride ==
  window these are lm-eval's loglikelihood_rolling windows (utils.get_rolling_token_windows, context_len 1,
  make_disjoint_window) with that one id replaced.
  """
  ids, last = tuple(ids), len(ids) - 1  # ids[last] is the last target
  end = min(window, last)
  rows = [Row(ids[:end + 1], end)]
  while end < last:
    new_end = min(end + stride, last)
    rows.append(Row(ids[:1] + ids[new_end - window + 1:new_end + 1], new_end - end))
    end = new_end
  return rows


def rolling_loglikelihood(model, texts: Sequence[str], window: int | None = None, stride: int | None = None,
                          batch_size: int = 8, progress: Progress = None) -> list[tuple[float, int]]:
  """(summed log-probability, tokens scored) of each whole text, BOS first: every token after BOS is scored
  once, through sliding windows (rolling_windows); windows of all texts are batched together.

  window: ids per forward (default min(2048, the model's context)); stride: new tokens scored per window
  after the first (default: window, lm-eval's disjoint windows).
  """
  window, stride = check_window(model, window, stride)
  rows, owner = [], []
  for i, text in enumerate(texts):
    if not isinstance(text, str) or not text:
      raise GemmaError(f"text {i} is empty: nothing to score" if isinstance(text, str) else
                       f"text {i} must be a string, got {type(text).__name__}")
    windows = rolling_windows(model.encode(text), window, stride)
    rows += windows
    owner += [i] * len(windows)
  sums, counts = [0.0] * len(texts), [0] * len(texts)
  for i, (lp, _) in zip(owner, score_rows(model, rows, batch_size, progress)):  # window order: a fixed sum
    sums[i] += float(np.sum(lp, dtype=np.float64))
    counts[i] += len(lp)
  return list(zip(sums, counts))


def text_perplexity(model, text: str, window: int | None = None, stride: int | None = None, batch_size: int = 8,
                    progress: Progress = None) -> dict[str, float | int]:
  """Perplexity of a text of any length (see rolling_loglikelihood for window and stride).

  Returns {"tokens": N scored (every token after BOS), "nll_per_token": -sum log p / N, "perplexity":
  exp(nll_per_token), "bits_per_byte": -sum log p / (ln 2 * UTF-8 bytes of the text)} (lm-eval's
  bits_per_byte counts the text's bytes too, so it compares across tokenizers).
  """
  (total, n), = rolling_loglikelihood(model, [text], window, stride, batch_size, progress)
  nll = -total / n
  return {"tokens": n, "nll_per_token": nll, "perplexity": math.exp(nll),
          "bits_per_byte": -total / (math.log(2) * len(text.encode("utf-8")))}


def generate_until(model, contexts: Sequence[str], until: Sequence[str] = (), max_gen_toks: int = 256,
                   batch_size: int = 8, progress: Progress = None) -> list[str]:
  """Greedy continuations (lm-eval's generate_until): each stops at EOS / <end_of_turn>, after max_gen_toks
  tokens, or where one of the `until` strings appears (the text ends before it).

  Contexts are encoded with BOS and run longest first in batches; a context longer than the model's context
  minus max_gen_toks loses its first tokens, as in lm-eval.
  """
  check_batch_size(batch_size)
  limit = model.config.max_seq_len - max_gen_toks
  if limit < 1:
    raise GemmaError(f"max_gen_toks {max_gen_toks} leaves no room for a context in {model.config.max_seq_len}")
  ids = [model.encode(c)[-limit:] for c in contexts]
  order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), ids[i]))
  out = [""] * len(ids)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    state = model.start([ids[i] for i in chunk], max_gen_toks)
    stream = model.stream_state(state, max_gen_toks, make_sampling(len(chunk)), stop=tuple(until), chunk=16,
                                num_rows=len(chunk))
    for pieces in stream:
      for i, piece in zip(chunk, pieces):
        out[i] += piece
    if progress is not None:
      progress(len(chunk), len(ids))
  return out


def mean_stderr(values: Sequence[float]) -> float | None:
  """Standard error of a mean: sample standard deviation / sqrt(n) (lm-eval's mean_stderr); None for n < 2."""
  if len(values) < 2:
    return None
  x = np.asarray(values, np.float64)
  return float(np.std(x, ddof=1) / math.sqrt(len(x)))


def perplexity(logprobs: Sequence[float] | np.ndarray) -> dict[str, float | int]:
  """Mean log-probability and perplexity of scored tokens.

  Args:
    logprobs: (N,) natural-log probabilities of each scored token given its prefix, e.g.
      Model.logprobs(ids) (N = len(ids) - 1: the first token is not scored).
  Returns:
    {"tokens": N, "mean_logprob": sum / N, "perplexity": exp(-sum / N)}, as Python numbers summed in
    float64 in token order.
  """
  values = [float(x) for x in np.asarray(logprobs, dtype=np.float64).reshape(-1)]
  if not values:
    raise GemmaError("perplexity needs at least one scored token, got no log-probabilities")
  mean = sum(values) / len(values)
  return {"tokens": len(values), "mean_logprob": mean, "perplexity": math.exp(-mean)}


__all__ = ["LogLikelihood", "Row", "encode_pair", "generate_until", "loglikelihood", "mean_stderr", "perplexity",
           "rolling_loglikelihood", "rolling_windows", "score_rows", "text_perplexity"]

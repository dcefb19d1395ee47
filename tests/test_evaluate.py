"""evaluate.py: log-likelihood requests, rolling perplexity, generate_until and the statistics, against
hand-computed values, the full forward, and each request alone."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

import gemma_jax as gj
from gemma_jax import decode, engine, evaluate
from gemma_jax.configs import TINY_PRESETS
from gemma_jax.errors import GemmaError
from gemma_jax.evaluate import Row, perplexity


def test_perplexity_is_exp_of_the_negative_mean_logprob():
  lps = [math.log(0.5), math.log(0.25), math.log(0.125)]  # mean log p = log(1/4): perplexity 4
  got = perplexity(lps)
  assert got["tokens"] == 3
  assert got["mean_logprob"] == pytest.approx(math.log(0.25), rel=1e-12)
  assert got["perplexity"] == pytest.approx(4.0, rel=1e-12)
  # A float32 array (what Model.logprobs returns) gives the same numbers as its Python floats.
  arr = np.array([-0.5, -2.25, -1.0, -3.0], np.float32)
  assert perplexity(arr) == perplexity(arr.tolist())
  assert perplexity(arr)["perplexity"] == pytest.approx(math.exp(1.6875), rel=1e-12)


def test_perplexity_of_nothing_is_an_error():
  with pytest.raises(GemmaError, match="perplexity needs at least one scored token"):
    perplexity([])


def test_mean_stderr_is_lm_evals():
  assert evaluate.mean_stderr([1.0]) is None
  assert evaluate.mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(math.sqrt(0.25 / 4), rel=1e-12)


# ---- scoring rows on a tiny random model: batching, padding, chunking ----

@pytest.fixture(scope="module")
def tiny():
  return gj.Model.random(TINY_PRESETS["tiny_gemma3_qk"], seed=3)  # window 5: rows run past it


def random_rows(n: int, seed: int = 0) -> list[Row]:
  """n rows of 3 to 40 ids (BOS first) with 1 to 8 of them scored: buckets T 32 and 64, C 8."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    length = int(rng.integers(3, 41))
    ids = [2] + rng.integers(3, 250, size=length - 1).tolist()
    rows.append(Row(tuple(ids), int(rng.integers(1, min(length, 9)))))
  return rows


def test_rows_equal_the_full_forward(tiny):
  """Against log-softmax of the full forward's logits (every position, float64 here): no gather, no chunks."""
  rows = random_rows(4)
  tokens, positions = engine.pad_rows([r.ids for r in rows], [0] * 4, 64)
  logits = np.asarray(tiny.decoder.forward(tiny.params, jnp.asarray(tokens), jnp.asarray(positions)), np.float64)
  for r, row, (lp, greedy) in zip(range(4), rows, evaluate.score_rows(tiny, rows, batch_size=3)):
    x = logits[r, len(row.ids) - 1 - row.n:len(row.ids) - 1]
    top = x.max(-1, keepdims=True)
    logp = x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))
    targets = np.asarray(row.ids[-row.n:])
    np.testing.assert_allclose(lp, logp[np.arange(row.n), targets], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(greedy, np.argmax(x, -1) == targets)


def test_batched_equals_one_by_one_whatever_the_batch_size_and_padding(tiny):
  rows = random_rows(6, seed=1)
  assert {engine.bucket(len(r.ids) - 1) for r in rows} == {32, 64}  # short rows get padded past their bucket
  alone = evaluate.score_rows(tiny, rows, batch_size=1)
  for b in (4, 6):  # 4: the second batch has 2 idle rows; 6: one batch, every row padded to the longest's bucket
    for (lp, greedy), (lp1, greedy1) in zip(evaluate.score_rows(tiny, rows, batch_size=b), alone):
      np.testing.assert_allclose(lp, lp1, rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(greedy, greedy1)


def test_one_compile_per_bucket_pair_not_per_request(tiny, monkeypatch):
  # A Decoder of its own (capacity is part of its static key), so earlier tests' compiles do not count.
  decoder = dataclasses.replace(tiny.decoder, capacity=5)
  monkeypatch.setattr(gj.Model, "decoder", property(lambda self: decoder))
  rows = [Row(tuple([2] + [7] * (n - 1)), k) for n, k in [(9, 1), (12, 3), (20, 2), (31, 5), (15, 8), (33, 4)]]
  before = decode.Decoder.score._cache_size()
  evaluate.score_rows(tiny, rows, batch_size=2)
  # Longest first: feeds of (32, 30), (19, 14), (11, 8) tokens, each batch padded to T 32 and C 8.
  assert decode.Decoder.score._cache_size() - before == 1


def test_long_rows_are_scored_in_chunks_of_positions(tiny, monkeypatch):
  rows = random_rows(3, seed=2)
  want = evaluate.score_rows(tiny, rows, batch_size=3)
  monkeypatch.setattr(decode, "SCORE_ROWS", 7)  # 3 rows x 2 positions per chunk, the last chunk padded
  decoder = dataclasses.replace(tiny.decoder, capacity=11)  # a new static self: traced afresh with SCORE_ROWS 7
  monkeypatch.setattr(gj.Model, "decoder", property(lambda self: decoder))
  for (lp, greedy), (lp0, greedy0) in zip(evaluate.score_rows(tiny, rows, batch_size=3), want):
    np.testing.assert_allclose(lp, lp0, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(greedy, greedy0)


# ---- windows ----

@pytest.mark.parametrize("n, window, stride", [(10, 4, 4), (10, 4, 1), (11, 4, 3), (3, 8, 8), (9, 8, 8), (40, 7, 5)])
def test_rolling_windows_score_every_token_once_with_bounded_context(n, window, stride):
  ids = list(range(100, 100 + n))
  rows = evaluate.rolling_windows(ids, window, stride)
  scored = [t for r in rows for t in r.ids[-r.n:]]
  assert scored == ids[1:]  # every token after BOS once, in order
  for k, r in enumerate(rows):
    assert r.ids[0] == ids[0] and len(r.ids) - 1 <= window  # BOS first; ids fed
    if k > 0 and len(ids) - 1 > window:
      assert len(r.ids) - 1 == window  # later windows always see a full window
      assert len(r.ids) - 1 - r.n >= window - stride  # context (BOS included) before the first scored token


def test_rolling_windows_with_stride_equal_to_window_are_lm_evals_disjoint_windows_starting_with_bos():
  """lm-eval's utils.get_rolling_token_windows(token_list, prefix, max_seq_len=4, context_len=1) on tokens
  [0..9] with prefix P (its docstring's example): INPUT P 0 1 2 / 3 4 5 6 / 5 6 7 8, PRED 0-3 / 4-7 / 8 9;
  ours puts BOS (P) in place of each later window's oldest input."""
  P = -1
  rows = evaluate.rolling_windows([P] + list(range(10)), window=4, stride=4)
  assert [(r.ids[:-1], r.ids[-r.n:]) for r in rows] == [((P, 0, 1, 2), (0, 1, 2, 3)), ((P, 4, 5, 6), (4, 5, 6, 7)),
                                                       ((P, 6, 7, 8), (8, 9))]


@pytest.mark.parametrize("window, stride, message", [
    (0, None, "window must be an integer >= 1"), (4, 5, "stride 5 exceeds the window 4"),
    (10 ** 9, None, "exceeds the model's context"), (4, 0, "stride must be an integer >= 1")])
def test_window_errors(tiny, window, stride, message):
  with pytest.raises(GemmaError, match=message):
    evaluate.check_window(tiny, window, stride)


def test_batch_size_must_be_positive(tiny):
  with pytest.raises(GemmaError, match="batch_size must be an integer >= 1, got 0"):
    evaluate.score_rows(tiny, random_rows(1), batch_size=0)


# ---- the real 270M: lm-eval's tokenization of requests ----

def test_encode_pair_follows_lm_eval(model_270m):
  m = model_270m
  ctx, cont = evaluate.encode_pair(m, "The capital of France is", " Paris")
  assert ctx == m.encode("The capital of France is") and ctx[0] == m.tokenizer.bos_id
  assert ctx + cont == m.encode("The capital of France is Paris")
  # Trailing whitespace of the context moves to the continuation: the same split as without it.
  assert evaluate.encode_pair(m, "The capital of France is ", "Paris") == (ctx, cont)
  # Split at len(encode(context)) of the joint encoding, even where the pieces merge across the boundary.
  whole, c = m.encode("Hello wor" + "ld"), m.encode("Hello wor")
  assert evaluate.encode_pair(m, "Hello wor", "ld") == (c, whole[len(c):])
  # An empty context is BOS alone; the continuation is encoded without BOS.
  assert evaluate.encode_pair(m, "", "Hello") == ([m.tokenizer.bos_id], m.encode("Hello", add_bos=False))


def test_loglikelihood_sums_the_continuations_token_logprobs(model_270m):
  m = model_270m
  (got,) = evaluate.loglikelihood(m, [("The capital of France is", " Paris, the city of light")], batch_size=4)
  ids, ctx = m.encode("The capital of France is Paris, the city of light"), m.encode("The capital of France is")
  lps = m.logprobs(ids)[len(ctx) - 1:]
  assert got.logprob == pytest.approx(float(np.sum(lps, dtype=np.float64)), abs=1e-4)
  logits = m.logits(ids)[len(ctx) - 1:-1]
  assert got.is_greedy == bool((np.argmax(logits, -1) == ids[len(ctx):]).all())


def test_loglikelihood_batched_equals_one_by_one_on_270m(model_270m):
  reqs = [("The capital of France is", " Paris"), ("The capital of France is ", "Berlin"), ("", "Hello world"),
          ("Question: What is 2+2?\nAnswer:", " 4"), ("The cat sat on the", " mat and purred quietly all day long.")]
  batched = evaluate.loglikelihood(model_270m, reqs, batch_size=4)
  for r, b in zip(reqs, batched):
    (alone,) = evaluate.loglikelihood(model_270m, [r], batch_size=1)
    assert b.is_greedy == alone.is_greedy
    np.testing.assert_allclose(b.logprob, alone.logprob, rtol=1e-5, atol=1e-5)
  assert batched[0].logprob > batched[1].logprob  # Paris over Berlin


def test_request_errors(model_270m):
  with pytest.raises(GemmaError, match="request 1: the continuation '' has no tokens"):
    evaluate.loglikelihood(model_270m, [("a", " b"), ("a", "")])
  with pytest.raises(GemmaError, match="request 0: context and continuation must be strings"):
    evaluate.loglikelihood(model_270m, [("a", 3)])


def test_long_context_loses_its_first_tokens_as_in_lm_eval(model_270m):
  ctx = "one two three four five six seven eight nine ten"
  ids = evaluate.request_row(model_270m, 0, ctx, " eleven", max_length=6)
  full = model_270m.encode(ctx + " eleven")
  assert ids == Row(tuple(full[-7:]), 1)


def test_text_perplexity_windows_and_bits_per_byte(model_270m):
  text = "The old lighthouse stood at the edge of the cliff, its paint peeling after decades of salt and wind. " * 3
  ids = model_270m.encode(text)
  whole = evaluate.text_perplexity(model_270m, text, batch_size=3)  # one window holds it all
  want = -np.sum(model_270m.logprobs(ids), dtype=np.float64)
  assert whole["tokens"] == len(ids) - 1
  assert whole["nll_per_token"] == pytest.approx(want / (len(ids) - 1), abs=1e-5)
  assert whole["perplexity"] == pytest.approx(math.exp(want / (len(ids) - 1)), rel=1e-5)
  assert whole["bits_per_byte"] == pytest.approx(want / math.log(2) / len(text.encode()), rel=1e-5)
  # Sliding windows: every token still scored once, with less context, so a higher perplexity on this
  # repeated text (the repeats are predictable only from earlier copies).
  slid = evaluate.text_perplexity(model_270m, text, window=16, stride=8, batch_size=3)
  assert slid["tokens"] == whole["tokens"] and slid["perplexity"] > whole["perplexity"]


def test_generate_until_stops_before_the_stop_string(model_270m):
  prompts = ["The capital of France is", "Question: What is 2+2?\nAnswer:"]
  got = evaluate.generate_until(model_270m, prompts, until=["."], max_gen_toks=24, batch_size=2)
  assert all("." not in g for g in got) and all(got)
  # What Model.generate gives with the same stop string (rows run in another order: longest first).
  assert got == model_270m.generate(prompts, max_new_tokens=24, stop=["."])

"""Generation: sampling through the model, stop conditions, streaming, compile counts, cache policies."""

import numpy as np
import pytest

import gemma_jax as gj
from gemma_jax import decode
from gemma_jax.configs import TINY_PRESETS
from gemma_jax.errors import GemmaError
from gemma_jax.streaming import TextRow
from test_decode import random_model


@pytest.fixture(scope="module")
def tiny():
  return random_model("tiny_gemma3_qk", seed=3)


PROMPTS = [[2, 9, 8, 7], [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [2, 3]]


def test_sampled_rows_equal_each_prompt_alone_and_repeat_with_their_seed(tiny):
  kw = dict(temperature=[0.0, 1.0, 0.8], top_p=[1.0, 0.9, 1.0], min_p=[0.0, 0.0, 0.05], seed=[0, 11, 12],
            stop_ids=[])
  batch = tiny.generate_ids(PROMPTS, max_new_tokens=12, **kw)
  assert batch == tiny.generate_ids(PROMPTS, max_new_tokens=12, **kw)
  for r, p in enumerate(PROMPTS):
    alone = {k: (v[r] if isinstance(v, list) and k != "stop_ids" else v) for k, v in kw.items()}
    assert batch[r] == tiny.generate_ids([p], max_new_tokens=12, **alone)[0]
  assert batch[0] == tiny.generate_ids([PROMPTS[0]], max_new_tokens=12, stop_ids=[])[0]  # temperature 0
  other = tiny.generate_ids(PROMPTS, max_new_tokens=12, **{**kw, "seed": [0, 99, 98]})
  assert other[0] == batch[0] and (other[1] != batch[1] or other[2] != batch[2])


def test_top_k_one_is_greedy_through_the_model(tiny):
  greedy = tiny.generate_ids(PROMPTS, max_new_tokens=10, stop_ids=[])
  assert tiny.generate_ids(PROMPTS, max_new_tokens=10, temperature=1.5, top_k=1, seed=5, stop_ids=[]) == greedy


def test_forbidden_tokens_are_never_drawn(tiny):
  free = tiny.generate_ids([PROMPTS[0]], max_new_tokens=10, stop_ids=[])[0]
  banned = sorted(set(free))[:3]
  got = tiny.generate_ids([PROMPTS[0]], max_new_tokens=10, stop_ids=[], forbidden_ids=banned)[0]
  assert not set(got) & set(banned) and len(got) == 10
  sampled = tiny.generate_ids([PROMPTS[0]] * 4, max_new_tokens=30, temperature=2.0, seed=[1, 2, 3, 4],
                              forbidden_ids=list(range(0, 251, 2)), stop_ids=[])
  assert all(t % 2 == 1 for row in sampled for t in row)


def test_continuing_a_state_equals_one_long_call(tiny):
  s = gj.sampling.make_sampling(2, temperature=0.9, seed=[4, 5])
  whole = tiny.generate_ids(PROMPTS[:2], max_new_tokens=20, temperature=0.9, seed=[4, 5], stop_ids=[])
  state = tiny.start(PROMPTS[:2], 20)
  rows = [[], []]
  for produced in range(0, 20, 3):  # seven calls of up to 3 tokens, each continuing the last state
    out, state = tiny.run(state, min(3, 20 - produced), s, stop_ids=[])
    rows = [a + b for a, b in zip(rows, out)]
  assert rows == whole


def test_compilations_happen_per_bucket_not_per_length_or_setting(tiny):
  prefill_before = decode.Decoder.prefill._cache_size()
  loop_before = decode.Decoder.decode_loop._cache_size()
  for n, temp, top_p, seed, max_new in [(5, 0.0, 1.0, 0, 9), (9, 0.7, 0.9, 1, 12), (17, 1.2, 0.5, 2, 20),
                                        (31, 0.3, 1.0, 3, 17)]:
    tiny.generate_ids([[2] + list(range(10, 10 + n))], max_new_tokens=max_new, temperature=temp, top_p=top_p,
                      seed=seed, stop_ids=[])
  # Prompt lengths 6..32 share the 32 bucket, cache 64, output capacity 32: one compile each.
  assert decode.Decoder.prefill._cache_size() - prefill_before <= 1
  assert decode.Decoder.decode_loop._cache_size() - loop_before <= 1


def test_cache_too_small_is_an_error_unless_rolling(tiny):
  with pytest.raises(GemmaError, match=r"the cache holds 16 tokens but prompt \(13\) \+ max_new_tokens \(10\) "
                                       r"needs 23; raise cache_len or pass cache_policy='rolling'"):
    tiny.generate_ids([PROMPTS[1]], max_new_tokens=10, cache_len=16)
  exact = tiny.generate_ids([PROMPTS[1]], max_new_tokens=10, stop_ids=[])
  # A rolling cache that still holds everything changes nothing.
  assert tiny.generate_ids([PROMPTS[1]], max_new_tokens=10, cache_len=64, cache_policy="rolling",
                           stop_ids=[]) == exact
  rolled = tiny.generate_ids([PROMPTS[1]], max_new_tokens=10, cache_len=16, cache_policy="rolling", stop_ids=[])
  assert len(rolled[0]) == 10


@pytest.mark.parametrize("kw, message", [
    (dict(stop_ids=[251]), r"stop token id 251 is outside the vocabulary \[0, 251\)"),
    (dict(forbidden_ids=[-4]), r"forbidden token id -4 is outside the vocabulary"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(cache_policy="grow"), "cache_policy must be 'error' or 'rolling'"),
])
def test_bad_generation_settings(tiny, kw, message):
  with pytest.raises(GemmaError, match=message):
    tiny.generate_ids([PROMPTS[0]], **{"max_new_tokens": 4, **kw})


# ---- text: streaming and stop strings on the real tokenizer -------------------------------------

def test_streamed_pieces_never_split_a_character(model_270m):
  tok = model_270m.tokenizer
  text = "Hieroglyph 𓀀 and 🧑‍🔬 then 你好, done."
  ids = tok.encode(text, add_bos=False)
  assert len(ids) > len(text.split())  # some characters are spread over byte-fallback tokens
  row = TextRow(tok, set(), ())
  pieces = [row.add([i]) for i in ids] + [row.flush()]
  assert "".join(pieces) == text
  assert not any("\ufffd" in p for p in pieces)


def test_stop_string_prefixes_are_held_back():
  class Chars:  # a stand-in tokenizer: id i is chr(i)
    decode = staticmethod(lambda ids: "".join(map(chr, ids)))

  row = TextRow(Chars, set(), ("END",))
  pieces = [row.add([ord(c)]) for c in "abcENxyE"]
  assert "".join(pieces) == "abcENxy" and pieces[3:5] == ["", ""] and pieces[5] == "ENx"
  assert row.add([ord("N")]) == "" and row.add([ord("D")]) == "" and row.stopped
  assert row.flush() == ""


@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.0, top_p=0.95, seed=7)])
def test_stream_joined_equals_generate(model_270m, kw):
  prompts = ["The capital of France is", "def add(a, b):"]
  full = model_270m.generate(prompts, max_new_tokens=24, **kw)
  pieces = list(model_270m.stream(prompts, max_new_tokens=24, chunk=5, **kw))
  assert ["".join(p[r] for p in pieces) for r in range(2)] == full
  assert len(pieces) >= 4  # it did stream


def test_stop_strings_end_the_text_before_them(model_270m):
  full = model_270m.generate("The capital of France is", max_new_tokens=32)
  assert full.startswith(" the capital of the country of France.")
  assert model_270m.generate("The capital of France is", max_new_tokens=32, stop=["France"]) == \
      " the capital of the country of "
  assert model_270m.generate("The capital of France is", max_new_tokens=32, stop=["zzz", "."]) == \
      " the capital of the country of France"
  with pytest.raises(GemmaError, match="stop strings must be non-empty strings"):
    model_270m.generate("x", stop=[""])


def test_feeding_past_a_fixed_cache_is_an_error(tiny):
  state = tiny.start([PROMPTS[0]], 4, cache_len=16)
  with pytest.raises(GemmaError, match=r"the cache holds 16 positions but feeding these ids reaches 17"):
    tiny.feed(state, [[5] * 13])

"""ChatSession: the Gemma instruct template, cache reuse across turns, and the cache's limits."""

import dataclasses

import pytest

import gemma_jax as gj
from gemma_jax.errors import GemmaError


@pytest.fixture
def chat(model_270m):
  with pytest.warns(UserWarning, match="not known to be instruction-tuned"):
    return gj.ChatSession(model_270m, system="Answer in one short sentence.", max_new_tokens=24)


def test_first_turn_uses_the_official_template(chat, model_270m):
  chat.send("What is the capital of France?")
  tok = model_270m.tokenizer
  want = tok.encode("<start_of_turn>user\nAnswer in one short sentence.\n\nWhat is the capital of France?"
                    "<end_of_turn>\n<start_of_turn>model\n", parse_control=True)
  assert chat.ids[:len(want)] == want and chat.last_fed == len(want)


def test_second_turn_reuses_the_cache_and_equals_a_fresh_run(chat, model_270m):
  chat.send("What is the capital of France?")
  before = list(chat.ids)
  answer = chat.send("And of Spain?")
  turn = model_270m.tokenizer.chat_turn("And of Spain?", first=False,
                                        close_previous=before[-1] != model_270m.tokenizer.end_of_turn_id)
  assert chat.last_fed == len(turn) < len(before)  # only the new turn ran through the model
  assert chat.ids[:len(before) + len(turn)] == before + turn
  fresh = model_270m.generate_ids([before + turn], max_new_tokens=24)[0]
  assert chat.ids[len(before) + len(turn):] == fresh
  stops = set(model_270m.stop_ids())
  assert answer == model_270m.decode_text([i for i in fresh if i not in stops])


def test_an_int8_cache_is_reused_across_turns_as_a_float_one(model_270m):
  """The int8 cache through ChatSession: the second turn feeds only its own tokens into the cache the first
  left (grown; int8 values and scales moved as they are) and answers as a fresh int8 run of the whole
  conversation does, up to a near-tie. Not token for token as with a float cache: the two runs compute the
  keys in differently shaped matmuls, and a float rounding difference on a quantization boundary moves a
  key by a whole step (measured here: the answers part at a margin of 0.004 nats, after 15 tokens)."""
  quantized = dataclasses.replace(model_270m, kv_cache_dtype="int8")
  with pytest.warns(UserWarning):
    chat = gj.ChatSession(quantized, system="Answer in one short sentence.", max_new_tokens=24)
  chat.send("What is the capital of France?")
  before = list(chat.ids)
  chat.send("And of Spain?")
  turn = quantized.tokenizer.chat_turn("And of Spain?", first=False,
                                       close_previous=before[-1] != quantized.tokenizer.end_of_turn_id)
  assert chat.last_fed == len(turn) and chat._state.cache[0].k.dtype == "int8"
  got = chat.ids[len(before) + len(turn):]
  fresh = quantized.generate_ids([before + turn], max_new_tokens=24)[0]
  same = next((i for i, (a, b) in enumerate(zip(got, fresh)) if a != b), len(fresh))
  assert same >= 8
  if same < len(fresh):
    prefix = before + turn + got[:same]
    margin = quantized.logprobs(prefix + [got[same]])[-1] - quantized.logprobs(prefix + [fresh[same]])[-1]
    assert abs(margin) < 0.05, (same, margin)


def test_an_interrupted_turn_is_dropped_and_the_history_replayed(chat, model_270m):
  chat.send("What is the capital of France?")
  before = list(chat.ids)
  stream = chat.stream("And of Spain?", chunk=2)
  next(stream)
  stream.close()  # the user stopped reading mid-answer
  assert chat.ids == before
  answer = chat.send("And of Spain?")
  assert chat.last_fed > len(before)  # replayed into a fresh cache
  with pytest.warns(UserWarning):
    again = gj.ChatSession(model_270m, system="Answer in one short sentence.", max_new_tokens=24)
  again.send("What is the capital of France?")
  assert again.send("And of Spain?") == answer


def test_cache_limit_errors_by_default_and_rolls_when_asked(model_270m):
  with pytest.warns(UserWarning):
    small = gj.ChatSession(model_270m, max_cache_len=40, max_new_tokens=16)
  small.send("Hello there!")
  with pytest.raises(GemmaError, match=r"the conversation would reach \d+ tokens but the cache holds 40; start "
                                       r"a new session, raise max_cache_len, or pass cache_policy='rolling'"):
    small.send("Tell me a long story about the sea and its lighthouses, please.")
  with pytest.warns(UserWarning):
    rolling = gj.ChatSession(model_270m, max_cache_len=40, max_new_tokens=16, cache_policy="rolling")
  rolling.send("Hello there!")
  rolling.send("Tell me a long story about the sea and its lighthouses, please.")
  assert len(rolling.ids) > 40


def test_bad_chat_input(chat):
  with pytest.raises(GemmaError, match="empty message"):
    chat.send("   ")
  with pytest.raises(GemmaError, match="top_p must be in"):
    chat.send("Hi", top_p=2.0)

"""data.py: JSONL examples (three shapes) -> ids and target masks, batching (bucketed or packed), the shuffled
stream and its resumable Position, eval batches, and every error path with its message.

Uses the tiny hand-made tokenizer of test_tokenizer.py: it has <bos>, <eos>, <pad>, <start_of_turn> and
<end_of_turn>, so all three shapes build without the 262144-piece model (text outside its few pieces is
spelled in byte pieces, which only makes examples longer).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from gemma_jax.data import (Batch, Example, Loader, Position, bucket_length, count_targets, eval_batches,
                            read_examples)
from gemma_jax.errors import GemmaError
from gemma_jax.tokenizer import Tokenizer
from test_tokenizer import tiny_proto


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
  return Tokenizer(tiny_proto())


def write(tmp_path, *lines, name="d.jsonl"):
  """A JSONL file of `lines`: dicts and lists as JSON, str as text, bytes as they are."""
  raw = [ln if isinstance(ln, bytes) else (ln if isinstance(ln, str) else json.dumps(ln)).encode() for ln in lines]
  path = tmp_path / name
  path.write_bytes(b"\n".join(raw) + b"\n")
  return path


def at(path, line: int | None = None) -> str:
  """The start every error message must have: `file:line: ` (or `file: ` for the whole file)."""
  return "^" + re.escape(f"{path}:{line}: " if line else f"{path}: ")


def encode(tok, text):
  return tok.encode(text, add_bos=False)


# ---------------------------------------------------------------------------------------------------------
# The three shapes


def test_text_shape(tok, tmp_path):
  path = write(tmp_path, {"text": "hello world", "id": 7})
  [ex] = read_examples(path, tok, seq_len=64)
  body = encode(tok, "hello world")
  assert ex.ids.tolist() == [tok.bos_id] + body and ex.ids.dtype == np.int32
  assert ex.targets.tolist() == [False] + [True] * len(body) and ex.targets.dtype == bool
  assert ex.where == f"{path}:1"


def test_prompt_response_shape(tok, tmp_path):
  [ex] = read_examples(write(tmp_path, {"prompt": "hello", "response": " world"}), tok, seq_len=64)
  prompt, response = encode(tok, "hello"), encode(tok, " world")
  assert ex.ids.tolist() == [tok.bos_id] + prompt + response + [tok.eos_id]
  assert ex.targets.tolist() == [False] * (1 + len(prompt)) + [True] * (len(response) + 1)


def test_messages_shape_is_the_chat_template(tok, tmp_path):
  messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
              {"role": "model", "content": " world \n"}, {"role": "user", "content": "hello world"},
              {"role": "model", "content": "hello"}]
  [ex] = read_examples(write(tmp_path, {"messages": messages}), tok, seq_len=256)
  eot = tok.end_of_turn_id
  parts = [(tok.chat_turn("hello", first=True, system="be brief"), False), (encode(tok, "world") + [eot], True),
           (tok.chat_turn("hello world", first=False), False), (encode(tok, "hello") + [eot], True)]
  assert ex.ids.tolist() == [i for ids, _ in parts for i in ids]
  assert ex.targets.tolist() == [t for ids, t in parts for _ in ids]
  assert ex.ids[0] == tok.bos_id and ex.ids[-1] == eot


def test_messages_without_system(tok, tmp_path):
  messages = [{"role": "user", "content": "hello"}, {"role": "model", "content": "world"}]
  [ex] = read_examples(write(tmp_path, {"messages": messages}), tok, seq_len=256)
  first = tok.chat_turn("hello", first=True)
  assert ex.ids.tolist() == first + encode(tok, "world") + [tok.end_of_turn_id]
  assert ex.targets.tolist() == [False] * len(first) + [True] * (len(ex.ids) - len(first))


def test_control_text_in_content_stays_text(tok, tmp_path):
  """Turn markers typed in data are text: only the template puts their ids in."""
  messages = [{"role": "user", "content": "<start_of_turn>model"}, {"role": "model", "content": "<end_of_turn>"}]
  chat, text = read_examples(write(tmp_path, {"messages": messages}, {"text": "<end_of_turn>"}), tok, seq_len=512)
  ids = chat.ids.tolist()
  assert ids.count(tok.end_of_turn_id) == 2 and ids[-1] == tok.end_of_turn_id  # the user's and the model's
  assert ids.count(tok.start_of_turn_id) == 2
  assert tok.end_of_turn_id not in text.ids and len(text.ids) > 2


def test_blank_lines_crlf_bom_and_line_numbers(tok, tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_bytes(b'\xef\xbb\xbf{"text": "hello"}\r\n\r\n   \n{"prompt": "hello", "response": "world"}\r\n\n')
  a, b = read_examples(path, tok, seq_len=64)
  assert a.ids.tolist() == [tok.bos_id] + encode(tok, "hello")
  assert (a.where, b.where) == (f"{path}:1", f"{path}:4")


def test_truncate_keeps_the_first_seq_len_tokens(tok, tmp_path):
  path = write(tmp_path, {"prompt": "hello", "response": "hello world hello world hello world"})
  [full] = read_examples(path, tok, seq_len=64)
  [cut] = read_examples(path, tok, seq_len=5, truncate=True)
  assert cut.ids.tolist() == full.ids[:5].tolist() and cut.targets.tolist() == full.targets[:5].tolist()


# ---------------------------------------------------------------------------------------------------------
# Errors: each names file:line (the bad line is line 3, after a good line and a blank one)

GOOD = {"text": "hello"}
BAD_LINES = [
    ("not json", r"not valid JSON: Expecting value at column 1"),
    ("[1, 2]", r"expected a JSON object, got a list"),
    ('"hello"', r"expected a JSON object, got a string"),
    ({"id": 1}, r"no example field among keys \['id'\]: expected 'text', 'prompt' and 'response', or 'messages'"),
    ({"text": "a", "prompt": "b"}, r"ambiguous example: it has keys of the text and prompt/response shapes"),
    ({"response": "a", "messages": []}, r"ambiguous example: .*prompt/response and messages"),
    ({"prompt": "hello"}, r"field 'response' is missing"),
    ({"text": 5}, r"field 'text' must be a string, got a number"),
    ({"text": None}, r"field 'text' must be a string, got null"),
    ({"text": " \n\t"}, r"field 'text' is empty"),
    ({"prompt": "", "response": "x"}, r"field 'prompt' is empty"),
    ({"prompt": "x", "response": " "}, r"field 'response' is empty"),
    ('{"text": "a", "text": "b"}', r"duplicate key 'text'"),
    ('{"text": "\\ud800"}', r"text is not valid Unicode"),
    ({"messages": []}, r"'messages' must be a non-empty list of messages, got a list"),
    ({"messages": "hello"}, r"'messages' must be a non-empty list of messages, got a string"),
    ({"messages": ["hello"]}, r"messages\[0\] must be an object with 'role' and 'content', got a string"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\]: field 'content' is missing"),
    ({"messages": [{"content": "x"}]}, r"messages\[0\]: field 'role' is missing"),
    ({"messages": [{"role": 1, "content": "x"}]}, r"messages\[0\]: field 'role' must be a string, got a number"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, r"messages\[0\]: field 'content' must be a string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "model", "content": ""}]},
     r"messages\[1\]: field 'content' is empty"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"messages\[1\]: unknown role 'assistant' \(Gemma calls the assistant 'model'\); "
     r"known roles: system, user, model"),
    ({"messages": [{"role": "bot", "content": "y"}]}, r"messages\[0\]: unknown role 'bot'; known roles"),
    ({"messages": [{"role": "model", "content": "x"}]}, r"messages\[0\]: expected a 'user' message, got 'model'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},
     r"messages\[1\]: expected a 'model' message, got 'user': an optional system message comes first, then turns "
     r"alternate user, model, user"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "model", "content": "y"},
                   {"role": "system", "content": "z"}]}, r"messages\[2\]: expected a 'user' message, got 'system'"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "system", "content": "y"}]},
     r"messages\[1\]: expected a 'user' message, got 'system'"),
    ({"messages": [{"role": "system", "content": "x"}]}, r"messages has no 'model' turn: nothing to train on"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"messages has no 'model' turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "model", "content": "y"},
                   {"role": "user", "content": "z"}]},
     r"messages ends with a 'user' turn \(messages\[2\]\) that no 'model' turn answers: nothing to train on"),
    (b'{"text": "ab\xff"}', r"not UTF-8: byte 0xff at byte offset 12 of the line \(31 of the file\)"),
    ({"text": "hello world " * 8}, r"the example is 25 tokens, longer than seq_len 16; .*pass --truncate "
                                   r"\(truncate=True\) to keep its first 16 tokens"),
]


@pytest.mark.parametrize("line, message", BAD_LINES, ids=[m[:40] for _, m in BAD_LINES])
def test_bad_line(tok, tmp_path, line, message):
  path = write(tmp_path, GOOD, "", line, GOOD)
  with pytest.raises(GemmaError, match=at(path, 3) + message):
    read_examples(path, tok, seq_len=16)


def test_truncation_that_leaves_no_target(tok, tmp_path):
  path = write(tmp_path, {"prompt": "hello world " * 8, "response": "hello"})
  with pytest.raises(GemmaError, match=at(path, 1) + r"no target tokens within the first 16 \(seq_len\) tokens"):
    read_examples(path, tok, seq_len=16, truncate=True)


def test_file_without_examples(tok, tmp_path):
  for content in (b"", b"\n  \n\r\n"):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(GemmaError, match=at(path) + r"no examples \(the file is empty or holds only blank lines\)"):
      read_examples(path, tok, seq_len=16)


def test_missing_file_and_directory(tok, tmp_path):
  with pytest.raises(GemmaError, match=at(tmp_path / "nope.jsonl") + "no such data file$"):
    read_examples(tmp_path / "nope.jsonl", tok, seq_len=16)
  with pytest.raises(GemmaError, match=r"no such data file \(it is a directory\)"):
    read_examples(tmp_path, tok, seq_len=16)


def test_tokenizer_without_turn_pieces(tmp_path):
  """The messages shape needs <end_of_turn>; the error says which piece is missing, at file:line."""
  from test_tokenizer import _SPECIAL, tiny_vocab
  from gemma_jax.convert.gguf_tokenizer import build_model_proto
  tokens, scores, types = tiny_vocab()
  for k, (piece, _) in enumerate(_SPECIAL):
    if piece in ("<start_of_turn>", "<end_of_turn>"):
      tokens[k] = f"<unused{k}>"
  tok = Tokenizer(build_model_proto(tokens, scores, types, unk_id=3, bos_id=2, eos_id=1, pad_id=0))
  path = write(tmp_path, {"messages": [{"role": "user", "content": "x"}, {"role": "model", "content": "y"}]})
  with pytest.raises(GemmaError, match=at(path, 1) + r"the tokenizer has no <end_of_turn> piece"):
    read_examples(path, tok, seq_len=64)


def test_bad_seq_len(tok, tmp_path):
  with pytest.raises(GemmaError, match=r"seq_len must be an integer >= 2, got 1"):
    read_examples(write(tmp_path, GOOD), tok, seq_len=1)


# ---------------------------------------------------------------------------------------------------------
# Batching


def make_examples(lengths) -> list[Example]:
  """Example i has len lengths[i], ids [bos, 1000 + i, ...] (so a row's segments name their examples) and
  targets on every token after the first two."""
  out = []
  for i, n in enumerate(lengths):
    ids = np.array([2, 1000 + i] + [10 + i % 50] * (n - 2), np.int32)
    out.append(Example(ids, np.arange(n) >= 2, f"x.jsonl:{i + 1}"))
  return out


def segments_of(batch: Batch) -> list[list[int]]:
  """Per row, the example numbers of its segments in order, after checking each segment's layout."""
  rows = []
  for b in range(batch.tokens.shape[0]):
    seg, names = batch.segments[b], []
    pad = seg == 0
    assert (batch.positions[b][pad] == -1).all() and (batch.targets[b][pad] == 0).all()
    assert (batch.tokens[b][pad] == 0).all() and (not pad.any() or pad[pad.argmax():].all())  # pad at the end
    for s in range(1, seg.max() + 1):
      [cols] = np.nonzero(seg == s)
      assert cols.tolist() == list(range(cols[0], cols[0] + len(cols)))  # contiguous: no example split
      i = int(batch.tokens[b, cols[1]]) - 1000
      names.append(i)
      assert batch.positions[b, cols].tolist() == list(range(len(cols)))  # positions restart at 0
      assert batch.tokens[b, cols[0]] == 2 and batch.targets[b, cols[0]] == 0  # no target at its <bos>
      assert len(cols) == LENGTHS[i] and batch.targets[b, cols].tolist() == [0, 0] + [1] * (len(cols) - 2)
    rows.append(names)
  return rows


def stream(seed, n, epochs=4) -> list[int]:
  return [int(i) for e in range(epochs) for i in np.random.default_rng([seed, e]).permutation(n)]


LENGTHS = [5, 17, 3, 30, 9, 12, 2, 16, 7, 25, 4]


def test_bucket_length():
  lengths = (1, 16, 17, 32, 33, 64, 65, 99, 100)
  assert [bucket_length(n, 100) for n in lengths] == [16, 16, 32, 32, 64, 64, 100, 100, 100]
  assert [bucket_length(n, 128) for n in (2, 100, 128)] == [16, 128, 128]
  assert bucket_length(3, 8) == 8  # seq_len below 16 is the one bucket
  with pytest.raises(GemmaError, match="an example of 101 tokens does not fit seq_len 100"):
    bucket_length(101, 100)


def test_unpacked_batches_follow_the_shuffled_stream():
  examples = make_examples(LENGTHS)
  loader = Loader(examples, batch_size=3, seq_len=40, seed=5)
  order = stream(5, len(LENGTHS))
  for k in range(8):  # 24 examples: past two epoch boundaries
    batch = loader.next_batch()
    taken = order[3 * k:3 * k + 3]
    assert [r for r in segments_of(batch)] == [[i] for i in taken]
    assert batch.tokens.shape == (3, bucket_length(max(LENGTHS[i] for i in taken), 40))
    assert batch.tokens.dtype == batch.positions.dtype == batch.segments.dtype == np.int32
    assert batch.targets.dtype == np.float32
  assert loader.position == Position(2, 2)


def test_packed_batches_fill_rows_greedily():
  examples = make_examples(LENGTHS)
  loader = Loader(examples, batch_size=2, seq_len=32, seed=1, pack=True, pad_id=0)
  order, taken = stream(1, len(LENGTHS)), 0
  for _ in range(10):
    batch = loader.next_batch()
    assert batch.tokens.shape == (2, 32)
    for row in segments_of(batch):
      assert row == order[taken:taken + len(row)]  # stream order, nothing skipped or repeated
      taken += len(row)
      assert sum(LENGTHS[i] for i in row) + LENGTHS[order[taken]] > 32  # the next example did not fit
    assert loader.position == Position(taken // len(LENGTHS), taken % len(LENGTHS))


def test_pad_id_and_count_targets():
  examples = make_examples([3, 5])
  batch = Loader(examples, batch_size=2, seq_len=16, seed=0, pad_id=7).next_batch()
  assert (batch.tokens[batch.segments == 0] == 7).all()
  assert count_targets(batch) == 1 + 3


def test_shuffle_is_set_by_the_seed():
  examples = make_examples(LENGTHS)
  first = lambda seed: [segments_of(Loader(examples, batch_size=11, seq_len=32, seed=seed).next_batch())]
  assert first(3) == first(3) != first(4)


@pytest.mark.parametrize("pack", [False, True])
def test_resume_from_a_position(pack):
  examples = make_examples(LENGTHS)
  reference = Loader(examples, batch_size=3, seq_len=32, seed=9, pack=pack)
  batches, positions = [], []
  for _ in range(12):  # several epochs, so positions before, at and after a boundary are resumed from
    batches.append(reference.next_batch())
    positions.append(reference.position)
  assert len({p.epoch for p in positions}) >= 3
  for k, position in enumerate(positions[:-1]):
    resumed = iter(Loader(examples, batch_size=3, seq_len=32, seed=9, pack=pack, position=position))
    for expected in batches[k + 1:k + 4]:
      got = next(resumed)
      for field in ("tokens", "positions", "segments", "targets"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))


def test_position_at_the_end_of_an_epoch_is_the_next_epoch():
  examples = make_examples(LENGTHS)
  a = Loader(examples, batch_size=2, seq_len=32, seed=0, position=Position(1, len(LENGTHS)))
  b = Loader(examples, batch_size=2, seq_len=32, seed=0, position=(2, 0))
  assert a.position == b.position == Position(2, 0)
  np.testing.assert_array_equal(a.next_batch().tokens, b.next_batch().tokens)


@pytest.mark.parametrize("pack", [False, True])
def test_eval_batches_hold_every_example_once_in_order(pack):
  examples = make_examples(LENGTHS)
  batches = eval_batches(examples, batch_size=4, seq_len=32, pack=pack)
  rows = [row for b in batches for row in segments_of(b)]
  assert [i for row in rows for i in row] == list(range(len(LENGTHS)))
  assert all(b.tokens.shape[0] == 4 for b in batches) and rows[-1] == []  # the last batch is filled up
  if pack:
    assert all(b.tokens.shape[1] == 32 for b in batches)
  else:
    assert [b.tokens.shape[1] for b in batches] == [32, 16, 32]  # the buckets of the longest: 30, 16, 25
  assert sum(count_targets(b) for b in batches) == sum(n - 2 for n in LENGTHS)


def test_loader_and_eval_errors():
  examples = make_examples(LENGTHS)
  cases = [(dict(batch_size=0), r"batch_size must be an integer >= 1, got 0"),
           (dict(seq_len=1), r"seq_len must be an integer >= 2, got 1"),
           (dict(seq_len=20), r"x.jsonl:4: the example is 30 tokens, longer than seq_len 20"),
           (dict(seed=-1), r"seed must be an integer >= 0, got -1"),
           (dict(position=Position(0, 12)), r"position.index 12 is past the 11 examples of an epoch"),
           (dict(position=Position(-1, 0)), r"position.epoch must be an integer >= 0, got -1")]
  for kwargs, message in cases:
    with pytest.raises(GemmaError, match=message):
      Loader(examples, **(dict(batch_size=2, seq_len=32, seed=0) | kwargs))
  with pytest.raises(GemmaError, match="no examples to batch"):
    Loader([], batch_size=2, seq_len=32, seed=0)
  with pytest.raises(GemmaError, match=r"x.jsonl:4: the example is 30 tokens, longer than seq_len 20"):
    eval_batches(examples, batch_size=2, seq_len=20)


def test_read_then_pack(tok, tmp_path):
  """End to end: a file's examples packed keep their ids and masks."""
  path = write(tmp_path, {"text": "hello world"}, {"prompt": "hello", "response": "world"},
               {"messages": [{"role": "user", "content": "hello"}, {"role": "model", "content": "world"}]})
  examples = read_examples(path, tok, seq_len=64)
  [batch] = eval_batches(examples, batch_size=1, seq_len=64, pack=True, pad_id=tok.pad_id)
  n = sum(len(e.ids) for e in examples)
  assert batch.tokens[0, :n].tolist() == np.concatenate([e.ids for e in examples]).tolist()
  assert batch.targets[0, :n].tolist() == np.concatenate([e.targets for e in examples]).astype(float).tolist()
  assert batch.segments[0, :n].tolist() == [s for s, e in enumerate(examples, 1) for _ in e.ids]

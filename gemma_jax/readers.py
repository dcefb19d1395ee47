"""Benchmark files (JSONL, one document a line, in their public layouts) -> Docs, with lm-evaluation-harness's
prompts. Nothing is downloaded: the README says where each file comes from.

Each reader follows the lm-eval task of the same name (lm_eval/tasks/<name>/*.yaml, 0.4.13): the same
question text (doc_to_text), answer texts (doc_to_choice) and gold index, joined by its target delimiter
" ". Every problem is a GemmaError starting with `file:line:`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Callable

from .errors import GemmaError

MMLU_LETTERS = ("A", "B", "C", "D")


@dataclasses.dataclass(frozen=True, eq=False)
class Doc:
  """One document of a task, as lm-eval's prompt builder sees it.

  Attributes:
    query: the question text (lm-eval's doc_to_text), without the answer.
    choices: the answer texts (doc_to_choice); for a task whose choices differ in their context (Winogrande),
      the per-choice contexts, all followed by `continuation`.
    gold: index of the right choice (-1 for generation tasks).
    continuation: Winogrande's shared continuation, None for every other task.
    delimiter: put between a context and its answer (lm-eval's target_delimiter).
    target: a generation task's reference answer (GSM8K: the worked solution ending in "#### N").
    description: text before the few-shot examples (MMLU: the subject line).
    group: documents whose few-shot examples come only from their own group (MMLU: the subject).
    raw: the line's JSON object (few-shot sampling leaves out the document being evaluated by comparing these,
      as lm-eval compares its documents).
    where: "file:line", for messages.
  """

  query: str
  choices: tuple[str, ...] = ()
  gold: int = -1
  continuation: str | None = None
  delimiter: str = " "
  target: str = ""
  description: str = ""
  group: str = ""
  raw: dict = dataclasses.field(default_factory=dict)
  where: str = ""

  def requests(self, prefix: str) -> list[tuple[str, str]]:
    """(context, continuation) per choice, after a prefix (description and few-shot examples)."""
    if self.continuation is not None:
      return [(prefix + c, self.delimiter + self.continuation) for c in self.choices]
    return [(prefix + self.query, self.delimiter + c) for c in self.choices]

  def answer(self) -> str:
    """This document as a solved few-shot example: question, delimiter, right answer, blank line."""
    if self.continuation is not None:
      return self.choices[self.gold] + self.delimiter + self.continuation + "\n\n"
    return self.query + self.delimiter + (self.target if self.gold < 0 else self.choices[self.gold]) + "\n\n"


def _lines(path: str | os.PathLike) -> list[tuple[str, dict]]:
  """(file:line, JSON object) of every non-blank line."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise GemmaError(f"{p}: no such data file" + (" (it is a directory)" if p.is_dir() else ""))
  out = []
  for lineno, raw in enumerate(p.read_bytes().split(b"\n"), 1):
    where = f"{p}:{lineno}"
    try:
      line = raw.decode("utf-8").removeprefix("\ufeff")  # a BOM some editors write first is not text
    except UnicodeDecodeError as e:
      raise GemmaError(f"{where}: not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start} of the line") from None
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise GemmaError(f"{where}: not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
      raise GemmaError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    out.append((where, obj))
  if not out:
    raise GemmaError(f"{p}: no documents (the file is empty or holds only blank lines)")
  return out


def _get(obj: dict, key: str, kind: type | tuple[type, ...], what: str | None = None) -> Any:
  if key not in obj:
    raise GemmaError(f"missing field {key!r}")
  v, kinds = obj[key], kind if isinstance(kind, tuple) else (kind,)
  if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):  # JSON true is no index
    raise GemmaError(f"field {key!r} must be {what or kinds[0].__name__}, got {json.dumps(v)[:60]}")
  return v


def _strings(obj: dict, key: str) -> list[str]:
  v = _get(obj, key, list, "a list of strings")
  if not v:
    raise GemmaError(f"field {key!r} is an empty list: nothing to choose from")
  if not all(isinstance(x, str) for x in v):
    raise GemmaError(f"field {key!r} must be a list of strings, got {json.dumps(v)[:60]}")
  if "" in v:
    raise GemmaError(f"field {key!r} has an empty string at index {v.index('')}: nothing to score")
  return v


def _index(obj: dict, key: str, n: int, value=None) -> int:
  i = _get(obj, key, int, "an integer") if value is None else value
  if not 0 <= i < n:
    raise GemmaError(f"answer index {i} (field {key!r}) is out of range for {n} choices")
  return i


def _int_label(obj: dict, key: str, n: int) -> int:
  """A label given as an integer or a digit string (HellaSwag's HF copy writes "3")."""
  v = _get(obj, key, (int, str), "an integer")
  if isinstance(v, str):
    if not v.strip().isdigit():
      raise GemmaError(f"field {key!r} must be an integer, got {json.dumps(v)}")
    v = int(v)
  return _index(obj, key, n, v)


def _hellaswag_text(text: str) -> str:
  """lm-eval's hellaswag/utils.py preprocess: WikiHow's bracketed artifacts removed."""
  text = text.strip().replace(" [title]", ". ")
  return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag(obj: dict) -> Doc:
  """rowanz/hellaswag data/hellaswag_{train,val}.jsonl or the Hugging Face copy (Rowan/hellaswag)."""
  endings = _strings(obj, "endings")
  ctx = _get(obj, "ctx_a", str) + " " + _get(obj, "ctx_b", str).capitalize()
  query = _hellaswag_text(_get(obj, "activity_label", str) + ": " + ctx)
  return Doc(query, tuple(_hellaswag_text(e) for e in endings), _int_label(obj, "label", len(endings)))


def arc(obj: dict) -> Doc:
  """allenai/ai2_arc (question, choices {text, label}, answerKey) or AI2's own ARC-*.jsonl (question {stem,
  choices [{text, label}]}, answerKey)."""
  q = _get(obj, "question", (str, dict), "a string or an object")
  if isinstance(q, dict):  # AI2's original layout
    stem, entries = _get(q, "stem", str), _get(q, "choices", list, "a list")
    if not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in entries):
      raise GemmaError("field 'question.choices' must be a list of {\"text\", \"label\"} objects")
    texts, labels = [c["text"] for c in entries], [str(c.get("label")) for c in entries]
  else:
    stem, choices = q, _get(obj, "choices", dict, "an object with 'text' and 'label' lists")
    texts, labels = _strings(choices, "text"), [str(x) for x in _get(choices, "label", list, "a list")]
  if not texts:
    raise GemmaError("the question has an empty choice list")
  key = str(_get(obj, "answerKey", (str, int), "a string"))
  if key not in labels:
    raise GemmaError(f"answerKey {key!r} is not one of the choice labels {labels}")
  return Doc(f"Question: {stem}\nAnswer:", tuple(texts), labels.index(key))


def mmlu(obj: dict) -> Doc:
  """cais/mmlu (question, subject, choices [4], answer 0-3): lm-eval's mmlu default template."""
  choices = _strings(obj, "choices")
  if len(choices) != 4:
    raise GemmaError(f"field 'choices' must hold 4 answers (A-D), got {len(choices)}")
  subject = obj.get("subject", "")
  if not isinstance(subject, str):
    raise GemmaError("field 'subject' must be a string")
  lines = [_get(obj, "question", str).strip()] + [f"{k}. {c}" for k, c in zip(MMLU_LETTERS, choices)]
  about = f" about {subject.replace('_', ' ')}" if subject else ""
  return Doc("\n".join(lines) + "\nAnswer:", MMLU_LETTERS, _index(obj, "answer", 4),
             description=f"The following are multiple choice questions (with answers){about}.\n\n", group=subject)


def piqa(obj: dict) -> Doc:
  """ybisk/piqa on Hugging Face (goal, sol1, sol2, label); the original valid.jsonl keeps its labels in
  valid-labels.lst: add them to each line as "label"."""
  sols = (_get(obj, "sol1", str), _get(obj, "sol2", str))
  if "label" not in obj:
    raise GemmaError("missing field 'label' (the original PIQA release keeps labels in valid-labels.lst: add "
                     "each line's label to its object)")
  return Doc(f"Question: {_get(obj, 'goal', str)}\nAnswer:", sols, _index(obj, "label", 2))


def boolq(obj: dict) -> Doc:
  """super_glue/boolq (passage, question, label 0/1) or google/boolq (answer true/false)."""
  if "label" in obj:
    gold = _index(obj, "label", 2)
  else:
    gold = int(_get(obj, "answer", bool, "true or false (or give 'label': 0 or 1)"))
  return Doc(f"{_get(obj, 'passage', str)}\nQuestion: {_get(obj, 'question', str)}?\nAnswer:", ("no", "yes"), gold)


def winogrande(obj: dict) -> Doc:
  """allenai/winogrande (sentence with one "_", option1, option2, answer "1"/"2"): lm-eval's partial
  evaluation, each option put in the blank as a context, the rest of the sentence scored after it."""
  sentence = _get(obj, "sentence", str)
  if "_" not in sentence:
    raise GemmaError("field 'sentence' has no '_' blank to fill")
  answer = str(_get(obj, "answer", (str, int), '"1" or "2"'))
  if answer not in ("1", "2"):
    raise GemmaError(f"answer {answer!r} is out of range: Winogrande answers are \"1\" or \"2\"")
  i = sentence.index("_")
  options = (sentence[:i] + _get(obj, "option1", str), sentence[:i] + _get(obj, "option2", str))
  return Doc("", options, int(answer) - 1, continuation=sentence[i + 1:].strip())


def gsm8k(obj: dict) -> Doc:
  """openai/gsm8k (question, answer ending in "#### N"): generated, compared by exact match (tasks.py)."""
  return Doc(f"Question: {_get(obj, 'question', str)}\nAnswer:", target=_get(obj, "answer", str))


def multiple_choice(obj: dict) -> Doc:
  """The generic layout {"context": str, "choices": [str, ...], "answer": int}: each choice is the continuation
  exactly as written (leading space included: no delimiter is added); acc_norm divides by its length."""
  choices = _strings(obj, "choices")
  return Doc(_get(obj, "context", str), tuple(choices), _index(obj, "answer", len(choices)), delimiter="")


READERS: dict[str, Callable[[dict], Doc]] = {
    "hellaswag": hellaswag, "arc_easy": arc, "arc_challenge": arc, "mmlu": mmlu, "piqa": piqa, "boolq": boolq,
    "winogrande": winogrande, "gsm8k": gsm8k, "multiple_choice": multiple_choice}


def read_docs(task: str, path: str | os.PathLike) -> list[Doc]:
  """The documents of a JSONL file in `task`'s layout, in file order (blank lines skipped)."""
  if task not in READERS:
    raise GemmaError(f"unknown task {task!r}; known: {', '.join(sorted(READERS))}")
  docs = []
  for where, obj in _lines(path):
    try:
      doc = READERS[task](obj)
    except GemmaError as e:  # one place adds file:line to every problem of the line
      raise GemmaError(f"{where}: {e}") from None
    docs.append(dataclasses.replace(doc, raw=obj, where=where))
  return docs


__all__ = ["Doc", "READERS", "read_docs"]

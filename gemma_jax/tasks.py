"""Benchmark tasks: documents (readers.py) -> few-shot prompts -> requests (evaluate.py) -> metrics, as
lm-evaluation-harness 0.4.13 builds and scores them (lm_eval/api/task.py, samplers.py, metrics.py).

- Prompts: description + k solved examples (question, delimiter, answer, "\\n\\n") + the question; each
  choice is scored as delimiter + choice after it.
- Few-shot examples are drawn with random.Random(seed) shared by the documents in file order, k + 1 at a
  time with the document itself left out when examples come from the evaluated file (lm-eval's
  ContextSampler, seed 1234 by default as lm-eval's fewshot_random_seed), or the first k of the document's
  subject for MMLU (lm-eval's first_n sampler over the dev split).
- acc: the choice of highest log-likelihood is the gold one (the first maximum); acc_norm: the same with
  each log-likelihood divided by its choice's length in characters (lm-eval's completion_len: the answer text
  without the delimiter). Reported by lm-eval's metric lists: acc_norm for HellaSwag, ARC, PIQA and the
  generic layout. stderr: sample standard deviation / sqrt(n).
- GSM8K: greedy generation until "Question:" (or EOS), then exact match of the final number (below).
"""

from __future__ import annotations

import random
import re
from typing import Sequence

import numpy as np

from . import evaluate
from .errors import GemmaError
from .readers import READERS, Doc

TASKS = tuple(sorted(READERS)) + ("perplexity",)
ACC_NORM = frozenset({"hellaswag", "arc_easy", "arc_challenge", "piqa", "multiple_choice"})
GENERATION = frozenset({"gsm8k"})
FIRST_N = frozenset({"mmlu"})
DEFAULT_FEWSHOT = {"gsm8k": 5}  # lm-eval's gsm8k.yaml num_fewshot; every other task: 0
DEFAULT_SEED = 1234
GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")  # lm-eval gsm8k.yaml generation_kwargs.until
# GSM8K answer extraction (lm-eval gsm8k.yaml filter_list): "strict" takes the number after "#### ", "flexible"
# the last number in the text; both are then normalised by GSM8K_IGNORE and lowercased, the reference too.
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
INVALID = "[invalid]"


class FewShot:
  """Few-shot examples for each document, drawn as lm-eval draws them (see the module docstring)."""

  def __init__(self, pool: Sequence[Doc], seed: int, *, exclude_self: bool, first_n: bool):
    self.pool, self.rnd, self.exclude_self, self.first_n = list(pool), random.Random(seed), exclude_self, first_n

  def examples(self, doc: Doc, k: int) -> list[Doc]:
    if k == 0:
      return []
    same = lambda x: x.raw == doc.raw  # lm-eval compares documents by value
    if self.first_n:
      pool = [x for x in self.pool if x.group == doc.group and not (self.exclude_self and same(x))]
      if len(pool) < k:
        raise GemmaError(f"{doc.where}: {k} few-shot examples asked, but only {len(pool)} documents of its subject "
                         f"{doc.group!r} are in the few-shot file")
      return pool[:k]
    need = k + 1 if self.exclude_self else k
    if len(self.pool) < need:
      raise GemmaError(f"{k} few-shot examples need at least {need} documents to draw from, the file has "
                       f"{len(self.pool)}")
    if not self.exclude_self:
      return self.rnd.sample(self.pool, k)
    shots = [x for x in self.rnd.sample(self.pool, k + 1) if not same(x)][:k]
    if len(shots) < k:  # the document appears more than once: redraw without any copy (lm-eval 0.4.13)
      shots = self.rnd.sample([x for x in self.pool if not same(x)], k)
    return shots

  def prefix(self, doc: Doc, k: int) -> str:
    return doc.description + "".join(x.answer() for x in self.examples(doc, k))


def _normalise(text: str, ignore: Sequence[str] = GSM8K_IGNORE) -> str:
  for pattern in ignore:
    text = re.sub(pattern, "", text)
  return text.lower()


def extract_number(text: str, flexible: bool) -> str:
  """GSM8K's answer in a generation: strict, the number after "#### "; flexible, the last number-like run
  (lm-eval's regex filters); "[invalid]" when there is none."""
  found = (GSM8K_FLEXIBLE if flexible else GSM8K_STRICT).findall(text)
  if not found:
    return INVALID
  pick = found[-1 if flexible else 0]
  if isinstance(pick, tuple):
    pick = next((g for g in pick if g), INVALID)
  return pick.strip()


def exact_match(prediction: str, reference: str) -> bool:
  """lm-eval's exact_match for GSM8K: both with "," and "$", everything up to "#### " and a final "." removed,
  then compared case-insensitively."""
  return _normalise(prediction) == _normalise(reference)


def _summary(values: dict[str, list[float]]) -> dict[str, float | None]:
  out: dict[str, float | None] = {}
  for name, v in values.items():
    out[name] = float(np.mean(v))
    out[f"{name}_stderr"] = evaluate.mean_stderr(v)
  return out


def run_task(model, task: str, docs: Sequence[Doc], *, num_fewshot: int | None = None,
             fewshot_docs: Sequence[Doc] | None = None, seed: int = DEFAULT_SEED, limit: int | None = None,
             batch_size: int = 8, max_gen_toks: int = 256, progress: evaluate.Progress = None) -> dict:
  """Evaluates `model` on a task's documents.

  Args:
    task: a reader's name (readers.READERS).
    docs: the documents evaluated (readers.read_docs); limit: only the first `limit` of them.
    num_fewshot: solved examples before each question (default 0; GSM8K 5).
    fewshot_docs: where they come from (default: `docs`, the document itself left out).
    seed: of the few-shot draws.
  Returns:
    {"results": {task: {metric: value, metric_stderr: value or None (fewer than 2 documents)}},
     "samples": [per document: {"doc_id", "loglikelihoods", "is_greedy", "pred", "gold"}, or for generation
     {"doc_id", "generation", "extracted_strict", "extracted_flexible", "target"}],
     "config": {"task", "num_fewshot", "seed", "docs"}}.
  """
  if task not in READERS:
    raise GemmaError(f"unknown task {task!r}; known: {', '.join(sorted(READERS))}")
  k = DEFAULT_FEWSHOT.get(task, 0) if num_fewshot is None else num_fewshot
  if not isinstance(k, int) or isinstance(k, bool) or k < 0:
    raise GemmaError(f"num_fewshot must be an integer >= 0, got {k!r}")
  if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
    raise GemmaError(f"limit must be an integer >= 1, got {limit!r}")
  pool = list(docs) if fewshot_docs is None else list(fewshot_docs)  # the whole file, whatever the limit
  docs = list(docs)[:limit]
  if not docs:
    raise GemmaError("no documents to evaluate")
  sampler = FewShot(pool, seed, exclude_self=fewshot_docs is None, first_n=task in FIRST_N)
  prefixes = [sampler.prefix(d, k) for d in docs]
  config = {"task": task, "num_fewshot": k, "seed": seed, "docs": len(docs)}
  if task in GENERATION:
    return _generation(model, task, docs, prefixes, batch_size, max_gen_toks, progress) | {"config": config}
  per_doc = [d.requests(p) for d, p in zip(docs, prefixes)]
  flat = evaluate.loglikelihood(model, [r for rs in per_doc for r in rs], batch_size, progress=progress)
  samples, metrics, start = [], {"acc": [], "acc_norm": []}, 0
  for i, (doc, rs) in enumerate(zip(docs, per_doc)):
    got, start = flat[start:start + len(rs)], start + len(rs)
    lls = np.array([g.logprob for g in got])
    pred = int(np.argmax(lls))
    metrics["acc"].append(float(pred == doc.gold))
    metrics["acc_norm"].append(float(int(np.argmax(lls / np.array([len(c) for c in doc.choices]))) == doc.gold))
    samples.append({"doc_id": i, "loglikelihoods": lls.tolist(), "is_greedy": [g.is_greedy for g in got],
                    "pred": pred, "gold": doc.gold})
  if task not in ACC_NORM:
    del metrics["acc_norm"]
  return {"results": {task: _summary(metrics)}, "samples": samples, "config": config}


def _generation(model, task: str, docs: list[Doc], prefixes: list[str], batch_size: int, max_gen_toks: int,
                progress: evaluate.Progress) -> dict:
  outputs = evaluate.generate_until(model, [p + d.query for d, p in zip(docs, prefixes)], GSM8K_UNTIL,
                                    max_gen_toks, batch_size, progress)
  samples, metrics = [], {"exact_match_strict": [], "exact_match_flexible": []}
  for i, (doc, text) in enumerate(zip(docs, outputs)):
    strict, flexible = extract_number(text, False), extract_number(text, True)
    metrics["exact_match_strict"].append(float(exact_match(strict, doc.target)))
    metrics["exact_match_flexible"].append(float(exact_match(flexible, doc.target)))
    samples.append({"doc_id": i, "generation": text, "extracted_strict": strict, "extracted_flexible": flexible,
                    "target": _normalise(doc.target)})
  return {"results": {task: _summary(metrics)}, "samples": samples}


__all__ = ["DEFAULT_SEED", "TASKS", "FewShot", "exact_match", "extract_number", "run_task"]

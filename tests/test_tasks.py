"""readers.py and tasks.py: every reader on a small file in its public layout, bad data named by file:line,
few-shot prompts, metrics and GSM8K's answer matching. No model: log-likelihoods are given by hand here
(test_lm_eval.py checks the prompts against lm-evaluation-harness's own tasks, and the numbers on the 270M)."""

import json

import pytest

from conftest import DATA
from gemma_jax import evaluate, readers, tasks
from gemma_jax.errors import GemmaError
from gemma_jax.evaluate import LogLikelihood

EVAL = DATA / "eval"


def docs(task: str, name: str | None = None):
  return readers.read_docs(task, EVAL / f"{name or task}.jsonl")


def test_hellaswag_is_lm_evals_preprocessing():
  d = docs("hellaswag")
  # ctx_a + " " + ctx_b.capitalize(), after "activity_label: "; the gold label as an int or a digit string.
  assert d[0].query == "Washing dishes: A woman stands at a kitchen sink full of plates. She"
  assert d[0].gold == 1 and d[0].choices[1] == "rinses each plate under the tap and sets it on a rack."
  # WikiHow's " [title]" becomes ". ", other [tags] go, double spaces collapse, the text is stripped.
  assert d[1].query == "Home and Garden: How to water a cactus. Check the soil first. Push a finger into the soil."
  assert d[1].choices[0] == "If it is dry, water slowly until it drains. Let it dry again before the next watering."
  assert d[1].gold == 0
  assert d[0].requests("")[2] == (d[0].query, " throws the plates out of the window.")


def test_arc_both_layouts():
  d = docs("arc_easy")
  assert d[0].query == "Question: Which part of a plant takes in water from the soil?\nAnswer:"
  assert d[0].choices == ("leaves", "roots", "flowers", "seeds") and d[0].gold == 1
  assert d[1].gold == 1 and len(d[1].choices) == 3  # numeric labels "1".."3"
  assert d[2].choices[2] == "the Sun" and d[2].gold == 2  # AI2's original layout
  assert readers.read_docs("arc_challenge", EVAL / "arc_easy.jsonl")[0].query == d[0].query


def test_mmlu_template_and_subject():
  d = docs("mmlu")
  assert d[1].query == "Which number is prime?\nA. 9\nB. 15\nC. 21\nD. 13\nAnswer:"  # question stripped
  assert d[1].choices == ("A", "B", "C", "D") and d[1].gold == 3
  assert d[0].description == ("The following are multiple choice questions (with answers) about elementary "
                              "mathematics.\n\n")
  assert d[0].requests("")[1] == (d[0].query, " B")


def test_piqa_boolq_winogrande_gsm8k_generic():
  p = docs("piqa")
  assert p[1].query == "Question: How do you cool a hot drink quickly?\nAnswer:" and p[1].gold == 1
  b = docs("boolq")
  assert b[0].query == "The Sun is the star at the centre of the Solar System.\nQuestion: is the sun a star?\nAnswer:"
  assert b[0].choices == ("no", "yes") and [x.gold for x in b] == [1, 0]  # super_glue label / google answer
  w = docs("winogrande")[0]
  assert w.requests("") == [("The trophy did not fit in the suitcase because the trophy", " was too big."),
                            ("The trophy did not fit in the suitcase because the suitcase", " was too big.")]
  assert w.gold == 0 and w.answer() == "The trophy did not fit in the suitcase because the trophy was too big.\n\n"
  g = docs("gsm8k")[0]
  assert g.query.startswith("Question: Tom has 3 apples") and g.query.endswith("\nAnswer:")
  assert g.answer() == g.query + " " + g.target + "\n\n"
  m = docs("multiple_choice")[0]
  assert m.requests("") == [("The capital of France is", c) for c in (" Paris", " Madrid", " Berlin", " Rome")]


def write(tmp_path, lines: list[str]):
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.mark.parametrize("task, line, message", [
    ("multiple_choice", '{"context": "a", "choices": [" b"]}', "missing field 'answer'"),
    ("multiple_choice", '{"context": "a", "choices": [" b", " c"], "answer": 2}',
     "answer index 2 (field 'answer') is out of range for 2 choices"),
    ("multiple_choice", '{"context": "a", "choices": [], "answer": 0}', "field 'choices' is an empty list"),
    ("multiple_choice", '{"context": "a", "choices": [" b"], "answer": true}', "field 'answer' must be an integer"),
    ("multiple_choice", '{"context": "a", "choices": [" b", 3], "answer": 0}', "must be a list of strings"),
    ("multiple_choice", '{"context": "a", "choices": [" b", ""], "answer": 0}',
     "field 'choices' has an empty string at index 1"),
    ("multiple_choice", '{"context": "a", "choices": [" b"], "answer": 0', "not valid JSON"),
    ("multiple_choice", '["a"]', "expected a JSON object, got list"),
    ("hellaswag", '{"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["c"], "label": "one"}',
     "field 'label' must be an integer"),
    ("hellaswag", '{"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["c"], "label": 4}',
     "answer index 4 (field 'label') is out of range for 1 choices"),
    ("arc_easy", '{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}',
     "answerKey 'B' is not one of the choice labels ['A']"),
    ("mmlu", '{"question": "q", "choices": ["a", "b", "c"], "answer": 0}', "must hold 4 answers"),
    ("piqa", '{"goal": "g", "sol1": "a", "sol2": "b"}', "missing field 'label' (the original PIQA release"),
    ("winogrande", '{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}', "no '_' blank"),
    ("winogrande", '{"sentence": "a _ b", "option1": "a", "option2": "b", "answer": "3"}', "out of range"),
    ("gsm8k", '{"question": "q"}', "missing field 'answer'"),
])
def test_bad_data_is_named_by_file_and_line(tmp_path, task, line, message):
  path = write(tmp_path, ['{"context": "ok", "choices": [" a"], "answer": 0}' if task == "multiple_choice" else
                          EVAL.joinpath(f"{task}.jsonl").read_text().splitlines()[0], "", line])
  with pytest.raises(GemmaError) as e:
    readers.read_docs(task, path)
  assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)


def test_unreadable_files(tmp_path):
  with pytest.raises(GemmaError, match="no such data file"):
    readers.read_docs("piqa", tmp_path / "missing.jsonl")
  (tmp_path / "empty.jsonl").write_text("\n\n")
  with pytest.raises(GemmaError, match="no documents"):
    readers.read_docs("piqa", tmp_path / "empty.jsonl")
  (tmp_path / "latin1.jsonl").write_bytes(b'{"context": "caf\xe9"}\n')
  with pytest.raises(GemmaError, match=r"latin1.jsonl:1: not UTF-8: byte 0xe9"):
    readers.read_docs("multiple_choice", tmp_path / "latin1.jsonl")
  with pytest.raises(GemmaError, match="unknown task 'squad'"):
    readers.read_docs("squad", tmp_path / "empty.jsonl")


# ---- few-shot ----

def test_fewshot_draws_are_seeded_sequential_and_leave_the_document_out():
  pool = docs("multiple_choice")
  a, b = tasks.FewShot(pool, 1234, exclude_self=True, first_n=False), tasks.FewShot(pool, 1234, exclude_self=True,
                                                                                   first_n=False)
  first = [a.prefix(d, 3) for d in pool[:10]]
  assert first == [b.prefix(d, 3) for d in pool[:10]]  # same seed, same prompts
  assert first != [tasks.FewShot(pool, 1, exclude_self=True, first_n=False).prefix(d, 3) for d in pool[:10]]
  for d, p in zip(pool, first):
    assert p.count("\n\n") == 3 and d.answer() not in p
  # Each example is question + delimiter ("" in the generic layout) + the right answer + a blank line.
  shot = a.examples(pool[0], 1)[0]
  assert shot.answer() == shot.query + shot.choices[shot.gold] + "\n\n"


def test_mmlu_fewshot_is_the_first_of_the_subject():
  pool = docs("mmlu")
  sampler = tasks.FewShot(pool, 0, exclude_self=True, first_n=True)
  assert sampler.examples(pool[0], 2) == [pool[1], pool[3]]  # same subject, in file order, itself left out
  p = sampler.prefix(pool[3], 1)
  assert p.startswith(pool[3].description) and p.endswith(pool[0].query + " B\n\n")
  with pytest.raises(GemmaError, match="only 0 documents of its subject 'anatomy'"):
    sampler.examples(pool[2], 1)


def test_too_few_documents_for_the_shots():
  pool = docs("piqa")
  with pytest.raises(GemmaError, match="2 few-shot examples need at least 3 documents to draw from, the file has 2"):
    tasks.FewShot(pool, 0, exclude_self=True, first_n=False).examples(pool[0], 2)


# ---- metrics ----

def test_acc_and_acc_norm_from_given_loglikelihoods(monkeypatch):
  d = docs("multiple_choice")[:3]  # gold 0, 0, 1; choices " Paris" ... / " Celsius" ... / " Mercury" " Jupiter" ...
  given = {0: [-1.0, -2.0, -3.0, -4.0],  # acc right; acc_norm: -1/6 vs -2/7 ... still 0: right
           1: [-9.0, -8.0, -20.0, -20.0],  # acc wrong (1); norm: -9/8 = -1.125 vs -8/7 = -1.14: right (0)
           2: [-5.0, -5.0, -9.0, -9.0]}  # tie: the first maximum (0) is wrong; norm: -5/8 vs -5/8: wrong
  seen = []

  def fake(model, requests, batch_size=8, *, progress=None, max_length=None):
    seen.extend(requests)
    return [LogLikelihood(v, False) for i in range(3) for v in given[i]]

  monkeypatch.setattr(evaluate, "loglikelihood", fake)
  out = tasks.run_task(None, "multiple_choice", docs("multiple_choice"), limit=3)
  assert seen == [r for x in d for r in x.requests("")]
  res = out["results"]["multiple_choice"]
  assert res["acc"] == pytest.approx(1 / 3) and res["acc_norm"] == pytest.approx(2 / 3)
  assert res["acc_stderr"] == pytest.approx(evaluate.mean_stderr([1, 0, 0]))
  assert [s["pred"] for s in out["samples"]] == [0, 1, 0] and [s["gold"] for s in out["samples"]] == [0, 0, 1]
  assert out["samples"][1] == {"doc_id": 1, "loglikelihoods": given[1], "is_greedy": [False] * 4, "pred": 1, "gold": 0}
  assert out["config"] == {"task": "multiple_choice", "num_fewshot": 0, "seed": 1234, "docs": 3}


def test_acc_only_where_lm_eval_reports_only_acc(monkeypatch):
  monkeypatch.setattr(evaluate, "loglikelihood", lambda m, r, *a, **k: [LogLikelihood(-1.0, False)] * len(r))
  for task in ("boolq", "winogrande", "mmlu"):
    assert set(tasks.run_task(None, task, docs(task))["results"][task]) == {"acc", "acc_stderr"}


@pytest.mark.parametrize("text, strict, flexible", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
    ("The total is $2,000.", "[invalid]", "$2,000."),
    ("#### -12.5 and then 3", "-12.5", "3"),
    ("no numbers", "[invalid]", "[invalid]"),
])
def test_gsm8k_extraction(text, strict, flexible):
  assert tasks.extract_number(text, flexible=False) == strict
  assert tasks.extract_number(text, flexible=True) == flexible


def test_gsm8k_exact_match_normalisation():
  ref = "She earned 1200 + 800 = <<1200+800=2000>>2,000 dollars.\n#### 2,000"
  assert tasks.exact_match("2000", ref) and tasks.exact_match("$2,000.", ref) and tasks.exact_match("2,000", ref)
  assert not tasks.exact_match("200", ref) and not tasks.exact_match("[invalid]", ref)


def test_gsm8k_task_with_given_generations(monkeypatch):
  monkeypatch.setattr(evaluate, "generate_until", lambda m, ctx, until, *a, **k: (
      [" 3 + 4 = 7.\n#### 7", " It is 36 pencils.", " #### 2,001"], seen.append((ctx, until)))[0])
  seen = []
  out = tasks.run_task(None, "gsm8k", docs("gsm8k"), num_fewshot=0)
  assert seen[0][1] == ("Question:", "</s>", "<|im_end|>")
  res = out["results"]["gsm8k"]
  assert res["exact_match_strict"] == pytest.approx(1 / 3) and res["exact_match_flexible"] == pytest.approx(2 / 3)
  assert out["samples"][1]["extracted_flexible"] == "36" and out["samples"][1]["target"] == "36"
  assert out["config"]["num_fewshot"] == 0
  json.dumps(out)  # the CLI prints it

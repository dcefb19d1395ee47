"""The lm-evaluation-harness adapter and our harness against lm-eval itself, offline (the eval extra).

- Prompts: lm-eval's own task files (hellaswag.yaml, arc_easy.yaml, ...) pointed at our small fixtures
  build the same requests, few-shot examples included, as readers.py + tasks.py.
- Numbers: a local lm-eval task over the generic layout, run through the adapter, gives the same per-request
  log-likelihoods and the same acc / acc_norm as python -m gemma_jax.eval's code.
- Against Hugging Face: lm-eval's HFLM on transformers' float32 270M (tests/reference/make_eval_goldens.py)
  gives the same token ids and, within 1e-3, the same log-likelihoods.
"""

import json
import os
import pathlib

import numpy as np
import pytest

from conftest import DATA
from gemma_jax import evaluate, readers, tasks

EVAL = DATA / "eval"
K = 1  # few-shot examples in the prompt comparisons (drawn from the evaluated file, the document left out)


@pytest.fixture(scope="module")
def lm_eval(tmp_path_factory):
  """lm_eval, imported with Hugging Face datasets offline and caching under a temporary directory."""
  saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HOME")}
  os.environ.update(HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path_factory.mktemp("hf_home")))
  try:
    module = pytest.importorskip("lm_eval")
    import gemma_jax.lm_eval_adapter  # noqa: F401  (registers "gemma_jax")

    yield module
  finally:
    for k, v in saved.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


# task -> (lm-eval's task file, the split our fixture stands for, lm-eval's dataset_name to clear, rows filter)
LM_TASKS = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "mmlu": ("mmlu/default/mmlu_elementary_mathematics.yaml", "test"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "gsm8k": ("gsm8k/gsm8k.yaml", "test"),
}


def lm_eval_rows(task: str) -> list[dict]:
  """The fixture's lines in the one layout lm-eval's task file reads (our readers take the others too)."""
  rows = [json.loads(line) for line in (EVAL / f"{'arc_easy' if task.startswith('arc') else task}.jsonl").open()]
  if task == "hellaswag":  # the HF copy writes labels as strings (one Arrow type per column)
    rows = [r | {"label": str(r["label"])} for r in rows]
  if task.startswith("arc"):  # AI2's original layout is not the HF one
    rows = [r for r in rows if isinstance(r["question"], str)]
  if task == "mmlu":  # lm-eval has one task per subject
    rows = [r for r in rows if r["subject"] == "elementary_mathematics"]
  if task == "boolq":  # super_glue's label, not google/boolq's answer
    rows = [{"label": int(r["answer"])} | {k: v for k, v in r.items() if k != "answer"} if "answer" in r else r
            for r in rows]
  return rows


def build_lm_eval_task(lm_eval, tmp_path: pathlib.Path, name: str, include: str, split: str, data: pathlib.Path,
                       extra: str = ""):
  from lm_eval.tasks import TaskManager, get_task_dict

  task_dir = tmp_path / f"tasks_{name}"
  task_dir.mkdir()
  splits = {s: ("null" if s != split else split) for s in ("training", "validation", "test")}
  (task_dir / f"{name}.yaml").write_text(
      (f"include: {include}\n" if include else "") + f"task: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
      f"dataset_kwargs:\n  data_files:\n    {split}: {data}\n"
      + "".join(f"{s}_split: {v}\n" for s, v in splits.items()) + f"fewshot_split: {split}\n" + extra)
  return get_task_dict([name], TaskManager(include_path=str(task_dir), include_defaults=False))[name]


@pytest.mark.parametrize("task", sorted(LM_TASKS))
def test_prompts_equal_lm_evals_own_tasks(lm_eval, tmp_path, task):
  include, split = LM_TASKS[task]
  data = tmp_path / f"{task}.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in lm_eval_rows(task)))
  lm_task = build_lm_eval_task(lm_eval, tmp_path, f"gj_{task}", str(pathlib.Path(lm_eval.__file__).parent / "tasks"
                                                                      / include), split, data)
  lm_task.set_config(key="num_fewshot", value=K)
  lm_task.set_fewshot_seed(tasks.DEFAULT_SEED)
  lm_task.build_all_requests(limit=None, rank=0, world_size=1)
  theirs: dict[int, list] = {}
  for inst in sorted(lm_task.instances, key=lambda x: (x.doc_id, x.idx)):
    theirs.setdefault(inst.doc_id, []).append(inst.args)
  docs = readers.read_docs(task, data)
  sampler = tasks.FewShot(docs, tasks.DEFAULT_SEED, exclude_self=True, first_n=task in tasks.FIRST_N)
  for i, doc in enumerate(docs):
    prefix = sampler.prefix(doc, K)
    if task in tasks.GENERATION:
      ((ctx, kwargs),) = theirs[i]
      assert ctx == prefix + doc.query and tuple(kwargs["until"]) == tasks.GSM8K_UNTIL
    else:
      assert theirs[i] == doc.requests(prefix)
      lm_doc = list(lm_task.eval_docs)[i]  # lm-eval's gold index is ours
      gold = lm_task.doc_to_text(lm_doc) if lm_task.multiple_input else lm_task.doc_to_target(lm_doc)
      assert gold in (doc.gold, str(doc.gold))


def test_rolling_windows_are_lm_evals_with_bos_first(lm_eval):
  """Our windows are lm-eval's loglikelihood_rolling windows, except that a later window's oldest input is BOS."""
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

  ids = list(range(3, 103))
  for window in (7, 32, 100, 200):
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, prefix_token=2, max_seq_len=window,
                                                                         context_len=1)]
    theirs = [([2] + list(c[1:]), list(p)) for c, p in theirs]
    ours = evaluate.rolling_windows([2] + ids, window, window)
    # make_disjoint_window drops the inputs that are also targets: compare what precedes the targets.
    assert [(list(r.ids[:-r.n]), list(r.ids[-r.n:])) for r in ours] == theirs


GENERIC = """output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def test_adapter_equals_our_harness_on_a_local_task(lm_eval, model_270m, tmp_path):
  """A local lm-eval task over the generic layout, run by lm-eval through the adapter, against run_task: the
  same prompts (2 few-shot examples drawn with the same seed), log-likelihoods and accuracies."""
  from gemma_jax.lm_eval_adapter import GemmaJaxLM

  data = EVAL / "multiple_choice.jsonl"
  task = build_lm_eval_task(lm_eval, tmp_path, "gj_generic_mc", "", "test", data, GENERIC)
  out = lm_eval.simple_evaluate(model=GemmaJaxLM(model=model_270m, batch_size=4), tasks=[task], num_fewshot=2,
                                limit=5, log_samples=True, fewshot_random_seed=tasks.DEFAULT_SEED)
  ours = tasks.run_task(model_270m, "multiple_choice", readers.read_docs("multiple_choice", data), num_fewshot=2,
                        limit=5, batch_size=4)
  theirs = sorted(out["samples"]["gj_generic_mc"], key=lambda s: s["doc_id"])
  assert [s["doc_id"] for s in theirs] == [s["doc_id"] for s in ours["samples"]] == list(range(5))
  diffs = []
  for t, o in zip(theirs, ours["samples"]):
    lls = [r[0][0] for r in t["resps"]]
    assert [r[0][1] for r in t["resps"]] == o["is_greedy"]
    diffs.append(np.abs(np.array(lls) - o["loglikelihoods"]).max())
  # The same requests through the same code: the numbers agree to float32 rounding (measured: bit for bit).
  assert max(diffs) <= 1e-5
  res, mine = out["results"]["gj_generic_mc"], ours["results"]["multiple_choice"]
  assert res["acc,none"] == pytest.approx(mine["acc"]) and res["acc_norm,none"] == pytest.approx(mine["acc_norm"])
  assert res["acc_stderr,none"] == pytest.approx(mine["acc_stderr"])


def test_loglikelihoods_equal_hugging_face_via_lm_evals_hflm(model_270m):
  """lm-eval's HFLM over transformers (tests/reference/make_eval_goldens.py): same ids, log-likelihoods within
  1e-3 (measured: at most 1.9e-4, on a sum of 11 tokens), same is_greedy."""
  golden = json.loads((EVAL / "hf_loglikelihoods.json").read_text())["requests"]
  pairs = [(g["context"], g["continuation"]) for g in golden]
  for g, (ctx, cont) in zip(golden, pairs):
    assert evaluate.encode_pair(model_270m, ctx, cont) == (g["context_ids"], g["continuation_ids"])
  got = evaluate.loglikelihood(model_270m, pairs, batch_size=4)
  np.testing.assert_allclose([x.logprob for x in got], [g["logprob"] for g in golden], rtol=0, atol=1e-3)
  assert [x.is_greedy for x in got] == [g["is_greedy"] for g in golden]

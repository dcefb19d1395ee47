"""python -m gemma_jax.eval on the real 270M: the --json contract, the table, and bad data as one error line."""

import json

import pytest

from conftest import DATA
from gemma_jax import eval as eval_cli

MC = DATA / "eval" / "multiple_choice.jsonl"


def run(argv, capsys):
  code = eval_cli.main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


def test_multiple_choice_json_contract(ckpt_270m, capsys):
  code, out, err = run(["--ckpt", str(ckpt_270m), "--task", "multiple_choice", "--data", str(MC), "--limit", "4",
                        "--batch-size", "4", "--json"], capsys)
  assert code == 0
  got = json.loads(out)
  res = got["results"]["multiple_choice"]
  assert set(res) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
  assert [s["doc_id"] for s in got["samples"]] == [0, 1, 2, 3]
  for s in got["samples"]:
    assert set(s) == {"doc_id", "loglikelihoods", "is_greedy", "pred", "gold"}
    assert len(s["loglikelihoods"]) == len(s["is_greedy"]) == 4
    assert s["pred"] == max(range(4), key=lambda i: s["loglikelihoods"][i])
  assert res["acc"] == sum(s["pred"] == s["gold"] for s in got["samples"]) / 4
  assert "16/16" in err  # the progress bar counted every request


def test_table_and_perplexity(ckpt_270m, capsys, tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("The old lighthouse stood at the edge of the cliff. Every evening the keeper lit the lamp.")
  argv = ["--ckpt", str(ckpt_270m), "--task", "perplexity", "--data", str(text), "--window", "8", "--stride", "4",
          "--batch-size", "4"]
  code, out, _ = run(argv + ["--json"], capsys)
  assert code == 0
  got = json.loads(out)["results"]["perplexity"]
  assert set(got) == {"tokens", "nll_per_token", "perplexity", "bits_per_byte"} and got["tokens"] > 10
  code, out, _ = run(argv, capsys)
  lines = out.strip().splitlines()
  assert code == 0 and lines[0].split() == ["task", "metric", "value", "stderr"]
  assert [line.split()[:3] for line in lines[1:]] == [["perplexity", "tokens", str(got["tokens"])]] + [
      ["perplexity", m, f"{got[m]:.4f}"] for m in ("nll_per_token", "perplexity", "bits_per_byte")]


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": [" b"], "answer": 1}',
     "answer index 1 (field 'answer') is out of range for 1 choices"),
    ('{"context": "a", "choices": []}', "field 'choices' is an empty list: nothing to choose from"),
    ('{"context": "a", "answer": 0}', "missing field 'choices'"),
    ("not json", "not valid JSON: Expecting value at column 1"),
])
def test_bad_data_is_one_error_line_naming_file_and_line(tmp_path, capsys, line, message):
  data = tmp_path / "mc.jsonl"
  data.write_text('{"context": "a", "choices": [" b"], "answer": 0}\n' + line + "\n")
  # The data is read before any model is loaded: no --ckpt needed to fail fast.
  code, out, err = run(["--ckpt", "/nonexistent", "--task", "multiple_choice", "--data", str(data)], capsys)
  assert code == 2 and out == ""
  assert err.strip() == f"error: {data}:2: {message}"


def test_missing_files(capsys, tmp_path):
  code, _, err = run(["--task", "perplexity", "--data", str(tmp_path / "nope.txt")], capsys)
  assert code == 2 and err.strip() == f"error: {tmp_path / 'nope.txt'}: no such text file"
  code, _, err = run(["--task", "piqa", "--data", str(tmp_path)], capsys)
  assert code == 2 and err.strip() == f"error: {tmp_path}: no such data file (it is a directory)"

"""The CLIs on the real 270M: contracts of --json, the default model cache, and clear errors."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA
from gemma_jax import default_model, sample, score
from gemma_jax.convert.__main__ import main as convert_main

GOLDEN = json.loads((DATA / "golden_270m.json").read_text())
FRANCE = GOLDEN["prompts"][0]


def run(main, argv, capsys):
  code = main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


def test_sample_json_contract(ckpt_270m, capsys):
  code, out, _ = run(sample.main, ["--ckpt", str(ckpt_270m), "--prompt", FRANCE["text"], "--max-new-tokens", "32",
                                   "--greedy", "--json"], capsys)
  assert code == 0
  got = json.loads(out)
  assert got["prompt_tokens"] == FRANCE["ids"]
  assert got["tokens"] == FRANCE["greedy"]
  assert got["text"].startswith(" the capital of")


def test_sample_plain_prints_the_continuation(ckpt_270m, capsys):
  code, out, _ = run(sample.main, ["--ckpt", str(ckpt_270m), "--prompt", FRANCE["text"], "--max-new-tokens", "4"],
                     capsys)
  assert code == 0 and out.startswith(" the capital of")


def test_sample_bfloat16_runs(ckpt_270m, capsys):
  code, out, _ = run(sample.main, ["--ckpt", str(ckpt_270m), "--prompt", FRANCE["text"], "--max-new-tokens", "8",
                                   "--dtype", "bfloat16", "--json"], capsys)
  assert code == 0 and len(json.loads(out)["tokens"]) == 8


def test_score_json_matches_golden_logprobs(ckpt_270m, capsys, tmp_path):
  prompt = GOLDEN["prompts"][1]
  code, out, _ = run(score.main, ["--ckpt", str(ckpt_270m), "--text", prompt["text"], "--json"], capsys)
  assert code == 0
  got = json.loads(out)
  assert got["tokens"] == prompt["ids"]
  np.testing.assert_allclose(got["logprobs"], prompt["logprobs"], rtol=0, atol=1e-4)
  # The same through --text-file and --tokens-file.
  (tmp_path / "t.txt").write_text(prompt["text"])
  (tmp_path / "t.json").write_text(json.dumps(prompt["ids"]))
  for flag, path in (("--text-file", "t.txt"), ("--tokens-file", "t.json")):
    code, out, _ = run(score.main, ["--ckpt", str(ckpt_270m), flag, str(tmp_path / path), "--json"], capsys)
    assert code == 0 and json.loads(out)["logprobs"] == got["logprobs"]


def test_score_plain_ends_with_perplexity(ckpt_270m, capsys):
  code, out, _ = run(score.main, ["--ckpt", str(ckpt_270m), "--text", FRANCE["text"]], capsys)
  lps = FRANCE["logprobs"]
  assert code == 0
  last = out.strip().splitlines()[-1]
  assert last.startswith("tokens: 5 ") and "perplexity: " in last
  np.testing.assert_allclose(float(last.rsplit(" ", 1)[1]), np.exp(-np.mean(lps)), rtol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "/nonexistent/ckpt", "--text", "hi"], "checkpoint directory /nonexistent/ckpt does not exist"),
    (["--text", ""], "empty text: nothing to score"),
])
def test_score_errors(argv, message, capsys):
  code, _, err = run(score.main, argv, capsys)
  assert code == 2 and err.strip() == f"error: {message}"


def test_score_rejects_ids_outside_the_vocabulary(ckpt_270m, capsys, tmp_path):
  (tmp_path / "ids.json").write_text(json.dumps([2, 818, 262144]))
  code, _, err = run(score.main, ["--ckpt", str(ckpt_270m), "--tokens-file", str(tmp_path / "ids.json")], capsys)
  assert code == 2
  assert "token id 262144 at position 2 of the token sequence is outside the vocabulary [0, 262144)" in err
  (tmp_path / "bad.json").write_text('{"ids": [1]}')
  code, _, err = run(score.main, ["--ckpt", str(ckpt_270m), "--tokens-file", str(tmp_path / "bad.json")], capsys)
  assert code == 2 and "must hold a JSON list of integer token ids" in err


def test_sample_errors(ckpt_270m, capsys):
  code, _, err = run(sample.main, ["--ckpt", str(ckpt_270m), "--prompt", ""], capsys)
  assert code == 2 and err.strip() == "error: empty prompt: give some text with --prompt"
  code, _, err = run(sample.main, ["--ckpt", str(ckpt_270m), "--prompt", "hi", "--max-new-tokens", "0"], capsys)
  assert code == 2 and "max_new_tokens must be an integer >= 1, got 0" in err
  code, _, err = run(sample.main, ["--ckpt", str(ckpt_270m), "--prompt", "hi", "--max-new-tokens", "40000"], capsys)
  assert code == 2 and "exceeds the model's context of 32768 tokens" in err


KV_INT4 = "error: unknown kv cache dtype 'int4'; known: float32, bfloat16, int8 (default: the model's dtype)"


@pytest.mark.parametrize("cli, argv", [
    ("sample", ["--ckpt", "/nonexistent/ckpt", "--prompt", "hi"]),  # named before the checkpoint is looked for
    ("sample", ["--preset", "gemma3_270m", "--plan"]),
    ("score", ["--ckpt", "/nonexistent/ckpt", "--text", "hi"]),
    ("chat", ["--ckpt", "/nonexistent/ckpt"]),
])
def test_an_unknown_kv_cache_dtype_is_one_error_line(cli, argv, capsys):
  main = {"sample": sample.main, "score": score.main, "chat": chat_cli.main}[cli]
  code, out, err = run(main, argv + ["--kv-cache-dtype", "int4"], capsys)
  assert code == 2 and out == "" and err == KV_INT4 + "\n"


def test_int8_kv_cache_flag_generates_and_scores(ckpt_270m, capsys):
  code, out, _ = run(sample.main, ["--ckpt", str(ckpt_270m), "--prompt", FRANCE["text"], "--max-new-tokens", "8",
                                   "--kv-cache-dtype", "int8", "--json"], capsys)
  assert code == 0 and json.loads(out)["tokens"] == FRANCE["greedy"][:8]  # (int8 parts from it after 11)
  prompt = GOLDEN["prompts"][1]
  runs = []
  for chunk in ([], ["--chunk", "8"]):
    code, out, _ = run(score.main, ["--ckpt", str(ckpt_270m), "--text", prompt["text"], "--kv-cache-dtype", "int8",
                                    "--json"] + chunk, capsys)
    assert code == 0
    runs.append(json.loads(out)["logprobs"])
  # Through the cache, however it is cut, up to float rounding amplified by quantization steps (a key
  # element on a rounding boundary moves by a whole step; float32 caches agree within 1e-5): measured
  # 0.069 nats at most, 0.0125 on average.
  diff = np.abs(np.asarray(runs[1]) - runs[0])
  assert diff.max() < 0.15 and diff.mean() < 0.03
  assert 0 < np.abs(np.asarray(runs[0]) - prompt["logprobs"]).max() < 0.5  # int8, close to float32


def test_convert_cli_errors(capsys, tmp_path):
  code, _, err = run(convert_main, [str(tmp_path / "missing.gguf"), str(tmp_path / "out")], capsys)
  assert code == 2 and err.strip() == f"error: {tmp_path / 'missing.gguf'} does not exist"


def test_default_model_cache_is_reused(ckpt_270m, capsys, monkeypatch, tmp_path):
  monkeypatch.setenv("GEMMA_JAX_CACHE", str(tmp_path))
  shutil.copytree(ckpt_270m, default_model.checkpoint_dir())
  code, out, _ = run(sample.main, ["--prompt", FRANCE["text"], "--max-new-tokens", "32", "--json"], capsys)
  assert code == 0 and json.loads(out)["tokens"] == FRANCE["greedy"]


def test_compilation_cache_setting(monkeypatch, tmp_path):
  import jax

  from gemma_jax.compile_cache import enable_compilation_cache

  saved = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
  monkeypatch.setenv("GEMMA_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("GEMMA_JAX_COMPILE_CACHE", "0")
  assert enable_compilation_cache() is None and jax.config.jax_compilation_cache_dir is None
  monkeypatch.setenv("GEMMA_JAX_COMPILE_CACHE", "")
  try:
    assert enable_compilation_cache() == tmp_path / "xla" == pathlib.Path(jax.config.jax_compilation_cache_dir)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))  # the user's own choice is kept
    assert enable_compilation_cache() == tmp_path / "mine"
  finally:
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


@pytest.mark.slow
def test_readme_command_on_a_fresh_cache(tmp_path):
  """The README's first command, in a subprocess with an empty cache: converts the default model once,
  then reuses it; user errors print one line, never a traceback."""
  env = {**os.environ, "GEMMA_JAX_CACHE": str(tmp_path), "GEMMA_JAX_COMPILE_CACHE": ""}
  cmd = [sys.executable, "-m", "gemma_jax.sample", "--prompt", FRANCE["text"], "--max-new-tokens", "32", "--json"]
  first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stderr
  assert json.loads(first.stdout)["tokens"] == FRANCE["greedy"]
  assert (tmp_path / default_model.checkpoint_dir().name / "config.json").is_file()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
  # The second process finds every program in the compilation cache: it compiles (writes) nothing new.
  compiled = sorted(p.name for p in (tmp_path / "xla").iterdir())
  assert compiled
  second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  assert second.returncode == 0 and json.loads(second.stdout)["tokens"] == FRANCE["greedy"], second.stderr
  assert sorted(p.name for p in (tmp_path / "xla").iterdir()) == compiled
  bad = subprocess.run(cmd[:3] + ["--prompt", "hi", "--max-new-tokens", "-3"], env=env, capture_output=True,
                       text=True, timeout=900)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip() == "error: max_new_tokens must be an integer >= 1, got -3"


# ---- sampler flags, batches, streaming, chat ---------------------------------------------------------

from gemma_jax import chat as chat_cli  # noqa: E402


def test_sampling_flags_are_reproducible_and_batched(ckpt_270m, capsys, tmp_path):
  (tmp_path / "prompts.txt").write_text("The capital of France is\n\ndef add(a, b):\n")
  argv = ["--ckpt", str(ckpt_270m), "--batch-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "12",
          "--temperature", "0.8", "--top-p", "0.9", "--min-p", "0.02", "--seed", "3", "--json"]
  code, out, _ = run(sample.main, argv, capsys)
  assert code == 0
  first = json.loads(out)
  assert [o["prompt_tokens"][:3] for o in first] == [[2, 818, 5279], [2, 2063, 1138]]
  assert all(1 <= len(o["tokens"]) <= 12 for o in first)
  assert json.loads(run(sample.main, argv, capsys)[1]) == first
  # Streaming JSON lines join to the same texts.
  code, out, _ = run(sample.main, argv + ["--stream"], capsys)
  joined = ["", ""]
  for line in out.splitlines():
    piece = json.loads(line)
    joined[piece["row"]] += piece["text"]
  assert joined == [o["text"] for o in first]


def test_stop_flags(ckpt_270m, capsys):
  base = ["--ckpt", str(ckpt_270m), "--prompt", FRANCE["text"], "--max-new-tokens", "32", "--json"]
  code, out, _ = run(sample.main, base + ["--stop", "."], capsys)
  got = json.loads(out)
  assert code == 0 and got["text"] == " the capital of the country of France"
  assert got["tokens"] == FRANCE["greedy"][:FRANCE["greedy"].index(236761) + 1]  # up to and with the "."
  code, out, _ = run(sample.main, base + ["--stop-token", "563"], capsys)
  assert json.loads(out)["tokens"][-1] == 563 or 563 not in FRANCE["greedy"]
  code, _, err = run(sample.main, base + ["--stop-token", "<no_such_piece>"], capsys)
  assert code == 2 and "unknown token '<no_such_piece>' for --stop-token" in err
  code, _, err = run(sample.main, base + ["--top-p", "1.5"], capsys)
  assert code == 2 and "top_p must be in (0, 1]" in err
  code, _, err = run(sample.main, base + ["--temperature", "-1"], capsys)
  assert code == 2 and "temperature must be >= 0" in err


def test_chat_repl_streams_answers_and_warns_for_a_base_model(ckpt_270m, capsys, monkeypatch):
  import io

  monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/reset\nHi\n/quit\nignored\n"))
  with pytest.warns(UserWarning, match="not known to be instruction-tuned"):
    code, out, _ = run(chat_cli.main, ["--ckpt", str(ckpt_270m), "--max-new-tokens", "8"], capsys)
  assert code == 0
  import gemma_jax as gj

  with pytest.warns(UserWarning):
    want = [gj.ChatSession(gj.load(ckpt_270m), max_new_tokens=8).send(m)
            for m in ("What is the capital of France?", "Hi")]  # /reset: the second is a new session
  assert out == want[0] + "\n" + want[1] + "\n"

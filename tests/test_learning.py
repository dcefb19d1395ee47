"""The train CLI teaches the real Gemma 3 270M something it cannot know: a short learning proof for CI.

benchmarks/learning/task.py makes a made-up digit -> letter code, a key drawn from the seed; here in its
"pairs" style ("Encode 4 9 2:" -> " 4f 9b 2l"), which LoRA learns in tens of steps (the letters-only style of
the full proof needs ~100). The base model's exact-match rate on held-out strings is measured here, not
assumed. A 30-step LoRA run through `python -m gemma_jax.train` must then (1) halve the held-out loss,
measured independently of the trainer (Model.logprobs on the exported RUN/final, against the base), (2) agree
with the eval loss the trainer logged (so the export merged what was trained), and (3) answer at least half of
the held-out prompts exactly, stopping at EOS: a guess of 3-4 letters out of 26 is right with probability
< 1e-4. The full-size proof (300 steps, 200 prompts) is benchmarks/learning/README.md.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

LEARNING = pathlib.Path(__file__).parent.parent / "benchmarks" / "learning"


def load_script(name: str):
  spec = importlib.util.spec_from_file_location(f"learning_{name}", LEARNING / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def heldout_loss(model, path: pathlib.Path) -> float:
  """Mean NLL over the response + EOS tokens of a prompt/response file, as data.py marks the targets."""
  from gemma_jax import data

  total = count = 0.0
  for ex in data.read_examples(path, model.tokenizer, seq_len=64):
    lp = model.logprobs(ex.ids.tolist())  # lp[t - 1] is log p(ids[t] | ids[:t])
    total -= float(np.sum(lp[ex.targets[1:]]))
    count += int(ex.targets.sum())
  return total / count


@pytest.mark.slow
def test_lora_learns_a_code_the_base_model_cannot_know(ckpt_270m, tmp_path):
  import gemma_jax as gj

  task, measure = load_script("task"), load_script("measure")
  # 3-4 digits: every example is 19-24 tokens, one bucket of 32 (one compiled shape).
  task.write(tmp_path / "code", seed=1, n_train=800, n_eval=16, n_test=16, digits=(3, 4), style="pairs")
  test_rows = measure.read(tmp_path / "code" / "test.jsonl", None)

  base = gj.load(ckpt_270m, dtype="float32")
  base_exact = np.mean([r["exact"] for r in measure.measure(base, test_rows, batch=16)])
  base_loss = heldout_loss(base, tmp_path / "code" / "eval.jsonl")
  del base

  run = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "gemma_jax.train", "--ckpt", str(ckpt_270m), "--data", str(tmp_path / "code" / "train.jsonl"),
       "--eval-data", str(tmp_path / "code" / "eval.jsonl"), "--out", str(run), "--method", "lora", "--lora-rank", "8",
       "--learning-rate", "3e-3", "--warmup", "5", "--steps", "30", "--batch-size", "4", "--seq-len", "32",
       "--eval-every", "15", "--save-every", "30", "--json"],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  logged = [e["eval_loss"] for e in events if "eval_loss" in e]

  tuned = gj.load(run / "final", dtype="float32")
  tuned_loss = heldout_loss(tuned, tmp_path / "code" / "eval.jsonl")
  records = measure.measure(tuned, test_rows, batch=16)
  tuned_exact = np.mean([r["exact"] for r in records])
  report = (f"base: exact {base_exact:.2f}, held-out loss {base_loss:.3f}; tuned: exact {tuned_exact:.2f}, loss "
            f"{tuned_loss:.3f} (trainer logged {logged}); answers {[(r['expected'], r['got']) for r in records[:4]]}")
  assert tuned_loss <= 0.5 * base_loss, report
  assert tuned_loss == pytest.approx(logged[-1], rel=1e-3, abs=1e-3), report
  assert tuned_exact >= 0.5 and tuned_exact > base_exact, report

# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # gemma_jax: evaluation
#
# Multiple-choice accuracy and perplexity with lm-evaluation-harness's semantics, from local files (nothing is
# downloaded at run time): the Python API, the `python -m gemma_jax.eval` command, and the lm-eval adapter.

# %% [markdown]
# ## Install
# On **Colab**: *Runtime > Change runtime type*, pick a GPU (T4 or better) or a TPU. On **Kaggle**: *Settings >
# Accelerator*. This cell installs JAX for that accelerator, then gemma_jax with its default model (Gemma 3
# 270M, a PyPI package); where gemma_jax is already importable (a local checkout, the test suite) it does
# nothing. Python 3.12 or newer is needed (Colab and Kaggle have it).

# %%
import importlib.util
import os
import shutil
import subprocess
import sys

# TODO(publish): the repository's pip URL; GEMMA_JAX_SOURCE overrides it (a fork, a branch, a wheel file).
GEMMA_JAX_SOURCE = os.environ.get("GEMMA_JAX_SOURCE", "git+https://github.com/REPLACE-WITH-OWNER/gemma_jax")
if importlib.util.find_spec("gemma_jax") is None:
  if os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ or "TPU_NAME" in os.environ:
    jax_requirement = "jax[tpu]>=0.12"  # a TPU VM runtime
  elif shutil.which("nvidia-smi"):
    jax_requirement = "jax[cuda12]>=0.12"  # a GPU runtime
  else:
    jax_requirement = "jax>=0.12"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", jax_requirement,
                  f"gemma_jax[default-model,eval] @ {GEMMA_JAX_SOURCE}"], check=True)

# %%
import jax

print(jax.devices())
ACCELERATOR = jax.default_backend() != "cpu"  # cells tagged needs-accelerator assume this

# %%
import json
import pathlib

import gemma_jax as gj

model = gj.load(gj.default_checkpoint())

# %% [markdown]
# ## A multiple-choice task in the generic layout
# One JSON object a line: `{"context": str, "choices": [str, ...], "answer": int}`. Each choice is the
# continuation exactly as written, leading space included. A choice's score is the sum of its tokens'
# log-probabilities after the context: **acc** takes the highest, **acc_norm** divides by the choice's length
# in characters first (lm-eval's definitions).

# %%
questions = [
    ("The capital of France is", [" Paris", " Madrid", " Berlin"], 0),
    ("Bees make", [" milk", " honey", " silk"], 1),
    ("A week has", [" five days", " seven days", " ten days"], 1),
    ("Water freezes at zero degrees", [" Celsius", " Kelvin", " Newton"], 0),
    ("The largest planet in our solar system is", [" Mercury", " Mars", " Jupiter"], 2),
]
data = pathlib.Path("questions.jsonl")
data.write_text("".join(json.dumps({"context": c, "choices": ch, "answer": a}) + "\n" for c, ch, a in questions))

out = gj.run_task(model, "multiple_choice", gj.read_docs("multiple_choice", data), batch_size=8)
print(out["results"])
for s in out["samples"]:
  print(s["doc_id"], "pred", s["pred"], "gold", s["gold"], [round(x, 2) for x in s["loglikelihoods"]])

# %% [markdown]
# The same from the command line (`--json` prints the per-document samples too; `--num-fewshot K` puts K
# solved examples before each question, drawn with `--seed`):

# %%
subprocess.run([sys.executable, "-m", "gemma_jax.eval", "--task", "multiple_choice", "--data", "questions.jsonl",
                "--num-fewshot", "2", "--batch-size", "8"], check=True)

# %% [markdown]
# ## Log-likelihoods of any requests
# `gj.loglikelihood` is lm-eval's `loglikelihood`: BOS first, whitespace at the end of the context moved to the
# continuation, batched in buckets (one compile per bucket, not per request).

# %%
for r in gj.loglikelihood(model, [("The capital of France is", " Paris"), ("The capital of France is ", "Rome")]):
  print(r)

# %% [markdown]
# ## Perplexity
# Of a text of any length: sliding windows of `window` tokens, each scoring `stride` new ones, so every
# token is scored once; only the scored positions' logits are ever computed. Bits per byte divide by the
# text's UTF-8 bytes, which compares across tokenizers.

# %%
text = (
    "The harbour office kept the keeper's log in a locked drawer. Every winter the clerk copied it out by hand, "
    "counting the ships that had anchored offshore and the cargo each one carried: timber, wool, salted cod, "
    "slate and wine. When the season ended, the copy went to the capital with the mail coach.")
print(gj.text_perplexity(model, text))
print(gj.text_perplexity(model, text, window=32, stride=16))  # less context per token: higher perplexity

# %% [markdown]
# ## Benchmarks from their public files
# The readers take HellaSwag, ARC, MMLU, PIQA, BoolQ, Winogrande and GSM8K in their public JSONL layouts
# (the README says where each comes from). This cell fetches HellaSwag's validation and training files and
# runs the Gemma 3 270M model card's setting (10-shot; the card reports 40.9): about 40k requests, a job for
# an accelerator.

# %% tags=["needs-download", "needs-accelerator"]
import urllib.request

base = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
for split in ("val", "train"):
  urllib.request.urlretrieve(base + f"hellaswag_{split}.jsonl", f"hellaswag_{split}.jsonl")
fast = gj.load(gj.default_checkpoint(), dtype="bfloat16")
out = gj.run_task(fast, "hellaswag", gj.read_docs("hellaswag", "hellaswag_val.jsonl"), num_fewshot=10,
                  fewshot_docs=gj.read_docs("hellaswag", "hellaswag_train.jsonl"), batch_size=64)
print(out["results"])

# %% [markdown]
# ## lm-evaluation-harness
# With the `eval` extra, lm-eval runs gemma_jax models on any of its tasks (it downloads their datasets):
# ```python
# import lm_eval, gemma_jax.lm_eval_adapter          # registers the model "gemma_jax"
# lm_eval.simple_evaluate(model="gemma_jax", model_args="dtype=bfloat16", tasks=["piqa"], batch_size=32)
# ```
# or `python -m gemma_jax.lm_eval_adapter --model gemma_jax --tasks piqa` (lm-eval's own flags).

# %% tags=["needs-download", "needs-accelerator"]
import lm_eval

import gemma_jax.lm_eval_adapter

results = lm_eval.simple_evaluate(model=gemma_jax.lm_eval_adapter.GemmaJaxLM(model=fast), tasks=["piqa", "arc_easy"],
                                  batch_size=64)
print({k: v for k, v in results["results"].items()})

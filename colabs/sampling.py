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
# # gemma_jax: sampling
#
# Temperature, top-k, top-p and min-p, set per row of a batch; seeds that reproduce a row whatever else is in
# the batch; stop strings; changing any of these never recompiles (they are traced values).

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

# %%
import gemma_jax as gj

model = gj.load(gj.default_checkpoint())
prompts = ["The best thing about the sea is", "My favourite recipe starts with", "In the year 3000,"]

# %% [markdown]
# ## Settings per row
# One value for every row, or one per row. Temperature 0 is greedy. The order is Hugging Face's: temperature,
# then top-k, then top-p on what is left, then min-p.

# %%
out = model.generate(prompts, max_new_tokens=16, temperature=[0.0, 0.8, 1.2], top_k=[0, 40, 0],
                     top_p=[1.0, 0.95, 0.9], min_p=[0.0, 0.0, 0.05], seed=[0, 1, 2])
for p, o in zip(prompts, out):
  print(repr(p), "->", repr(o))

# %% [markdown]
# ## Seeds
# Row b draws with `fold_in(key(seed_b), step)`: the same seed gives the same tokens in any batch, whatever
# its neighbours and its place.

# %%
batched = model.generate(prompts, max_new_tokens=16, temperature=0.8, seed=[3, 7, 9])
moved = model.generate([prompts[1], prompts[2], prompts[0]], max_new_tokens=16, temperature=0.8, seed=[7, 1, 2])
print(repr(batched[1]))
assert moved[0] == batched[1]

# %% [markdown]
# ## Stop strings and tokens
# A row stops at EOS / `<end_of_turn>`, at extra stop ids, or where a stop string appears (its text ends
# before it). Forbidden ids are never drawn.

# %%
out = model.generate(["List three colours:\n1.", "Count: one, two,", "Dear Sir,"], max_new_tokens=16,
                     stop=["\n", "five"], forbidden_ids=[model.encode(" Madam", add_bos=False)[0]])
for text in out:
  print(repr(text))

# %% [markdown]
# ## Ids in, ids out
# `generate_ids` skips the tokenizer: useful for token-level experiments.

# %%
ids = [model.encode(p) for p in prompts]
new = model.generate_ids(ids, max_new_tokens=16)
print(new[0], repr(model.decode_text(new[0])))

# ---
# jupyter:
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
# # gemma_jax: sharding
#
# A mesh of 8 devices (simulated on the CPU where there is no TPU), a model spread over it giving the
# one-device text, the memory plan of a big model before anything is loaded, and the recipe for a TPU slice.

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

# %% [markdown]
# ## Eight devices
# XLA reads the device count once, when JAX starts: this cell must run before anything imports JAX. On a
# TPU runtime the real devices are used; elsewhere the CPU is split into 8 simulated devices (that is also how
# the test suite checks every sharded path against one device).

# %%
ON_TPU = os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ or "TPU_NAME" in os.environ
if not ON_TPU:
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax

print(jax.devices())
assert len(jax.devices()) >= 8, "restart the runtime and run this notebook from the top"

# %% [markdown]
# ## A model on a mesh
# Two axes, `data` (the batch) and `model` (heads, MLP width, vocabulary). Each device restores only its slice
# of each parameter. The text equals the one-device run; the logits agree within float32 rounding.

# %%
import numpy as np

import gemma_jax as gj

ckpt = gj.default_checkpoint()
mesh = gj.make_mesh("data=2,model=4")
sharded = gj.load(ckpt, mesh=mesh)
prompts = ["The capital of France is", "Why is the sky blue?"]
out = sharded.generate(prompts, max_new_tokens=12)
print(out)
w = sharded.params["embedder"]["input_embedding"].value
print("embedding", w.shape, "->", w.sharding.spec, "per device", w.addressable_shards[0].data.shape)

# %%
single = gj.load(ckpt)
assert single.generate(prompts, max_new_tokens=12) == out
ids = single.encode(prompts[0])
np.testing.assert_allclose(sharded.logprobs(ids), single.logprobs(ids), atol=1e-5)

# %% [markdown]
# ## Will it fit? `--plan`
# Bytes per device of params and KV cache for any preset and mesh, from shapes alone (nothing is loaded, the
# devices need not exist here).

# %%
subprocess.run([sys.executable, "-m", "gemma_jax.sample", "--preset", "gemma2_27b", "--mesh", "data=1,model=8",
                "--plan", "--cache-len", "8192", "--batch-size", "4"], check=True)

# %% [markdown]
# ## A TPU slice
# On a multi-host slice every host runs the same command; `--distributed` starts `jax.distributed` and the mesh
# spans all hosts' chips. Keep `model` within a host, put `data` across hosts. (Needs a TPU VM slice and the
# checkpoint at the same path on every host.)

# %% tags=["needs-accelerator"]
command = ("cd gemma_jax && . .venv/bin/activate && python -m gemma_jax.sample --distributed --mesh data=1,model=8 "
           "--ckpt ~/ckpt/gemma2-27b --prompt 'Why is the sky blue?'")
subprocess.run(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-16", "--zone", "us-central2-b", "--worker=all",
                "--command", command], check=True)

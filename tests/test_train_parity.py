"""Training computes what Hugging Face computes: the loss and every gradient, of full fine-tuning and of LoRA,
on the tiny random HF Gemma 2 and Gemma 3 models (tests/reference/make_train_goldens.py: transformers + peft,
float32, eager attention, one batch of 2 right-padded rows with partial label masks).

The full gradients are stored under HF's names and layouts; our own importer (convert/safetensors.py, which
only transposes, reshapes and stacks: a permutation of the entries, so it maps gradients as it maps
weights) puts them into ours. The tied embedding's gradient includes its use as the output layer on both
sides. PEFT's A and B are mapped by hand here, from PEFT's layouts (lora_A.weight (r, in), lora_B.weight
(out, r), q/k/v out = heads * head_dim head-major, o_proj in = N * H), independently of lora.py.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from conftest import DATA
from gemma_jax import lora, optim, transformer
from gemma_jax.convert import import_any
from gemma_jax.transformer import Transformer, abstract_model, flat_params, set_flat_params

TINY = DATA / "hf_tiny"
NAMES = ["gemma2_gqa", "gemma3_qk"]
TOL = dict(rtol=1e-4, atol=1e-4)


def build(name: str) -> Transformer:
  imported = import_any(TINY / name)
  graphdef, state = abstract_model(imported.config)
  set_flat_params(state, dict(imported.params))
  return nnx.merge(graphdef, state)


def batch_of(name: str) -> tuple[optim.TrainBatch, dict[str, np.ndarray]]:
  """Our batch for HF's: segments 1 on tokens and 0 on padding, positions 0.. and -1 on padding, and
  targets[:, t] = 1 where HF trains labels[:, t] (HF shifts the labels inside its loss; we shift in nll_sum)."""
  ref = dict(np.load(TINY / name / "train_batch.npz"))
  mask = ref["attention_mask"]
  assert (ref["labels"][mask == 0] == -100).all() and (mask[:, 0] == 1).all()
  positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, -1)
  batch = optim.TrainBatch(tokens=jnp.asarray(ref["input_ids"]), positions=jnp.asarray(positions, jnp.int32),
                           segments=jnp.asarray(mask, jnp.int32),
                           targets=jnp.asarray(ref["labels"] != -100, jnp.float32))
  return batch, ref


def hf_grads_in_our_layout(name: str, tmp_path) -> dict[str, np.ndarray]:
  """The HF gradients, read by our importer as if they were a checkpoint (same config.json)."""
  shutil.copy(TINY / name / "config.json", tmp_path / "config.json")
  save_file(dict(np.load(TINY / name / "train_full_grads.npz")), tmp_path / "model.safetensors")
  return {k: np.asarray(v) for k, v in import_any(tmp_path).params.items()}


def peft_to_ours(get, cfg, i: int) -> dict[str, np.ndarray]:
  """Layer i's PEFT arrays (get(module, "A" or "B") in PEFT's layout) as our adapter arrays."""
  n, k, h, r = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 4
  a = lambda m: get(m, "A").T  # (r, in) -> (in, r)
  b = lambda m: get(m, "B").T  # (out, r) -> (r, out)
  p = f"layer_{i}/"
  return {p + "attn/q_einsum/lora_a": a("self_attn.q_proj"),
          p + "attn/q_einsum/lora_b": b("self_attn.q_proj").reshape(r, n, h),
          p + "attn/kv_einsum/lora_a": np.stack([a("self_attn.k_proj"), a("self_attn.v_proj")]),
          p + "attn/kv_einsum/lora_b": np.stack([b("self_attn.k_proj").reshape(r, k, h),
                                                 b("self_attn.v_proj").reshape(r, k, h)]),
          p + "attn/attn_vec_einsum/lora_a": a("self_attn.o_proj").reshape(n, h, r),
          p + "attn/attn_vec_einsum/lora_b": b("self_attn.o_proj"),
          p + "mlp/gating_einsum/lora_a": np.stack([a("mlp.gate_proj"), a("mlp.up_proj")]),
          p + "mlp/gating_einsum/lora_b": np.stack([b("mlp.gate_proj"), b("mlp.up_proj")]),
          p + "mlp/linear/lora_a": a("mlp.down_proj"),
          p + "mlp/linear/lora_b": b("mlp.down_proj")}


def adapter_name(path: str) -> str:
  """"layer_0/attn/q_einsum/adapter/lora_a" (a state path, official) -> "layer_0/attn/q_einsum/lora_a"."""
  return path.replace("/adapter/", "/")


def max_diffs(got: dict, want: dict) -> tuple[float, float]:
  """(max abs difference, max of abs difference / the tensor's largest entry) over all arrays."""
  absd = [float(np.abs(np.asarray(got[k]) - want[k]).max()) for k in want]
  rel = [d / float(np.abs(want[k]).max()) for d, k in zip(absd, want)]
  return max(absd), max(rel)


# The tiny batch has fewer rows than SPLIT_GATING_ROWS; 1 sends it down the other GeGLU path (two matmuls
# on slices of the gating weight, activations (2, B, T, F)), which must match the reference as well.
GATING_PATHS = pytest.mark.parametrize("split_rows", [transformer.SPLIT_GATING_ROWS, 1], ids=["one_matmul", "sliced"])


@GATING_PATHS
@pytest.mark.parametrize("name", NAMES)
def test_full_fine_tuning_loss_and_every_gradient_match_transformers(name, split_rows, tmp_path, monkeypatch):
  monkeypatch.setattr(transformer, "SPLIT_GATING_ROWS", split_rows)
  model = build(name)
  batch, ref = batch_of(name)
  graphdef, params = nnx.split(model)
  loss, grads = jax.value_and_grad(optim.loss_fn)(params, graphdef, batch)
  np.testing.assert_allclose(float(loss), ref["loss_full"], **TOL)
  want = hf_grads_in_our_layout(name, tmp_path)
  got = {k: np.asarray(v) for k, v in flat_params(grads).items()}
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], **TOL, err_msg=f"{name} {key}")
  absd, rel = max_diffs(got, want)
  assert rel < 1e-4, (name, absd, rel)  # also relative to each gradient's scale, not only atol


@GATING_PATHS
@pytest.mark.parametrize("name", NAMES)
def test_lora_loss_and_every_adapter_gradient_match_peft(name, split_rows, monkeypatch):
  monkeypatch.setattr(transformer, "SPLIT_GATING_ROWS", split_rows)
  model = build(name)
  batch, ref = batch_of(name)
  hf = np.load(TINY / name / "train_lora.npz")
  cfg = model.config
  values, want = {}, {}
  for i in range(cfg.num_layers):
    values.update(peft_to_ours(lambda m, x: hf[f"model.layers.{i}.{m}.lora_{x}.weight"], cfg, i))
    want.update(peft_to_ours(lambda m, x: hf[f"model.layers.{i}.{m}.lora_{x}.grad"], cfg, i))
  lora.attach(model, lora.LoraConfig(rank=4, alpha=8), values)
  graphdef, trainable, base = lora.split(model)
  loss, grads = jax.value_and_grad(optim.loss_fn)(trainable, graphdef, batch, frozen=base)
  np.testing.assert_allclose(float(loss), ref["loss_lora"], **TOL)
  got = {adapter_name(k): np.asarray(v) for k, v in flat_params(grads).items()}
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], **TOL, err_msg=f"{name} {key}")
  absd, rel = max_diffs(got, want)
  assert rel < 1e-4, (name, absd, rel)

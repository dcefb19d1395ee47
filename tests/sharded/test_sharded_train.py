"""Sharded training equals one device, on 8 simulated CPU devices: several optimizer steps of full
fine-tuning and of LoRA on the meshes 1x8, 2x4 and 8x1 give the one-device losses and final params within
1e-5, and each device holds about 1/8 of the params and the optimizer state (FSDP over `data`, model
parallel over `model`, sharding.TRAINING). The CLI's --mesh runs the same way."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma_jax as gj
from gemma_jax import lora, optim, trainer
from gemma_jax.recipe import Recipe
from gemma_jax.configs import TINY_PRESETS
from gemma_jax.sharding import TRAINING, Layout
from gemma_jax.transformer import flat_params
from test_train import save_tiny_base, task_rows, write_jsonl

MESHES = ["data=1,model=8", "data=2,model=4", "data=8,model=1"]
# Every matrix dimension a multiple of 8 (and K = 8 kv heads), so FSDP x model parallelism can split every
# matrix 8 ways and the per-device bytes can be checked against 1/8; local/global layers and QK-norm kept.
CONFIG = TINY_PRESETS["tiny_gemma3_qk"].replace(vocab_size=256, embed_dim=48, hidden_dim=64, num_heads=8,
                                                 num_kv_heads=8)
STEPS = 3


def batches(seed: int = 0, rows: int = 8, t: int = 12) -> list[optim.TrainBatch]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(STEPS):
    positions = np.tile(np.arange(t, dtype=np.int32), (rows, 1))
    positions[3, 8:] = -1  # a padded row
    targets = (positions >= 0).astype(np.float32)
    targets[:, :4] = 0.0  # a prompt that is not trained on
    out.append(optim.TrainBatch(rng.integers(0, CONFIG.vocab_size, (rows, t)).astype(np.int32), positions,
                                (positions >= 0).astype(np.int32), targets))
  return out


def run(method: str, spec: str | None):
  """STEPS updates; returns (losses, final trainable params as {path: np array}, per-device bytes, total)."""
  model = gj.Model.random(CONFIG, seed=3)
  module = nnx.merge(model.graphdef, model.params)
  if method == "lora":
    lora.apply(module, lora.LoraConfig(rank=4, alpha=8.0), seed=1)
    graphdef, params, frozen = lora.split(module)
  else:
    (graphdef, params), frozen = nnx.split(module), None
  layout = Layout.of(spec, TRAINING) if spec else None
  if layout is not None:
    params = layout.shard_params(params)
    frozen = None if frozen is None else layout.shard_params(frozen)
  # eps 1e-6 instead of Adam's usual 1e-8: Adam's update g / (|g| + eps) has slope lr * eps / (|g| + eps)^2,
  # which for the gradients that nearly cancel to zero turns float summation-order noise into visible update
  # differences (measured: layer_0/attn/q_einsum/w[1, 3, 7] has g = -1.39e-7 at the first step while the
  # mean |g| is 8e-3; with eps 1e-8 one update moved 0.93 lr, and the 8-device sum's ~1e-8 rounding moved
  # the param 3.6e-5 after 3 steps). The gradients themselves agree within 1e-5 (test_sharded_tiny.py).
  opt = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, steps=10, weight_decay=0.01, eps=1e-6))
  opt_state = jax.jit(opt.init, out_shardings=trainer.opt_shardings(opt, params, layout))(params)
  shardings = None
  if layout is not None:
    shardings = (jax.tree.map(lambda x: x.sharding, params), jax.tree.map(lambda x: x.sharding, opt_state),
                 layout.replicated())
  step = optim.make_train_step(graphdef, opt, shardings=shardings)
  losses = []
  for b in batches():
    arrays = trainer.device_batches([_numpy_batch(b)], layout)
    params, opt_state, metrics = step(params, opt_state, frozen, arrays)
    losses.append(float(metrics.loss))
  held = {d: 0 for d in jax.devices()}
  total = 0
  for x in jax.tree.leaves((params, opt_state)):
    total += x.nbytes
    for shard in x.addressable_shards:
      held[shard.device] += shard.data.nbytes
  final = {k: np.asarray(v) for k, v in flat_params(params).items()}
  return losses, final, held, total, (params, opt_state)


def _numpy_batch(b: optim.TrainBatch):
  from gemma_jax.data import Batch  # noqa: PLC0415

  return Batch(*(np.asarray(x) for x in b))


@pytest.fixture(scope="module", params=["full", "lora"])
def one_device(request):
  return request.param, run(request.param, None)


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_training_equals_one_device(one_device, spec, capsys):
  method, (want_losses, want, _, _, _) = one_device
  losses, got, held, total, state = run(method, spec)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-5)
  assert got.keys() == want.keys()
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-5, err_msg=f"{method} {spec} {path}")
  # Gradients and optimizer state live where the params do: Adam's moments sharded like their params.
  params, opt_state = state
  param_specs = {tuple(x.shape): x.sharding.spec for x in jax.tree.leaves(params)}
  for x in jax.tree.leaves(opt_state):
    if x.ndim:
      assert x.sharding.spec == param_specs[tuple(x.shape)], (method, spec, x.shape)
  with capsys.disabled():
    print(f"\n{method} {spec}: params + optimizer state {total} bytes; per device "
          f"{min(held.values())}..{max(held.values())} bytes ({max(held.values()) / total:.3f} of the total)")
  if method == "full":  # LoRA's A/B have rank 4: too small to split 8 ways, and that is fine
    assert max(held.values()) <= total / 8 * 1.05


def test_cli_mesh_training_equals_one_device(tmp_path):
  base = save_tiny_base(tmp_path / "base")
  train = write_jsonl(tmp_path / "train.jsonl", task_rows(24, 0))
  finals = []
  for i, mesh in enumerate([None, "data=2,model=4"]):
    recipe = Recipe(data=str(train), method="lora", steps=4, batch_size=4, seq_len=32, learning_rate=3e-3,
                    save_every=2, mesh=mesh, adam_eps=1e-6)  # eps: see run()
    out = tmp_path / f"run{i}"
    r = trainer.start(recipe, out, base, resume=False)
    trainer.fit(r, out)
    trainer.export(r, out)
    finals.append(flat_params(gj.load(out / "final").params))
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    finals[-1]["losses"] = np.asarray(losses)
  for path in finals[0]:
    np.testing.assert_allclose(np.asarray(finals[1][path]), np.asarray(finals[0][path]), rtol=1e-5, atol=1e-5,
                               err_msg=path)

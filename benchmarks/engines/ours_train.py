"""gemma_jax training runner (Python 3.12 venv with gemma_jax importable): python ours_train.py SPEC.json OUT.json
(protocol: train_common.py).

The model and the step are built as the train CLI builds them (gemma_jax.trainer.prepare and fit), minus
the data files: gj.load(ckpt, dtype="float32") (the float32 masters), for LoRA lora.apply(module,
LoraConfig(rank, alpha)) on the recipe's default targets (q_einsum, kv_einsum, attn_vec_einsum,
gating_einsum, linear: q, k, v, o, gate, up, down) and nnx.split(module, nnx.LoRAParam, ...) into trainable
and frozen state; for full, every param trainable. optim.make_optimizer(OptimConfig(lr, clip 1.0, weight
decay 0)) and optim.make_train_step(graphdef, optimizer, dtype=compute dtype, remat=False), called on one
microbatch (A = 1), LoRA's frozen base cast to the compute dtype once (optim.frozen_for_step, the float32
base kept as trainer.fit keeps it), with positions 0..T-1, one segment per row and every position after the first a target.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo root: gemma_jax
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import train_common  # noqa: E402


class Engine:

  def setup(self):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import gemma_jax as gj
    from gemma_jax import optim
    self.jax, self.jnp, self.np, self.nnx, self.gj, self.optim = jax, jnp, np, nnx, gj, optim
    jax.devices()  # start the runtime

  def load(self, spec):
    jax, jnp, np, nnx, optim = self.jax, self.jnp, self.np, self.nnx, self.optim
    self.spec = spec
    base = self.gj.load(spec["ckpt"], dtype="float32")
    self.param_count = base.config.param_count()
    self.param_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(base.params))
    module = nnx.merge(base.graphdef, base.params)
    del base
    if spec["method"] == "lora":
      from gemma_jax import lora, recipe
      cfg = lora.LoraConfig(rank=spec["lora"]["rank"], alpha=spec["lora"]["alpha"],
                            targets=recipe.Recipe.lora_targets)
      lora.apply(module, cfg, rngs=nnx.Rngs(0))
      self.graphdef, self.params, self.frozen = nnx.split(module, nnx.LoRAParam, ...)
    else:
      self.graphdef, self.params = nnx.split(module)
      self.frozen = None
    del module
    optimizer = optim.make_optimizer(optim.OptimConfig(learning_rate=spec["learning_rate"], warmup=0, steps=10_000,
                                                       weight_decay=0.0, clip=1.0))
    self.opt_state = jax.jit(optimizer.init)(self.params)
    dtype = jnp.dtype(spec["dtype"])
    self.step_fn = optim.make_train_step(self.graphdef, optimizer, dtype=dtype, remat=False)
    # As trainer.fit: LoRA's base cast to the compute dtype once; the float32 base is kept (the merge uses it).
    self.frozen_step = optim.frozen_for_step(self.frozen, dtype)
    tokens = np.asarray(spec["tokens"], np.int32)[None]  # (A=1, B, T)
    targets = np.ones(tokens.shape, np.float32)
    targets[..., 0] = 0.0  # nothing predicts BOS
    self.batch = optim.TrainBatch(
        tokens=jnp.asarray(tokens), positions=jnp.asarray(np.broadcast_to(np.arange(tokens.shape[-1], dtype=np.int32),
                                                                          tokens.shape)),
        segments=jnp.ones(tokens.shape, jnp.int32), targets=jnp.asarray(targets))
    jax.block_until_ready((self.params, self.frozen, self.frozen_step, self.opt_state, self.batch))

  def step(self):
    self.params, self.opt_state, m = self.step_fn(self.params, self.opt_state, self.frozen_step, self.batch)
    self.jax.block_until_ready((self.params, self.opt_state))
    return float(m.loss)

  def info(self):
    import flax
    import jax
    leaves = lambda t: jax.tree.leaves(t)
    trainable = leaves(self.params)
    return {
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "python": sys.version.split()[0]},
        "param_count": self.param_count,
        "params_bytes": self.param_bytes,
        "trainable_count": sum(int(x.size) for x in trainable),
        "trainable_bytes": sum(int(x.nbytes) for x in trainable),
        "opt_state_bytes": sum(int(x.nbytes) for x in leaves(self.opt_state)),
        "settings": f"optim.make_train_step(dtype={self.spec['dtype']}, remat=False), float32 masters, "
                    f"{jax.devices()[0].platform} x{jax.device_count()}",
    }


if __name__ == "__main__":
  train_common.main(Engine)

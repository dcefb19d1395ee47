"""gemma_jax runner (Python 3.12 venv with gemma_jax importable): python ours.py SPEC.json OUT.json

Generation goes through the public API, Model.generate_ids(..., stop_ids=[]); prefill alone through
gemma_jax.decode.Decoder.prefill with a fresh gemma_jax.cache.init_cache, sized as generate_ids would size it
(cache_len = next power of two >= prompt + new tokens). The long-prompt row prefills through
gemma_jax.engine.start, the path Model.start and generate take.
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo root: gemma_jax
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402


def pow2_bucket(n: int, minimum: int = 32) -> int:
  return max(minimum, 1 << max(n - 1, 0).bit_length())


class Engine:

  def setup(self):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import gemma_jax as gj
    from gemma_jax import cache as gcache
    from gemma_jax import decode
    self.jax, self.jnp, self.np, self.gj, self.gcache, self.decode = jax, jnp, np, gj, gcache, decode
    jax.devices()  # start the runtime

  def load(self, spec):
    jax, gj = self.jax, self.gj
    self.spec = spec
    self.model = gj.load(spec["ckpt"], dtype=spec["dtype"])
    jax.block_until_ready(self.model.params)

  def generate(self, prompts, n):
    return self.model.generate_ids(prompts, max_new_tokens=n, stop_ids=[])

  def prefill(self, ids):
    np, jnp = self.np, self.jnp
    cfg = self.model.config
    t = pow2_bucket(len(ids))
    cache_len = min(pow2_bucket(len(ids) + self.spec["new_tokens"]), cfg.max_seq_len)
    tokens = np.zeros((1, t), np.int32)
    positions = np.full((1, t), -1, np.int32)
    tokens[0, :len(ids)] = ids
    positions[0, :len(ids)] = np.arange(len(ids))
    cache = self.gcache.init_cache(cfg, 1, cache_len)
    out = self.model.decoder.prefill(self.model.params, jnp.asarray(tokens), jnp.asarray(positions), cache)
    self.jax.block_until_ready(out)

  def prefill_long(self, ids):
    """The long-prompt row: the user's path, engine.start (Model.start), for one new token."""
    from gemma_jax import engine
    state = engine.start(self.model.engine, [ids], 1)
    self.jax.block_until_ready(state)

  def info(self):
    import flax
    import jax
    cfg = self.model.config
    dtype = self.spec["dtype"]
    params_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(self.model.params))
    n = self.spec["new_tokens"]
    p = len(self.spec["decode_prompts"][0])
    b = len(self.spec["decode_prompts"])
    dec_cache_len = min(pow2_bucket(p + n), cfg.max_seq_len)
    pre_cache_len = min(pow2_bucket(len(self.spec["prefill_ids"]) + n), cfg.max_seq_len)
    return {
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "python": sys.version.split()[0]},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "param_count": cfg.param_count(),
        "params_bytes": params_bytes,
        "decode_cache_len": dec_cache_len,
        "cache_bytes_b1": self.gcache.cache_bytes(cfg, 1, dec_cache_len, dtype),
        "cache_bytes_bB": self.gcache.cache_bytes(cfg, b, dec_cache_len, dtype),
        "prefill_cache_len": pre_cache_len,
        # the long-prompt row's cache: engine.start's default for the prompt + 1 new token
        "long_cache_bytes": self.gcache.cache_bytes(
            cfg, 1, min(pow2_bucket(len(self.spec["prefill_ids"]) + 1), cfg.max_seq_len), dtype),
        "settings": f"generate_ids(stop_ids=[]); decode cache_len {dec_cache_len}, prefill cache_len "
                    f"{pre_cache_len}; prompts padded to pow2 >= 32",
    }


if __name__ == "__main__":
  common.main(Engine)

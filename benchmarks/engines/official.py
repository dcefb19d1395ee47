"""Official `gemma` (PyPI 4.0.1, `gm` API) runner, in its own Python 3.12 venv (see benchmarks/README.md):

  python official.py SPEC.json OUT.json

Model: gm.nn.Gemma3_270M; sampling: gm.text.Sampler (its prefill, then its jitted while_loop), greedy.
Weights: our converted Orbax checkpoint, read with plain orbax (StandardCheckpointer) and re-nested into
gm's tree: our names are the official ones except that gm's MLP params are bare leaves
(`mlp/gating_einsum`, `mlp/linear`) where ours end in `/w`, and our projections are D-major (transposed
back here: q_einsum (D, N, H) -> (N, D, H), kv_einsum (D, K, 2, H) -> (2, K, D, H), gating_einsum
(F, 2, D) -> (2, F, D)). Every shape is checked against
jax.eval_shape(model.init). bfloat16: the params are cast (gm computes in the params' dtype; its KV cache
takes the dtype of the first param leaf).

Two thin changes to gm.text.Sampler, both in a subclass and neither in the timed math:
  * prompts are given as token ids (so that every engine sees exactly the same ids) instead of text;
  * the end tokens are replaced by an id that never occurs, so every row generates exactly n tokens
    (gm always stops at <eos>/<end_of_turn>; the benchmark runs without stop tokens for every engine).
Sampler settings: pad_length left at gm's default (256, 512, 1024); max_out_length = the decode new-token
count (static output buffer; max_new_tokens is dynamic); cache_length per workload, the smallest multiple
of 128 that gm accepts for it (its prefill slices the cache to the padded prompt bucket, and its loop stops
when end_index >= cache_length - 1). gm's default cache_length (4096) would make every decode step read a
4096-slot KV cache on all 18 layers.
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402

PAD_LENGTHS = (256, 512, 1024)  # gm.text.Sampler's default pad_length


def _pad_bucket(n: int) -> int:
  return next((p for p in PAD_LENGTHS if n <= p), n)


def _cache_length(prompt_len: int, new_tokens: int) -> int:
  need = max(_pad_bucket(prompt_len), prompt_len + new_tokens + 2)
  return -(-need // 128) * 128


class Engine:

  def setup(self):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from gemma import gm
    from gemma.gm.data import _functional
    from gemma.gm.text import _prefill, _sampler_loop
    self.jax, self.jnp, self.np, self.gm, self._prefill = jax, jnp, np, gm, _prefill
    self.ocp, self._functional, self._sampler_loop = ocp, _functional, _sampler_loop
    gm.nn.Gemma3_270M, gm.text.Sampler, gm.text.Gemma3Tokenizer  # noqa: B018 (gm imports lazily)
    jax.devices()  # start the runtime

  def load(self, spec):
    jax, jnp, gm, ocp = self.jax, self.jnp, self.gm, self.ocp
    _functional, _sampler_loop = self._functional, self._sampler_loop
    self.spec = spec
    dtype = jnp.dtype(spec["dtype"])

    self.model = gm.nn.Gemma3_270M(dtype=dtype)
    raw = ocp.StandardCheckpointer().restore(os.path.join(spec["ckpt"], "params"))
    expected = jax.eval_shape(lambda: self.model.init(jax.random.key(0), tokens=jnp.zeros((1, 4), jnp.int32)))
    params = {}
    for layer, sub in raw.items():
      params[layer] = {}
      for mod, leaves in sub.items():
        if mod == "attn":
          leaves = dict(leaves, q_einsum={"w": leaves["q_einsum"]["w"].transpose(1, 0, 2)},
                        kv_einsum={"w": leaves["kv_einsum"]["w"].transpose(2, 1, 0, 3)})
        if mod == "mlp":
          leaves = {k: v["w"] for k, v in leaves.items()}  # gm: mlp/gating_einsum, mlp/linear (no /w)
          leaves["gating_einsum"] = leaves["gating_einsum"].transpose(1, 0, 2)
        params[layer][mod] = leaves
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    want = jax.tree.map(lambda x: (x.shape, dtype), expected["params"])
    if got != want:
      raise SystemExit(f"param tree mismatch:\n got {got}\n want {want}")
    del raw
    self.params = params
    jax.block_until_ready(self.params)
    self.tokenizer = gm.text.Gemma3Tokenizer(path=os.path.join(spec["ckpt"], "tokenizer.model"))

    class IdsSampler(gm.text.Sampler):
      """gm.text.Sampler fed with token ids, with no end tokens (see module docstring)."""

      def _tokenize_prompts(self, prompt, *, add_bos, pad_length=None):
        rows = [list(map(int, p)) for p in prompt]
        return jnp.asarray(_functional.pad(rows, max_length=pad_length or max(map(len, rows))))

      def _initialize_sampler_loop(self, sampling):
        return _sampler_loop.SamplerLoop(
            model=self.model, end_tokens=(-7,), forbidden_tokens=self._normalized_forbidden_tokens,
            sampling=sampling, cache_length=self.cache_length, special_tokens=self.tokenizer.special_tokens)

    self.IdsSampler = IdsSampler
    self._samplers = {}

  def sampler(self, cache_length):
    if cache_length not in self._samplers:
      self._samplers[cache_length] = self.IdsSampler(
          model=self.model, params=self.params, tokenizer=self.tokenizer,
          sampling=self.gm.text.Greedy(), cache_length=cache_length,
          max_out_length=max(self.spec["new_tokens"], self.spec["check_tokens"]))
    return self._samplers[cache_length]

  def generate(self, prompts, n):
    longest = max(map(len, prompts))
    # One sampler (one cache length) for all decode-shaped calls: n=1 and n=N share compiled shapes.
    s = self.sampler(_cache_length(longest, max(n, self.spec["new_tokens"])))
    out = s.sample([list(p) for p in prompts], max_new_tokens=n, rng=0, return_state=True)
    toks = self.np.asarray(out.state.predicted_tokens)
    return [row[:n].tolist() for row in toks]

  def prefill(self, ids):
    jnp = self.jnp
    s = self.sampler(_cache_length(len(ids), self.spec["new_tokens"]))
    inputs = s._get_inputs(prompt=[list(ids)], images=None, add_bos=True, has_batch_dim=True,
                           sharding=None)
    state = self._prefill.prefill(
        model=s.model, params=s.params, input=inputs, last_state=None, cache_length=s.cache_length,
        pad_length=s.pad_length, rng=self.jax.random.key(0), sharding=None,
        max_out_length=s.max_out_length)
    self.jax.block_until_ready(state)

  def info(self):
    import importlib.metadata as md
    import jax
    return {
        "versions": {"gemma": md.version("gemma"), "jax": jax.__version__, "flax": md.version("flax"),
                     "python": sys.version.split()[0]},
        "settings": "gm.text.Sampler(Greedy, pad_length (256,512,1024), max_out_length "
                    f"{max(self.spec['new_tokens'], self.spec['check_tokens'])}); cache_length "
                    f"{sorted(self._samplers)} (per workload); ids in, no end tokens",
    }


if __name__ == "__main__":
  common.main(Engine)

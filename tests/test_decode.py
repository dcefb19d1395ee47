"""Cached decoding equals the full forward, far past the sliding window, for every tiny family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_jax as gj
from gemma_jax.cache import init_cache, layer_slots
from gemma_jax.configs import TINY_PRESETS
from gemma_jax.errors import GemmaError
from gemma_jax.transformer import flat_params, set_flat_params


def random_model(name: str, seed: int = 0) -> gj.Model:
  """A tiny model whose every param, norms included, is random (std 0.3), so no mechanism hides."""
  model = gj.Model.random(TINY_PRESETS[name], seed=seed)
  rng = np.random.default_rng(seed)
  flat = flat_params(model.params)  # drawn in sorted official-name order, whatever the module tree's order
  set_flat_params(model.params, {p: jnp.asarray(0.3 * rng.standard_normal(flat[p].shape), flat[p].dtype)
                                 for p in sorted(flat)})
  return model


@pytest.fixture(scope="module", params=sorted(TINY_PRESETS))
def model(request):
  return random_model(request.param)


def test_greedy_tokens_equal_full_forward_argmax_at_every_step(model):
  prompt = [2, 17, 33, 5, 101, 7]
  new = model.generate_ids([prompt], max_new_tokens=3 * 5 + 6, stop_ids=[])[0]  # window 5: 3x past it
  assert len(new) == 21
  full = model.logits(prompt + new[:-1])
  np.testing.assert_array_equal(np.argmax(full[len(prompt) - 1:], axis=-1), new)


def test_chunked_prefill_and_steps_equal_full_forward(model):
  """Prefill chunks longer than the window, then single steps: the logits of every position agree."""
  ids = np.random.default_rng(1).integers(0, 251, size=(2, 29)).astype(np.int32)
  full = np.asarray(model.decoder.forward(model.params, jnp.asarray(ids),
                                   jnp.broadcast_to(jnp.arange(29), (2, 29))))
  cache = init_cache(model.config, 2, 32)
  start = 0
  for size in (11, 7, 1, 1, 9):
    pos = jnp.broadcast_to(jnp.arange(start, start + size), (2, size))
    last, cache = model.decoder.prefill(model.params, jnp.asarray(ids[:, start:start + size]), pos,
                                 cache)
    start += size
    np.testing.assert_allclose(last, full[:, start - 1], rtol=1e-5, atol=1e-5)


def test_ragged_batch_rows_equal_each_prompt_alone(model):
  prompts = [[2, 9, 8, 7], [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [2, 3]]
  batch = model.generate_ids(prompts, max_new_tokens=12, stop_ids=[])
  for p, row in zip(prompts, batch):
    assert row == model.generate_ids([p], max_new_tokens=12, stop_ids=[])[0]


def test_rows_stop_on_their_own(model):
  prompts = [[2, 9, 8, 7], [2, 40, 41]]
  free = model.generate_ids(prompts, max_new_tokens=10, stop_ids=[])
  stop = free[0][3]
  got = model.generate_ids(prompts, max_new_tokens=10, stop_ids=[stop])
  assert got[0] == free[0][:free[0].index(stop) + 1]
  if stop in free[1]:
    assert got[1] == free[1][:free[1].index(stop) + 1]
  else:
    assert got[1] == free[1]


def test_local_layers_get_window_sized_ring_buffers():
  cfg = TINY_PRESETS["tiny_gemma3_qk"]
  assert layer_slots(cfg, 64) == (5, 5, 5, 5, 5, 64, 5)
  assert layer_slots(cfg, 3) == (3,) * 7
  cache = init_cache(cfg, 2, 64)
  assert [c.k.shape for c in cache][:6] == [(2, 5, 2, 16)] * 5 + [(2, 64, 2, 16)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[]]), "empty prompt"),
    (dict(prompts=[[2, 251]]), "token id 251 at position 1 of the prompt is outside the vocabulary"),
    (dict(prompts=[[2, -1]]), "token id -1 at position 1"),
    (dict(prompts=[[2, 5]], max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(prompts=[[2] * 500], max_new_tokens=20), "exceeds the model's context of 512"),
    (dict(prompts=[]), "no prompts"),
])
def test_bad_generation_input_is_named(kwargs, message):
  model = gj.Model.random(TINY_PRESETS["tiny_gemma1_mqa"])
  with pytest.raises(GemmaError, match=message):
    model.generate_ids(**kwargs)


def test_fresh_prefill_skips_the_empty_cache_with_the_same_result(model):
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 251, size=(2, 13)), jnp.int32)
  pos = jnp.asarray([list(range(13)), list(range(9)) + [-1] * 4], jnp.int32)
  a, ca = model.decoder.prefill(model.params, ids, pos, init_cache(model.config, 2, 32), fresh=False)
  b, cb = model.decoder.prefill(model.params, ids, pos, init_cache(model.config, 2, 32), fresh=True)
  # Whole-model f32 comparison: the reductions differ in shape (the empty slots add exact zeros).
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for x, y in zip(jax.tree.leaves(ca), jax.tree.leaves(cb)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)

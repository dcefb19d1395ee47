"""The real Gemma 3 270M (GGUF from PyPI, converted by our importer) against goldens made once with an
independent implementation: transformers' Gemma3ForCausalLM loading the same GGUF in float32
(tests/reference/make_270m_goldens.py). Prompts run from 6 to 586 tokens, past the 512 sliding window."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA
from gemma_jax.cache import init_cache

GOLDEN = json.loads((DATA / "golden_270m.json").read_text())
PROMPTS = GOLDEN["prompts"]
IDS = [f"{len(p['ids'])}tok" for p in PROMPTS]


def test_golden_was_made_in_float32_by_transformers():
  assert GOLDEN["dtype"] == "float32" and "transformers" in GOLDEN["how_loaded"]
  assert max(len(p["ids"]) for p in PROMPTS) > 512


@pytest.mark.parametrize("prompt", PROMPTS, ids=IDS)
def test_tokenizer_matches_the_reference_ids(model_270m, prompt):
  assert model_270m.encode(prompt["text"]) == prompt["ids"]


@pytest.mark.parametrize("prompt", PROMPTS, ids=IDS)
def test_logits_at_every_position_match_golden(model_270m, prompt):
  logits = model_270m.logits(prompt["ids"])
  top_ids = np.asarray(prompt["topk_ids"])
  want = np.asarray(prompt["topk_logits"], np.float32)
  np.testing.assert_allclose(np.take_along_axis(logits, top_ids, axis=1), want, rtol=1e-4, atol=1e-6)
  # Our own top-k is the same set in the same order (no near-ties in these goldens).
  np.testing.assert_array_equal(np.argsort(-logits, axis=1)[:, :top_ids.shape[1]], top_ids)


@pytest.mark.parametrize("prompt", PROMPTS, ids=IDS)
def test_logprobs_match_golden(model_270m, prompt):
  # 1e-4 absolute in log space is 1e-4 relative in probability.
  np.testing.assert_allclose(model_270m.logprobs(prompt["ids"]), prompt["logprobs"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("prompt", PROMPTS, ids=IDS)
def test_greedy_32_tokens_identical(model_270m, prompt):
  got = model_270m.generate_ids([prompt["ids"]], max_new_tokens=32, stop_ids=[])[0]
  assert got == prompt["greedy"]


def test_cached_decoding_equals_full_forward_past_the_window(model_270m):
  ids = PROMPTS[-1]["ids"]  # 586 tokens; window 512
  n = len(ids)
  full = model_270m.logits(ids)
  cache = init_cache(model_270m.config, 1, 1024)
  start = 0
  for size in (300, 250, 1, 1, 1, n - 553):
    pos = jnp.arange(start, start + size, dtype=jnp.int32)[None]
    last, cache = model_270m.decoder.prefill(model_270m.params,
                                           jnp.asarray([ids[start:start + size]], jnp.int32), pos, cache)
    start += size
    np.testing.assert_allclose(last[0], full[start - 1], rtol=1e-4, atol=1e-4)
  assert start == n
  # Local layers hold exactly the last 512 positions in their ring buffers.
  assert sorted(np.asarray(cache[0].pos[0]).tolist()) == list(range(n - 512, n))


def test_batched_prompts_match_the_golden_continuations(model_270m):
  prompts = [p["ids"] for p in PROMPTS[:3]]
  got = model_270m.generate_ids(prompts, max_new_tokens=32, stop_ids=[])
  assert got == [p["greedy"] for p in PROMPTS[:3]]

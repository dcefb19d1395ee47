"""Long inputs: the blockwise attention path and chunked prefill against Hugging Face transformers, and on
the real Gemma 3 270M at 16K tokens.

Tiny models (tests/reference/make_long_goldens.py, long.npz): 240 tokens, 48 times the sliding window (5),
the most the tiny configs' context (256) allows. Here the thresholds are lowered so that these short
inputs take the long-input paths: every attention call blockwise, with blocks (32 queries x 36 keys) that
do not divide the lengths and are longer than the window, and prompts prefilled 64 tokens per call (224
tokens: 4 calls, the last one partly padding).
"""

import resource
import time

import jax
import numpy as np
import pytest

import gemma_jax as gj
from conftest import DATA
from gemma_jax import attention, engine
from gemma_jax.configs import get_preset
from gemma_jax.sampling import make_sampling

TINY = DATA / "hf_tiny"
# The default suite runs Gemma 2 (soft-cap, sliding window, GQA) through the blockwise forward; the rest,
# several compiled programs per model, is marked slow.
slow = pytest.mark.slow
NAMES = [pytest.param("gemma_mqa", marks=slow), "gemma2_gqa", pytest.param("gemma3_qk", marks=slow)]


@pytest.fixture
def long_paths(monkeypatch):
  """Every attention call blockwise, prefill in chunks of 64; jit caches cleared on both sides so that
  no program traced under other constants is reused."""
  jax.clear_caches()
  monkeypatch.setattr(attention, "BLOCKWISE_MIN_KEYS", 0)
  monkeypatch.setattr(attention, "BLOCK_Q", 32)
  monkeypatch.setattr(attention, "BLOCK_K", 36)
  monkeypatch.setattr(engine, "prefill_chunk", lambda cfg, rows: 64)
  yield
  jax.clear_caches()


@pytest.fixture(scope="module", params=NAMES)
def tiny(request, tmp_path_factory):
  ckpt = gj.convert(TINY / request.param, tmp_path_factory.mktemp(request.param) / "ckpt")
  return request.param, gj.load(ckpt), np.load(TINY / request.param / "long.npz")


def test_long_sequences_match_transformers_blockwise(tiny, long_paths):
  """Full forward, no cache: blockwise attention far past the window."""
  name, model, ref = tiny
  logits = model.logits(ref["input_ids"][0].tolist())
  np.testing.assert_allclose(logits[ref["at"]], ref["logits"], rtol=1e-4, atol=1e-4, err_msg=name)


@slow
def test_chunked_prefill_and_generation_match_transformers(tiny, long_paths):
  """A 224-token prompt prefilled in 4 chunks (each attending to the ring buffers plus itself), then 16
  greedy tokens through the cache."""
  name, model, ref = tiny
  prompt = ref["prompt_ids"][0].tolist()
  want = ref["output_ids"][0, len(prompt):].tolist()
  state = model.start([prompt], max_new_tokens=len(want))
  np.testing.assert_allclose(np.asarray(state.logits)[0], ref["step_logits"][0], rtol=1e-4, atol=1e-4, err_msg=name)
  got = model.generate_ids([prompt], max_new_tokens=len(want), stop_ids=[])[0]
  assert got == want, name


@slow
def test_chunked_feed_of_a_batch_equals_one_call(tiny, long_paths):
  """Rows of different lengths fed in chunks of 64: a row that ends early keeps its logits from its last
  chunk (rows of 5, 160 and 60 ids after a 40-id prompt)."""
  name, model, ref = tiny
  ids = ref["input_ids"][0].tolist()
  state = model.start([ids[:40]] * 3, max_new_tokens=200)
  state = model.feed(state, [ids[40:45], ids[40:200], ids[40:100]])
  full = model.logits(ids[:200])
  for row, last in enumerate((44, 199, 99)):
    np.testing.assert_allclose(np.asarray(state.logits)[row], full[last], rtol=1e-4, atol=1e-4, err_msg=name)


def test_prefill_chunk_follows_the_budget():
  """The chunk is the largest power of two whose estimated activations fit the budget, per row."""
  cfg = get_preset("gemma3_270m")
  per_token = 4 * (3 * 2048 + 4 * 640 + 2 * (4 + 1) * 256) * engine.XLA_TEMP_FACTOR  # float32
  for rows in (1, 3, 8):
    c = engine.prefill_chunk(cfg, rows)
    assert c & (c - 1) == 0 and c * rows * per_token <= engine.PREFILL_BUDGET_BYTES < 2 * c * rows * per_token
  assert engine.prefill_chunk(cfg, 1) == 2048
  assert engine.prefill_chunk(cfg, 10**6) == engine.MIN_BUCKET  # never below the smallest bucket


def heldout_ids(model, n):
  """n ids of real text: BOS and the held-out text's ids, repeated."""
  text = model.encode((DATA / "heldout_en.txt").read_text(), add_bos=False)
  return ([model.encode("", add_bos=True)[0]] + text * (n // len(text) + 1))[:n]


@pytest.mark.slow
def test_270m_16k_prompt_chunked_equals_one_shot_and_2k_equals_exact(model_270m, monkeypatch):
  """A 16K-token prompt prefilled in chunks (2048 tokens per call on the 270M) and in one blockwise call:
  the same next-token logits and greedy continuation. At 2K, where the exact path fits, chunked blockwise
  prefill (512 per call) equals one exact call."""
  ids = heldout_ids(model_270m, 16384)

  def prefill(prompt, chunk=None, exact=False):
    t0 = time.perf_counter()
    jax.clear_caches()
    with monkeypatch.context() as m:
      if chunk is not None:
        m.setattr(engine, "prefill_chunk", lambda cfg, rows: chunk)
      if exact:
        m.setattr(attention, "BLOCKWISE_MIN_KEYS", 1 << 30)
      state = model_270m.start([prompt], max_new_tokens=8)
      logits = np.asarray(state.logits)[0]
      new = model_270m.run(state, 8, make_sampling(1, temperature=0.0), stop_ids=[])[0][0]
    jax.clear_caches()
    # The process's peak RSS so far (the report of issue 12 quotes it; pytest -s shows it).
    print(f"{len(prompt)} tokens, chunk {chunk}, exact {exact}: peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB, {time.perf_counter() - t0:.0f} s")
    return logits, new

  chunked, chunked_new = prefill(ids)
  one, one_new = prefill(ids, chunk=16384)
  np.testing.assert_allclose(chunked, one, rtol=1e-4, atol=1e-4)
  assert chunked_new == one_new
  short, short_new = prefill(ids[:2048], chunk=512)
  exact, exact_new = prefill(ids[:2048], exact=True)
  np.testing.assert_allclose(short, exact, rtol=1e-4, atol=1e-4)
  assert short_new == exact_new

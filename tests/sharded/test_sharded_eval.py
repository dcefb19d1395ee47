"""Evaluation scoring (evaluate.score_rows through Decoder.score) on 8 simulated CPU devices equals one
device: rows padded to the data axis, logits split over the vocabulary, the chunked output layer."""

import numpy as np
import pytest

import gemma_jax as gj
from gemma_jax import evaluate
from gemma_jax.configs import TINY_PRESETS
from gemma_jax.evaluate import Row

# N, F, V and D multiples of 8 (as in test_sharded_tiny.py), so the model axis really splits them.
CONFIG = TINY_PRESETS["tiny_gemma3_qk"].replace(vocab_size=256, embed_dim=48, hidden_dim=64, num_heads=8,
                                                num_kv_heads=2)


@pytest.fixture(scope="module")
def model():
  return gj.Model.random(CONFIG, seed=5)


def rows() -> list[Row]:
  rng = np.random.default_rng(0)
  out = []
  for length in (9, 40, 3, 17, 26):
    ids = [2] + rng.integers(3, 256, size=length - 1).tolist()
    out.append(Row(tuple(ids), int(rng.integers(1, length))))
  return out


@pytest.mark.parametrize("mesh", ["data=1,model=8", "data=2,model=4", "data=8,model=1"])
def test_sharded_scores_equal_one_device(model, mesh):
  want = evaluate.score_rows(model, rows(), batch_size=3)  # 2 batches: 3 rows, then 2 (+ idle rows)
  got = evaluate.score_rows(model.shard(mesh), rows(), batch_size=3)
  for (lp, greedy), (lp1, greedy1) in zip(got, want):
    np.testing.assert_allclose(lp, lp1, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(greedy, greedy1)

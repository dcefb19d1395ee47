"""evaluate.py against hand-computed values."""

import math

import numpy as np
import pytest

from gemma_jax.errors import GemmaError
from gemma_jax.evaluate import perplexity


def test_perplexity_is_exp_of_the_negative_mean_logprob():
  lps = [math.log(0.5), math.log(0.25), math.log(0.125)]  # mean log p = log(1/4): perplexity 4
  got = perplexity(lps)
  assert got["tokens"] == 3
  assert got["mean_logprob"] == pytest.approx(math.log(0.25), rel=1e-12)
  assert got["perplexity"] == pytest.approx(4.0, rel=1e-12)
  # A float32 array (what Model.logprobs returns) gives the same numbers as its Python floats.
  arr = np.array([-0.5, -2.25, -1.0, -3.0], np.float32)
  assert perplexity(arr) == perplexity(arr.tolist())
  assert perplexity(arr)["perplexity"] == pytest.approx(math.exp(1.6875), rel=1e-12)


def test_perplexity_of_nothing_is_an_error():
  with pytest.raises(GemmaError, match="perplexity needs at least one scored token"):
    perplexity([])

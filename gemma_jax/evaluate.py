"""Evaluation: numbers computed from a model's outputs (for now, perplexity from per-token log-probs).

design.md gives this module log-likelihood requests, multiple choice and generation tasks as well; they
come here when they are written.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .errors import GemmaError


def perplexity(logprobs: Sequence[float] | np.ndarray) -> dict[str, float | int]:
  """Mean log-probability and perplexity of scored tokens.

  Args:
    logprobs: (N,) natural-log probabilities of each scored token given its prefix, e.g.
      Model.logprobs(ids) (N = len(ids) - 1: the first token is not scored).
  Returns:
    {"tokens": N, "mean_logprob": sum / N, "perplexity": exp(-sum / N)}, as Python numbers summed in
    float64 in token order.
  """
  values = [float(x) for x in np.asarray(logprobs, dtype=np.float64).reshape(-1)]
  if not values:
    raise GemmaError("perplexity needs at least one scored token, got no log-probabilities")
  mean = sum(values) / len(values)
  return {"tokens": len(values), "mean_logprob": mean, "perplexity": math.exp(-mean)}


__all__ = ["perplexity"]

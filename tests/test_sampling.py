"""Sampling keeps exactly the right tokens on constructed logits, reproducibly, per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.errors import GemmaError
from gemma_jax.sampling import filter_logits, make_sampling, next_token

PROBS = np.array([0.5, 0.3, 0.15, 0.05])  # sorted descending on purpose of reading; shuffled below
ORDER = np.array([2, 0, 3, 1])  # token ids holding PROBS[0..3]


def logits_of(probs=PROBS, order=ORDER, v=4):
  out = np.full((v,), -np.inf, np.float32)
  out[order] = np.log(probs)
  return jnp.asarray(out[None])


def kept(logits, **kw):
  s = make_sampling(logits.shape[0], **{"temperature": 1.0, **kw})
  return sorted(np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, s))[0])).tolist())


@pytest.mark.parametrize("top_p, ranks", [(1.0, [0, 1, 2, 3]), (0.5, [0]), (0.50001, [0, 1]), (0.8, [0, 1]),
                                          (0.80001, [0, 1, 2]), (0.95, [0, 1, 2]), (0.96, [0, 1, 2, 3]),
                                          (0.01, [0])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, ranks):
  assert kept(logits_of(), top_p=top_p) == sorted(ORDER[ranks].tolist())


@pytest.mark.parametrize("min_p, ranks", [(0.0, [0, 1, 2, 3]), (0.1, [0, 1, 2, 3]), (0.25, [0, 1, 2]),
                                          (0.31, [0, 1]), (0.61, [0]), (1.0, [0])])
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p, ranks):
  assert kept(logits_of(), min_p=min_p) == sorted(ORDER[ranks].tolist())


@pytest.mark.parametrize("top_k, ranks", [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 2, 3]), (9, [0, 1, 2, 3])])
def test_top_k(top_k, ranks):
  assert kept(logits_of(), top_k=top_k) == sorted(ORDER[ranks].tolist())


def test_top_p_applies_to_the_top_k_renormalised_mass():
  # After top-k 2 the kept mass renormalises to [0.625, 0.375]; top-p 0.7 then needs both.
  assert kept(logits_of(), top_k=2, top_p=0.7) == sorted(ORDER[[0, 1]].tolist())
  assert kept(logits_of(), top_k=2, top_p=0.6) == [ORDER[0]]


def test_temperature_sharpens_before_top_p():
  # At temperature 0.5 the probabilities become proportional to p^2: [0.69, 0.25, 0.06, 0.007].
  assert kept(logits_of(), temperature=0.5, top_p=0.9) == sorted(ORDER[[0, 1]].tolist())


def test_rows_have_their_own_settings():
  logits = jnp.concatenate([logits_of()] * 3)
  s = make_sampling(3, temperature=[1.0, 1.0, 0.0], top_k=[1, 0, 0], top_p=[1.0, 0.5, 1.0])
  f = np.isfinite(np.asarray(filter_logits(logits, s)))
  assert f[0].tolist() == f[1].tolist() == (np.arange(4) == ORDER[0]).tolist()
  assert f[2].all()  # greedy rows are not filtered: argmax decides


def test_top_k_one_and_temperature_zero_are_greedy():
  logits = jax.random.normal(jax.random.key(0), (5, 300))
  greedy = np.argmax(logits, axis=-1)
  for kw in (dict(temperature=0.0), dict(temperature=1.3, top_k=1), dict(temperature=0.7, top_p=1e-6)):
    got = next_token(logits, make_sampling(5, seed=[1, 2, 3, 4, 5], **kw), jnp.int32(0))
    np.testing.assert_array_equal(got, greedy)


def test_seeds_are_reproducible_and_matter():
  logits = jnp.zeros((4, 1000))
  s = make_sampling(4, temperature=1.0, seed=[7, 7, 8, 9])
  a = np.stack([np.asarray(next_token(logits, s, jnp.int32(t))) for t in range(20)])
  b = np.stack([np.asarray(next_token(logits, s, jnp.int32(t))) for t in range(20)])
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[:, 0], a[:, 1])  # same seed, same row draws, whatever the row
  assert (a[:, 0] != a[:, 2]).any() and (a[:, 2] != a[:, 3]).any()


def test_draws_follow_the_filtered_distribution():
  logits = jnp.broadcast_to(logits_of(v=4), (4000, 4))
  s = make_sampling(4000, temperature=1.0, top_p=0.8, seed=np.arange(4000))
  toks = np.asarray(next_token(logits, s, jnp.int32(3)))
  freq = np.bincount(toks, minlength=4) / 4000
  want = np.zeros(4)
  want[ORDER[:2]] = [0.5 / 0.8, 0.3 / 0.8]
  np.testing.assert_allclose(freq, want, atol=0.03)  # ~4 standard errors at n=4000


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(min_p=-0.5), r"min_p must be in \[0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(temperature=[0.5, 1.0, 2.0]), r"temperature must be one value or one per prompt \(2\)"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(seed=-3), r"seed must be in \[0, 2\*\*31\)"),
])
def test_bad_settings_are_named(kw, message):
  with pytest.raises(GemmaError, match=message):
    make_sampling(2, **kw)

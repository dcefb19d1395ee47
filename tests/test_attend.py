"""attend.blockwise (flash-style online softmax) against attend.exact (one softmax over every score).

Random tiny inputs in float32, every feature combination the model uses: GQA (K=2, G=3), a cache part
plus a chunk part, causal and sliding-window masks (windows shorter than a block too), Gemma 2's
soft-cap, empty cache slots (k_pos -1), padding queries (q_pos -1), packed-row segments, an int8 cache's
per-(row, slot, kv head) scales, block sizes that do and do not divide T and S, and the gradients.
Real queries must agree within 1e-5; padding queries (which see no key) only need to stay finite.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import attend
from gemma_jax.cache import Stored, quantize

B, T, S, K, G, H = 2, 37, 29, 2, 3, 8


def stored(rng, s, int8=False):
  k, v = (jnp.asarray(rng.normal(size=(B, s, K, H)) * 2, jnp.float32) for _ in range(2))
  if not int8:
    return Stored(k, v)
  (k8, ks), (v8, vs) = quantize(k), quantize(v)
  return Stored(k8, v8, ks, vs)


def case(seed, int8=False, cache=True, segments=False):
  rng = np.random.default_rng(seed)
  qg = jnp.asarray(rng.normal(size=(B, T, K, G, H)), jnp.float32)
  # row 0: a chunk at 30.. after a full cache; row 1: 5 padding queries, 4 empty cache slots
  q_pos = jnp.asarray(np.stack([np.arange(30, 30 + T), np.r_[np.arange(40, 40 + T - 5), -np.ones(5)]]), jnp.int32)
  k_pos = jnp.asarray(np.stack([np.arange(1, S + 1), np.r_[np.arange(11, 11 + S - 4), -np.ones(4)]]), jnp.int32)
  seg = None
  if segments:  # packed rows: three examples in row 0, two in row 1, positions restarting per example
    seg = jnp.asarray(np.stack([np.repeat([1, 2, 3], [10, 20, 7]), np.repeat([1, 2], [16, 21])]), jnp.int32)
    q_pos = jnp.asarray(np.stack([np.r_[np.arange(10), np.arange(20), np.arange(7)],
                                  np.r_[np.arange(16), np.arange(16), -np.ones(5)]]), jnp.int32)
  parts = [(stored(rng, T, int8), q_pos, seg)]
  if cache:
    parts.insert(0, (stored(rng, S, int8), k_pos, None))
  return qg, parts, q_pos, seg


def both(qg, parts, q_pos, seg, window, cap, bq, bk):
  e = attend.exact(qg, parts, q_pos, seg, window, cap, jnp.float32)
  b = attend.blockwise(qg, parts, q_pos, seg, window, cap, jnp.float32, bq, bk)
  return np.asarray(e), np.asarray(b)


def check(e, b, q_pos):
  assert np.isfinite(b).all() and np.isfinite(e).all()
  real = np.asarray(q_pos) >= 0
  np.testing.assert_allclose(b[real], e[real], rtol=1e-5, atol=1e-5)


# (window, soft-cap, block_q, block_k): 5, 7, 8 divide neither T=37 nor S=29; window 4 is shorter than every
# block, 60 longer than T + S; one block of everything (37, 29) and blocks larger than the input.
@pytest.mark.parametrize("int8, combos", [
    (False, ((None, None, 5, 7), (4, 2.0, 8, 8), (60, None, 64, 64))),
    (True, ((13, 2.0, 37, 29), (4, None, 8, 8)))], ids=["float", "int8"])
def test_blockwise_equals_exact_with_a_cache(int8, combos):
  qg, parts, q_pos, seg = case(0, int8)
  for window, cap, bq, bk in combos:
    check(*both(qg, parts, q_pos, seg, window, cap, bq, bk), q_pos)


def test_blockwise_equals_exact_on_packed_rows_and_a_first_prefill():
  for segments in (False, True):
    qg, parts, q_pos, seg = case(1, cache=False, segments=segments)
    for window, bq, bk in ((None, 8, 8), (6, 16, 5)):
      check(*both(qg, parts, q_pos, seg, window, 2.0, bq, bk), q_pos)


def test_blockwise_gradients_equal_exact():
  qg, parts, q_pos, seg = case(2)
  real = (np.asarray(q_pos) >= 0)[:, :, None, None, None]
  w = jnp.asarray(np.random.default_rng(3).normal(size=qg.shape[:-1] + (H,)) * real, jnp.float32)

  def loss(fn, qg, k, v, ck, cv):
    ps = [(Stored(ck, cv), parts[0][1], None), (Stored(k, v), parts[1][1], None)]
    return jnp.sum(fn(qg, ps) * w)

  ex = lambda q, ps: attend.exact(q, ps, q_pos, None, 5, 2.0, jnp.float32)
  bw = lambda q, ps: attend.blockwise(q, ps, q_pos, None, 5, 2.0, jnp.float32, 8, 6)
  args = (qg, parts[1][0].k, parts[1][0].v, parts[0][0].k, parts[0][0].v)
  ge = jax.grad(lambda *a: loss(ex, *a), argnums=range(5))(*args)
  gb = jax.grad(lambda *a: loss(bw, *a), argnums=range(5))(*args)
  for x, y in zip(ge, gb):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5)


def test_fully_masked_blocks_are_skipped_without_changing_real_queries():
  """A query block that sees no key of a block (empty slots, the future) must neither read it nor be
  changed by it: make those keys huge, so any leak of them would show."""
  qg, parts, q_pos, _ = case(4)
  (kv, k_pos, _), chunk = parts
  empty = np.asarray(k_pos) < 0
  poisoned = Stored(jnp.where(empty[:, :, None, None], 1e30, kv.k), jnp.where(empty[:, :, None, None], 1e30, kv.v))
  parts = [(poisoned, k_pos, None), chunk]
  e, b = both(qg, parts, q_pos, None, None, None, 8, 4)
  check(e, b, q_pos)

"""xent.token_nll_sum: the chunked, gradient-fused training loss against plain autodiff of the logits.

The reference is the definition: logits = h W^T (highest precision), [cap * tanh(logits / cap)], minus
log-softmax at the target, weighted and summed; its gradients come from jax.grad. Whole-model parity with
Hugging Face (loss and every gradient) is in test_train_parity.py, which runs through this function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from gemma_jax import xent


def reference(h, w, targets, weights, softcap):
  z = jnp.einsum("BTD,VD->BTV", h.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
  if softcap is not None:
    z = jnp.tanh(z / softcap) * softcap
  logp = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)
  return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights)


def inputs(b=3, t=7, d=16, v=37, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  h = jax.random.normal(k[0], (b, t, d))
  w = jax.random.normal(k[1], (v, d)) * 0.5
  targets = jax.random.randint(k[2], (b, t), 0, v)
  weights = (jax.random.uniform(k[3], (b, t)) > 0.3).astype(jnp.float32)  # some positions carry no loss
  return h, w, targets, weights


# chunk 3 does not divide T = 7: the padded positions weigh 0; 7: one chunk; 1: one position at a time.
@pytest.mark.parametrize(("softcap", "chunk"), [(None, 3), (3.0, 3), (None, 7), (3.0, 1)])
def test_loss_and_gradients_equal_autodiff_of_the_logits(softcap, chunk):
  h, w, targets, weights = inputs()
  ours = jax.jit(jax.value_and_grad(lambda h, w: xent.token_nll_sum(h, w, targets, weights, softcap, chunk), (0, 1)))
  (loss, (dh, dw)) = ours(h, w)
  ref_loss, (ref_dh, ref_dw) = jax.value_and_grad(lambda h, w: reference(h, w, targets, weights, softcap), (0, 1))(h, w)
  assert abs(float(loss - ref_loss)) <= 1e-5 * abs(float(ref_loss))
  assert float(jnp.max(jnp.abs(dh - ref_dh))) <= 1e-5
  assert float(jnp.max(jnp.abs(dw - ref_dw))) <= 1e-5
  # Undifferentiated (evaluation), and with the table frozen (LoRA): the same value, the same dh.
  value = jax.jit(lambda h, w: xent.token_nll_sum(h, w, targets, weights, softcap, chunk))(h, w)
  assert abs(float(value - loss)) <= 1e-6 * abs(float(loss))
  dh_only = jax.jit(jax.grad(lambda h: 2.0 * xent.token_nll_sum(h, w, targets, weights, softcap, chunk)))(h)
  assert float(jnp.max(jnp.abs(dh_only - 2.0 * ref_dh))) <= 2e-5


def test_bfloat16_is_as_close_to_float32_as_plain_autodiff_in_bfloat16():
  """In bfloat16 the fused gradient feeds the backward matmuls a bfloat16 cotangent (float32 accumulation);
  its error against the float32 gradient must stay of the size plain bfloat16 autodiff already has."""
  h, w, targets, weights = inputs(b=2, t=16, d=64, v=512, seed=1)
  h16, w16 = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  exact = jax.grad(lambda h, w: reference(h, w, targets, weights, None), (0, 1))(h16.astype(jnp.float32),
                                                                                    w16.astype(jnp.float32))

  def plain(h, w):
    z = jnp.einsum("BTD,VD->BTV", h, w, preferred_element_type=jnp.float32)
    logp = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)
    return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights)

  ours = jax.jit(jax.grad(lambda h, w: xent.token_nll_sum(h, w, targets, weights, None, 5), (0, 1)))(h16, w16)
  base = jax.jit(jax.grad(plain, (0, 1)))(h16, w16)
  for o, b, e in zip(ours, base, exact, strict=True):
    assert o.dtype == jnp.bfloat16
    err = lambda g: float(jnp.linalg.norm(g.astype(jnp.float32) - e) / jnp.linalg.norm(e))
    assert err(o) <= 2 * err(b) + 1e-3, (err(o), err(b))


def test_no_batch_by_length_by_vocab_array_is_held():
  """The compiled gradient's temporaries stay below one (B, T, V) float32 array; plain autodiff holds several."""
  b, t, d, v = 2, 64, 32, 8192
  h, w, targets, weights = inputs(b, t, d, v)
  full = b * t * v * 4
  ours = jax.jit(jax.grad(lambda h, w: xent.token_nll_sum(h, w, targets, weights, None, 8), (0, 1)))
  plain = jax.jit(jax.grad(lambda h, w: reference(h, w, targets, weights, None), (0, 1)))
  assert plain.lower(h, w).compile().memory_analysis().temp_size_in_bytes >= full  # the measure sees them
  assert ours.lower(h, w).compile().memory_analysis().temp_size_in_bytes < full / 2


def test_chunk_positions_keeps_a_chunk_within_the_budget():
  assert xent.chunk_positions(4, 255, 262144) == 64  # 4 chunks of the benchmark's batch
  assert xent.chunk_positions(4, 10, 262144) == 10
  assert xent.chunk_positions(64, 4096, 262144) == 4
  assert xent.chunk_positions(1024, 4096, 262144) == 1

"""Multi-head attention for all Gemma variants: MHA/MQA/GQA, soft-cap, QK-norm, sliding window.

Order (../shared/models.md, official gemma/gm/nn/_modules.py): project -> (Gemma 3) RMSNorm of q and k
per head -> RoPE on q and k -> q * query scale -> logits -> (Gemma 2) tanh soft-cap -> causal and
sliding-window mask -> softmax in float32 -> weighted values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .cache import LayerCache, Stored
from .configs import LOCAL, ModelConfig
from .layers import Einsum, RMSNorm
from .rope import apply_rope
from .shapes import Array, Bool, Float, Hidden, Int, Positions

# Large negative finite value for masked logits, as the official implementation (K_MASK): finite so a
# fully masked row (a padding query) gives a uniform softmax instead of NaN.
MASK_VALUE = -2.3819763e38


def attention_mask(q_pos: Positions, k_pos: Int[Array, "B S"], window: int | None,
                   segments: Int[Array, "B T"] | None = None) -> Bool[Array, "B T S"]:
  """(B, T) query and (B, S) key positions -> (B, T, S) bool: key visible to query.

  A key is visible when its slot is filled (k_pos >= 0), it is not in the future, and on sliding-window
  layers q_pos - k_pos < window. segments (training with packed rows, no cache; then S == T): a key is
  visible only within its own example, since positions restart per example and would let a later example
  see an earlier one's keys at lower positions.
  """
  q = q_pos[:, :, None]
  k = k_pos[:, None, :]
  visible = (k >= 0) & (k <= q)
  if window is not None:
    visible &= q - k < window
  if segments is not None:
    visible &= segments[:, :, None] == segments[:, None, :]
  return visible


class Attention(nnx.Module):
  """Attention with grouped kv heads (G = N // K query heads per kv head; k/v are never repeated)."""

  def __init__(self, config: ModelConfig, attn_type: str, *, rngs: nnx.Rngs):
    n, k, d, h = config.num_heads, config.num_kv_heads, config.embed_dim, config.head_dim
    dtype = jnp.dtype(config.dtype)
    self.num_kv_heads = k
    self.query_scale = config.query_scale
    self.softcap = config.attn_logits_softcap
    self.window = config.sliding_window if attn_type == LOCAL else None
    if attn_type == LOCAL:
      self.rope_base, self.rope_scale = config.rope_base_local, 1.0
    else:
      self.rope_base, self.rope_scale = config.rope_base_global, config.rope_scale_global
    # D-major weights so each projection is one 2-D matmul (layers.weight_einsum); the official
    # checkpoints' (N, D, H) / (2, K, D, H) / fused (3, N, D, H) layouts are transposed at import.
    # [k, v] sit inside K so that sharding K splits whole heads.
    q = dict(dtype=dtype, rngs=rngs, quant=config.quant, block=config.quant_block)
    self.q_einsum = Einsum((d, n, h), ("D", "N", "H"), 1, **q)
    self.kv_einsum = Einsum((d, k, 2, h), ("D", "K", "_", "H"), 1, **q)
    self.attn_vec_einsum = Einsum((n, h, d), ("N", "H", "D"), 2, **q)
    if config.use_qk_norm:
      self._query_norm = RMSNorm(h, "H", eps=config.norm_eps, dtype=dtype, rngs=rngs)
      self._key_norm = RMSNorm(h, "H", eps=config.norm_eps, dtype=dtype, rngs=rngs)
    else:
      self._query_norm = self._key_norm = None

  def project(self, x: Hidden) -> tuple[Float[Array, "B T N H"], Float[Array, "B T K H"], Float[Array, "B T K H"]]:
    """(B, T, D) -> q (B, T, N, H), k and v (B, T, K, H)."""
    kv = self.kv_einsum("BTD,DKCH->BTKCH", x)
    return self.q_einsum("BTD,DNH->BTNH", x), kv[:, :, :, 0], kv[:, :, :, 1]

  def __call__(self, x: Hidden, positions: Positions, cache: LayerCache | None, fresh: bool = False,
               segments: Int[Array, "B T"] | None = None) -> tuple[Hidden, LayerCache | None]:
    """x (B, T, D) at positions (B, T) (-1 = padding) -> (B, T, D) and the cache with this chunk added.

    Queries attend to the cache as it was before this call plus the chunk itself (read as the cache
    stores it: quantized for an int8 cache), then the chunk is written. Attending to both parts (one softmax over their concatenated logits) keeps a ring buffer
    exact even when the chunk is longer than the window, and never copies the cache. fresh=True
    (static) promises the cache is empty, so its slots are not read at all (a first prefill).
    segments (B, T): example ids of packed training rows (attention_mask); only without a cache.
    """
    if segments is not None and cache is not None:
      raise ValueError("segments (packed rows) are a training input; they cannot be combined with a cache")
    q, k, v = self.project(x)
    if self._query_norm is not None:
      q, k = self._query_norm(q), self._key_norm(k)
    q = apply_rope(q, positions, base=self.rope_base, scale=self.rope_scale)
    k = apply_rope(k, positions, base=self.rope_base, scale=self.rope_scale)
    q = q * jnp.asarray(self.query_scale, q.dtype)
    b, t, n, h = q.shape
    qg = q.reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, h)

    # Each part is keys and values as attention reads them (cache.Stored): the cache as it was, and the
    # chunk as the cache stores it (int8 caches: quantized, so results do not depend on how a text is cut
    # into calls; cache.py says why).
    chunk = Stored(k, v) if cache is None else cache.encode(k, v)
    parts = [(chunk, positions, segments)]
    if cache is not None and not fresh:
      parts.insert(0, (cache.stored, cache.pos, None))
    logits = []
    for kv, k_pos, k_seg in parts:
      # int8 keys: the dot product runs on the integers (exact in bf16/f32) and each (row, slot, kv head)
      # scale multiplies its logit afterwards: q . (k8 * s) = (q . k8) * s, without a dequantized copy.
      keys = kv.k if kv.k_scale is None else kv.k.astype(qg.dtype)
      l = jnp.einsum("BTKGH,BSKH->BTKGS", qg, keys, preferred_element_type=jnp.float32)
      if kv.k_scale is not None:
        l = l * jnp.swapaxes(kv.k_scale, 1, 2)[:, None, :, None, :]
      if self.softcap is not None:
        l = jnp.tanh(l / self.softcap) * self.softcap
      mask = attention_mask(positions, k_pos, self.window, k_seg)[:, :, None, None, :]
      logits.append(jnp.where(mask, l, MASK_VALUE))
    probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
    out, start = 0.0, 0
    for kv, _, _ in parts:
      s = kv.k.shape[1]
      p, values = probs[..., start:start + s], kv.v
      if kv.v_scale is not None:  # likewise: sum_s p_s * (v8_s * s_s) = sum_s (p_s * s_s) * v8_s
        p, values = p * jnp.swapaxes(kv.v_scale, 1, 2)[:, None, :, None, :], values.astype(v.dtype)
      out = out + jnp.einsum("BTKGS,BSKH->BTKGH", p.astype(v.dtype), values)
      start += s
    out = out.reshape(b, t, n, h).astype(x.dtype)
    new_cache = None if cache is None else cache.write_stored(chunk, positions)
    return self.attn_vec_einsum("BTNH,NHD->BTD", out), new_cache

"""Multi-head attention for all Gemma variants: MHA/MQA/GQA, soft-cap, QK-norm, sliding window.

Order (../shared/models.md, official gemma/gm/nn/_modules.py): project -> (Gemma 3) RMSNorm of q and k
per head -> RoPE on q and k -> q * query scale -> logits -> (Gemma 2) tanh soft-cap -> causal and
sliding-window mask -> softmax in float32 -> weighted values.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from . import attend
from .attend import MASK_VALUE, attention_mask  # noqa: F401  (re-exported: their home was here)
from .cache import LayerCache, Stored
from .configs import LOCAL, ModelConfig
from .layers import Einsum, RMSNorm
from .rope import apply_rope
from .shapes import Array, Float, Hidden, Int, Positions

# From this many keys (cache part + chunk) on, a call with more than one query takes the blockwise path
# (attend.blockwise); below it, and for one query (a decode step: its scores are only (B, 1, N, S)), the
# exact one. Measured on the 270M's shapes (K=1, G=4, H=256, float32, 2 busy CPU cores;
# benchmarks/results/2026-12-05_attention.md): a first prefill of 512 tokens takes 77 ms exact vs 108 ms
# blockwise, of 1024 tokens 396 vs 340 ms, of 2048 1717 vs 797 ms and 138 vs 26 MiB; of 8192, 2.1 GB vs 74 MiB.
BLOCKWISE_MIN_KEYS = 1024
# Block sizes of the blockwise path (same file): at T = S = 4096, 512 x 512 took 1.87 s, against 2.15 s
# for 256 x 256, 2.22 s for 1024 x 1024 and 2.13-2.90 s for unequal pairs; its scores are 4 MiB a block.
BLOCK_Q = 512
BLOCK_K = 512


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
    stores it: quantized for an int8 cache), then the chunk is written. Attending to both parts (one
    softmax over both: attend.py) keeps a ring buffer exact even when the chunk is longer than the window,
    and never copies the cache. Calls with many keys take the blockwise path (BLOCKWISE_MIN_KEYS). fresh=True
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
    keys = sum(kv.k.shape[1] for kv, _, _ in parts)
    if t > 1 and keys >= BLOCKWISE_MIN_KEYS:
      out = attend.blockwise(qg, parts, positions, segments, self.window, self.softcap, v.dtype, BLOCK_Q, BLOCK_K)
    else:
      out = attend.exact(qg, parts, positions, segments, self.window, self.softcap, v.dtype)
    out = out.reshape(b, t, n, h).astype(x.dtype)
    new_cache = None if cache is None else cache.write_stored(chunk, positions)
    return self.attn_vec_einsum("BTNH,NHD->BTD", out), new_cache

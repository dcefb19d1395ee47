"""ModelConfig: the one frozen description that drives all three Gemma families.

The families differ only in data (layer pattern, window, soft-caps, qk-norm, post-norms, RoPE bases and
scale, query scale), never in subclasses. Values follow the official JAX library
(google-deepmind/gemma: gemma/transformer.py for Gemma 1, gemma/gm/nn/_gemma.py for Gemma 2 and 3);
see ../shared/models.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

LOCAL = "local"
GLOBAL = "global"
DTYPES = ("float32", "bfloat16")
# Weight-only quantization (qarray.py): int8 and int4-sym symmetric (values and a scale per block), int4
# asymmetric (values, a scale and an offset per block); int4-sym is checkpoint format 4's int4.
QUANT_SCHEMES = ("int8", "int4", "int4-sym")
QUANT_BLOCKS = (32, 64, 128)  # along the contracting axis; None: one scale per output channel (int8 only)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of one Gemma text model (letters as in shapes.py).

  Attributes:
    name: preset name, informational.
    family: 1, 2 or 3 (Gemma generation).
    num_layers: L.
    embed_dim: D.
    hidden_dim: F, the width of each GeGLU branch.
    num_heads: N query heads.
    num_kv_heads: K key/value heads; N % K == 0 (K == 1 is MQA, K == N is MHA).
    head_dim: H, even (RoPE rotates halves).
    vocab_size: V, rows of the (tied) embedding matrix.
    attention_pattern: tiled over layers and cut to L, each LOCAL (sliding window) or GLOBAL.
    sliding_window: keys with q_pos - k_pos < window are kept on LOCAL layers.
    query_pre_attn_scalar: queries are multiplied by this ** -0.5 (head_dim, or D/N for the 27B models).
    attn_logits_softcap: Gemma 2: logits = tanh(logits / c) * c before masking.
    final_logits_softcap: Gemma 2: output logits = tanh(logits / c) * c.
    use_qk_norm: Gemma 3: RMSNorm on each query and key head before RoPE.
    use_post_attn_norm / use_post_ffw_norm: Gemma 2 and 3 norms on the branch outputs.
    rope_base_local / rope_base_global: RoPE max wavelength on LOCAL / GLOBAL layers.
    rope_scale_global: positions are divided by this on GLOBAL layers (Gemma 3 4B+: 8).
    norm_eps: RMSNorm epsilon.
    max_seq_len: context length the model was trained for (an upper bound for cache lengths).
    dtype: runtime dtype of params and activations, "float32" or "bfloat16". Norm statistics,
      softmax, RoPE angles and logits are always float32.
    quant: None, or "int8" / "int4" / "int4-sym": every projection weight is stored as values of that type
      and float scales (int4: and offsets) (qarray.py, quantize.py), and computes dequantized in `dtype`.
    quant_block: the block of each scale along the contracting axis (32, 64 or 128), or None for one
      scale per output channel (int8 only). One block size for every quantized weight, embedding included.
    quant_embedding: None (the embedding in `dtype`), or one of QUANT_SCHEMES (a scale per vocabulary row, or
      per block of it). Independent of `quant`: the embedding is also the tied output layer.
  """

  name: str
  family: int
  num_layers: int
  embed_dim: int
  hidden_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  vocab_size: int
  attention_pattern: tuple[str, ...] = (GLOBAL,)
  sliding_window: int | None = None
  query_pre_attn_scalar: float | None = None
  attn_logits_softcap: float | None = None
  final_logits_softcap: float | None = None
  use_qk_norm: bool = False
  use_post_attn_norm: bool = False
  use_post_ffw_norm: bool = False
  rope_base_local: float = 10_000.0
  rope_base_global: float = 10_000.0
  rope_scale_global: float = 1.0
  norm_eps: float = 1e-6
  max_seq_len: int = 8192
  dtype: str = "float32"
  quant: str | None = None
  quant_block: int | None = None
  quant_embedding: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern))
    problems = []
    for field in ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size", "max_seq_len"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        problems.append(f"{field} must be a positive integer, got {value!r}")
    if self.family not in (1, 2, 3):
      problems.append(f"family must be 1, 2 or 3, got {self.family!r}")
    if not problems:
      if self.num_heads % self.num_kv_heads:
        problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                        f"({self.num_kv_heads})")
      if self.head_dim % 2:
        problems.append(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
    bad = [p for p in self.attention_pattern if p not in (LOCAL, GLOBAL)]
    if bad or not self.attention_pattern:
      problems.append(f"attention_pattern entries must be {LOCAL!r} or {GLOBAL!r}, got "
                      f"{self.attention_pattern!r}")
    if LOCAL in self.attention_pattern and not (self.sliding_window and self.sliding_window > 0):
      problems.append("a pattern with local layers needs a positive sliding_window")
    if self.dtype not in DTYPES:
      problems.append(f"dtype must be one of {DTYPES} (float16 overflows in Gemma), got {self.dtype!r}")
    if not problems:
      problems += self.quant_problems()
    if problems:
      raise ValueError(f"invalid ModelConfig {self.name!r}: " + "; ".join(problems))

  @property
  def quantized(self) -> bool:
    """Whether any weight is stored quantized."""
    return self.quant is not None or self.quant_embedding is not None

  def contracting_dims(self) -> dict[str, int]:
    """{what: size} of the contracting dims of the weights `quant` and `quant_embedding` cover."""
    dims = {"embed_dim D": self.embed_dim} if self.quantized else {}
    if self.quant is not None:
      dims.update({"hidden_dim F": self.hidden_dim, "num_heads * head_dim": self.num_heads * self.head_dim})
    return dims

  def quant_problems(self) -> list[str]:
    """What is wrong with the quant fields (quantize.py raises these as GemmaErrors before any work)."""
    problems = []
    for field in ("quant", "quant_embedding"):
      if getattr(self, field) not in (None, *QUANT_SCHEMES):
        problems.append(f"{field} must be None or one of {QUANT_SCHEMES}, got {getattr(self, field)!r}")
    block = self.quant_block
    if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block not in QUANT_BLOCKS):
      problems.append(f"quant_block must be None or one of {QUANT_BLOCKS}, got {block!r}")
    elif block is None and any(str(q).startswith("int4") for q in (self.quant, self.quant_embedding)):
      problems.append("int4 needs a block size (quant_block 32, 64 or 128): a scale per output channel of 4-bit "
                      "values loses too much")
    elif block is not None:
      if not self.quantized:
        problems.append(f"quant_block {block} is set but nothing is quantized")
      problems += [f"block size {block} does not divide the contracting dimension {what} = {n}"
                   for what, n in self.contracting_dims().items() if n % block]
    return problems

  @property
  def attention_types(self) -> tuple[str, ...]:
    """LOCAL or GLOBAL for each of the L layers (the pattern tiled and cut to L)."""
    p = self.attention_pattern
    return tuple(p[i % len(p)] for i in range(self.num_layers))

  @property
  def query_scale(self) -> float:
    scalar = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
    return float(scalar) ** -0.5

  def param_count(self) -> int:
    """Number of parameters, computed from the shapes (embedding counted once: it is tied)."""
    d, f, n, k, h = self.embed_dim, self.hidden_dim, self.num_heads, self.num_kv_heads, self.head_dim
    attn = n * d * h * 2 + 2 * k * d * h
    norms = d * (2 + self.use_post_attn_norm + self.use_post_ffw_norm) + 2 * h * self.use_qk_norm
    per_layer = attn + 3 * d * f + norms
    return self.vocab_size * d + self.num_layers * per_layer + d

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["attention_pattern"] = list(self.attention_pattern)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {unknown}")
    if isinstance(d.get("attention_pattern"), list):  # JSON has no tuples
      d = {**d, "attention_pattern": tuple(d["attention_pattern"])}
    return cls(**d)


def tiled_pattern(num_local: int) -> tuple[str, ...]:
  """num_local LOCAL layers followed by one GLOBAL (Gemma 2: 1, Gemma 3: 5)."""
  return (LOCAL,) * num_local + (GLOBAL,)

"""One preset per official Gemma text model (../shared/models.md), plus tiny prime-sized test presets.

Base and instruct ("-it") checkpoints share an architecture, so one preset serves both.
"""

from __future__ import annotations

from .families import family_config
from .model_config import ModelConfig

# Each preset states what varies within its family; the rest comes from families.FAMILY_DEFAULTS.
PRESETS: dict[str, ModelConfig] = {
    # Gemma 1: gemma/transformer.py (v1 layout).
    "gemma1_2b": family_config(1, "gemma1_2b", num_layers=18, embed_dim=2048, hidden_dim=16384, num_heads=8,
                               num_kv_heads=1, head_dim=256, vocab_size=256128),
    "gemma1_7b": family_config(1, "gemma1_7b", num_layers=28, embed_dim=3072, hidden_dim=24576, num_heads=16,
                               num_kv_heads=16, head_dim=256, vocab_size=256128),
    # Gemma 2: the 9B scales queries by 1/sqrt(256), not 1/sqrt(D/N) = 1/sqrt(224) (HF#31891);
    # the 27B by 1/sqrt(D/N) = 1/sqrt(144).
    "gemma2_2b": family_config(2, "gemma2_2b", num_layers=26, embed_dim=2304, hidden_dim=9216, num_heads=8,
                               num_kv_heads=4, head_dim=256, vocab_size=256128),
    "gemma2_9b": family_config(2, "gemma2_9b", num_layers=42, embed_dim=3584, hidden_dim=14336, num_heads=16,
                               num_kv_heads=8, head_dim=256, vocab_size=256128),
    "gemma2_27b": family_config(2, "gemma2_27b", num_layers=46, embed_dim=4608, hidden_dim=36864, num_heads=32,
                                num_kv_heads=16, head_dim=128, vocab_size=256128, query_pre_attn_scalar=4608 / 32),
    # Gemma 3 text: window 512 on 270M and 1B, 1024 from 4B up, where global RoPE positions are also / 8.
    "gemma3_270m": family_config(3, "gemma3_270m", num_layers=18, embed_dim=640, hidden_dim=2048, num_heads=4,
                                 num_kv_heads=1, head_dim=256, vocab_size=262144, max_seq_len=32768),
    "gemma3_1b": family_config(3, "gemma3_1b", num_layers=26, embed_dim=1152, hidden_dim=6912, num_heads=4,
                               num_kv_heads=1, head_dim=256, vocab_size=262144, max_seq_len=32768),
    "gemma3_4b": family_config(3, "gemma3_4b", num_layers=34, embed_dim=2560, hidden_dim=10240, num_heads=8,
                               num_kv_heads=4, head_dim=256, vocab_size=262144, sliding_window=1024,
                               rope_scale_global=8.0, max_seq_len=131072),
    "gemma3_12b": family_config(3, "gemma3_12b", num_layers=48, embed_dim=3840, hidden_dim=15360, num_heads=16,
                                num_kv_heads=8, head_dim=256, vocab_size=262144, sliding_window=1024,
                                rope_scale_global=8.0, max_seq_len=131072),
    "gemma3_27b": family_config(3, "gemma3_27b", num_layers=62, embed_dim=5376, hidden_dim=21504, num_heads=32,
                                num_kv_heads=16, head_dim=128, vocab_size=262144, sliding_window=1024,
                                query_pre_attn_scalar=5376 / 32, rope_scale_global=8.0, max_seq_len=131072),
}

# Published sizes (text parameters) the presets must reproduce within 1%: Gemma, Gemma 2 and Gemma 3
# technical reports (Gemma 3 counts: embedding + non-embedding, vision encoder excluded).
PUBLISHED_PARAMS = {
    "gemma1_2b": 2.51e9, "gemma1_7b": 8.54e9,
    "gemma2_2b": 2.61e9, "gemma2_9b": 9.24e9, "gemma2_27b": 27.2e9,
    "gemma3_270m": 268e6, "gemma3_1b": 1.00e9, "gemma3_4b": 3.88e9, "gemma3_12b": 11.77e9,
    "gemma3_27b": 27.0e9,
}

# Tiny prime-sized presets for mechanism tests: odd widths catch transposed weights, N*H != D catches
# square-projection assumptions (like Gemma 1 7B).
_TINY = dict(vocab_size=251, embed_dim=44, hidden_dim=67, head_dim=16, max_seq_len=512)
TINY_PRESETS: dict[str, ModelConfig] = {
    "tiny_gemma1_mqa": family_config(1, "tiny_gemma1_mqa", num_layers=3, num_heads=3, num_kv_heads=1, **_TINY),
    "tiny_gemma1_mha": family_config(1, "tiny_gemma1_mha", num_layers=2, num_heads=3, num_kv_heads=3, **_TINY),
    "tiny_gemma2_gqa": family_config(2, "tiny_gemma2_gqa", num_layers=4, num_heads=6, num_kv_heads=2,
                                     sliding_window=5, attn_logits_softcap=3.0, final_logits_softcap=2.0,
                                     query_pre_attn_scalar=24, **_TINY),
    "tiny_gemma3_qk": family_config(3, "tiny_gemma3_qk", num_layers=7, num_heads=4, num_kv_heads=2, sliding_window=5,
                                    query_pre_attn_scalar=20, rope_scale_global=8.0, **_TINY),
}

ALL_PRESETS = {**PRESETS, **TINY_PRESETS}


def get_preset(name: str) -> ModelConfig:
  """The preset called `name`; a clear error listing the known names otherwise."""
  try:
    return ALL_PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(ALL_PRESETS)}") from None

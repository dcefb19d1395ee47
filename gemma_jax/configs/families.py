"""What each Gemma family fixes, in one table that the presets and every importer build from.

A family's entry holds the ModelConfig fields it sets apart from ModelConfig's own defaults (values from
the official JAX library, gemma/transformer.py and gemma/gm/nn/_gemma.py; ../shared/models.md). A preset
or an imported file then states what varies within the family (sizes, context, window, query scale) or
overrides an entry (a file that states its soft-caps). Gemma 1: every layer global, one RoPE base.
Gemma 2: local/global alternation, window 4096, tanh soft-caps 50 (attention) and 30 (final), post-norms.
Gemma 3: 5 local layers then 1 global, window 512 (270M and 1B; 4B and up state 1024), QK-norm,
post-norms, RoPE base 10k on local layers and 1M on global ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .model_config import GLOBAL, ModelConfig, tiled_pattern

FAMILY_DEFAULTS: dict[int, dict[str, Any]] = {
    1: dict(family=1, attention_pattern=(GLOBAL,), rope_base_local=10_000.0, rope_base_global=10_000.0),
    2: dict(family=2, attention_pattern=tiled_pattern(1), sliding_window=4096, attn_logits_softcap=50.0,
            final_logits_softcap=30.0, use_post_attn_norm=True, use_post_ffw_norm=True, rope_base_local=10_000.0,
            rope_base_global=10_000.0, max_seq_len=8192),
    3: dict(family=3, attention_pattern=tiled_pattern(5), sliding_window=512, use_qk_norm=True,
            use_post_attn_norm=True, use_post_ffw_norm=True, rope_base_local=10_000.0, rope_base_global=1_000_000.0),
}

# Families whose sliding-window layers have a RoPE base of their own (Gemma 3). In the others every layer
# uses one base, so the one base a file states is every layer's.
OWN_LOCAL_ROPE_BASE = frozenset({3})


def family_defaults(family: int) -> dict[str, Any]:
  """Every ModelConfig field that has a default, as the family sets it (FAMILY_DEFAULTS over ModelConfig's
  defaults): what an importer falls back to for what a file does not state."""
  out = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
  return {**out, **FAMILY_DEFAULTS[family]}


def family_config(family: int, name: str, **stated: Any) -> ModelConfig:
  """A ModelConfig of `family`: its FAMILY_DEFAULTS entry, overridden by what is stated."""
  return ModelConfig(name=name, **{**FAMILY_DEFAULTS[family], **stated})

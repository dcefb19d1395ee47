"""Long-sequence references for the tiny Hugging Face models: far past their sliding windows.

Independent reference for gemma_jax's blockwise attention and chunked prefill (tests/test_long_context.py):
the numbers come from Hugging Face transformers (PyTorch, float32, eager attention). Run with the Python
3.11 reference venv after make_hf_tiny.py (it reads the checkpoints that script wrote):

    $VENVS/ref311/bin/python tests/reference/make_long_goldens.py

Writes, for each NAME in NAMES, tests/data/hf_tiny/NAME/long.npz:
  input_ids   int32 (1, 240)   seeded random ids (the tiny window is 5: 48 windows)
  at          int32 (P,)       the positions whose logits are kept (every 8th and the last 8)
  logits      float32 (P, V)   full forward, no cache, logits at those positions
  prompt_ids  int32 (1, 224)   = input_ids[:, :224]
  output_ids  int32 (1, 240)   prompt + 16 greedy tokens from HF generate (its KV cache)
  step_logits float32 (16, V)  the logits each greedy token was chosen from
Every tiny config has max_position_embeddings 256 (which our importer reads as the context), so 240 tokens
is as long as these models go. Only a subset of positions is stored to keep the files small (~45 KB each).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_hf_tiny import OUT, numpy_forward  # noqa: E402  (wraps HF's eager attention; harmless here)
import make_hf_tiny  # noqa: E402

NAMES = {"gemma_mqa": 101, "gemma2_gqa": 102, "gemma3_qk": 103}  # name -> seed of its ids
T, PROMPT, NEW = 240, 224, 16


def main():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name, seed in NAMES.items():
        d = OUT / name
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, vocab, (1, T), generator=gen)  # no pad/eos/bos inside the text
        ids[0, 0] = 2  # BOS first, as a real prompt
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()[0]
        make_hf_tiny._ATTN_STATS.clear()
        # independent check: float64 numpy forward of the same weights
        ndiff = float(np.abs(numpy_forward(d, ids.numpy())[0] - logits.numpy()).max())
        assert ndiff < 1e-4, (name, ndiff)
        at = np.unique(np.concatenate([np.arange(0, T, 8), np.arange(T - 8, T)])).astype(np.int32)

        prompt = ids[:, :PROMPT]
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                                 return_dict_in_generate=True, output_logits=True)
        make_hf_tiny._ATTN_STATS.clear()
        seq = out.sequences
        step_logits = torch.cat([l.float() for l in out.logits], 0)
        # HF's cached generation against its own no-cache forward of the generated text
        with torch.no_grad():
            full = model(input_ids=seq[:, :-1], use_cache=False).logits.float()[0, PROMPT - 1:]
        make_hf_tiny._ATTN_STATS.clear()
        cdiff = float((full - step_logits).abs().max())
        assert cdiff < 1e-4, (name, cdiff)
        top2 = step_logits.topk(2, -1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
        np.savez(d / "long.npz", input_ids=ids.numpy().astype(np.int32), at=at,
                 logits=logits.numpy()[at].astype(np.float32), prompt_ids=prompt.numpy().astype(np.int32),
                 output_ids=seq.numpy().astype(np.int32), step_logits=step_logits.numpy().astype(np.float32))
        print(name, f"numpy_f64_vs_hf {ndiff:.2e}  cache_vs_nocache {cdiff:.2e}  greedy_min_top2_margin "
              f"{margin:.4f}  bytes {(d / 'long.npz').stat().st_size}")


if __name__ == "__main__":
    main()

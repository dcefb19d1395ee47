"""Hugging Face transformers runner (CPU torch, Python 3.11 reference venv): python hf.py SPEC.json OUT.json

Model: AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32 | torch.bfloat16):
transformers dequantizes the GGUF itself. Default attention implementation (sdpa) and default cache
(what a user gets). Greedy model.generate(do_sample=False) with eos_token_id=None, so every row
generates exactly n tokens. Prefill alone: one forward of the prompt with use_cache=True and
logits_to_keep=1 (as generate's own prefill does). Runs under torch.inference_mode(), torch's default
thread count (= the number of cores).
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402


class Engine:

  def setup(self):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    self.torch, self.AutoModelForCausalLM = torch, AutoModelForCausalLM
    transformers.Gemma3ForCausalLM  # noqa: B018 (transformers imports lazily)

  def load(self, spec):
    torch, AutoModelForCausalLM = self.torch, self.AutoModelForCausalLM
    self.spec = spec
    torch.set_grad_enabled(False)
    path = pathlib.Path(spec["gguf"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    assert self.model.dtype == dtype, self.model.dtype
    gc = self.model.generation_config
    gc.eos_token_id = None
    gc.do_sample = False
    gc.top_k = gc.top_p = gc.temperature = None
    if gc.pad_token_id is None:
      gc.pad_token_id = 0

  def generate(self, prompts, n):
    torch = self.torch
    x = torch.tensor(prompts, dtype=torch.long)  # equal-length rows: no padding needed
    with torch.inference_mode():
      out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n)
    return out[:, x.shape[1]:].tolist()

  def prefill(self, ids):
    torch = self.torch
    x = torch.tensor([ids], dtype=torch.long)
    with torch.inference_mode():
      out = self.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True, logits_to_keep=1)
    out.logits.float().sum().item()

  def info(self):
    import torch
    import transformers
    return {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
        "settings": f"generate(do_sample=False, eos_token_id=None), attn "
                    f"{getattr(self.model.config, '_attn_implementation', '?')}, {torch.get_num_threads()} threads",
    }


if __name__ == "__main__":
  common.main(Engine)

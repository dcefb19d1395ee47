"""Hugging Face training runner (CPU torch + transformers + peft, Python 3.11 reference venv):
python hf_train.py SPEC.json OUT.json (protocol: train_common.py).

Model: AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32): float32 master
weights either way, as Trainer keeps them; "bfloat16" runs the forward and backward under
torch.autocast("cpu", dtype=torch.bfloat16), which is what Trainer(bf16=True) does (mixed precision, not a
bfloat16 copy of the weights). Default attention implementation (sdpa), no gradient checkpointing, model.train().

LoRA: peft.get_peft_model with LoraConfig(r, lora_alpha, target_modules=q/k/v/o/gate/up/down_proj,
lora_dropout=0, bias="none"): the base frozen. Full: every parameter trained (the tied embedding once).
A step is Trainer's inner loop without the Trainer: loss = model(input_ids, labels=input_ids).loss (mean NLL
of every next token), loss.backward(), clip_grad_norm_(1.0), AdamW.step() (torch's default implementation
on CPU, betas (0.9, 0.999), eps 1e-8, weight decay 0), zero_grad(set_to_none=True).
"""

from __future__ import annotations

import contextlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import train_common  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Engine:

  def setup(self):
    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    self.torch, self.peft, self.AutoModelForCausalLM = torch, peft, AutoModelForCausalLM
    transformers.Gemma3ForCausalLM  # noqa: B018 (transformers imports lazily)

  def load(self, spec):
    torch, peft = self.torch, self.peft
    self.spec = spec
    path = pathlib.Path(spec["gguf"])
    model = self.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    self.param_count = sum(p.numel() for p in model.parameters())
    if spec["method"] == "lora":
      cfg = peft.LoraConfig(r=spec["lora"]["rank"], lora_alpha=spec["lora"]["alpha"], target_modules=TARGETS,
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
      model = peft.get_peft_model(model, cfg)
    model.train()
    self.model = model
    self.trainable = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(self.trainable, lr=spec["learning_rate"], betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=0.0)
    self.tokens = torch.tensor(spec["tokens"], dtype=torch.long)
    self.mask = torch.ones_like(self.tokens)
    self.autocast = spec["dtype"] == "bfloat16"

  def step(self):
    torch = self.torch
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
    with ctx:
      loss = self.model(input_ids=self.tokens, attention_mask=self.mask, labels=self.tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  def info(self):
    import peft
    import torch
    import transformers
    state_bytes = sum(v.numel() * v.element_size() for s in self.opt.state.values() for v in s.values()
                      if torch.is_tensor(v))
    cfg = getattr(self.model, "config", None)
    attn = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
    return {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(),
        "param_count": self.param_count,
        "params_bytes": self.param_bytes,
        "trainable_count": sum(p.numel() for p in self.trainable),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in self.trainable),
        "opt_state_bytes": state_bytes,
        "settings": f"float32 weights{', autocast bfloat16' if self.autocast else ''}, attn {attn}, "
                    f"{torch.get_num_threads()} threads, torch.optim.AdamW (default impl)",
    }


if __name__ == "__main__":
  train_common.main(Engine)

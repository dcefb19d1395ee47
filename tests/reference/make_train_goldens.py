"""Training goldens for the tiny HF models: loss and gradients of full fine-tuning and of PEFT LoRA.

Independent reference for gemma_jax's training path (train.loss_fn, lora.py): PyTorch + transformers + peft,
float32, eager attention. Nothing here imports gemma_jax. Run with the reference venv (tests/reference/
README.md; peft==0.21.2 on top of it):

    $VENVS/ref311/bin/python tests/reference/make_train_goldens.py

For each of tests/data/hf_tiny/{gemma2_gqa,gemma3_qk} it loads the saved model and, on one fixed batch of 2
right-padded rows (attention_mask 0 on padding, labels -100 on padding and on some real tokens), writes:

  train_batch.npz             input_ids, attention_mask, labels int32 (2, T); loss_full, loss_lora float32 ()
  train_full_grads.npz        d loss_full / d p for every parameter, under the names and layouts of
                              model.safetensors (the tied embedding once: its grad includes the lm_head use)
  train_lora.npz              for every PEFT module M (model.layers.{i}.self_attn.{q,k,v,o}_proj,
                              model.layers.{i}.mlp.{gate,up,down}_proj): M.lora_A.weight (r, in),
                              M.lora_B.weight (out, r) -- the values used -- and M.lora_A.grad, M.lora_B.grad

npz, not safetensors: the HF importer reads every *.safetensors file of the directory as weights.

The loss is HF's causal LM loss: logits[:, :-1] against labels[:, 1:], mean over labels != -100 (the whole
batch at once). LoRA: r=4, lora_alpha=8 (scale 2), every q/k/v/o/gate/up/down projection, no dropout; A and
B are then overwritten with seeded N(0, 0.2^2) draws, so that B != 0 and both get gradients.

Checks before writing (an assertion stops the script): the loss equals a manual cross-entropy over the
shifted labels; the gradients (full and LoRA) agree with float64 ones (< 1e-4 of each tensor's largest
entry), which agree with a float64 central finite difference along a random direction (< 1e-5 relative);
PEFT's merged model (merge_and_unload) gives the LoRA loss; padding never changes a real row's loss (row 1
alone, unpadded).
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "hf_tiny"
NAMES = {"gemma2_gqa": 2001, "gemma3_qk": 2002}  # model -> seed of its batch and LoRA values
T = 13  # past the sliding window (5) of both models
LENGTHS = (13, 9)  # row 1 is right-padded with 4 pad tokens
IGNORED = ((0, 1, 2, 3), (0, 1, 2, 6))  # labels -100 here (a prompt, and one token inside row 1's answer)
PAD = 0
RANK, ALPHA, LORA_STD = 4, 8, 0.2
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_batch(vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, T), generator=gen)  # no pad/eos/bos ids among the tokens
    mask = torch.zeros(2, T, dtype=torch.long)
    labels = ids.clone()
    for row, (n, ignored) in enumerate(zip(LENGTHS, IGNORED)):
        mask[row, :n] = 1
        ids[row, n:] = PAD
        labels[row, n:] = -100
        labels[row, list(ignored)] = -100
    return ids, mask, labels


def load(name: str):
    model = AutoModelForCausalLM.from_pretrained(TINY / name, dtype=torch.float32, attn_implementation="eager")
    return model.eval()  # no dropout anywhere (attention_dropout is 0.0 too)


def loss_of(model, ids, mask, labels):
    return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss


def manual_loss(model, ids, mask, labels):
    """The same loss without HF's loss function, in the model's dtype (HF's upcasts float64 logits to float32)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


@contextlib.contextmanager
def float64_throughout():
    """HF computes RMSNorm (`x.float()`) and the eager softmax (`dtype=torch.float32`) in float32 even in a
    float64 model, which leaves ~1e-7 of rounding noise in the loss: too much for a finite difference to
    check gradients to 1e-4. Inside this block both stay in float64 (RoPE's float32 angles are a constant
    of the function, not noise, and are left alone)."""
    orig_float, orig_softmax = torch.Tensor.float, torch.nn.functional.softmax

    def keep64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else orig_float(self, *args, **kwargs)

    def softmax(x, *args, dtype=None, **kwargs):
        return orig_softmax(x, *args, dtype=torch.float64 if x.dtype == torch.float64 else dtype, **kwargs)

    torch.Tensor.float, torch.nn.functional.softmax = keep64, softmax
    try:
        yield
    finally:
        torch.Tensor.float, torch.nn.functional.softmax = orig_float, orig_softmax


def check_gradients(model, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], batch, seed: int,
                    h: float = 1e-6) -> tuple[float, float]:
    """Checks float32 gradients of the named params; returns (finite-difference error, float32 error).

    In float64 throughout, the autograd gradient g64 must predict the central difference (f(h) - f(-h)) / 2h
    of the loss along a random direction v of all the named params (relative error < 1e-5), and the float32
    gradients must agree with g64 (max difference < 1e-4 of each tensor's largest entry). Two steps because
    <g, v> sums ~1e5 terms of both signs: on the gemma3_qk model it is 4000x smaller than sum |g_i v_i|, so
    a direct finite-difference check of float32 gradients would measure their rounding times 4000.
    """
    m64 = copy.deepcopy(model).to(torch.float64)
    named = dict(m64.named_parameters())
    m64.zero_grad()
    with float64_throughout():
        manual_loss(m64, *batch).backward()
    g64 = {n: named[n].grad.detach().clone() for n in params}
    err32 = max(float((grads[n].double() - g64[n]).abs().max() / g64[n].abs().max()) for n in params)
    assert err32 < 1e-4, err32
    gen = torch.Generator().manual_seed(seed)
    direction = {n: torch.randn(params[n].shape, generator=gen, dtype=torch.float64) for n in params}
    predicted = sum(float((g64[n] * direction[n]).sum()) for n in params)
    values = {}
    with torch.no_grad(), float64_throughout():
        for step in (-1, 1):
            for n in params:
                named[n].copy_(params[n].double() + step * h * direction[n])
            values[step] = float(manual_loss(m64, *batch))
    fd = (values[1] - values[-1]) / (2 * h)
    rel = abs(fd - predicted) / abs(fd)
    assert rel < 1e-5, (fd, predicted, rel)
    return rel, err32


def full_grads(model, batch, seed):
    model.zero_grad()
    loss = loss_of(model, *batch)
    loss.backward()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}  # tied lm_head appears once
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in grads and all(g.abs().max() > 0 for g in grads.values())
    return loss.detach(), grads, check_gradients(model, params, grads, batch, seed)


def lora_grads(model, batch, seed):
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=MODULES, lora_dropout=0.0, bias="none",
                        init_lora_weights=True)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(seed + 1)
    lora = {}
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_STD)
                lora[n] = p
    assert len(lora) == 2 * len(MODULES) * model.config.num_hidden_layers
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())
    loss = loss_of(peft_model, *batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in lora.items()}
    values = {n: p.detach().clone() for n, p in lora.items()}
    rel = check_gradients(peft_model, values, grads, batch, seed + 2)
    # merged into the base weights (PEFT's own merge) the model computes the same loss
    merged = peft_model.merge_and_unload()
    mdiff = abs(float(loss_of(merged, *batch)) - float(loss))
    assert mdiff < 1e-5, mdiff
    short = {}
    for n in lora:  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight -> model.layers.0...
        key = n.removeprefix("base_model.model.").replace(".default.", ".")
        short[key] = values[n].contiguous()
        short[key.removesuffix(".weight") + ".grad"] = grads[n].contiguous()
    return loss.detach(), short, rel, mdiff


def main():
    print(f"transformers {transformers.__version__}, torch {torch.__version__}", file=sys.stderr)
    for name, seed in NAMES.items():
        model = load(name)
        batch = make_batch(model.config.vocab_size, seed)
        ids, mask, labels = batch
        with torch.no_grad():
            manual = manual_loss(model, *batch)
            # padding changes nothing: row 1 alone, unpadded, has the same per-token losses
            full_row = torch.nn.functional.cross_entropy(
                model(input_ids=ids, attention_mask=mask).logits[1, :-1], labels[1, 1:], reduction="none")
            n = LENGTHS[1]
            alone = torch.nn.functional.cross_entropy(
                model(input_ids=ids[1:, :n]).logits[0, :-1], labels[1, 1:n], reduction="none")
            pad_diff = float((full_row[: n - 1] - alone).abs().max())
            assert pad_diff < 1e-5, pad_diff
        loss_full, grads, rel_full = full_grads(model, batch, seed)
        assert abs(float(loss_full) - float(manual)) < 1e-6
        loss_lora, lora, rel_lora, mdiff = lora_grads(load(name), batch, seed)
        out = TINY / name
        np.savez(out / "train_full_grads.npz", **{n: g.numpy() for n, g in grads.items()})
        np.savez(out / "train_lora.npz", **{n: t.numpy() for n, t in lora.items()})
        np.savez(out / "train_batch.npz", input_ids=ids.numpy().astype(np.int32),
                 attention_mask=mask.numpy().astype(np.int32), labels=labels.numpy().astype(np.int32),
                 loss_full=np.float32(loss_full), loss_lora=np.float32(loss_lora))
        sizes = {f: (out / f).stat().st_size for f in ("train_batch.npz", "train_full_grads.npz", "train_lora.npz")}
        report = dict(loss_full=float(loss_full), loss_lora=float(loss_lora), fd_rel_full=rel_full[0],
                      f32_err_full=rel_full[1], fd_rel_lora=rel_lora[0], f32_err_lora=rel_lora[1],
                      merged_loss_diff=mdiff, padding_diff=pad_diff, targets=int((labels[:, 1:] != -100).sum()),
                      bytes=sizes)
        print(name, json.dumps(report))

if __name__ == "__main__":
    main()

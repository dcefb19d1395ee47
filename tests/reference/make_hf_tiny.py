"""Build tiny random Hugging Face Gemma models and their reference logits.

Independent reference for gemma_jax: the numbers come from Hugging Face transformers (PyTorch, float32,
eager attention), not from our code. Run with the Python 3.11 reference venv (see tests/reference/README.md):

    $VENVS/ref311/bin/python tests/reference/make_hf_tiny.py

Writes, for each config NAME below, tests/data/hf_tiny/NAME/:
  config.json, generation_config.json, model.safetensors (or shards + model.safetensors.index.json)
  reference.npz: input_ids int32 (2, 23), logits float32 (2, 23, V)  [full forward, no padding, no cache]
  greedy.npz:    prompt_ids int32 (1, 6), output_ids int32 (1, 26) [prompt + 20 greedy tokens from
                 HF generate with its KV cache], step_logits float32 (20, V) [logits that chose each token]

Every parameter is re-drawn from N(0, 0.3^2), RMSNorm weights included (HF initialises them to 0 because it
multiplies by 1 + w; random values make a missing or doubled "+1" visible). Gemma 3's q/k norm weights use
std 1.0 so that its attention (on RMS-normed q and k) is not nearly uniform.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
)
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gemma3 import modeling_gemma3

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "data" / "hf_tiny"

STD = 0.3  # std of every parameter (matrices, embeddings and norm weights) ...
QK_NORM_STD = 1.0  # ... except Gemma 3's q/k norms: RMS-normed q and k give flat attention with std 0.3
B, T = 2, 23  # reference batch
PROMPT_LEN, NEW_TOKENS = 6, 20  # greedy check: goes well past the sliding window (5)

COMMON = dict(
    vocab_size=251,
    intermediate_size=67,
    head_dim=16,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
    tie_word_embeddings=True,
    attention_bias=False,
    attention_dropout=0.0,
    dtype="float32",
)


def make_configs():
    """name -> (model class, config, seed)."""
    gemma_mqa = GemmaConfig(
        **COMMON,
        hidden_size=44,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        hidden_act="gelu_pytorch_tanh",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    gemma_mha = GemmaConfig(
        **COMMON,
        hidden_size=44,  # N*H = 48 != D = 44, like Gemma 1 7B
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=3,
        hidden_act="gelu_pytorch_tanh",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    # NOTE hidden 42, not 44: transformers 5.24 Gemma2Config.validate_architecture (configuration_gemma2.py
    # L101-107) refuses hidden_size % num_attention_heads != 0 even though head_dim is explicit, and 44 % 6 != 0.
    # 42 keeps every dim odd-looking (N*H = 96 != D = 42) and lets the config load back in HF.
    gemma2_gqa = Gemma2Config(
        **COMMON,
        hidden_size=42,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"] * 2,  # layer 0 local, alternating
        attn_logit_softcapping=3.0,
        final_logit_softcapping=2.0,
        query_pre_attn_scalar=24,  # deliberately != head_dim (16)
    )
    gemma3_qk = Gemma3TextConfig(
        **COMMON,
        hidden_size=44,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=5,
        # the 5:1 pattern cut to 7 layers: 0-4 local, 5 global, 6 local
        layer_types=["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        query_pre_attn_scalar=20,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
    )
    return {
        "gemma_mqa": (GemmaForCausalLM, gemma_mqa, 1001),
        "gemma_mha": (GemmaForCausalLM, gemma_mha, 1002),
        "gemma2_gqa": (Gemma2ForCausalLM, gemma2_gqa, 1003),
        "gemma3_qk": (Gemma3ForCausalLM, gemma3_qk, 1004),
    }


def build(cls, config, seed):
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        names = []
        for name, p in model.named_parameters():  # tied lm_head appears once (as the embedding)
            std = QK_NORM_STD if name.endswith(("q_norm.weight", "k_norm.weight")) else STD
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
            names.append(name)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    norms = [n for n in names if "norm" in n]
    assert norms and all(model.get_parameter(n).abs().min() > 0 for n in norms)
    return model


# ---- attention-logit statistics (to show the soft-cap really bends things) -------------------------------
_ATTN_STATS: list[torch.Tensor] = []


def _wrap_eager(mod):
    orig = mod.eager_attention_forward

    def wrapped(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
        k = modeling_gemma2.repeat_kv(key, module.num_key_value_groups)
        s = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            s = s[(attention_mask == 0).expand_as(s)]  # only the kept (unmasked) positions
        _ATTN_STATS.append(s.detach().flatten())
        return orig(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap, **kw)

    mod.eager_attention_forward = wrapped


_wrap_eager(modeling_gemma2)
_wrap_eager(modeling_gemma3)
# (Gemma 1 has no soft-cap; its eager function is not wrapped.)


def forward_logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits.float()


def greedy(model, prompt):
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,  # never stop early on eos (id 1): we want 20 pure argmax steps
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    seq = out.sequences
    step_logits = torch.cat([l.float() for l in out.logits], 0)  # (20, V)
    assert seq.shape == (1, PROMPT_LEN + NEW_TOKENS), seq.shape
    # independent check of HF's own cache: argmax of full no-cache forwards must give the same tokens
    ref = prompt
    for _ in range(NEW_TOKENS):
        nxt = forward_logits(model, ref)[:, -1].argmax(-1, keepdim=True)
        ref = torch.cat([ref, nxt], 1)
    assert torch.equal(ref, seq), (ref, seq)
    # the logits at each step must also agree with the no-cache forward (cache = same math)
    full = forward_logits(model, seq[:, :-1])[0, PROMPT_LEN - 1 :]
    diff = (full - step_logits).abs().max().item()
    assert diff < 1e-4, diff
    top2 = step_logits.topk(2, -1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    return seq, step_logits, margin, diff


def numpy_forward(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """float64 numpy re-implementation from the saved files only, written from the semantics listed in
    tests/reference/README.md. Agreement with HF's logits checks that list (and the saved files)."""
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    w = {}
    files = sorted(model_dir.glob("*.safetensors"))
    for f in files:
        w.update({k: v.astype(np.float64) for k, v in load_file(f).items()})
    D, N, K, H = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    G = N // K
    eps = cfg["rms_norm_eps"]
    mt = cfg["model_type"]
    L = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["full_attention"] * L
    window = cfg.get("sliding_window")
    scale = cfg.get("query_pre_attn_scalar", H) ** -0.5
    acap = cfg.get("attn_logit_softcapping")
    fcap = cfg.get("final_logit_softcapping")
    rp = cfg["rope_parameters"]

    def rms(x, s):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1.0 + s)

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))

    def rope(x, pos, p):  # x (B, T, heads, H); rotate-half
        inv = 1.0 / p["rope_theta"] ** (np.arange(0, H, 2) / H)
        factor = p.get("factor", 1.0) if p["rope_type"] == "linear" else 1.0
        ang = (pos / factor)[:, None] * inv[None, :]  # (T, H/2)
        cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
        x1, x2 = x[..., : H // 2], x[..., H // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    Bn, Tn = ids.shape
    pos = np.arange(Tn, dtype=np.float64)
    E = w["model.embed_tokens.weight"]
    x = E[ids] * np.float64(np.float32(np.sqrt(D)))  # HF: float32 buffer sqrt(D), cast to weight dtype
    qi, ki = np.arange(Tn)[:, None], np.arange(Tn)[None, :]
    for i in range(L):
        P = f"model.layers.{i}."
        h = rms(x, w[P + "input_layernorm.weight"])
        q = (h @ w[P + "self_attn.q_proj.weight"].T).reshape(Bn, Tn, N, H)
        k = (h @ w[P + "self_attn.k_proj.weight"].T).reshape(Bn, Tn, K, H)
        v = (h @ w[P + "self_attn.v_proj.weight"].T).reshape(Bn, Tn, K, H)
        if mt == "gemma3_text":  # q/k RMSNorm per head, before RoPE
            q = rms(q, w[P + "self_attn.q_norm.weight"])
            k = rms(k, w[P + "self_attn.k_norm.weight"])
        p = rp[types[i]] if types[i] in rp else rp
        q, k = rope(q, pos, p), rope(k, pos, p)
        q = q.reshape(Bn, Tn, K, G, H) * scale  # query head n uses kv head n // G
        s = np.einsum("btkgh,bskh->bkgts", q, k)
        if acap:
            s = np.tanh(s / acap) * acap
        keep = ki <= qi
        if types[i] == "sliding_attention":
            keep = keep & (qi - ki < window)
        s = np.where(keep, s, -1e30)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        o = np.einsum("bkgts,bskh->btkgh", s, v).reshape(Bn, Tn, N * H)
        a = o @ w[P + "self_attn.o_proj.weight"].T
        if mt == "gemma":
            x = x + a
            h = rms(x, w[P + "post_attention_layernorm.weight"])  # Gemma 1: this is the pre-MLP norm
        else:
            x = x + rms(a, w[P + "post_attention_layernorm.weight"])
            h = rms(x, w[P + "pre_feedforward_layernorm.weight"])
        m = (gelu_tanh(h @ w[P + "mlp.gate_proj.weight"].T) * (h @ w[P + "mlp.up_proj.weight"].T)) @ w[
            P + "mlp.down_proj.weight"
        ].T
        x = x + (m if mt == "gemma" else rms(m, w[P + "post_feedforward_layernorm.weight"]))
    x = rms(x, w["model.norm.weight"])
    logits = x @ E.T
    if fcap:
        logits = np.tanh(logits / fcap) * fcap
    return logits


def describe(name, model, logits, cfg):
    v = logits.flatten()
    rep = {
        "logits_std": float(v.std()),
        "logits_absmax": float(v.abs().max()),
        "distinct_argmax": int(logits.argmax(-1).unique().numel()),
    }
    fcap = getattr(cfg, "final_logit_softcapping", None)
    if fcap:
        rep["final_frac_|l|>cap/2"] = float((v.abs() > fcap / 2).float().mean())
    if _ATTN_STATS:
        s = torch.cat(_ATTN_STATS)
        rep["attn_score_std"] = float(s.std())
        acap = getattr(cfg, "attn_logit_softcapping", None)
        if acap:
            rep["attn_frac_|s|>cap/2"] = float((s.abs() > acap / 2).float().mean())
            rep["attn_frac_|s|>cap"] = float((s.abs() > acap).float().mean())
    return rep


def main():
    print(f"transformers {transformers.__version__}, torch {torch.__version__}", file=sys.stderr)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    OUT.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, (cls, cfg, seed) in make_configs().items():
        model = build(cls, cfg, seed)
        d = OUT / name
        if d.exists():
            shutil.rmtree(d)
        model.save_pretrained(d, safe_serialization=True)

        gen = torch.Generator().manual_seed(seed + 7)
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
        _ATTN_STATS.clear()
        logits = forward_logits(model, ids)
        stats = describe(name, model, logits, cfg)
        _ATTN_STATS.clear()

        # the saved directory must reload in HF to the same logits (config round trip, tying, rope params)
        re = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        rdiff = (forward_logits(re, ids) - logits).abs().max().item()
        assert rdiff == 0.0, (name, rdiff)
        _ATTN_STATS.clear()

        np.savez(d / "reference.npz", input_ids=ids.numpy().astype(np.int32), logits=logits.numpy().astype(np.float32))
        ndiff = float(np.abs(numpy_forward(d, ids.numpy()) - logits.numpy()).max())
        assert ndiff < 1e-4, (name, ndiff)
        stats["numpy_f64_vs_hf_maxdiff"] = ndiff
        prompt = ids[:1, :PROMPT_LEN]
        seq, step_logits, margin, cdiff = greedy(model, prompt)
        _ATTN_STATS.clear()
        np.savez(
            d / "greedy.npz",
            prompt_ids=prompt.numpy().astype(np.int32),
            output_ids=seq.numpy().astype(np.int32),
            step_logits=step_logits.numpy().astype(np.float32),
        )
        stats.update(greedy_min_top2_margin=margin, cache_vs_nocache_maxdiff=cdiff, reload_maxdiff=rdiff)
        summary[name] = stats

        if name == "gemma3_qk":
            # same weights, sharded: several model-0000X-of-0000Y.safetensors + model.safetensors.index.json
            ds = OUT / "gemma3_qk_sharded"
            if ds.exists():
                shutil.rmtree(ds)
            model.save_pretrained(ds, safe_serialization=True, max_shard_size="150KB")
            shards = sorted(p.name for p in ds.glob("model-*.safetensors"))
            assert len(shards) >= 3 and (ds / "model.safetensors.index.json").exists(), shards
            re = cls.from_pretrained(ds, dtype=torch.float32, attn_implementation="eager").eval()
            sdiff = (forward_logits(re, ids) - logits).abs().max().item()
            assert sdiff == 0.0, sdiff
            assert np.abs(numpy_forward(ds, ids.numpy()) - logits.numpy()).max() < 1e-4
            _ATTN_STATS.clear()
            # copies, so that every hf_tiny dir is self-contained
            shutil.copy(d / "reference.npz", ds / "reference.npz")
            shutil.copy(d / "greedy.npz", ds / "greedy.npz")
            summary["gemma3_qk_sharded"] = {"shards": shards, "reload_maxdiff": sdiff}

    for name, s in summary.items():
        size = sum(p.stat().st_size for p in (OUT / name).iterdir())
        s["dir_bytes"] = size
        print(name, json.dumps(s))


if __name__ == "__main__":
    main()

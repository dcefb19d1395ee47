"""Test utility: write a Gemma model in llama.cpp's GGUF layout with gguf.GGUFWriter (the inverse of
gemma_jax/convert/gguf.py, written independently from models.md's table)."""

import gguf
import numpy as np

ARCH = {1: "gemma", 2: "gemma2", 3: "gemma3"}


def gguf_tensors(cfg, flat: dict) -> dict[str, np.ndarray]:
  """Our flat params -> {gguf name: numpy array in GGUF's numpy shape}; norms get +1."""
  n, k, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim
  out = {"token_embd.weight": flat["embedder/input_embedding"], "output_norm.weight": flat["final_norm/scale"] + 1}
  for i in range(cfg.num_layers):
    a, b = f"layer_{i}/attn/", f"blk.{i}."
    q = flat[a + "q_einsum/w"]                       # (D, N, H)
    kv = flat[a + "kv_einsum/w"]                     # (D, K, 2, H)
    rows = lambda w: np.transpose(w, (1, 2, 0)).reshape(-1, d)  # (D, X, H) -> (X*H, D)
    out[b + "attn_q.weight"] = rows(q)
    out[b + "attn_k.weight"], out[b + "attn_v.weight"] = rows(kv[:, :, 0]), rows(kv[:, :, 1])
    out[b + "attn_output.weight"] = np.transpose(flat[a + "attn_vec_einsum/w"], (2, 0, 1)).reshape(d, n * h)
    g = flat[f"layer_{i}/mlp/gating_einsum/w"]       # (F, 2, D)
    out[b + "ffn_gate.weight"], out[b + "ffn_up.weight"] = g[:, 0], g[:, 1]
    out[b + "ffn_down.weight"] = flat[f"layer_{i}/mlp/linear/w"].T
    norms = {"attn_norm": "pre_attention_norm", "ffn_norm": "pre_ffw_norm"}
    if cfg.use_post_attn_norm:
      norms.update(post_attention_norm="post_attention_norm", post_ffw_norm="post_ffw_norm")
    for g, ours in norms.items():
      out[f"{b}{g}.weight"] = flat[f"layer_{i}/{ours}/scale"] + 1
    if cfg.use_qk_norm:
      out[b + "attn_q_norm.weight"] = flat[a + "_query_norm/scale"] + 1
      out[b + "attn_k_norm.weight"] = flat[a + "_key_norm/scale"] + 1
  return {name: np.ascontiguousarray(x, np.float32) for name, x in out.items()}


def write_gguf(path, cfg, flat: dict, *, types: dict[str, gguf.GGMLQuantizationType] | None = None,
               arch: str | None = None, vocab: tuple[list, list, list] | None = None) -> dict[str, np.ndarray]:
  """Writes cfg/flat as a GGUF; `types` picks a quantization per GGUF tensor name (default F32).

  Returns the arrays as the file holds them after quantization (dequantized), in GGUF numpy shape.
  """
  arch = arch or ARCH[cfg.family]
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_embedding_length(cfg.embed_dim)
  w.add_feed_forward_length(cfg.hidden_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_context_length(cfg.max_seq_len)
  w.add_rope_freq_base(cfg.rope_base_global)
  if cfg.sliding_window:
    w.add_sliding_window(cfg.sliding_window)
  if cfg.rope_scale_global != 1:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_scale_global)
  if cfg.family == 2:
    w.add_float32(f"{arch}.attn_logit_softcapping", cfg.attn_logits_softcap)
    w.add_float32(f"{arch}.final_logit_softcapping", cfg.final_logits_softcap)
  if vocab is not None:
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab[0])
    w.add_token_scores(vocab[1])
    w.add_token_types(vocab[2])
  held = {}
  for name, x in gguf_tensors(cfg, flat).items():
    qtype = (types or {}).get(name, gguf.GGMLQuantizationType.F32)
    if qtype == gguf.GGMLQuantizationType.F32:
      w.add_tensor(name, x)
      held[name] = x
    else:
      q = gguf.quants.quantize(x, qtype)
      w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
      held[name] = gguf.quants.dequantize(q, qtype).reshape(x.shape)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return held

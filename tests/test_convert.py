"""Importers: GGUF (every tensor type the gguf package can write), official Orbax layout, and the errors
a user meets with bad files. The HF importer is covered by test_hf_parity.py, the real GGUF by
test_real_270m.py."""

import json
import shutil

import gguf
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import gemma_jax as gj
from gemma_jax.transformer import flat_params, set_flat_params
from gemma_jax.configs import PRESETS, TINY_PRESETS
from gemma_jax.convert.official import infer_config
from gemma_jax.errors import GemmaError
from gguf_writer import write_gguf

T = gguf.GGMLQuantizationType
# GGUF cannot store the query scale; these tiny models use the default 1/sqrt(head_dim).
GGUF_TINY = {name: cfg.replace(query_pre_attn_scalar=None) for name, cfg in TINY_PRESETS.items()}
# Quantized rows must be multiples of the 32-wide blocks.
QUANT_TINY = TINY_PRESETS["tiny_gemma3_qk"].replace(embed_dim=64, hidden_dim=96, head_dim=32,
                                                    query_pre_attn_scalar=None)


def random_flat(cfg, seed=0):
  model = gj.Model.random(cfg, seed=seed)
  rng = np.random.default_rng(seed)
  return {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
          for k, v in flat_params(jax.tree.map(np.asarray, model.params)).items()}


def logits_of(cfg, flat, ids):
  model = gj.Model.random(cfg)
  set_flat_params(model.params, {k: np.asarray(v, np.float32) for k, v in flat.items()})
  return model.logits(ids)


def loaded_flat(ckpt):
  model = gj.load(ckpt)
  return model, flat_params(jax.tree.map(np.asarray, model.params))


@pytest.mark.parametrize("name", sorted(GGUF_TINY))
def test_gguf_f32_round_trip_is_exact(name, tmp_path):
  cfg = GGUF_TINY[name]
  flat = random_flat(cfg)
  write_gguf(tmp_path / "m.gguf", cfg, flat)
  model, got = loaded_flat(gj.convert(tmp_path / "m.gguf", tmp_path / "ckpt"))
  assert model.config.replace(name=cfg.name, max_seq_len=cfg.max_seq_len) == cfg
  assert model.tokenizer is None  # weights-only GGUF
  for k, v in flat.items():
    np.testing.assert_allclose(got[k], v, rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1])
def test_gguf_quantized_tensors_land_in_the_right_places(qtype, tmp_path):
  cfg = QUANT_TINY
  flat = random_flat(cfg)
  matrices = ["token_embd.weight"] + [f"blk.{i}.{t}.weight" for i in range(cfg.num_layers)
                                      for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                "ffn_up", "ffn_down")]
  held = write_gguf(tmp_path / "q.gguf", cfg, flat, types={m: qtype for m in matrices})
  # The file's (dequantized) weights, mapped back by the F32 path, are what the import must produce.
  write_gguf(tmp_path / "f.gguf", cfg, flat, types={})
  from gemma_jax.convert.gguf import import_gguf

  reference = import_gguf(tmp_path / "f.gguf").params
  quantized = import_gguf(tmp_path / "q.gguf").params
  assert held["token_embd.weight"].shape == (cfg.vocab_size, cfg.embed_dim)
  np.testing.assert_array_equal(quantized["embedder/input_embedding"], held["token_embd.weight"])
  for k, v in reference.items():
    err = np.abs(quantized[k] - v).max()
    assert err < (0.35 if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1) else 0.03), (k, err)
    assert quantized[k].shape == v.shape


def official_layout(cfg, flat, transpose_gating=False):
  """Our flat params -> the official nested tree (layouts as in ../shared/models.md)."""
  out = {}
  for path, value in flat.items():
    module, leaf = path.rsplit("/", 1)
    if path.endswith("q_einsum/w"):
      value = value.transpose(1, 0, 2)                  # (D, N, H) -> (N, D, H)
    elif path.endswith("kv_einsum/w"):
      value = value.transpose(2, 1, 0, 3)               # (D, K, 2, H) -> (2, K, D, H)
    elif path.endswith("gating_einsum/w"):
      value = value.transpose(1, 2, 0) if transpose_gating else value.transpose(1, 0, 2)  # -> (2, D, F) / (2, F, D)
    out.setdefault(f"transformer/{module}", {})[leaf] = np.ascontiguousarray(value)
  if cfg.num_heads == cfg.num_kv_heads:  # MHA checkpoints fuse q, k, v into qkv_einsum (3, N, D, H)
    for i in range(cfg.num_layers):
      attn = out.pop(f"transformer/layer_{i}/attn/q_einsum"), out.pop(f"transformer/layer_{i}/attn/kv_einsum")
      out[f"transformer/layer_{i}/attn/qkv_einsum"] = {"w": np.concatenate([attn[0]["w"][None], attn[1]["w"]])}
  return out


def official_shapes(cfg):
  """The official checkpoint's flat shapes for cfg, written from models.md (not from our code)."""
  n, k, d, h, f = cfg.num_heads, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim, cfg.hidden_dim
  shapes = {"embedder/input_embedding": (cfg.vocab_size, d), "final_norm/scale": (d,)}
  for i in range(cfg.num_layers):
    a = f"layer_{i}/attn/"
    if n == k:
      shapes[a + "qkv_einsum/w"] = (3, n, d, h)
    else:
      shapes[a + "q_einsum/w"], shapes[a + "kv_einsum/w"] = (n, d, h), (2, k, d, h)
    shapes[a + "attn_vec_einsum/w"] = (n, h, d)
    shapes[f"layer_{i}/mlp/gating_einsum/w"], shapes[f"layer_{i}/mlp/linear/w"] = (2, f, d), (f, d)
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    norms += ["post_attention_norm"] if cfg.use_post_attn_norm else []
    norms += ["post_ffw_norm"] if cfg.use_post_ffw_norm else []
    shapes.update({f"layer_{i}/{m}/scale": (d,) for m in norms})
    if cfg.use_qk_norm:
      shapes[a + "_query_norm/scale"] = shapes[a + "_key_norm/scale"] = (h,)
  return shapes


@pytest.mark.parametrize("name", ["tiny_gemma1_mha", "tiny_gemma2_gqa", "tiny_gemma3_qk"])
def test_official_orbax_layout_imports(name, tmp_path):
  cfg = TINY_PRESETS[name]
  flat = random_flat(cfg)
  # Gemma 2 2B stores gating_einsum as (2, D, F); the importer turns it back.
  ocp.PyTreeCheckpointer().save(tmp_path / "official", official_layout(cfg, flat, name == "tiny_gemma2_gqa"))
  model, got = loaded_flat(gj.convert(tmp_path / "official", tmp_path / "ckpt", preset=name))
  assert model.config == cfg
  for k, v in flat.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  ids = [2, 5, 9, 77, 13, 200, 31, 8, 8, 1]
  np.testing.assert_allclose(model.logits(ids), logits_of(cfg, flat, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_official_config_is_inferred_from_shapes(name):
  assert infer_config(official_shapes(PRESETS[name]), "ckpt") == PRESETS[name]


def test_official_layout_without_matching_preset_asks_for_one(tmp_path):
  flat = random_flat(TINY_PRESETS["tiny_gemma1_mqa"])
  ocp.PyTreeCheckpointer().save(tmp_path / "official", official_layout(TINY_PRESETS["tiny_gemma1_mqa"], flat))
  with pytest.raises(GemmaError, match=r"no official preset matches Gemma 1 with L=3 D=44 .*--preset"):
    gj.convert(tmp_path / "official", tmp_path / "ckpt")


# ---- bad input -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  write_gguf(path, GGUF_TINY["tiny_gemma3_qk"], random_flat(GGUF_TINY["tiny_gemma3_qk"]))
  return path


def test_missing_path(tmp_path):
  with pytest.raises(GemmaError, match=r"nowhere\.gguf does not exist"):
    gj.convert(tmp_path / "nowhere.gguf", tmp_path / "out")


def test_file_that_is_not_a_model(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(GemmaError, match=r"notes\.txt is not a model file gemma_jax can import"):
    gj.convert(tmp_path / "notes.txt", tmp_path / "out")
  (tmp_path / "empty").mkdir()
  with pytest.raises(GemmaError, match=r"empty is a folder but not a model"):
    gj.convert(tmp_path / "empty", tmp_path / "out")


def test_truncated_gguf(tiny_gguf, tmp_path):
  data = tiny_gguf.read_bytes()
  for cut in (len(data) - 100, 2000, 10):
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    with pytest.raises(GemmaError, match=r"cut\.gguf (is truncated: tensor \S+ needs bytes|is not a readable "
                                         r"GGUF file)"):
      gj.convert(tmp_path / "cut.gguf", tmp_path / "out")


def test_unsupported_architecture(tmp_path):
  cfg = GGUF_TINY["tiny_gemma1_mqa"]
  write_gguf(tmp_path / "llama.gguf", cfg, random_flat(cfg), arch="llama")
  with pytest.raises(GemmaError, match=r"unsupported architecture 'llama'; gemma_jax imports gemma, gemma2, gemma3"):
    gj.convert(tmp_path / "llama.gguf", tmp_path / "out")


def test_unsupported_tensor_type(tmp_path):
  cfg = QUANT_TINY
  flat = random_flat(cfg)
  write_gguf(tmp_path / "i.gguf", cfg, flat)
  # Rewrite blk.0.attn_q as IQ4_NL (same block size as Q4_0: 18 bytes per 32 values).
  w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "gemma3")
  reader = gguf.GGUFReader(tmp_path / "i.gguf")
  for key, field in reader.fields.items():
    if key.startswith("gemma3."):
      value = field.contents()
      add = {int: w.add_uint32, float: w.add_float32, str: w.add_string}[type(value)]
      add(key, value)
  for t in reader.tensors:
    data = np.asarray(t.data)
    if t.name == "blk.0.attn_q.weight":
      raw = np.zeros((data.shape[0], data.shape[1] // 32 * 18), np.uint8)
      w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=T.IQ4_NL)
    else:
      w.add_tensor(t.name, data)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(GemmaError, match=r"tensor blk\.0\.attn_q\.weight has type IQ4_NL, which gemma_jax does not "
                                       r"import \(supported: F32, F16, BF16, Q8_0"):
    gj.convert(tmp_path / "iq.gguf", tmp_path / "out")


def test_output_directory_must_be_new(tiny_gguf, tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "x").write_text("keep me")
  with pytest.raises(GemmaError, match=r"out already exists and is not an empty directory"):
    gj.convert(tiny_gguf, tmp_path / "out")
  assert (tmp_path / "out" / "x").read_text() == "keep me"


def test_checkpoint_whose_shapes_do_not_match_its_config(tiny_gguf, tmp_path):
  ckpt = gj.convert(tiny_gguf, tmp_path / "ckpt")
  meta = json.loads((ckpt / "config.json").read_text())
  meta["config"]["hidden_dim"] = 71
  (ckpt / "config.json").write_text(json.dumps(meta))
  with pytest.raises(GemmaError, match=r"parameter layer_0/mlp/gating_einsum/w has shape \(67, 2, 44\) but the "
                                       r"config \(\S+\) expects \(71, 2, 44\)"):
    gj.load(ckpt)


def test_checkpoint_of_an_older_format_asks_to_convert_again(tiny_gguf, tmp_path):
  ckpt = gj.convert(tiny_gguf, tmp_path / "ckpt")
  meta = json.loads((ckpt / "config.json").read_text())
  meta["version"] = 1  # official (N, D, H) projection layouts
  (ckpt / "config.json").write_text(json.dumps(meta))
  with pytest.raises(GemmaError, match=r"has format version 1, this library reads versions 3, 4 and 5; "
                                       r"convert the weights again with `python -m gemma_jax.convert`"):
    gj.load(ckpt)


def test_loading_something_that_is_not_a_checkpoint(tmp_path):
  with pytest.raises(GemmaError, match=r"checkpoint directory \S+missing does not exist"):
    gj.load(tmp_path / "missing")
  with pytest.raises(GemmaError, match=r"is not a gemma_jax checkpoint \(no config\.json\)"):
    gj.load(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(GemmaError, match=r"config\.json is not valid JSON"):
    gj.load(tmp_path)


def test_hf_folder_with_unsupported_model_type(tmp_path):
  src = tmp_path / "hf"
  shutil.copytree(__import__("conftest").DATA / "hf_tiny" / "gemma_mqa", src)
  cfg = json.loads((src / "config.json").read_text())
  cfg["model_type"] = "llama"
  (src / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(GemmaError, match=r"unsupported model_type 'llama'; gemma_jax imports gemma, gemma2"):
    gj.convert(src, tmp_path / "out")


def test_hf_folder_with_a_wrong_tensor_shape(tmp_path):
  from safetensors.numpy import load_file, save_file

  src = tmp_path / "hf"
  shutil.copytree(__import__("conftest").DATA / "hf_tiny" / "gemma_mqa", src)
  tensors = load_file(src / "model.safetensors")
  tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:60]
  save_file(tensors, src / "model.safetensors")
  with pytest.raises(GemmaError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight has shape \(60, 44\) but "
                                       r"the config expects \(67, 44\)"):
    gj.convert(src, tmp_path / "out")

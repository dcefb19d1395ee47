"""LoRA adapters (lora.py): a fresh adapter changes nothing, merging equals the unmerged adapter, only the
adapters train, adapter files round-trip and refuse what does not fit, merged checkpoints load everywhere.

That the adapters compute what PEFT computes (layouts, scale, gradients) is tests/test_train_parity.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import gemma_jax as gj
from gemma_jax import checkpoint, lora, optim
from gemma_jax.transformer import Transformer, abstract_model, flat_params, param_shapes, set_flat_params

PRESETS = ["tiny_gemma2_gqa", "tiny_gemma3_qk"]
IDS = [2, 17, 5, 99, 3, 41, 7, 8, 120, 11, 64]
CONFIG = lora.LoraConfig(rank=4, alpha=8)


def transformer(preset: str | gj.ModelConfig, seed: int = 0) -> Transformer:
  model = gj.Model.random(gj.get_preset(preset) if isinstance(preset, str) else preset, seed=seed)
  return nnx.merge(model.graphdef, model.params)


def logits(model: Transformer, ids=IDS) -> np.ndarray:
  tokens = jnp.asarray([ids], jnp.int32)
  return np.asarray(model.logits(model(tokens, jnp.arange(len(ids))[None]).hidden))[0]


def randomize(model: Transformer, seed: int = 1) -> dict[str, np.ndarray]:
  """Replaces every adapter's A and B by random values (B != 0, so the adapters change the output)."""
  rng = np.random.default_rng(seed)
  arrays = {k: rng.normal(0, 0.3 if k.endswith("lora_a") else 0.02, v.shape).astype(np.float32)
            for k, v in lora.adapter_arrays(model).items()}
  config = lora.config_of(model)
  lora.attach(lora.strip(model), config, arrays)
  return arrays


def expected_lora_count(cfg, r: int) -> int:
  """Parameters of rank-r adapters on every projection, from the shapes in lora.py's table."""
  d, f, n, k, h = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_layer = r * (d + n * h) + 2 * r * (d + k * h) + r * (n * h + d) + 2 * r * (d + f) + r * (f + d)
  return cfg.num_layers * per_layer


def batch(ids=IDS) -> optim.TrainBatch:
  t = len(ids)
  return optim.TrainBatch(tokens=jnp.asarray([ids], jnp.int32), positions=jnp.arange(t, dtype=jnp.int32)[None],
                          segments=jnp.ones((1, t), jnp.int32), targets=jnp.ones((1, t), jnp.float32))


@pytest.mark.parametrize("preset", PRESETS)
def test_fresh_adapters_give_the_base_logits(preset):
  model = transformer(preset)
  base = logits(model)
  lora.apply(model, CONFIG, seed=3)
  assert len(lora.adapters(model)) == 5 * model.config.num_layers
  assert all(float(jnp.abs(a.lora_a[...]).max()) > 0 for a in lora.adapters(model).values())
  np.testing.assert_allclose(logits(model), base, rtol=0, atol=1e-6)


def test_a_plain_model_keeps_its_param_names_and_strip_restores_them():
  model = transformer("tiny_gemma3_qk")
  names = param_shapes(model.config)
  assert {k: tuple(v.shape) for k, v in flat_params(nnx.state(model)).items()} == names
  lora.apply(model, CONFIG)
  assert len(flat_params(nnx.state(model))) == len(names) + 2 * 5 * model.config.num_layers
  lora.strip(model)
  assert {k: tuple(v.shape) for k, v in flat_params(nnx.state(model)).items()} == names


@pytest.mark.parametrize("preset", PRESETS)
def test_merged_weights_give_the_adapted_logits(preset):
  model = lora.apply(transformer(preset), CONFIG)
  base = logits(model)
  randomize(model)
  adapted = logits(model)
  assert np.abs(adapted - base).max() > 1e-2  # the adapters matter
  graphdef, state = abstract_model(model.config)
  set_flat_params(state, lora.merge(model))
  np.testing.assert_allclose(logits(nnx.merge(graphdef, state)), adapted, rtol=0, atol=1e-5)


def test_only_the_adapters_are_trainable_and_only_they_get_gradients():
  model = lora.apply(transformer("tiny_gemma2_gqa"), CONFIG)
  graphdef, trainable, base = lora.split(model)
  leaves = jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert leaves and all(isinstance(v, nnx.LoRAParam) for v in leaves)
  assert not any(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(base, is_leaf=lambda x: isinstance(
      x, nnx.Variable)))
  assert sum(v.get_value().size for v in leaves) == expected_lora_count(model.config, 4)
  grads = jax.grad(optim.loss_fn)(trainable, graphdef, batch(), frozen=base)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  flat = flat_params(grads)
  # B = 0: dL/dA = x^T (dL/dy) B^T is zero, dL/dB is not (why PEFT starts B, not A, at zero)
  assert all(float(jnp.abs(g).max()) == 0 for k, g in flat.items() if k.endswith("lora_a"))
  assert all(float(jnp.abs(g).max()) > 0 for k, g in flat.items() if k.endswith("lora_b"))
  randomize(model)
  graphdef, trainable, base = lora.split(model)
  grads = flat_params(jax.grad(optim.loss_fn)(trainable, graphdef, batch(), frozen=base))
  assert all(float(jnp.abs(g).max()) > 0 for g in grads.values())


def test_adapter_params_have_logical_axes_that_the_rules_place():
  model = lora.apply(transformer("tiny_gemma3_qk"), CONFIG)
  for rules in (gj.GENERATION, gj.TRAINING):
    shardings = gj.Layout.of("data=1,model=1", rules).param_shardings(nnx.state(model))
    assert "blocks/0/attn/kv_einsum/adapter/lora_b" in shardings


def test_adapter_save_load_round_trip_is_bitwise(tmp_path):
  model = lora.apply(transformer("tiny_gemma3_qk"), lora.LoraConfig(3, 5.0, ("q_einsum", "linear")))
  saved = randomize(model)
  want = logits(model)
  lora.save_adapter(tmp_path / "adapter", model, source="hf:gemma3_qk")
  meta = json.loads((tmp_path / "adapter" / lora.CONFIG_FILE).read_text())
  assert (meta["rank"], meta["alpha"], meta["targets"]) == (3, 5.0, ["q_einsum", "linear"])
  assert meta["base"] == {"config": model.config.to_dict(), "source": "hf:gemma3_qk"}
  assert sorted(load_file(tmp_path / "adapter" / lora.WEIGHTS_FILE)) == sorted(saved)
  fresh = transformer("tiny_gemma3_qk")
  assert lora.load_adapter(tmp_path / "adapter", fresh) == lora.LoraConfig(3, 5.0, ("q_einsum", "linear"))
  for k, v in lora.adapter_arrays(fresh).items():
    assert v.dtype == jnp.float32 and np.array_equal(np.asarray(v), saved[k]), k
  np.testing.assert_array_equal(logits(fresh), want)


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
  path = tmp_path_factory.mktemp("lora") / "adapter"
  lora.save_adapter(path, lora.apply(transformer("tiny_gemma3_qk"), CONFIG))
  return path


def copy_adapter(src, dst, *, arrays=None, meta=None):
  dst.mkdir()
  save_file(load_file(src / lora.WEIGHTS_FILE) if arrays is None else arrays, dst / lora.WEIGHTS_FILE)
  (dst / lora.CONFIG_FILE).write_text((src / lora.CONFIG_FILE).read_text() if meta is None else meta)
  return dst


def test_loading_onto_another_shape_names_the_field(saved_adapter):
  other = transformer(gj.get_preset("tiny_gemma3_qk").replace(num_layers=6))
  with pytest.raises(gj.GemmaError, match=r"adapter.json: the adapter was made for a base model with "
                                          r"num_layers=7, but this model has num_layers=6"):
    lora.load_adapter(saved_adapter, other)
  with pytest.raises(gj.GemmaError, match="family=3, but this model has family=2"):
    lora.load_adapter(saved_adapter, transformer("tiny_gemma2_gqa"))


def test_missing_extra_or_misshapen_arrays_are_named(saved_adapter, tmp_path):
  arrays = load_file(saved_adapter / lora.WEIGHTS_FILE)
  missing = {k: v for k, v in arrays.items() if k != "layer_2/mlp/linear/lora_b"}
  cases = {"missing": (missing, r"missing array layer_2/mlp/linear/lora_b \(expected shape \(4, 44\)\)"),
           "extra": ({**arrays, "layer_0/attn/q_einsum/lora_c": arrays["layer_0/attn/q_einsum/lora_a"]},
                     "unexpected array layer_0/attn/q_einsum/lora_c"),
           "shape": ({**arrays, "layer_1/attn/kv_einsum/lora_a": np.zeros((2, 44, 5), np.float32)},
                     r"array layer_1/attn/kv_einsum/lora_a has shape \(2, 44, 5\), expected \(2, 44, 4\)")}
  for name, (bad, message) in cases.items():
    model = transformer("tiny_gemma3_qk")
    with pytest.raises(gj.GemmaError, match=message):
      lora.load_adapter(copy_adapter(saved_adapter, tmp_path / name, arrays=bad), model)
    assert lora.adapters(model) == {}  # a failed load leaves the model as it was


def test_bad_or_missing_adapter_json_is_named(saved_adapter, tmp_path):
  model = transformer("tiny_gemma3_qk")
  meta = json.loads((saved_adapter / lora.CONFIG_FILE).read_text())
  cases = {"corrupt": ("{not json", "adapter.json is not valid JSON"),
           "foreign": (json.dumps({"format": "peft"}), "adapter.json is not a gemma_jax LoRA adapter config"),
           "version": (json.dumps({**meta, "version": 99}), "adapter.json has format version 99"),
           "rank": (json.dumps({**meta, "rank": 0}), "adapter.json: invalid adapter config: LoRA rank must be"),
           "dtype": (json.dumps({**meta, "dtype": "int8"}), "adapter.json: invalid adapter config: dtype must be"),
           "nobase": (json.dumps({k: v for k, v in meta.items() if k != "base"}),
                      "adapter.json: invalid adapter config: 'base'")}
  for name, (text, message) in cases.items():
    with pytest.raises(gj.GemmaError, match=message):
      lora.load_adapter(copy_adapter(saved_adapter, tmp_path / name, meta=text), model)
  (tmp_path / "nojson").mkdir()
  with pytest.raises(gj.GemmaError, match="nojson/adapter.json does not exist"):
    lora.load_adapter(tmp_path / "nojson", model)
  copy_adapter(saved_adapter, tmp_path / "badweights")
  (tmp_path / "badweights" / lora.WEIGHTS_FILE).write_bytes(b"garbage")
  with pytest.raises(gj.GemmaError, match="adapter.safetensors is not a valid safetensors file"):
    lora.load_adapter(tmp_path / "badweights", model)


def test_loading_onto_a_model_with_adapters_is_refused(saved_adapter):
  model = lora.apply(transformer("tiny_gemma3_qk"), CONFIG)
  with pytest.raises(gj.GemmaError, match=r"already has LoRA adapters; lora.strip\(model\)"):
    lora.load_adapter(saved_adapter, model)
  with pytest.raises(gj.GemmaError, match="already has LoRA adapters"):
    lora.apply(model, CONFIG)


def test_merged_checkpoint_loads_with_gj_load_and_gives_the_adapted_logits(tmp_path):
  model = lora.apply(transformer("tiny_gemma2_gqa"), CONFIG)
  randomize(model)
  want = logits(model)
  lora.save_merged(tmp_path / "merged", model, source="lora merge test")
  loaded = gj.load(tmp_path / "merged")
  assert checkpoint.read_meta(tmp_path / "merged")["source"] == "lora merge test"
  np.testing.assert_allclose(loaded.logits(IDS), want, rtol=0, atol=1e-5)


def test_the_embedding_cannot_be_a_target():
  for name in ("embedder", "input_embedding"):
    with pytest.raises(gj.GemmaError, match=f"LoRA target '{name}': the embedding is tied to the output logits"):
      lora.LoraConfig(4, 8, ("q_einsum", name))


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0, alpha=8), "rank must be a positive integer, got 0"),
    (dict(rank=2.5, alpha=8), "rank must be a positive integer, got 2.5"),
    (dict(rank=4, alpha=0), "alpha must be a positive number, got 0"),
    (dict(rank=4, alpha=float("nan")), "alpha must be a positive number, got nan"),
    (dict(rank=4, alpha=8, targets=("q_proj",)), "unknown LoRA target 'q_proj'; known: q_einsum, kv_einsum, "
                                                 "attn_vec_einsum, gating_einsum, linear"),
    (dict(rank=4, alpha=8, targets="q_einsum"), "targets must be a tuple of names"),
    (dict(rank=4, alpha=8, targets=()), "must be distinct and not empty"),
    (dict(rank=4, alpha=8, targets=("linear", "linear")), "must be distinct and not empty"),
])
def test_bad_lora_configs_are_named(kwargs, message):
  with pytest.raises(gj.GemmaError, match=message):
    lora.LoraConfig(**kwargs)


def test_split_merge_and_save_need_adapters(tmp_path):
  model = transformer("tiny_gemma2_gqa")
  for call in (lambda: lora.split(model), lambda: lora.save_adapter(tmp_path / "a", model)):
    with pytest.raises(gj.GemmaError, match="no LoRA adapters"):
      call()


def test_adapters_compute_in_the_activation_dtype():
  model = lora.apply(transformer("tiny_gemma3_qk"), CONFIG)
  randomize(model)
  einsum = model.blocks[0].attn.kv_einsum
  x = jax.random.normal(jax.random.key(0), (1, 3, model.config.embed_dim), jnp.bfloat16)
  delta = einsum.adapter("BTD,DKCH->BTKCH", x)
  assert delta.dtype == jnp.bfloat16 and einsum.adapter.lora_a[...].dtype == jnp.float32
  a, b = (np.asarray(v, np.float32) for v in (einsum.adapter.lora_a[...], einsum.adapter.lora_b[...]))
  want = 2.0 * np.einsum("btd,cdr,crkh->btkch", np.asarray(x, np.float32), a, b)
  np.testing.assert_allclose(np.asarray(delta, np.float32), want, rtol=0.05, atol=0.02)


ADAPTED = [("attn.q_einsum", "BTD,DNH->BTNH", "D"), ("attn.kv_einsum", "BTD,DKCH->BTKCH", "D"),
           ("attn.attn_vec_einsum", "BTNH,NHD->BTD", "NH"), ("mlp.gating_einsum", "BTD,FCD->BTFC", "D"),
           ("mlp.gating_einsum", "BTD,FCD->CBTF", "D"), ("mlp.linear", "BTF,FD->BTD", "F")]


@pytest.mark.parametrize("where, equation, con", ADAPTED, ids=[e for _, e, _ in ADAPTED])
def test_the_adapter_product_and_its_written_out_gradients_equal_plain_autodiff(where, equation, con):
  """lora._product has a hand-written backward pass (for XLA:CPU's layouts): its output and the gradients
  of x, A and B equal autodiff of the plain two-einsum product, for every target's equation."""
  model = lora.apply(transformer("tiny_gemma3_qk"), CONFIG)
  randomize(model)
  module = model.blocks[0]
  for name in where.split("."):
    module = getattr(module, name)
  adapter = module.adapter
  ins, out = equation.split("->")
  xs, ws = ins.split(",")
  a_l, b_l = ("".join(t) for t in lora.ab_dims(tuple(ws), adapter.w_axes, adapter.target, "R"))
  sizes = {"B": 2, "T": 3, "D": model.config.embed_dim, "F": model.config.hidden_dim,
           "N": model.config.num_heads, "H": model.config.head_dim}
  x = jax.random.normal(jax.random.key(2), tuple(sizes[c] for c in xs))

  def mine(x, a, b):
    return lora.LoraAdapter(a, b, adapter.w_axes, adapter.target, adapter.alpha)(equation, x)

  def plain(x, a, b):
    mid = "".join(c for c in xs + a_l if c not in con)
    return jnp.einsum(f"{mid},{b_l}->{out}", jnp.einsum(f"{xs},{a_l}->{mid}", x, a), b) * adapter.scale

  a, b = adapter.lora_a[...], adapter.lora_b[...]
  want = plain(x, a, b)
  cot = jax.random.normal(jax.random.key(3), want.shape)
  np.testing.assert_allclose(mine(x, a, b), want, rtol=1e-5, atol=1e-6)
  got_g = jax.grad(lambda *v: jnp.sum(mine(*v) * cot), argnums=(0, 1, 2))(x, a, b)
  want_g = jax.grad(lambda *v: jnp.sum(plain(*v) * cot), argnums=(0, 1, 2))(x, a, b)
  for g, w, what in zip(got_g, want_g, "xAB"):  # float32 sums in another order: 1e-6 of the array's scale
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(jnp.abs(w).max()), err_msg=f"{equation}: d{what}")

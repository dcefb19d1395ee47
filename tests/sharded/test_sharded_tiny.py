"""Sharded runs equal the one-device run, on 8 simulated CPU devices, for every tiny family and the meshes
1x8, 2x4, 4x2 and 8x1; every param and cache array lands where the rules promise; restores read only each
device's slice; an FSDP training step equals the unsharded one."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import gemma_jax as gj
from gemma_jax import checkpoint, decode, optim, sharding
from gemma_jax.cache import CACHE_AXES, resize_cache
from gemma_jax.configs import TINY_PRESETS
from gemma_jax.errors import GemmaError
from gemma_jax.sampling import make_sampling
from gemma_jax.transformer import abstract_model, flat_params, set_flat_params
from gemma_jax.tree import flatten, unflatten

MESHES = ["data=1,model=8", "data=2,model=4", "data=4,model=2", "data=8,model=1"]
# The tiny presets are prime-sized (transposed weights fail loudly), so 2, 4 or 8 divides almost none of
# their dimensions and every array would fall back to replication. These keep each family's mechanisms
# (MQA, MHA with N*H != D, GQA, local/global, soft-caps, QK-norm) with N, F, V and D multiples of 8; the
# kv heads (1, 8, 4, 2) make K divide some model axes and not others.
HEADS = {"tiny_gemma1_mqa": (8, 1), "tiny_gemma1_mha": (8, 8), "tiny_gemma2_gqa": (8, 4), "tiny_gemma3_qk": (8, 2)}
CONFIGS = {name: TINY_PRESETS[name].replace(vocab_size=256, embed_dim=48, hidden_dim=64, num_heads=n, num_kv_heads=k)
           for name, (n, k) in HEADS.items()}
# Three prompts: on data=2, 4 and 8 the batch is padded with idle rows.
PROMPTS = [[2, 17, 33, 5, 101, 7], [2, 9, 8], [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]]
NEW = 14  # past the window (5) of the Gemma 2/3 configs

# What the rules promise, written from the issue, not from sharding.py: generation is model parallel over
# heads, MLP width and vocabulary, batch over data; training adds FSDP (D over data). A dimension the mesh
# axis does not divide is replicated, and no mesh axis is used twice in one array.
PROMISE = {"generation": {"N": "model", "K": "model", "F": "model", "V": "model", "B": "data"},
           "training": {"N": "model", "K": "model", "F": "model", "V": "model", "B": "data", "D": "data"}}


def random_model(cfg, seed=0):
  """Every param random (std 0.3), norms included, so no mechanism hides."""
  model = gj.Model.random(cfg, seed=seed)
  rng = np.random.default_rng(seed)
  flat = flat_params(model.params)  # drawn in sorted official-name order, whatever the module tree's order
  set_flat_params(model.params, {p: jnp.asarray(0.3 * rng.standard_normal(flat[p].shape), flat[p].dtype)
                                 for p in sorted(flat)})
  return model


def promised(axes, shape, mesh, rules="generation"):
  sizes, promise, used, out = dict(mesh.shape), PROMISE[rules], set(), []
  for a, n in zip(axes, shape):
    m = promise.get(a)
    ok = m is not None and m not in used and n % sizes[m] == 0
    out.append(m if ok else None)
    used |= {m} if ok else set()
  return out


def check_placed(x, axes, mesh, what, rules="generation"):
  """x is sharded as promised, and each device holds exactly its slice (never the whole array unless the
  promise replicates every dimension)."""
  want = promised(axes, x.shape, mesh, rules)
  assert x.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(*want)), x.ndim), (what, x.sharding, want)
  slice_shape = tuple(n // (mesh.shape[m] if m else 1) for n, m in zip(x.shape, want))
  assert {s.data.shape for s in x.addressable_shards} == {slice_shape}, (what, slice_shape)
  assert len(x.addressable_shards) == 8


def param_axes(cfg):
  """{path: axes} from the modules' own Param metadata."""
  _, state = abstract_model(cfg)
  return {"/".join(map(str, path)): v.get_metadata()["axes"] for path, v in nnx.to_flat_state(state)}


def check_params(model, rules="generation"):
  axes = param_axes(model.config)
  flat = flatten(nnx.to_pure_dict(model.params))
  assert set(flat) == set(axes)
  for path, x in flat.items():
    check_placed(x, axes[path], model.layout.mesh, path, rules)


def check_cache(cache, mesh):
  for i, layer in enumerate(cache):
    for field, axes in CACHE_AXES.items():
      if getattr(layer, field) is not None:  # an int8 cache's scales; a float cache has none
        check_placed(getattr(layer, field), axes, mesh, f"cache layer {i} {field}")


_REFERENCE = {}


def reference(name):
  """The one-device model, its greedy tokens for PROMPTS and its full logits of PROMPTS[2]."""
  if name not in _REFERENCE:
    model = random_model(CONFIGS[name])
    tokens = model.generate_ids(PROMPTS, max_new_tokens=NEW, stop_ids=[])
    _REFERENCE[name] = model, tokens, model.logits(PROMPTS[2])
  return _REFERENCE[name]


@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sharded_generation_equals_one_device(name, spec):
  model, want_tokens, want_logits = reference(name)
  sharded = model.shard(spec)
  check_params(sharded)
  np.testing.assert_allclose(sharded.logits(PROMPTS[2]), want_logits, rtol=1e-5, atol=1e-5)

  state = sharded.start(PROMPTS, NEW)
  data = sharded.layout.mesh.shape["data"]
  assert state.pos.shape[0] == -(-len(PROMPTS) // data) * data  # padded to a multiple of data
  check_cache(state.cache, sharded.layout.mesh)
  # Several decode_loop calls (chunks of 4): the cache stays where the rules put it, so the loop is
  # compiled once and the donated cache reused.
  sampling = make_sampling(len(PROMPTS))
  rows = [[] for _ in PROMPTS]
  compiled = None
  for produced in range(0, NEW, 4):
    out, state = sharded.run(state, min(4, NEW - produced), sampling, stop_ids=[])
    for row, ids in zip(rows, out):
      row += ids
    check_cache(state.cache, sharded.layout.mesh)
    compiled = compiled or decode.Decoder.decode_loop._cache_size()
  assert decode.Decoder.decode_loop._cache_size() == compiled
  assert rows == want_tokens


_INT8 = {}


@pytest.mark.parametrize("spec", ["data=1,model=8", "data=2,model=4"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sharded_int8_cache_generation_equals_one_device(name, spec):
  """The int8 cache's values and scales are split like a float cache (batch over data, kv heads over model
  where they divide it); generation and scoring through it equal the one-device run."""
  if name not in _INT8:
    model = dataclasses.replace(reference(name)[0], kv_cache_dtype="int8")
    ids = PROMPTS[2] + PROMPTS[0]
    _INT8[name] = model, model.generate_ids(PROMPTS, max_new_tokens=NEW, stop_ids=[]), ids, model.logprobs(ids, chunk=4)
  model, want_tokens, ids, want_logprobs = _INT8[name]
  sharded = model.shard(spec)
  state = sharded.start(PROMPTS, NEW)
  assert {layer.k.dtype for layer in state.cache} == {jnp.dtype("int8")}
  assert all(layer.k_scale is not None and layer.v_scale is not None for layer in state.cache)
  check_cache(state.cache, sharded.layout.mesh)
  rows = [[] for _ in PROMPTS]
  for produced in range(0, NEW, 4):
    out, state = sharded.run(state, min(4, NEW - produced), make_sampling(len(PROMPTS)), stop_ids=[])
    for row, new in zip(rows, out):
      row += new
    check_cache(state.cache, sharded.layout.mesh)
  assert rows == want_tokens
  # Float rounding differs (all-reduces sum in another order) and quantization may amplify it by a step.
  np.testing.assert_allclose(sharded.logprobs(ids, chunk=4), want_logprobs, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name, spec, params, cache", [
    # MQA on a model axis of 8 or 2: the one kv head cannot be split; kv weights and cache are replicated
    # over model (the cache still split over data by batch), while heads, MLP and vocab are split.
    ("tiny_gemma1_mqa", "data=1,model=8", {"K": None, "N": "model", "F": "model", "V": "model", "D": None},
     {"B": "data", "K": None}),
    ("tiny_gemma1_mqa", "data=4,model=2", {"K": None, "N": "model"}, {"B": "data", "K": None}),
    # GQA with K=4: split over a model axis of 4, replicated over one of 8.
    ("tiny_gemma2_gqa", "data=2,model=4", {"K": "model", "N": "model"}, {"B": "data", "K": "model"}),
    ("tiny_gemma2_gqa", "data=1,model=8", {"K": None, "N": "model", "F": "model"}, {"K": None}),
    # MHA: every head projection split by heads.
    ("tiny_gemma1_mha", "data=1,model=8", {"K": "model", "N": "model", "H": None}, {"K": "model"}),
])
def test_fallbacks_for_heads_that_do_not_divide_the_model_axis(name, spec, params, cache):
  """Spelled out per logical axis: each named dimension of every param (and of the cache's k and v)."""
  model = reference(name)[0].shard(spec)
  mesh = model.layout.mesh
  effective = lambda m: m if m and mesh.shape[m] > 1 else None  # a size-1 axis splits nothing
  state = model.start(PROMPTS[:2], 4)
  arrays = [(p, x, param_axes(model.config)[p], params)
            for p, x in flatten(nnx.to_pure_dict(model.params)).items()]
  arrays += [(f"cache {f}", getattr(state.cache[0], f), CACHE_AXES[f], cache) for f in ("k", "v")]
  seen = set()
  for what, x, names, want in arrays:
    spec_ = x.sharding.spec
    for i, dim in enumerate(names):
      if dim in want:
        got = spec_[i] if i < len(spec_) else None
        assert effective(got) == effective(want[dim]), (what, dim, spec_)
        seen.add((what.split()[0] == "cache", dim))
  assert seen >= {(False, d) for d in params} | {(True, d) for d in cache}


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
def test_a_decode_step_never_gathers_a_layers_cache(kv_cache_dtype):
  """GQA whose kv heads (2) do not divide the model axis (4) while the query heads do: XLA once split
  the cache write over K and all-gathered every layer's cache on each step. The write is pinned to the
  cache's sharding, so what the step gathers for it is the new token's k and v, not the cache (nor, for
  an int8 cache, its scales)."""
  import re

  cfg = CONFIGS["tiny_gemma3_qk"].replace(sliding_window=16)
  model = dataclasses.replace(random_model(cfg), kv_cache_dtype=kv_cache_dtype).shard("data=2,model=4")
  state = model.start([[2, 3, 4], [2, 5]], 8, cache_len=64)
  args = (model.decoder.with_capacity(8), model.params, state, model.engine.batch_sampling(make_sampling(2), 2),
          model.engine.put(np.int32(4)), model.engine.put(np.array([-2], np.int32)),
          model.engine.put(np.ones(cfg.vocab_size, bool)))
  hlo = decode.Decoder.decode_loop.lower(*args).compile().as_text()
  smallest = min(min(s.data.size for s in layer.k.addressable_shards) for layer in state.cache)  # 1*16*2*16
  gathered = []  # (elements, line) of each all-gather made for the cache write
  for line in hlo.splitlines():
    if " all-gather(" in line and re.search(r"/(scatter|sharding_constraint)\"", line):
      dims = [int(d) for d in re.search(r"= \w+\[([\d,]*)\]", line).group(1).split(",")]
      gathered.append((int(np.prod(dims)), line.strip()[:200]))
      # (B, T, ...) of the one new token: never a layer's slots (an int8 cache's scales are the smallest
      # arrays, (B, S, K), so their size alone would not tell)
      assert dims[1] == 1, line.strip()[:200]
  assert gathered, "expected the new token's k and v to be gathered"
  assert max(n for n, _ in gathered) < smallest, max(gathered)


def test_prime_sized_model_replicates_what_does_not_divide_and_still_matches():
  model = random_model(TINY_PRESETS["tiny_gemma1_mqa"])  # N=3, F=67, V=251: nothing divides 4
  want = model.generate_ids(PROMPTS, max_new_tokens=8, stop_ids=[])
  sharded = model.shard("data=2,model=4")
  emb = sharded.params["embedder"]["input_embedding"].get_value()
  assert emb.sharding.is_fully_replicated
  assert sharded.generate_ids(PROMPTS, max_new_tokens=8, stop_ids=[]) == want


def test_padding_rows_of_a_sharded_batch_are_idle_and_never_returned():
  model = reference("tiny_gemma3_qk")[0].shard("data=4,model=2")
  state = model.start(PROMPTS, 6)
  assert state.pos.shape == (4,) and np.asarray(state.done).tolist() == [False] * 3 + [True]
  assert np.asarray(state.cache[0].pos)[3].max() == -1  # the idle row wrote nothing
  out = model.generate_ids(PROMPTS, max_new_tokens=6, stop_ids=[])
  assert len(out) == 3 and all(len(r) == 6 for r in out)


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
def test_feed_and_resized_cache_on_a_mesh_equal_one_device(kv_cache_dtype):
  """What a chat turn does: generate, grow the cache, feed more ids, generate again."""
  results = []
  one = dataclasses.replace(reference("tiny_gemma2_gqa")[0], kv_cache_dtype=kv_cache_dtype)
  for model in (one, one.shard("data=2,model=4")):
    state = model.start([PROMPTS[0]], 5, cache_len=16)
    sampling = make_sampling(1)
    ids = []
    out, state = model.run(state, 5, sampling, stop_ids=[])
    ids += out[0]
    state = state.replace(cache=resize_cache(model.config, state.cache, 32, place=model.engine.place))
    if model.layout:
      check_cache(state.cache, model.layout.mesh)
    state = model.feed(state, [[7, 8, 9]])
    out, state = model.run(state, 6, sampling, stop_ids=[])
    ids += out[0]
    results.append(ids)
  assert len(results[0]) == 11 and results[0] == results[1]


@pytest.mark.parametrize("spec", ["data=2,model=4", "data=8,model=1", "data=4,model=2"])
def test_fsdp_training_step_equals_unsharded(spec):
  cfg = CONFIGS["tiny_gemma3_qk"]
  model = random_model(cfg, seed=3)
  rng = np.random.default_rng(4)
  tokens = rng.integers(0, cfg.vocab_size, size=(8, 12)).astype(np.int32)
  positions = np.tile(np.arange(12, dtype=np.int32), (8, 1))
  positions[5, 9:] = -1  # a padded row
  step = jax.jit(jax.value_and_grad(optim.loss_fn), static_argnums=1)
  batch = lambda put: optim.TrainBatch(put(tokens), put(positions), put((positions >= 0).astype(np.int32)),
                                       put((positions >= 0).astype(np.float32)))
  want_loss, want_grads = step(model.params, model.graphdef, batch(jnp.asarray))

  sharded = model.shard(spec, rules="training")
  check_params(sharded, "training")
  layout = sharded.layout
  loss, grads = step(sharded.params, sharded.graphdef, batch(lambda x: layout.put(x, ("B", "T"))))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
  got, want = flat_params(grads), flat_params(want_grads)
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-5, err_msg=path)


@pytest.fixture
def small_chunks(monkeypatch):
  """Chunks of 2 KiB: the tiny params span many chunks, as a real model's do at the default size."""
  monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 2048)


@pytest.mark.parametrize("spec", ["data=1,model=8", "data=2,model=4"])
def test_restore_into_a_mesh_reads_each_devices_slice(spec, tmp_path, small_chunks):
  model, _, want_logits = reference("tiny_gemma2_gqa")
  flat = flat_params(jax.tree.map(np.asarray, model.params))
  checkpoint.save(tmp_path / "ckpt", model.config, unflatten(flat))
  stored = checkpoint.stored_metadata(tmp_path / "ckpt")
  emb = stored["embedder/input_embedding"]
  assert tuple(emb.storage.chunk_shape) != tuple(emb.shape)  # split into chunks

  loaded = gj.load(tmp_path / "ckpt", mesh=spec)
  check_params(loaded)  # includes: every device holds only its slice
  for path, x in flat_params(loaded.params).items():
    np.testing.assert_array_equal(np.asarray(x), flat[path], err_msg=path)
  np.testing.assert_allclose(loaded.logits(PROMPTS[2]), want_logits, rtol=1e-5, atol=1e-5)


def test_importers_write_checkpoints_that_restore_into_a_mesh(tmp_path, small_chunks):
  import orbax.checkpoint as ocp

  from gguf_writer import write_gguf
  from test_convert import official_layout

  flat_of = lambda cfg: flat_params(jax.tree.map(np.asarray, random_model(cfg).params))
  gguf_cfg = CONFIGS["tiny_gemma3_qk"].replace(query_pre_attn_scalar=None)  # GGUF stores no query scale
  write_gguf(tmp_path / "m.gguf", gguf_cfg, flat_of(gguf_cfg))
  # The official importer takes a preset's config: the prime-sized one, whose 6 heads and 2 kv heads
  # split over a model axis of 2 (as do the HF folder's).
  official = TINY_PRESETS["tiny_gemma2_gqa"]
  ocp.PyTreeCheckpointer().save(tmp_path / "official", official_layout(official, flat_of(official)))
  sources = {"gguf": (tmp_path / "m.gguf", None, "data=2,model=4"),
             "official": (tmp_path / "official", "tiny_gemma2_gqa", "data=4,model=2"),
             "hf": (pathlib.Path(__file__).parent.parent / "data" / "hf_tiny" / "gemma2_gqa", None, "data=4,model=2")}
  for kind, (src, preset, spec) in sources.items():
    ckpt = gj.convert(src, tmp_path / f"ckpt_{kind}", preset=preset)
    emb = checkpoint.stored_metadata(ckpt)["embedder/input_embedding"]
    assert tuple(emb.storage.chunk_shape) != tuple(emb.shape), kind
    one = gj.load(ckpt)
    many = gj.load(ckpt, mesh=spec)
    check_params(many)
    ids = [2, 5, 9, 77, 13, 200, 31, 8]
    np.testing.assert_allclose(many.logits(ids), one.logits(ids), rtol=1e-5, atol=1e-5, err_msg=kind)


@pytest.mark.parametrize("spec, message", [
    ("data=3,model=-1", "the other axes (3) do not divide the 8 devices"),
    ("data=16", "needs 16 devices, which does not divide the 8 available"),
    ("data=3,model=1", "needs 3 devices, which does not divide the 8 available"),
    ("data=2,seq=4", "unknown axis 'seq'"),
])
def test_bad_mesh_specs_on_8_devices(spec, message):
  with pytest.raises(GemmaError, match=message.replace("(", r"\(").replace(")", r"\)")):
    sharding.make_mesh(spec)


def test_a_mesh_may_use_the_first_devices():
  mesh = sharding.make_mesh("data=2,model=2")
  assert dict(mesh.shape) == {"data": 2, "model": 2} and mesh.devices.size == 4
  assert dict(sharding.make_mesh().shape) == {"data": 1, "model": 8}

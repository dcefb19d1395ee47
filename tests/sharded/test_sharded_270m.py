"""The real Gemma 3 270M on 8 simulated devices: the same greedy tokens on 1x8 and 2x4 meshes as on one
device, through the Python API, the sample CLI's --mesh and a chat session; restores read per slice.

Gemma 3 270M has N=4 query heads and K=1 kv head: on model=8 its attention weights fall back to
replication, on model=4 the query heads split; the MLP and the vocabulary split on both."""

import json
import pathlib

import jax
import numpy as np
import pytest

import gemma_jax as gj
from gemma_jax import checkpoint, sample
from gemma_jax.transformer import abstract_model, flat_params

GOLDEN = json.loads((pathlib.Path(__file__).parent.parent / "data" / "golden_270m.json").read_text())
PROMPTS = [p["ids"] for p in GOLDEN["prompts"][:3]]  # 3 rows: padded to 4 on data=2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_device(ckpt_270m):
  """The one-device greedy continuations (the main suite pins them to the goldens too)."""
  model = gj.load(ckpt_270m, dtype="float32")
  return model.generate_ids(PROMPTS, max_new_tokens=32, stop_ids=[])


@pytest.mark.parametrize("spec", ["data=1,model=8", "data=2,model=4"])
def test_greedy_tokens_on_a_mesh_equal_one_device(ckpt_270m, one_device, spec):
  model = gj.load(ckpt_270m, dtype="float32", mesh=spec)
  assert model.generate_ids(PROMPTS, max_new_tokens=32, stop_ids=[]) == one_device
  assert one_device == [p["greedy"] for p in GOLDEN["prompts"][:3]]


def test_restored_slices_are_read_alone(ckpt_270m):
  """Each device reads only its slice of each split param: the stored chunks tile the vocabulary, so the
  bytes Orbax reserves for one device's slice of the embedding are exactly that slice."""
  config = checkpoint.read_config(ckpt_270m).replace(dtype="float32")
  layout = gj.Layout(gj.make_mesh("data=1,model=8"))
  stored = checkpoint.stored_metadata(ckpt_270m)
  shardings = layout.param_shardings(abstract_model(config)[1])
  v, d = stored["embedder/input_embedding"].shape
  target = lambda p: jax.ShapeDtypeStruct(stored[p].shape, np.float32, sharding=shardings[p])
  assert checkpoint._slice_read_bytes(target("embedder/input_embedding"), stored["embedder/input_embedding"]) \
      == v // 8 * d * 4
  model = gj.load(ckpt_270m, dtype="float32", mesh=layout.mesh)
  emb = model.params["embedder"]["input_embedding"].get_value()
  assert {s.data.shape for s in emb.addressable_shards} == {(v // 8, d)}
  flat = flat_params(model.params)
  mlp = flat["layer_0/mlp/linear/w"]
  assert {s.data.shape for s in mlp.addressable_shards} == {(mlp.shape[0] // 8, mlp.shape[1])}


def test_sample_cli_with_mesh(ckpt_270m, capsys):
  france = GOLDEN["prompts"][0]
  code = sample.main(["--ckpt", str(ckpt_270m), "--mesh", "data=2,model=4", "--prompt", france["text"],
                      "--max-new-tokens", "32", "--json"])
  assert code == 0
  assert json.loads(capsys.readouterr().out)["tokens"] == france["greedy"]


def test_chat_on_a_mesh_equals_one_device(ckpt_270m):
  answers = []
  for mesh in (None, "data=2,model=4"):  # data=2: the one-row conversation is padded to two rows
    model = gj.load(ckpt_270m, dtype="float32", mesh=mesh)
    with pytest.warns(UserWarning, match="not known to be instruction-tuned"):
      chat = gj.ChatSession(model, max_new_tokens=12, max_cache_len=64)
    answers.append([chat.send("What is the capital of France?"), chat.send("And of Spain?")])
  assert answers[0] == answers[1] and all(answers[0])

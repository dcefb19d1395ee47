"""Sharding on one device: mesh specs, the rules tables, the memory plan against a hand calculation, CLI
errors, multi-host detection. Then the tests that need more devices, each in processes of their own:
tests/sharded on 8 simulated CPU devices, and a two-process (two "hosts" of 4 devices) jax.distributed run."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import gemma_jax as gj
from gemma_jax import checkpoint, distributed, sample, score, sharding
from gemma_jax.transformer import abstract_model, flat_params
from gemma_jax.tree import unflatten
from gemma_jax.configs import PRESETS, TINY_PRESETS
from gemma_jax.errors import GemmaError
from gemma_jax.plan import memory_plan

ROOT = pathlib.Path(__file__).parent.parent


@pytest.mark.parametrize("spec, devices, want", [
    ("data=1,model=-1", 8, (1, 8)),
    ("model=-1,data=2", 8, (2, 4)),
    (" data = 4 ", 8, (4, 1)),
    ("model=2", 8, (1, 2)),       # fewer than the devices: the mesh takes the first ones
    ("data=-1", 6, (6, 1)),
])
def test_mesh_specs(spec, devices, want):
  assert tuple(sharding.parse_mesh_spec(spec, devices).values()) == want


@pytest.mark.parametrize("spec, devices, message", [
    ("data=3,model=-1", 8, "the other axes (3) do not divide the 8 devices, so model=-1 has no size"),
    ("data=3,model=2", 8, "needs 6 devices, which does not divide the 8 available"),
    ("data=4,model=4", 8, "needs 16 devices, which does not divide the 8 available"),
    ("data=2,tensor=4", 8, "unknown axis 'tensor'; the axes are data and model"),
    ("data=-1,model=-1", 8, "only one axis may be -1"),
    ("data=0", 8, "size of 'data' must be a positive integer or -1, got 0"),
    ("data", 8, "'data' is not AXIS=SIZE"),
    ("data=1,data=2", 8, "axis 'data' is given twice"),
    ("", 8, "empty mesh spec"),
])
def test_bad_mesh_specs_are_named(spec, devices, message):
  with pytest.raises(GemmaError) as e:
    sharding.parse_mesh_spec(spec, devices)
  assert message in str(e.value)


def test_make_mesh_on_one_device():
  assert dict(sharding.make_mesh().shape) == {"data": 1, "model": 1}
  with pytest.raises(GemmaError, match="needs 8 devices, which does not divide the 1 available"):
    sharding.make_mesh("data=1,model=8")


@pytest.mark.parametrize("rules", [sharding.GENERATION, sharding.TRAINING], ids=lambda r: r.name)
def test_rules_cover_every_parameter_and_cache_array_of_every_preset(rules):
  """Every official and tiny preset, on a 2x8 mesh: nothing the modules declare is left uncovered."""
  sizes = {"data": 2, "model": 8}
  for cfg in [*PRESETS.values(), *TINY_PRESETS.values()]:
    params = abstract_model(cfg)[1]
    cache = jax.eval_shape(lambda: gj.init_cache(cfg, 4, 64))
    rows = memory_plan(params, cache, rules, sizes)
    assert rows[-1].name == "total" and rows[-1].device_bytes < rows[-1].total_bytes, cfg.name


def test_a_parameter_the_rules_do_not_cover_fails_loudly():
  class Odd(nnx.Module):
    def __init__(self, axes):
      self.w = nnx.Param(jnp.zeros((4, 8)), axes=axes)

  layout = gj.Layout(sharding.make_mesh())
  with pytest.raises(GemmaError, match=r"parameter w has logical axes \('Z', 'D'\), but the generation "
                                       r"sharding rules cover no axis 'Z'"):
    layout.param_shardings(nnx.state(Odd(("Z", "D"))))
  with pytest.raises(GemmaError, match="parameter w has no logical axes"):
    layout.param_shardings(nnx.state(Odd(None)))
  with pytest.raises(GemmaError, match="unknown rule set 'inference'"):
    sharding.get_rules("inference")


@pytest.mark.parametrize("axes, shape, sizes, want", [
    # MQA: one kv head cannot be split over model=8: replicated; the [k, v] stack never is split.
    (("D", "K", "_", "H"), (640, 1, 2, 256), {"data": 1, "model": 8}, P(None, None, None, None)),
    (("D", "K", "_", "H"), (4608, 16, 2, 128), {"data": 1, "model": 8}, P(None, "model", None, None)),
    # The cache: kv heads over model where they divide, batch over data either way.
    (("B", "S", "K", "H"), (4, 512, 1, 256), {"data": 2, "model": 4}, P("data", None, None, None)),
    (("B", "S", "K", "H"), (4, 512, 8, 256), {"data": 2, "model": 4}, P("data", None, "model", None)),
    (("B", "S", "K", "H"), (3, 512, 8, 256), {"data": 2, "model": 4}, P(None, None, "model", None)),
    # Gemma 3 270M on model=8: 4 query heads do not divide, the MLP width and the vocabulary do.
    (("D", "N", "H"), (640, 4, 256), {"data": 1, "model": 8}, P(None, None, None)),
    (("F", "_", "D"), (2048, 2, 640), {"data": 1, "model": 8}, P("model", None, None)),
    (("V", "D"), (262144, 640), {"data": 4, "model": 2}, P("model", None)),
])
def test_generation_rules_and_their_fallbacks(axes, shape, sizes, want):
  assert sharding.partition_spec(axes, shape, sharding.GENERATION, sizes) == want


def test_training_rules_add_fsdp_over_data():
  sizes = {"data": 4, "model": 2}
  assert sharding.partition_spec(("V", "D"), (256128, 4608), sharding.TRAINING, sizes) == P("model", "data")
  assert sharding.partition_spec(("D",), (4608,), sharding.TRAINING, sizes) == P("data")
  assert sharding.partition_spec(("B", "T"), (8, 64), sharding.TRAINING, sizes) == P("data", None)


def plan(argv, capsys):
  code = sample.main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


@pytest.mark.parametrize("mesh, data, model", [("data=1,model=8", 1, 8), ("data=2,model=4", 2, 4)])
def test_plan_for_gemma2_27b_matches_a_hand_calculation(mesh, data, model, capsys):
  code, out, _ = plan(["--preset", "gemma2_27b", "--mesh", mesh, "--plan", "--cache-len", "8192",
                       "--batch-size", "4", "--json"], capsys)
  assert code == 0
  rows = {r["name"]: r for r in json.loads(out)["rows"]}
  # Gemma 2 27B from ../shared/models.md, in bfloat16 (2 bytes): L=46 D=4608 F=36864 N=32 K=16 H=128
  # V=256128; layers alternate local (window 4096) and global, 23 of each.
  L, D, F, N, K, H, V, bf16 = 46, 4608, 36864, 32, 16, 128, 256128, 2
  # Params: the model axis splits the vocabulary rows, q's N heads, k/v's K heads, the output projection's
  # N heads and the MLP width (gate and up: 2*F*D, down: F*D); the four norms per layer and the final one
  # (D each) are replicated. Nothing is split over data.
  total = (V * D + L * (N * D * H + 2 * K * D * H + N * H * D + 3 * F * D + 4 * D) + D) * bf16
  per_device = (V * D // model + L * ((N * D * H + 2 * K * D * H + N * H * D + 3 * F * D) // model + 4 * D) + D) * bf16
  assert rows["params"]["total_bytes"] == total
  assert round(total / bf16 / 1e9, 2) == 27.23  # the README's (and the technical report's) count
  assert rows["params"]["device_bytes"] == per_device
  # KV cache of batch B=4, 8192 tokens: k and v (B, slots, K, H) split by batch over data and kv heads over
  # model; positions (B, slots) int32 split by batch only.
  B, slots = 4, 23 * 4096 + 23 * 8192
  cache = B // data * slots * (2 * (K // model) * H * bf16 + 4)
  assert rows["kv cache"]["device_bytes"] == cache
  assert rows["kv cache"]["total_bytes"] == B * slots * (2 * K * H * bf16 + 4)
  assert rows["total"]["device_bytes"] == per_device + cache


@pytest.mark.parametrize("mesh, data, model", [("data=1,model=8", 1, 8), ("data=2,model=4", 2, 4)])
def test_plan_counts_an_int8_kv_cache(mesh, data, model, capsys):
  code, out, _ = plan(["--preset", "gemma2_27b", "--mesh", mesh, "--plan", "--cache-len", "8192", "--batch-size", "4",
                       "--kv-cache-dtype", "int8", "--json"], capsys)
  assert code == 0
  got = json.loads(out)
  rows = {r["name"]: r for r in got["rows"]}
  assert got["dtype"] == "bfloat16" and got["kv_cache_dtype"] == "int8"
  # As above, with k and v 1 byte per element plus a float32 scale per (row, slot, kv head) for each of
  # them, split like k and v (batch over data, kv heads over model).
  K, H, B, slots = 16, 128, 4, 23 * 4096 + 23 * 8192
  assert rows["kv cache"]["device_bytes"] == B // data * slots * (2 * (K // model) * (H + 4) + 4)
  assert rows["kv cache"]["total_bytes"] == B * slots * (2 * K * (H + 4) + 4)  # 0.52x the bfloat16 cache
  code, out, _ = plan(["--preset", "gemma2_27b", "--mesh", mesh, "--plan", "--kv-cache-dtype", "int8"], capsys)
  assert code == 0 and out.startswith("gemma2_27b (bfloat16, int8 KV cache) on mesh")


def test_plan_prints_a_table_without_loading_anything(capsys):
  code, out, _ = plan(["--preset", "gemma3_27b", "--mesh", "data=2,model=8", "--plan", "--cache-len", "32768"],
                      capsys)
  lines = out.splitlines()
  assert code == 0
  assert lines[0].startswith("gemma3_27b (bfloat16) on mesh data=2,model=8 (16 devices), batch 1, cache 32768")
  assert [line.split()[0] for line in lines[2:-1]] == ["params:"] * 4 + ["params", "kv", "total"]
  assert "GiB" in lines[-2]


@pytest.mark.parametrize("argv, message", [
    (["--plan"], "--plan needs --preset NAME or --ckpt DIR"),
    (["--plan", "--preset", "gemma9"], "unknown preset 'gemma9'"),
    (["--plan", "--preset", "gemma2_2b", "--cache-len", "9000"], "--cache-len must be in [1, 8192]"),
    (["--plan", "--preset", "gemma2_2b", "--mesh", "data=2,tensor=4"], "unknown axis 'tensor'"),
    # The mesh is checked before the checkpoint is opened.
    (["--ckpt", "/none", "--prompt", "hi", "--mesh", "data=3,model=-1"], "the other axes (3) do not divide the 1"),
    (["--ckpt", "/none", "--prompt", "hi", "--mesh", "model=2"], "needs 2 devices, which does not divide the 1"),
])
def test_plan_and_mesh_errors(argv, message, capsys):
  code, _, err = plan(argv, capsys)
  assert code == 2 and err.startswith("error: ") and message in err, err


def test_mesh_flag_on_one_device_equals_no_mesh(tmp_path, capsys):
  model = gj.Model.random(TINY_PRESETS["tiny_gemma2_gqa"], seed=1)
  params = jax.tree.map(np.asarray, unflatten(flat_params(model.params)))
  ckpt = checkpoint.save(tmp_path / "ckpt", model.config, params)
  (tmp_path / "ids.json").write_text(json.dumps([2, 5, 9, 77, 13, 200]))
  runs = []
  for extra in ([], ["--mesh", "data=1,model=-1"]):
    assert score.main(["--ckpt", str(ckpt), "--tokens-file", str(tmp_path / "ids.json"), "--json"] + extra) == 0
    runs.append(json.loads(capsys.readouterr().out)["logprobs"])
  assert runs[0] == runs[1]


@pytest.mark.parametrize("env, want", [
    ({}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
])
def test_cluster_detection(env, want):
  assert distributed.cluster_detected(env) is want


# ---- in other processes -------------------------------------------------------------------------------

def run_sharded_session(marker: str, extra_env: dict, files: tuple[str, ...] = ("tests/sharded",)) -> None:
  env = {**os.environ, "GEMMA_JAX_SHARDED": "1", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8", **extra_env}
  env.pop("PYTEST_XDIST_WORKER", None)
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
                        *files], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
  assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-4000:]
  assert " passed" in out.stdout.splitlines()[-1] and "skipped" not in out.stdout.splitlines()[-1]


def test_sharded_tiny_models_on_8_devices():
  """tests/sharded/test_sharded_tiny.py: every tiny family's generation, params, cache and restores on the
  1x8, 2x4, 4x2 and 8x1 meshes."""
  run_sharded_session("not slow", {}, ("tests/sharded/test_sharded_tiny.py",))


@pytest.mark.slow
def test_sharded_training_eval_quantized_on_8_devices():
  """The rest of tests/sharded's tiny-model tests (FSDP training, evaluation, quantized restore and
  generation): slow since the default suite neared CI's 20 minutes (the whole session took 472 s of it)."""
  run_sharded_session("not slow", {}, tuple(f"tests/sharded/test_sharded_{n}.py" for n in ("train", "eval", "quant")))


@pytest.mark.slow
def test_sharded_real_270m_on_8_devices(ckpt_270m):
  """tests/sharded's real-model tests, reusing this session's converted 270M."""
  run_sharded_session("slow", {"GEMMA_JAX_CKPT_270M": str(ckpt_270m)})


HOST = r"""
import json, sys
import numpy as np
from gemma_jax import cli, distributed
cli.start_processes(cli.argparse.Namespace(distributed=False))  # JAX_COORDINATOR_ADDRESS: detected
import jax, jax.numpy as jnp
import gemma_jax as gj
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
model = gj.Model.random(gj.get_preset("tiny_gemma3_qk").replace(
    vocab_size=256, embed_dim=48, hidden_dim=64, num_heads=8, num_kv_heads=2), seed=2)
rng = np.random.default_rng(2)
model.params = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), model.params)
model = model.shard(sys.argv[1])
tokens = model.generate_ids(json.loads(sys.argv[2]), max_new_tokens=10, stop_ids=[])
print(json.dumps(tokens))
# What chat does with its input: process 0's line (or end of input) reaches every process.
lines = [distributed.broadcast_text("héllo" if jax.process_index() == 0 else "not this"),
         distributed.broadcast_text(None)]
print("broadcast", json.dumps(lines), file=sys.stderr)
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_hosts_generate_what_one_device_does():
  """Two processes of 4 CPU devices each, joined by jax.distributed (gloo collectives): a batch of 3 is
  padded to data=2, split over the hosts, and only process 0 prints; text read by process 0 reaches both."""
  prompts = [[2, 17, 33, 5, 101, 7], [2, 9, 8], [2, 40, 41, 42, 43]]
  model = gj.Model.random(TINY_PRESETS["tiny_gemma3_qk"].replace(
      vocab_size=256, embed_dim=48, hidden_dim=64, num_heads=8, num_kv_heads=2), seed=2)
  rng = np.random.default_rng(2)
  model.params = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), model.params)
  want = model.generate_ids(prompts, max_new_tokens=10, stop_ids=[])

  port = free_port()
  procs = []
  for i in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
    procs.append(subprocess.Popen([sys.executable, "-c", HOST, "data=2,model=4", json.dumps(prompts)], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    outs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  # Gloo (JAX's CPU collectives) logs its connections on stdout; the result is the last line.
  assert json.loads(outs[0][0].splitlines()[-1]) == want
  assert outs[1][0] == ""  # process 1 printed nothing
  for _, err in outs:
    assert 'broadcast ["h\\u00e9llo", null]' in err

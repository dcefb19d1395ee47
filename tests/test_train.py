"""Training: the loss and step (optim.py), recipes (recipe.py), the loop and resume (trainer.py), the CLI.

A tiny Gemma 3 with the tiny test tokenizer (test_tokenizer.tiny_proto) is saved as a normal checkpoint,
so the CLI runs end to end in seconds. Numerics against Hugging Face are in test_lora.py (parity goldens).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gemma_jax as gj
from gemma_jax import checkpoint, lora, optim, recipe
from gemma_jax.errors import GemmaError
from gemma_jax.transformer import flat_params
from gemma_jax.tree import unflatten
from test_tokenizer import tiny_proto

REPO = pathlib.Path(__file__).parent.parent
TIMEOUT = 300


def tiny_train_model(seed: int = 0) -> gj.Model:
  """tiny_gemma3_qk with a vocabulary that holds the tiny tokenizer's 283 pieces."""
  config = gj.get_preset("tiny_gemma3_qk").replace(vocab_size=283)
  return gj.Model.random(config, seed=seed, tokenizer=gj.Tokenizer(tiny_proto()))


def save_tiny_base(path: pathlib.Path) -> pathlib.Path:
  m = tiny_train_model()
  return checkpoint.save(path, m.config, unflatten(jax.tree.map(np.asarray, flat_params(m.params))),
                         tokenizer_proto=tiny_proto(), source="test")


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


WORDS = ["hello", "world", "hello world", "low", "red", "owl", "dew"]


def task_rows(n: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [{"prompt": " ".join(rng.choice(WORDS, 2)), "response": " " + str(rng.choice(WORDS))} for _ in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> pathlib.Path:
  return save_tiny_base(tmp_path_factory.mktemp("base") / "ckpt")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  d = tmp_path_factory.mktemp("data")
  return write_jsonl(d / "train.jsonl", task_rows(24, 0)), write_jsonl(d / "eval.jsonl", task_rows(6, 1))


def batch(rows: int = 4, t: int = 16, seed: int = 0, vocab: int = 283) -> optim.TrainBatch:
  rng = np.random.default_rng(seed)
  return optim.TrainBatch(jnp.asarray(rng.integers(1, vocab, (rows, t)), jnp.int32),
                          jnp.asarray(np.tile(np.arange(t), (rows, 1)), jnp.int32), jnp.ones((rows, t), jnp.int32),
                          jnp.ones((rows, t), jnp.float32).at[:, 0].set(0.0))


# ---- the loss and the step ----------------------------------------------------------------------------

def test_packed_rows_give_each_example_its_own_forward():
  m = tiny_train_model()
  model = nnx.merge(m.graphdef, m.params)
  rng = np.random.default_rng(0)
  a, b = rng.integers(1, 283, 9), rng.integers(1, 283, 7)  # 9 > sliding window 5: local layers matter too
  alone = [model(jnp.asarray([x]), jnp.arange(len(x))[None]).hidden[0] for x in (a, b)]
  tokens = jnp.asarray([np.concatenate([a, b, [0, 0]])])
  positions = jnp.asarray([list(range(9)) + list(range(7)) + [-1, -1]])
  segments = jnp.asarray([[1] * 9 + [2] * 7 + [0, 0]])
  packed = model(tokens, positions, segments=segments).hidden[0]
  np.testing.assert_allclose(packed[:9], alone[0], atol=1e-6)
  np.testing.assert_allclose(packed[9:16], alone[1], atol=1e-6)
  # Without segment ids the second example would see the first one's keys at positions <= its own.
  assert np.abs(model(tokens, positions).hidden[0][9:16] - alone[1]).max() > 1e-2


def test_remat_gives_the_same_loss_and_gradients():
  m = tiny_train_model()
  grad = lambda **kw: jax.value_and_grad(lambda p: optim.loss_fn(p, m.graphdef, batch(), **kw))(m.params)
  (l1, g1), (l2, g2) = grad(), grad(remat=True)
  assert float(l1) == pytest.approx(float(l2), abs=1e-6)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
  m = tiny_train_model()
  # Plain SGD with rate 1: the update is the gradient itself. (Adam's first step divides each gradient by its
  # own magnitude, which turns float summation-order noise in near-zero elements into visible differences.)
  opt = optax.sgd(1.0)
  step = optim.make_train_step(m.graphdef, opt)
  big = batch(rows=4)
  # Unequal target counts per microbatch: the step must divide by the whole step's tokens once.
  big = big._replace(targets=big.targets.at[0, :10].set(0.0))
  two = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), big)
  copy = lambda: jax.tree.map(jnp.array, m.params)
  p1, _, m1 = step(copy(), opt.init(m.params), None, jax.tree.map(lambda x: x[None], big))
  p2, _, m2 = step(copy(), opt.init(m.params), None, two)
  assert float(m1.loss) == pytest.approx(float(m2.loss), abs=1e-6) and float(m1.targets) == float(m2.targets) == 51
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_full_finetuning_fits_one_batch():
  m = tiny_train_model()
  opt = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2, warmup=5, steps=100))
  step = optim.make_train_step(m.graphdef, opt)
  params, state, b = m.params, opt.init(m.params), jax.tree.map(lambda x: x[None], batch())
  losses = []
  for _ in range(100):
    params, state, metrics = step(params, state, None, b)
    losses.append(float(metrics.loss))
  assert losses[0] > 5.0 and losses[-1] < 0.05, losses[::10]


def test_bfloat16_compute_keeps_float32_masters_and_follows_float32():
  m = tiny_train_model()
  opt = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, steps=10))
  b = jax.tree.map(lambda x: x[None], batch())
  p32, _, m32 = optim.make_train_step(m.graphdef, opt)(jax.tree.map(jnp.array, m.params), opt.init(m.params), None, b)
  p16, _, m16 = optim.make_train_step(m.graphdef, opt, dtype=jnp.bfloat16)(
      jax.tree.map(jnp.array, m.params), opt.init(m.params), None, b)
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}
  assert float(m16.loss) == pytest.approx(float(m32.loss), rel=2e-2)  # bf16 keeps ~3 significant digits


def test_weight_decay_skips_the_norms():
  m = tiny_train_model()
  mask = flat_params(optim.decay_mask(m.params))
  assert mask and all(v == (not k.endswith("/scale")) for k, v in mask.items())
  assert mask["embedder/input_embedding"] and not mask["final_norm/scale"]


def test_schedule_warms_up_then_decays_to_zero():
  lr = optim.schedule(optim.OptimConfig(learning_rate=1.0, warmup=10, steps=110))
  assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1.0) and float(lr(60)) == pytest.approx(0.5)
  assert float(lr(110)) == pytest.approx(0.0, abs=1e-7)


# ---- recipes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_in_configs_loads(path):
  r = recipe.resolve(path, {"data": "train.jsonl"})
  assert r.data == "train.jsonl" and r.steps > r.warmup
  assert set(recipe.read_yaml(path)) <= set(r.to_dict())


def test_flags_override_the_recipe_file(tmp_path):
  (tmp_path / "r.yaml").write_text("steps: 50\nlearning_rate: 1.0e-3\ndata: a.jsonl\n")
  r = recipe.resolve(tmp_path / "r.yaml", {"steps": 70, "learning_rate": None})
  assert (r.steps, r.learning_rate, r.data) == (70, 1e-3, "a.jsonl")


@pytest.mark.parametrize("text, message", [
    ("stpes: 5\n", r"r.yaml: unknown setting\(s\) stpes"),
    ("steps: [5\n", r"r.yaml: not valid YAML"),
    ("- 5\n", r"r.yaml: a recipe is a mapping of settings, got list"),
    ("steps: five\n", r"steps must be int, got 'five'"),
    ("steps: 0\n", r"steps must be at least 1, got 0"),
    ("method: qlora\n", r"unknown method 'qlora'; known: lora, full"),
    ("dtype: float16\n", r"unknown dtype 'float16'"),
    ("learning_rate: -1\n", r"learning-rate must be positive"),
    ("warmup: 500\nsteps: 100\n", r"warmup \(500\) must be shorter than steps \(100\)"),
])
def test_bad_recipes_are_named(tmp_path, text, message):
  (tmp_path / "r.yaml").write_text(text)
  with pytest.raises(GemmaError, match=message):
    recipe.resolve(tmp_path / "r.yaml", {"data": "x.jsonl"})


def test_changes_that_alter_the_run_are_listed():
  saved = recipe.Recipe(data="a.jsonl", steps=10)
  assert recipe.Recipe(data="a.jsonl", steps=10, save_every=3, mesh="data=2").changes_from(saved) == []
  assert recipe.Recipe(data="a.jsonl", steps=20, learning_rate=1e-3).changes_from(saved) == [
      "learning_rate: 0.0001 -> 0.001", "steps: 10 -> 20"]


# ---- the CLI: runs, resume, errors --------------------------------------------------------------------

def train_cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "gemma_jax.train", *args], capture_output=True, text=True,
                        timeout=TIMEOUT, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, **kw)


def flags(base, data_files, out, *extra: str) -> list[str]:
  train, evals = data_files
  return ["--ckpt", str(base), "--data", str(train), "--eval-data", str(evals), "--out", str(out),
          "--method", "full", "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--learning-rate", "3e-3",
          "--save-every", "2", "--eval-every", "3", "--json", *extra]


def events(stdout: str) -> list[dict]:
  return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def final_params(run: pathlib.Path) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in flat_params(gj.load(run / "final").params).items()}


@pytest.fixture(scope="module")
def finished(base, data_files, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("runs") / "full"
  proc = train_cli(*flags(base, data_files, out))
  assert proc.returncode == 0, proc.stderr
  return out


def test_a_full_run_logs_saves_evaluates_and_exports(finished):
  lines = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
  steps = [x for x in lines if "loss" in x]
  assert [x["step"] for x in steps] == [1, 2, 3, 4, 5, 6]
  assert all(x["tokens_per_s"] > 0 and x["learning_rate"] > 0 and x["grad_norm"] > 0 for x in steps)
  assert [x["step"] for x in lines if "eval_loss" in x] == [3, 6]
  assert [x["step"] for x in lines if "saved" in x] == [2, 4, 6]
  assert steps[-1]["loss"] < steps[0]["loss"]
  assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["2", "4", "6"]
  model = gj.load(finished / "final")  # a normal checkpoint, verified
  assert model.config.vocab_size == 283 and model.generate_ids([[2, 300 - 20]], max_new_tokens=3)


def test_an_existing_run_is_refused_without_resume(finished, base, data_files):
  proc = train_cli(*flags(base, data_files, finished))
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      f"error: {finished} already exists; pass --resume to continue that run, or choose a new --out"]


def test_resume_refuses_settings_that_change_the_run(finished, base, data_files):
  proc = train_cli(*flags(base, data_files, finished, "--resume", "--learning-rate", "1e-2", "--seed", "3"))
  assert proc.returncode == 2
  assert proc.stderr.strip() == (f"error: {finished} was started with other settings; resuming would change the "
                                 "run: learning_rate: 0.003 -> 0.01; seed: 0 -> 3")


def test_resuming_a_finished_run_changes_nothing(finished, base, data_files):
  before = final_params(finished)
  proc = train_cli("--out", str(finished), "--resume", "--json")
  assert proc.returncode == 0, proc.stderr
  assert [e for e in events(proc.stdout) if "loss" in e] == []
  after = final_params(finished)
  assert all(np.array_equal(before[k], after[k]) for k in before)


KILLER = """
import os, signal, sys
import orbax.checkpoint as ocp
from gemma_jax import train

# SIGKILL in the middle of writing checkpoint KILL_AT: every item is written under the temporary name,
# Orbax is finalizing it, and the rename that commits the step has not happened.
finalize = ocp.CompositeCheckpointHandler.finalize
def dying(self, directory):
  if os.path.basename(str(directory)).split(".")[0] == os.environ["KILL_AT"]:
    os.kill(os.getpid(), signal.SIGKILL)
  return finalize(self, directory)
ocp.CompositeCheckpointHandler.finalize = dying
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_bits(finished, base, data_files, tmp_path):
  out = tmp_path / "killed"
  # 1. SIGKILL in the middle of saving step 4: step 2 is complete, step 4's files are half there.
  killed = subprocess.run([sys.executable, "-c", KILLER, *flags(base, data_files, out)], capture_output=True,
                          text=True, timeout=TIMEOUT, env={**os.environ, "JAX_PLATFORMS": "cpu", "KILL_AT": "4"})
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  assert [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]
  assert any(p.name.startswith("4.") for p in (out / "checkpoints").iterdir())  # step 4, half written
  # 2. Resume; SIGKILL again from outside once step 5 has been logged (between saves).
  proc = subprocess.Popen([sys.executable, "-m", "gemma_jax.train", "--out", str(out), "--resume", "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    seen = []
    for line in proc.stdout:
      seen.append(json.loads(line))
      if seen[-1].get("step") == 5 and "loss" in seen[-1]:
        proc.send_signal(signal.SIGKILL)
        break
    proc.wait(TIMEOUT)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGKILL and seen[0]["step"] == 3  # resumed after step 2
  # 3. Resume to the end: the same parameters, to the bit, as the run that was never interrupted.
  done = train_cli("--out", str(out), "--resume", "--json")
  assert done.returncode == 0, done.stderr
  assert [e["step"] for e in events(done.stdout) if "loss" in e] == [5, 6]
  want, got = final_params(finished), final_params(out)
  assert all(np.array_equal(want[k], got[k]) for k in want)
  logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
  assert logged == [json.loads(x)["step"] for x in (finished / "metrics.jsonl").read_text().splitlines()]


def test_resume_on_other_data_is_refused(finished, base, data_files, tmp_path):
  other = write_jsonl(tmp_path / "train.jsonl", task_rows(24, 5))
  proc = train_cli("--out", str(finished), "--resume", "--data", str(other))
  assert proc.returncode == 2 and "was started with other settings" in proc.stderr and "data:" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--out", "{tmp}/r"], "no training data: pass --data FILE.jsonl"),
    (["--out", "{tmp}/r", "--data", "{tmp}/missing.jsonl"], "missing.jsonl"),
    (["--out", "{tmp}/r", "--data", "{train}", "--steps", "0"], "steps must be at least 1, got 0"),
    (["--out", "{tmp}/r", "--data", "{train}", "--method", "qlora"], "unknown method 'qlora'"),
    (["--out", "{tmp}/r", "--data", "{train}", "--config", "{tmp}/missing.yaml"], "missing.yaml"),
    (["--out", "{tmp}/nothing", "--resume"], "is not a training run (no recipe.yaml)"),
    (["--out", "{tmp}/r", "--data", "{train}", "--seq-len", "4"], "longer than"),
])
def test_cli_errors_are_one_line(argv, message, base, data_files, tmp_path):
  fill = lambda a: a.format(tmp=tmp_path, train=data_files[0])
  proc = train_cli(*map(fill, argv), "--ckpt", str(base))
  assert proc.returncode == 2, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_a_relative_run_directory_works(base, data_files, tmp_path):
  proc = train_cli("--ckpt", str(base), "--data", str(data_files[0]), "--out", "runs/rel", "--method", "full",
                   "--steps", "2", "--seq-len", "32", "--json", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "runs" / "rel" / "checkpoints" / "2").is_dir() and gj.load(tmp_path / "runs" / "rel" / "final")


def test_resume_on_a_changed_data_file_is_refused(base, tmp_path):
  train = write_jsonl(tmp_path / "train.jsonl", task_rows(8, 0))
  out = tmp_path / "run"
  first = train_cli("--ckpt", str(base), "--data", str(train), "--out", str(out), "--method", "full", "--steps", "2",
                    "--seq-len", "32", "--json")
  assert first.returncode == 0, first.stderr
  write_jsonl(train, task_rows(9, 0))  # same name, one more example: the saved data position means other rows
  proc = train_cli("--out", str(out), "--resume")
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert f"{train} is not the data {out / 'checkpoints' / '2'} was trained on" in proc.stderr


def test_a_lora_run_exports_a_merged_checkpoint_and_its_adapter(base, data_files, tmp_path):
  out = tmp_path / "lora"
  proc = train_cli(*flags(base, data_files, out, "--method", "lora", "--lora-rank", "4", "--steps", "4"))
  assert proc.returncode == 0, proc.stderr
  merged = gj.load(out / "final")
  # The adapter applied to the base gives the merged checkpoint's logits.
  adapted = gj.load(base)
  module = nnx.merge(adapted.graphdef, adapted.params)
  lora.load_adapter(out / "adapter", module)
  ids = [2, 20, 30, 40, 50, 60]
  want = module.logits(module(jnp.asarray([ids]), jnp.arange(len(ids))[None]).hidden)[0]
  np.testing.assert_allclose(merged.logits(ids), want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(want) - np.asarray(adapted.logits(ids))).max() > 1e-3  # training changed something
  # Only the adapters were trained: the rest of the merged checkpoint is the base, and the Orbax checkpoint
  # holds A/B and their Adam moments, nothing of the base.
  base_flat = flat_params(adapted.params)
  assert np.array_equal(np.asarray(flat_params(merged.params)["final_norm/scale"]), base_flat["final_norm/scale"])
  stored = json.loads((out / "checkpoints" / "4" / "state" / "_METADATA").read_text())["tree_metadata"]
  arrays = [k for k in stored if "'value'" in k]  # the Variables' values; the rest are Adam's counts
  assert len(arrays) == 3 * 2 * 5 * 7 and all("'lora_a'" in k or "'lora_b'" in k for k in arrays)


def test_frozen_params_get_no_optimizer_state():
  m = tiny_train_model()
  module = nnx.merge(m.graphdef, m.params)
  lora.apply(module, lora.LoraConfig(rank=2, alpha=4.0))
  graphdef, params, frozen = lora.split(module)
  opt = optim.make_optimizer(optim.OptimConfig())
  state = opt.init(params)
  n_lora = sum(x.size for x in jax.tree.leaves(params))
  assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * n_lora  # Adam's mu and nu, nothing else
  step = optim.make_train_step(graphdef, opt)
  before = jax.tree.map(np.asarray, frozen)
  step(params, state, frozen, jax.tree.map(lambda x: x[None], batch()))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(frozen)))


@pytest.mark.slow  # ~50 s: two bfloat16 steps of a LoRA model compiled twice; the default suite is near its 20 min
def test_a_base_cast_once_gives_the_same_bfloat16_step():
  """optim.frozen_for_step: LoRA's base cast to bfloat16 before the loop gives the step the same bits as the
  cast inside it; float32 (and no base) pass through untouched."""
  m = tiny_train_model()
  module = nnx.merge(m.graphdef, m.params)
  lora.apply(module, lora.LoraConfig(rank=2, alpha=4.0))
  graphdef, params, frozen = lora.split(module)
  assert optim.frozen_for_step(frozen, jnp.float32) is frozen and optim.frozen_for_step(None, jnp.bfloat16) is None
  cast = optim.frozen_for_step(frozen, jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.float32)}  # the caller's base is kept
  opt = optim.make_optimizer(optim.OptimConfig())
  step = optim.make_train_step(graphdef, opt, dtype=jnp.bfloat16)
  b = jax.tree.map(lambda x: x[None], batch())
  outs = [step(jax.tree.map(jnp.array, params), opt.init(params), f, b) for f in (frozen, cast)]
  assert float(outs[0][2].loss) == float(outs[1][2].loss)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])))

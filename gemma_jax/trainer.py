"""The fine-tuning loop: a run directory, Orbax CheckpointManager checkpoints, resume, metrics, the export.

  RUN/recipe.yaml      the resolved recipe (recipe.py); a resume must agree with it
  RUN/metrics.jsonl    one JSON object per step (and per evaluation)
  RUN/checkpoints/N/   Orbax: trainable params + optimizer state ("state"), step, data position and
                       checksums ("meta"); the last `keep` are kept
  RUN/final            at the end: a normal checkpoint (LoRA merged in; a quantized base dequantized
                       first, so float32), usable as --ckpt by every CLI
  RUN/adapter          LoRA only: the adapter alone (lora.save_adapter)

Resuming continues from the newest complete checkpoint and ends bitwise where an uninterrupted run ends:
every random choice is a function of the seed (the LoRA init) or of (seed, data position) (the shuffle),
and the step is deterministic. Orbax writes a step under a temporary name and renames it when complete,
so a run killed in the middle of a save never restores that step; the checksums recorded in "meta" catch
a checkpoint whose files changed afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from . import checkpoint, data, integrity, lora, optim
from .errors import GemmaError
from .model import Model, load
from .quantize import describe, float_config, quantize
from .recipe import Recipe, read_saved, write
from .sharding import TRAINING, Layout
from .transformer import flat_params
from .tree import unflatten

RECIPE_FILE, METRICS_FILE = "recipe.yaml", "metrics.jsonl"
Event = Callable[[dict[str, Any]], None]


@dataclasses.dataclass
class Run:
  """A run in memory: the model split into trainable and frozen state, its optimizer and data."""

  recipe: Recipe
  base: Model
  graphdef: nnx.GraphDef
  params: nnx.State  # trainable, float32 masters
  frozen: nnx.State | None  # LoRA's base; None for full fine-tuning
  opt_state: Any
  optimizer: optax.GradientTransformation
  examples: list[data.Example]
  loader: data.Loader
  eval_examples: list[data.Example] | None
  layout: Layout | None
  lora_config: Any = None
  step: int = 0
  data_id: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the data position counts in
  checkpoints: ocp.CheckpointManager | None = None

  @property
  def pad_id(self) -> int:
    return self.base.tokenizer.pad_id or 0


def prepare(recipe: Recipe, base_path: str | pathlib.Path) -> Run:
  """Loads the base (float32 masters, on the recipe's mesh with the TRAINING rules), reads the data, adds
  the LoRA adapters and initialises the optimizer. Data errors come before the model is loaded."""
  layout = Layout.of(recipe.mesh, TRAINING) if recipe.mesh else None
  base = load(base_path, dtype="float32", mesh=layout.mesh if layout else None, rules=TRAINING)
  if recipe.quantize is not None:
    base = quantize(base, recipe.quantize)
  if base.config.quantized and recipe.method != "lora":
    raise GemmaError(f"{base_path} is quantized ({describe(base.config)}): its int values cannot be "
                     "trained; use --method lora (QLoRA), or a float checkpoint for full fine-tuning")
  if base.tokenizer is None:
    raise GemmaError(f"{base_path} has no tokenizer.model: training reads text and needs one")
  train = data.read_examples(recipe.data, base.tokenizer, seq_len=recipe.seq_len, truncate=recipe.truncate)
  evals = (data.read_examples(recipe.eval_data, base.tokenizer, seq_len=recipe.seq_len, truncate=recipe.truncate)
           if recipe.eval_data else None)
  if layout is not None and recipe.batch_size % layout.batch_multiple:
    raise GemmaError(f"batch-size {recipe.batch_size} must be a multiple of the mesh's data axis "
                     f"({layout.batch_multiple}): the batch is split over it")
  module = nnx.merge(base.graphdef, base.params)
  lora_config = None
  if recipe.method == "lora":
    lora_config = lora.LoraConfig(rank=recipe.lora_rank, alpha=recipe.lora_alpha, targets=recipe.lora_targets)
    lora.apply(module, lora_config, seed=recipe.seed)
    graphdef, params, frozen = lora.split(module)
  else:
    graphdef, params = nnx.split(module)
    frozen = None
  if layout is not None:
    params = layout.shard_params(params)
  optimizer = optim.make_optimizer(optim.OptimConfig(
      learning_rate=recipe.learning_rate, warmup=recipe.warmup, steps=recipe.steps,
      weight_decay=recipe.weight_decay, clip=recipe.clip, eps=recipe.adam_eps))
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings(optimizer, params, layout))(params)
  pad = base.tokenizer.pad_id or 0
  data_id = {"file_sha256": hashlib.sha256(pathlib.Path(recipe.data).read_bytes()).hexdigest(), "examples": len(train)}
  return Run(recipe, base, graphdef, params, frozen, opt_state, optimizer, train, make_loader(recipe, train, pad),
             evals, layout, lora_config, data_id=data_id)


def make_loader(recipe: Recipe, examples: list[data.Example], pad_id: int,
                position: data.Position = data.Position(0, 0)) -> data.Loader:
  return data.Loader(examples, batch_size=recipe.batch_size, seq_len=recipe.seq_len, seed=recipe.seed,
                     pack=recipe.pack, position=position, pad_id=pad_id)


def opt_shardings(optimizer: optax.GradientTransformation, params: nnx.State, layout: Layout | None):
  """The optimizer state's shardings: every param-shaped leaf (Adam's moments) sharded like its param,
  the rest (step counts) replicated. None on one device."""
  if layout is None:
    return None
  abstract = jax.eval_shape(optimizer.init, params)
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  return optax.tree_map_params(optimizer, lambda _, s: s, abstract, param_sh,
                               transform_non_params=lambda _: layout.replicated())


# ---- checkpoints --------------------------------------------------------------------------------------

def manager(run_dir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  # Synchronous saves: a step is on disk (renamed from its temporary name) before training goes on, so
  # "saved at step N" in the metrics is true when it is printed.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
  # Orbax refuses relative paths ("Checkpoint path should be absolute"); `--out runs/x` is one.
  return ocp.CheckpointManager(run_dir.absolute() / "checkpoints", options=options, item_names=("state", "meta"))


def _sums(tree) -> dict[str, int]:
  return {jax.tree_util.keystr(p): integrity.array_sum32(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def save(mngr: ocp.CheckpointManager, run: Run) -> None:
  state = {"params": run.params, "opt_state": run.opt_state}
  meta = {"step": run.step, "position": list(run.loader.position), "data": run.data_id, "sums": _sums(state)}
  mngr.save(run.step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()


def _describe(data_id: dict[str, Any] | None) -> str:
  return "unknown" if not data_id else f"{data_id['examples']} examples, sha256 {data_id['file_sha256'][:12]}"


def restore(mngr: ocp.CheckpointManager, run: Run, step: int) -> None:
  """Replaces the run's params, optimizer state, step and data position with checkpoint `step`'s,
  restored straight into their shardings and checked against the recorded checksums."""
  state = {"params": run.params, "opt_state": run.opt_state}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  where = mngr.directory / str(step)
  try:
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                    meta=ocp.args.JsonRestore()))
  except Exception as e:  # noqa: BLE001 (Orbax and tensorstore raise many kinds; name the checkpoint)
    raise GemmaError(f"cannot restore {where}: {integrity.cause(e)}") from None
  meta = got["meta"]
  if meta.get("data") != run.data_id:
    # The position counts examples of one file in one order: on other data it would point elsewhere.
    raise GemmaError(f"{run.recipe.data} is not the data {where} was trained on ({_describe(meta.get('data'))}; "
                     f"now {_describe(run.data_id)}); resume with the same file, or start a new run")
  if jax.process_count() == 1 and _sums(got["state"]) != meta["sums"]:
    bad = next(k for k, v in _sums(got["state"]).items() if meta["sums"].get(k) != v)
    raise GemmaError(f"{where} is damaged: {bad} does not match its checksum; delete that step to resume "
                     "from the one before")
  run.params, run.opt_state = got["state"]["params"], got["state"]["opt_state"]
  run.step = int(meta["step"])
  run.loader = make_loader(run.recipe, run.examples, run.pad_id, data.Position(*meta["position"]))


# ---- the loop -----------------------------------------------------------------------------------------

def start(recipe: Recipe, run_dir: str | pathlib.Path, base_path: str | pathlib.Path, *, resume: bool) -> Run:
  """Checks the run directory against `resume`, writes or compares the recipe, prepares the run and
  restores the newest complete checkpoint when resuming."""
  run_dir = pathlib.Path(run_dir)
  if resume:
    saved = read_saved(run_dir / RECIPE_FILE)
    changes = recipe.changes_from(saved)
    if changes:
      raise GemmaError(f"{run_dir} was started with other settings; resuming would change the run: "
                       + "; ".join(changes))
  elif run_dir.exists() and any(run_dir.iterdir()):
    raise GemmaError(f"{run_dir} already exists; pass --resume to continue that run, or choose a new --out")
  run = prepare(recipe, base_path)
  run_dir.mkdir(parents=True, exist_ok=True)
  if not resume:
    write(recipe, run_dir / RECIPE_FILE)
  run.checkpoints = manager(run_dir, recipe.keep)
  latest = run.checkpoints.latest_step()
  if latest is not None:
    restore(run.checkpoints, run, latest)
  return run


def fit(run: Run, run_dir: str | pathlib.Path, on_event: Event = lambda e: None) -> None:
  """Trains `run` to recipe.steps, saving every save_every steps and at the end, evaluating every
  eval_every steps; each step's metrics go to RUN/metrics.jsonl and to on_event."""
  run_dir = pathlib.Path(run_dir)
  recipe = run.recipe
  mngr = run.checkpoints
  _truncate_metrics(run_dir / METRICS_FILE, run.step)
  dtype = jnp.dtype(recipe.dtype)
  shardings = None
  if run.layout is not None:
    shardings = (jax.tree.map(lambda x: x.sharding, run.params), jax.tree.map(lambda x: x.sharding, run.opt_state),
                 run.layout.replicated())
  step_fn = optim.make_train_step(run.graphdef, run.optimizer, dtype=dtype, remat=recipe.remat, shardings=shardings)
  eval_fn = optim.make_eval_step(run.graphdef, dtype=dtype)
  lr = optim.schedule(optim.OptimConfig(learning_rate=recipe.learning_rate, warmup=recipe.warmup,
                                        steps=recipe.steps))
  frozen = optim.frozen_for_step(run.frozen, dtype)  # LoRA's base in the compute dtype, cast once
  with open(run_dir / METRICS_FILE, "a") as metrics:
    def emit(event):
      metrics.write(json.dumps(event) + "\n")
      metrics.flush()
      on_event(event)

    while run.step < recipe.steps:
      batches = [run.loader.next_batch() for _ in range(recipe.grad_accum)]
      t0 = time.perf_counter()
      arrays = device_batches(batches, run.layout, run.pad_id)
      run.params, run.opt_state, m = step_fn(run.params, run.opt_state, frozen, arrays)
      loss = float(m.loss)  # waits for the step
      seconds = time.perf_counter() - t0
      emit({"step": run.step + 1, "loss": loss, "learning_rate": float(lr(run.step)), "grad_norm": float(m.grad_norm),
            "tokens": int(m.tokens), "target_tokens": int(m.targets), "tokens_per_s": float(m.tokens) / seconds,
            "seconds": seconds})
      run.step += 1
      if run.eval_examples and (run.step % recipe.eval_every == 0 or run.step == recipe.steps):
        emit({"step": run.step, "eval_loss": evaluate(run, eval_fn, frozen)})
      if run.step % recipe.save_every == 0 or run.step == recipe.steps:
        save(mngr, run)
        emit({"step": run.step, "saved": str(mngr.directory / str(run.step))})
  mngr.close()


def evaluate(run: Run, eval_fn, frozen: Any = None) -> float:
  """Mean loss over every eval example's targets (each example once, data.eval_batches); frozen: the
  step's copy of run.frozen (optim.frozen_for_step), default run.frozen."""
  frozen = run.frozen if frozen is None else frozen
  total = count = 0.0
  for batch in data.eval_batches(run.eval_examples, batch_size=run.recipe.batch_size, seq_len=run.recipe.seq_len,
                                 pack=run.recipe.pack, pad_id=run.pad_id):
    t, c = eval_fn(run.params, frozen, device_batches([batch], run.layout, run.pad_id, stacked=False))
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)


def device_batches(batches: list[data.Batch], layout: Layout | None, pad_id: int = 0, *, stacked: bool = True
                   ) -> optim.TrainBatch:
  """Microbatches as one TrainBatch of (A, B, T) arrays (padded to the longest T), placed on the mesh with
  rows over `data`; stacked=False: one (B, T) batch."""
  width = max(b.tokens.shape[1] for b in batches)
  fields = {name: np.stack([_pad(getattr(b, name), width, fill) for b in batches])
            for name, fill in (("tokens", pad_id), ("positions", -1), ("segments", 0), ("targets", 0.0))}
  if not stacked:
    fields = {k: v[0] for k, v in fields.items()}
  axes = ("_", "B", "T") if stacked else ("B", "T")
  put = (lambda x: layout.put(x, axes)) if layout is not None else jnp.asarray
  return optim.TrainBatch(**{k: put(v) for k, v in fields.items()})


def _pad(x: np.ndarray, width: int, fill) -> np.ndarray:
  return np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=fill)


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
  """Drops the metrics a killed run logged after its last checkpoint: the resumed run logs them again."""
  if path.is_file():
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


# ---- the results --------------------------------------------------------------------------------------

def export(run: Run, run_dir: str | pathlib.Path) -> pathlib.Path:
  """Writes RUN/final (merged for LoRA; float32) and, for LoRA, RUN/adapter. Returns RUN/final."""
  run_dir = pathlib.Path(run_dir)
  base = run.base
  states = (run.params,) if run.frozen is None else (run.params, run.frozen)
  module = nnx.merge(run.graphdef, *states)
  source = f"fine-tuned ({run.recipe.method}) from {run.recipe.ckpt or 'the default model'}"
  if run.lora_config is not None:
    flat = lora.merge(module)
    lora.save_adapter(run_dir / "adapter", module, source=source, overwrite=True)
  else:
    flat = flat_params(nnx.state(module, nnx.Param))
  params = unflatten({k: np.asarray(jax.device_get(v)) for k, v in flat.items()})
  # Trained to end its turns (conversations in the chat template): a chat model, chat.py stops warning.
  eot = base.tokenizer.end_of_turn_id
  chat = eot is not None and any(np.any(e.ids[e.targets] == eot) for e in run.examples)
  instruct = True if chat else base.instruct
  # A QLoRA run's final model is its base dequantized with the adapters merged in (lora.merge): float32.
  return checkpoint.save(run_dir / "final", float_config(base.config).replace(dtype="float32"), params,
                         tokenizer_proto=base.tokenizer.serialized_model_proto(),
                         source=source, instruct=instruct, overwrite=True)

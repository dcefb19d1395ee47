"""Fine-tune a Gemma checkpoint with LoRA or full fine-tuning; resumable; sharded with --mesh.

  python -m gemma_jax.train --ckpt out/ckpt --data train.jsonl --out runs/x [--config configs/lora_270m.yaml]
  python -m gemma_jax.train --out runs/x --data train.jsonl --resume      # continue a killed run
  python -m gemma_jax.chat --ckpt runs/x/final                            # the result, LoRA merged in

Settings come from the recipe's defaults, then --config (YAML, configs/), then the flags given. The run
directory holds recipe.yaml, metrics.jsonl, checkpoints/, and at the end final/ and (LoRA) adapter/.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from . import cli

# flag -> (type, help); the recipe's field is the flag with '-' -> '_' (recipe.py documents each).
SETTINGS = {
    "data": (str, "training examples, JSONL: {text} | {prompt, response} | {messages} per line"),
    "eval-data": (str, "held-out examples (JSONL) for the eval loss"),
    "method": (str, "lora (default) or full"),
    "quantize": (str, "int8 or int4: quantize the base in memory and train LoRA over it (QLoRA)"),
    "lora-rank": (int, "adapter rank (default 8)"),
    "lora-alpha": (float, "adapter scale numerator: the update is alpha/rank * x A B (default 16)"),
    "steps": (int, "optimizer updates (default 200)"),
    "batch-size": (int, "rows per microbatch (default 4)"),
    "seq-len": (int, "tokens per row at most (default 256)"),
    "grad-accum": (int, "microbatches per update (default 1)"),
    "learning-rate": (float, "peak learning rate, after warmup, before cosine decay (default 1e-4)"),
    "warmup": (int, "linear warmup steps (default 0)"),
    "weight-decay": (float, "AdamW weight decay, not applied to norms (default 0)"),
    "clip": (float, "global gradient-norm clip (default 1.0)"),
    "adam-eps": (float, "Adam's epsilon (default 1e-8)"),
    "save-every": (int, "checkpoint every K steps (default 100), and at the end"),
    "keep": (int, "checkpoints kept (default 3)"),
    "eval-every": (int, "eval loss every K steps (default 50), and at the end"),
    "seed": (int, "seed of the LoRA init and the data order (default 0)"),
    "dtype": (str, "compute dtype: float32 (default) or bfloat16; masters stay float32"),
    "mesh": (str, "train on a device mesh with FSDP over data and model parallel over model, e.g. data=8"),
}
SWITCHES = {
    "pack": "pack several examples per row (attention never crosses them)",
    "truncate": "cut examples longer than --seq-len instead of refusing them",
    "remat": "recompute each block's activations in the backward pass (less memory)",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m gemma_jax.train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, metavar="RUN", help="the run directory (new, or existing with --resume)")
  p.add_argument("--ckpt", help="base checkpoint (default: the embedded Gemma 3 270M)")
  p.add_argument("--config", metavar="YAML", help="a recipe file (configs/); flags override it")
  p.add_argument("--resume", action="store_true", help="continue RUN from its newest complete checkpoint")
  p.add_argument("--json", action="store_true", help="one JSON object per step on stdout instead of a bar")
  p.add_argument("--distributed", action="store_true", help="start jax.distributed first (as the other CLIs)")
  for flag, (kind, text) in SETTINGS.items():
    p.add_argument(f"--{flag}", type=kind, help=text)
  for flag, text in SWITCHES.items():
    p.add_argument(f"--{flag}", action="store_true", default=None, help=text)
  return p.parse_args(argv)


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
  args = parse(argv)
  cli.start_processes(args)
  from . import default_model, recipe, trainer  # noqa: PLC0415 (keep --help fast)

  overrides = {flag.replace("-", "_"): getattr(args, flag.replace("-", "_")) for flag in (*SETTINGS, *SWITCHES)}
  overrides["ckpt"] = args.ckpt
  # A resumed run starts from the settings it was started with: `--out RUN --resume` is enough.
  saved = recipe.read_saved(pathlib.Path(args.out) / trainer.RECIPE_FILE) if args.resume else None
  rec = recipe.resolve(args.config, overrides, saved=saved)
  base = rec.ckpt or default_model.default_checkpoint(progress=sys.stderr.isatty())
  run = trainer.start(rec, args.out, base, resume=args.resume)
  bar = None
  if not args.json:
    from tqdm import tqdm  # noqa: PLC0415

    bar = tqdm(total=rec.steps, initial=run.step, desc="train", unit="step", file=sys.stderr)

  def on_event(event):
    if args.json:
      print(json.dumps(event), flush=True)
    elif "loss" in event:
      bar.update(1)
      bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['learning_rate']:.2e}",
                      tok_s=f"{event['tokens_per_s']:.0f}")
    elif "eval_loss" in event:
      bar.write(f"step {event['step']}: eval loss {event['eval_loss']:.4f}")

  try:
    trainer.fit(run, args.out, on_event)
  finally:
    if bar is not None:
      bar.close()
  final = trainer.export(run, args.out)
  if args.json:
    print(json.dumps({"final": str(final)}), flush=True)
  else:
    print(f"final checkpoint: {final}")
  return 0


if __name__ == "__main__":
  cli.run(main)

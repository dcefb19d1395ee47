"""Train and eval loss curves of training runs (RUN/metrics.jsonl) in one PNG, and a table of the evals.

  python benchmarks/learning/plot.py --out curves.png code=runs/code chat=runs/chat

matplotlib is needed here only (pip install matplotlib; not a gemma_jax dependency). Each run gets one panel:
the per-step training loss (thin; it is noisy, every batch is different), its moving average over --smooth
steps, and the held-out eval loss at each evaluation (dots).
"""

from __future__ import annotations

import argparse
import json
import pathlib


def read_metrics(run: pathlib.Path) -> tuple[list[dict], list[dict]]:
  events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
  return [e for e in events if "loss" in e], [e for e in events if "eval_loss" in e]


def moving_average(xs: list[float], n: int) -> list[float]:
  out, acc = [], 0.0
  for i, x in enumerate(xs):
    acc += x - (xs[i - n] if i >= n else 0.0)
    out.append(acc / min(i + 1, n))
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("runs", nargs="+", help="NAME=RUN_DIR (or RUN_DIR)")
  ap.add_argument("--out", required=True, help="the PNG")
  ap.add_argument("--smooth", type=int, default=10)
  args = ap.parse_args()
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = [(r.split("=", 1) if "=" in r else (pathlib.Path(r).name, r)) for r in args.runs]
  fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
  print("| run | step | eval loss |\n|---|---|---|")
  for ax, (name, path) in zip(axes[0], runs):
    train, evals = read_metrics(pathlib.Path(path))
    steps, losses = [e["step"] for e in train], [e["loss"] for e in train]
    ax.plot(steps, losses, lw=0.5, alpha=0.4, color="tab:blue", label="train loss (per step)")
    ax.plot(steps, moving_average(losses, args.smooth), lw=1.5, color="tab:blue",
            label=f"train loss ({args.smooth}-step mean)")
    ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", color="tab:red",
            label="eval loss (held-out)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean NLL per target token")
    ax.set_title(name)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    for e in evals:
      print(f"| {name} | {e['step']} | {e['eval_loss']:.4f} |")
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
  main()

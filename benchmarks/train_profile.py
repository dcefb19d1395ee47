"""Where does our training step spend its time? Timing experiments on gemma_jax's train step (CPU).

  python benchmarks/train_profile.py [--method lora] [--dtype float32] [--batch 4] [--seq 256] [--repeats 3]

Read-only on gemma_jax: it times the public step (optim.make_train_step, built as ours_train.py builds it)
and pieces of it, each one jitted call on the same (B, T) batch (bench_train.py's text, every position a
target):

  step          the whole update: forward, backward, clip, AdamW
  grad          jax.grad of optim.nll_sum alone (no optimizer)
  loss fwd      optim.nll_sum forward alone
  blocks fwd    the embedding + 18 blocks + final norm (Transformer.__call__), no logits
  logits fwd    token_logprobs on given hidden states: (B*T, D) x (D, V) and the log-softmax over V = 262144
  logits f+b    the same with its gradient with respect to the hidden states (what LoRA must backpropagate)

and two proposals, monkeypatched in this process only (nothing in gemma_jax/ changes):

  frozen pre-cast   (bfloat16, LoRA) the frozen base cast to bfloat16 once, outside the step: the step's
                    cast_floats then has nothing to do, instead of re-casting ~1 GB of float32 every step
  targets only      the loss's logits only at target positions (gathered to a fixed count K = the batch's
                    targets), for prompt/response data where most positions carry no loss; timed on a batch
                    of the learning task's shape (--targets-batch rows of 32, ~1/3 of positions targets)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import gemma_jax as gj  # noqa: E402
from gemma_jax import lora, optim, recipe  # noqa: E402


def med_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def build(ckpt: str, method: str):
  base = gj.load(ckpt, dtype="float32")
  module = nnx.merge(base.graphdef, base.params)
  if method == "lora":
    lora.apply(module, lora.LoraConfig(rank=8, alpha=16.0, targets=recipe.Recipe.lora_targets), rngs=nnx.Rngs(0))
    return nnx.split(module, nnx.LoRAParam, ...)
  graphdef, params = nnx.split(module)
  return graphdef, params, None


def lm_batch(tokens: np.ndarray, targets: np.ndarray | None = None) -> optim.TrainBatch:
  b, t = tokens.shape
  if targets is None:
    targets = np.ones((b, t), np.float32)
    targets[:, 0] = 0.0
  return optim.TrainBatch(jnp.asarray(tokens, jnp.int32),
                          jnp.asarray(np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))),
                          jnp.ones((b, t), jnp.int32), jnp.asarray(targets, jnp.float32))


def nll_sum_targets_only(params, graphdef, batch, *, frozen=None, dtype=None, remat=False, k: int):
  """optim.nll_sum with the logits computed at k gathered positions (the targets' predecessors) only."""
  states = (params,) if frozen is None else (params, frozen)
  if dtype is not None:
    states = tuple(optim.cast_floats(s, dtype) for s in states)
  model = nnx.merge(graphdef, *states)
  hidden = model(batch.tokens, batch.positions, segments=batch.segments, remat=remat).hidden
  weight = batch.targets[:, 1:].reshape(-1)
  idx = jnp.argsort(-weight, stable=True)[:k]  # positions t - 1 that predict a target t
  h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[idx]
  nll = -model.token_logprobs(h[None], batch.tokens[:, 1:].reshape(-1)[idx][None])[0]
  return jnp.sum(nll * weight[idx]), jnp.sum(weight)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", default=str(pathlib.Path.home() / f".cache/gemma_jax_bench/gemma3_270m-v{gj.checkpoint.VERSION}"))
  ap.add_argument("--method", default="lora")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--targets-batch", type=int, default=8, help="rows of the targets-only proposal (0: skip)")
  ap.add_argument("--pieces", default="step,grad,loss,blocks,logits,logits_fb,precast,targets")
  args = ap.parse_args()
  pieces = set(args.pieces.split(","))
  from bench_train import make_tokens

  graphdef, params, frozen = build(args.ckpt, args.method)
  tok = gj.Tokenizer.from_file(pathlib.Path(args.ckpt) / "tokenizer.model")
  batch = lm_batch(np.asarray(make_tokens(tok, args.batch, args.seq)))
  dtype = jnp.dtype(args.dtype)
  n_tok = args.batch * args.seq
  rows = []

  def record(name, seconds, note=""):
    rows.append((name, seconds, note))
    print(f"  {name}: {seconds * 1e3:.0f} ms ({n_tok / seconds:.0f} tok/s) {note}", file=sys.stderr, flush=True)

  optimizer = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-4, steps=10_000))
  if "step" in pieces:
    step = optim.make_train_step(graphdef, optimizer, dtype=dtype)
    state = {"p": jax.tree.map(jnp.copy, params), "o": optimizer.init(params)}
    stacked = jax.tree.map(lambda x: x[None], batch)

    def run_step():
      state["p"], state["o"], m = step(state["p"], state["o"], frozen, stacked)
      return m.loss
    record("step", med_time(run_step, args.repeats))
  if "grad" in pieces:
    g = jax.jit(jax.grad(lambda p, f, b: optim.nll_sum(p, graphdef, b, frozen=f, dtype=dtype)[0]))
    record("grad", med_time(lambda: g(params, frozen, batch), args.repeats))
  if "loss" in pieces:
    f = jax.jit(lambda p, fr, b: optim.nll_sum(p, graphdef, b, frozen=fr, dtype=dtype)[0])
    record("loss fwd", med_time(lambda: f(params, frozen, batch), args.repeats))

  def merged(p, fr):
    states = (p,) if fr is None else (p, fr)
    return nnx.merge(graphdef, *(optim.cast_floats(s, dtype) for s in states))
  blocks = jax.jit(lambda p, fr, b: merged(p, fr)(b.tokens, b.positions, segments=b.segments).hidden)
  hidden = blocks(params, frozen, batch)
  if "blocks" in pieces:
    record("blocks fwd", med_time(lambda: blocks(params, frozen, batch), args.repeats))
  lp = lambda p, fr, h, t: -jnp.sum(merged(p, fr).token_logprobs(h[:, :-1], t[:, 1:]))
  if "logits" in pieces:
    f = jax.jit(lp)
    record("logits fwd", med_time(lambda: f(params, frozen, hidden, batch.tokens), args.repeats))
  if "logits_fb" in pieces:
    f = jax.jit(jax.grad(lp, argnums=2))
    record("logits f+b", med_time(lambda: f(params, frozen, hidden, batch.tokens), args.repeats),
           "(gradient w.r.t. the hidden states)")
  if "precast" in pieces and args.dtype == "bfloat16" and frozen is not None:
    step = optim.make_train_step(graphdef, optimizer, dtype=dtype)
    frozen16 = optim.cast_floats(frozen, dtype)
    state = {"p": jax.tree.map(jnp.copy, params), "o": optimizer.init(params)}
    stacked = jax.tree.map(lambda x: x[None], batch)

    def run_pre():
      state["p"], state["o"], m = step(state["p"], state["o"], frozen16, stacked)
      return m.loss
    record("step, frozen pre-cast", med_time(run_pre, args.repeats), "(proposal)")

  if "targets" in pieces and args.targets_batch:
    # The learning task's shape: rows of 32 with ~1/3 of positions targets (a response + EOS of 6 of 19).
    b, t = args.targets_batch, 32
    ids = np.asarray(make_tokens(tok, b, t))
    targets = np.zeros((b, t), np.float32)
    targets[:, 13:19] = 1.0
    tb = jax.tree.map(lambda x: x[None], lm_batch(ids, targets))
    k = int(targets.sum())
    results = {}
    for name, fn in (("all positions", optim.nll_sum), ("targets only", None)):
      if fn is None:
        original = optim.nll_sum
        optim.nll_sum = lambda *a, **kw: nll_sum_targets_only(*a, k=k, **kw)
      try:
        step = optim.make_train_step(graphdef, optimizer, dtype=dtype)
        state = {"p": jax.tree.map(jnp.copy, params), "o": optimizer.init(params)}

        def run_t():
          state["p"], state["o"], m = step(state["p"], state["o"], frozen, tb)
          return m.loss
        loss0 = float(run_t())
        results[name] = (med_time(run_t, args.repeats), loss0)
      finally:
        if fn is None:
          optim.nll_sum = original
    for name, (sec, loss0) in results.items():
      rows.append((f"step {b}x{t}, {k} targets, logits at {name}", sec, f"first loss {loss0:.5f}"))
      print(f"  step {b}x{t} logits at {name}: {sec * 1e3:.0f} ms, first loss {loss0:.5f}", file=sys.stderr)

  print(f"gemma_jax train step pieces, {args.method} {args.dtype}, batch {args.batch} x {args.seq}, median of "
        f"{args.repeats} after a compile call\n")
  print("| piece | ms | tokens/s | note |\n|---|---|---|---|")
  for name, sec, note in rows:
    tps = "" if name.startswith("step ") and "x32" in name else f"{n_tok / sec:.0f}"
    print(f"| {name} | {sec * 1e3:.0f} | {tps} | {note} |")
  print(json.dumps({name: sec for name, sec, _ in rows}), file=sys.stderr)


if __name__ == "__main__":
  main()

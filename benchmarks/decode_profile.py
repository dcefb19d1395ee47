"""Where does our decode step spend its time? Timing experiments on gemma_jax's greedy decode (CPU).

  python benchmarks/decode_profile.py [--dtype float32] [--batch 1] [--new-tokens 64] [--repeats 5]

Read-only on gemma_jax: it times the public path and some pieces of it:

  baseline     Model.generate_ids, step = (t(N new) - t(1 new)) / (N - 1)
  pieces       one jitted call each, same shapes as a batch-B decode step: the 18 blocks with a
               256-slot cache (no logits), the tied-embedding logits + argmax, a whole step outside the
               while loop; and a plain read of every weight (the bandwidth floor for this dtype)
  f32 copies   (bf16 only) what XLA keeps in f32 for the loop: counted from the compiled HLO

(The D-major weight layouts of checkpoint format 2 came out of this script's copy count: 330 MB of
copies per step before, 24 MB (cache and activations, no weights) after, at batch 1 in float32.)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gemma_jax as gj  # noqa: E402
from gemma_jax import decode  # noqa: E402
from gemma_jax import cache as gcache  # noqa: E402


def med_time(fn, repeats):
  fn()
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def step_ms(model, prompts, n, repeats):
  gen = lambda k: model.generate_ids(prompts, max_new_tokens=k, stop_ids=[])
  gen(1), gen(n)
  t1s, tns = [], []
  for _ in range(repeats):
    t0 = time.perf_counter(); gen(1); t1s.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); out = gen(n); tns.append(time.perf_counter() - t0)
  return (statistics.median(tns) - statistics.median(t1s)) / (n - 1) * 1e3, statistics.median(t1s), out


def pieces(model, batch, repeats):
  cfg = model.config
  gd, params = model.graphdef, model.params
  from flax import nnx
  cache = gcache.init_cache(cfg, batch, 256)
  tok = jnp.full((batch, 1), 818, jnp.int32)
  pos = jnp.full((batch, 1), 130, jnp.int32)
  h = jnp.ones((batch, 1, cfg.embed_dim), jnp.dtype(model.params["final_norm"]["scale"].value.dtype))

  @jax.jit
  def layers(params, tok, pos, cache):
    m = nnx.merge(gd, params)
    hidden, c = m(tok, pos, cache)
    return hidden, c

  @jax.jit
  def logits_argmax(params, h):
    m = nnx.merge(gd, params)
    return jnp.argmax(m.logits(h)[:, 0], axis=-1)

  @jax.jit
  def step(params, tok, pos, cache):
    m = nnx.merge(gd, params)
    hidden, c = m(tok, pos, cache)
    return jnp.argmax(m.logits(hidden)[:, 0], axis=-1), c

  @jax.jit
  def read_all(params):  # touches every weight once: the memory floor of a step
    return sum(jnp.max(x.astype(jnp.float32)) for x in jax.tree.leaves(params))

  out = {}
  out["layers_ms"] = 1e3 * med_time(lambda: jax.block_until_ready(layers(params, tok, pos, cache)), repeats)
  out["logits_argmax_ms"] = 1e3 * med_time(lambda: jax.block_until_ready(logits_argmax(params, h)), repeats)
  out["step_outside_loop_ms"] = 1e3 * med_time(lambda: jax.block_until_ready(step(params, tok, pos, cache)),
                                               repeats)
  out["read_all_weights_ms"] = 1e3 * med_time(lambda: jax.block_until_ready(read_all(params)), repeats)
  return out


_ITEMSIZE = {"f32": 4, "bf16": 2, "s32": 4}


def _computation(txt: str, name: str) -> str:
  start = txt.index(f"\n%{name} ")
  return txt[start:txt.index("\n}\n", start)]


def _big_buffers(text: str, pattern: str, min_elems: int = 64 * 1024) -> float:
  """MB of the buffers whose instruction line matches `pattern` (group 1 dtype, group 2 dims)."""
  total = 0
  for m in re.finditer(pattern, text):
    n = int(np.prod([int(s) for s in m.group(2).split(",")]))
    if n >= min_elems:
      total += _ITEMSIZE[m.group(1)] * n
  return total / 1e6


def hlo_weight_copies(model, batch):
  """From the compiled decode_loop: MB of weight-sized copies/slices materialised per step inside the
  while body, and MB of float32 weight buffers built before the loop (bf16 params upcast by XLA)."""
  cfg = model.config
  from gemma_jax.sampling import make_sampling
  c = gcache.init_cache(cfg, batch, 256)
  st = decode.DecodeState(logits=jnp.zeros((batch, cfg.vocab_size), jnp.float32),
                          pos=jnp.full((batch,), 128, jnp.int32), done=jnp.zeros((batch,), bool),
                          step=jnp.int32(0), cache=c)
  txt = decode.Decoder.decode_loop.lower(model.decoder.with_capacity(128), model.params, st, make_sampling(batch),
                                        jnp.int32(8), jnp.asarray([-2], jnp.int32),
                                        jnp.ones((cfg.vocab_size,), bool)).compile().as_text()
  entry = txt[txt.index("\nENTRY"):]
  body = _computation(txt, re.search(r" while\(.*?body=%([\w.\-]+)", entry).group(1))
  copy_pat = r"%(?:copy|slice|transpose|convert)[\w.\-]* = (f32|bf16)\[([0-9,]+)\]\{[0-9,]*\} (?:fusion|copy|transpose|slice|convert)\("
  entry_pat = r"= (f32)\[([0-9,]+)\]\{[0-9,]*\} fusion\("
  return {"weight_copies_per_step_MB": _big_buffers(body, copy_pat),
          "f32_weight_buffers_before_loop_MB": _big_buffers(entry, entry_pat)}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--ckpt", default=os.path.expanduser(f"~/.cache/gemma_jax_bench/gemma3_270m-v{gj.checkpoint.VERSION}"))
  args = ap.parse_args()
  import bench_sample
  tok = gj.Tokenizer.from_file(pathlib.Path(args.ckpt) / "tokenizer.model")
  ids = tok.encode(bench_sample.long_text())
  prompts = [[ids[0]] + ids[1 + 91 * r: 1 + 91 * r + 127] for r in range(args.batch)]

  res = {"dtype": args.dtype, "batch": args.batch, "loadavg_start": os.getloadavg()}
  model = gj.load(args.ckpt, dtype=args.dtype)
  res["params_MB"] = sum(x.nbytes for x in jax.tree.leaves(model.params)) / 1e6
  res["hlo"] = hlo_weight_copies(model, args.batch)
  res["baseline_step_ms"], res["baseline_t1_s"], base_out = step_ms(model, prompts, args.new_tokens, args.repeats)
  res.update(pieces(model, args.batch, args.repeats))

  res["loadavg_end"] = os.getloadavg()
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()

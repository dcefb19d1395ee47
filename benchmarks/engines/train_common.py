"""The training-step protocol shared by the training runners (stdlib only: each runner has its own venv).

A runner defines an Engine with four methods and calls `main(Engine)`:

  setup()        import the libraries (so that RSS before load counts the runtime)
  load(spec)     the model with float32 master weights, the method's trainable params (LoRA adapters or every
                 param) and AdamW over them; the batch of spec["tokens"] made ready (timed, not a metric)
  step()         one update on that batch: forward, loss, backward, global-norm clip, AdamW; blocks until the
                 new params exist; returns the loss (float)
  info()         dict of engine facts (versions, settings, trainable/param/optimizer-state bytes...)

The spec: tokens (B rows of T ids, BOS first), dtype ("float32": everything in float32; "bfloat16": float32
masters, bfloat16 compute), method ("lora" | "full"), lora {rank, alpha}, learning_rate, warmup_steps, steps.
The loss is the mean next-token NLL over every position after the first (language modelling on the rows).

The protocol (the same order for every engine):
  1. RSS after the imports and after load; then the peak-RSS counter is reset (/proc/self/clear_refs), so the
     "training peak" covers only what happens once the weights are in memory.
  2. The first step alone ("cold": compilation included for JAX), then warmup_steps more, then `steps` timed
     steps; tokens/s = B * T / median step time; tokens per CPU second = B * T / median CPU seconds of the
     process per step (all threads).
  3. The loss of every step: the first is computed from the same weights on the same batch by every engine,
     so it must agree across engines (a check that both train the same model on the same data).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from common import hwm_bytes, log, reset_peak, rss_bytes, ru_maxrss_bytes, timed


def main(engine_cls) -> None:
  spec_path, out_path = sys.argv[1], sys.argv[2]
  with open(spec_path) as f:
    spec = json.load(f)
  res: dict = {"loadavg_start": os.getloadavg()}
  engine = engine_cls()
  res["import_s"], _ = timed(engine.setup)
  res["rss_before_load"] = rss_bytes()
  res["load_s"], _ = timed(engine.load, spec)
  res["rss_after_load"] = rss_bytes()
  res["peak_reset_ok"] = reset_peak()
  log(f"  loaded in {res['load_s']:.1f}s, rss {res['rss_after_load'] / 2**20:.0f} MiB")

  losses = []
  res["first_step_s"], loss = timed(engine.step)
  losses.append(loss)
  log(f"  first step {res['first_step_s']:.1f}s, loss {loss:.4f}")
  for _ in range(spec["warmup_steps"]):
    losses.append(engine.step())
  times, cpus = [], []
  for _ in range(spec["steps"]):
    t0, c0 = time.perf_counter(), time.process_time()
    losses.append(engine.step())
    times.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  b, t = len(spec["tokens"]), len(spec["tokens"][0])
  res["step_s"] = statistics.median(times)
  res["step_all"] = times
  res["tokens_per_s"] = b * t / res["step_s"]
  # CPU seconds of this process (all its threads) per step: on a machine shared with other work a step's
  # wall time grows with the load, its CPU seconds much less (it is not a speed on a quiet machine).
  res["cpu_all"] = cpus
  res["tokens_per_cpu_s"] = b * t / statistics.median(cpus)
  res["losses"] = losses
  log(f"  step {res['step_s']:.2f}s median of {len(times)}: {res['tokens_per_s']:.0f} tok/s; loss "
      f"{losses[0]:.4f} -> {losses[-1]:.4f}")
  res["peak_rss_after_load"] = hwm_bytes()
  res["ru_maxrss"] = ru_maxrss_bytes()
  res["loadavg_end"] = os.getloadavg()
  res["info"] = engine.info()
  with open(out_path, "w") as f:
    json.dump(res, f, indent=1)

"""The measurement protocol shared by every engine runner (stdlib only: each runner has its own venv).

A runner defines an Engine with five methods and calls `main(Engine)`:

  setup()                     import the libraries (so that RSS before load counts the runtime)
  load(spec)                  load the model in the requested dtype (timed, not part of any metric)
  generate(prompts, n)        greedy, exactly n new ids per prompt (no stop tokens); blocks; list of lists
  prefill(ids)                one prompt through the model and a fresh KV cache; blocks on the result
  info()                      dict of engine facts (versions, settings, params/cache bytes...)

The protocol (identical order for every engine, so that "cold" means the same thing everywhere):
  1. RSS after the imports and after load; then the peak-RSS counter is reset (/proc/self/clear_refs), so the
     "generation peak" covers only what happens after the weights are in memory.
  2. TTFT cold: the first generate([short], 1) of the process (compilation included for JAX engines).
  3. TTFT warm: median of `repeats` more identical calls.
  4. Greedy check: generate([short], check_tokens) -> ids, compared across engines by the driver.
  5. Prefill: prefill(prompt of prefill_len ids) once cold, then median of `repeats`.
  6. Decode at batch 1 and batch B: generate(prompts, 1) and generate(prompts, N) once each to warm
     up, then `decode_repeats` interleaved pairs; decode tokens/s = B * (N - 1) / (median_N - median_1), i.e.
     the N - 1 steps after the first token, prefill excluded by difference (same shapes in both calls).
A spec with "long": true runs the long-prompt row instead (long_prefill), one fresh process per length.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time


def _status_kb(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def rss_bytes() -> int | None:
  kb = _status_kb("VmRSS")
  return None if kb is None else kb * 1024


def hwm_bytes() -> int | None:
  """Peak RSS since the process started or since the last reset_peak()."""
  kb = _status_kb("VmHWM")
  return None if kb is None else kb * 1024


def reset_peak() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def ru_maxrss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn, *args):
  t0 = time.perf_counter()
  out = fn(*args)
  return time.perf_counter() - t0, out


def log(*args):
  print(*args, file=sys.stderr, flush=True)


def vm_size() -> int | None:
  kb = _status_kb("VmSize")
  return None if kb is None else kb * 1024


def long_prefill(engine, spec: dict, out_path: str) -> None:
  """The long-prompt row, in a process of its own: load, then prefill the spec's long prompt twice (cold:
  compilation included, then warm) and report the warm tok/s and the peak RSS after load (both calls).

  An engine prefills through `prefill_long(ids)` where it has one (ours: the user's path, Model.start),
  else `prefill(ids)`. spec["mem_budget_gib"]: address space the process may add after load (RLIMIT_AS),
  so a prompt that does not fit fails in this process (an error, or an abort) instead of pushing the
  machine into swap or the OOM killer; the driver then reports that it did not fit.
  """
  import resource as rs
  res: dict = {"loadavg_start": os.getloadavg()}
  res["import_s"], _ = timed(engine.setup)
  res["rss_before_load"] = rss_bytes()
  res["load_s"], _ = timed(engine.load, spec)
  res["rss_after_load"] = rss_bytes()
  budget = spec.get("mem_budget_gib")
  if budget:
    limit = vm_size() + int(budget * 2**30)
    rs.setrlimit(rs.RLIMIT_AS, (limit, rs.getrlimit(rs.RLIMIT_AS)[1]))
    res["address_space_limit"] = limit
  res["peak_reset_ok"] = reset_peak()
  run = getattr(engine, "prefill_long", engine.prefill)
  ids = spec["prefill_ids"]
  try:
    res["prefill_cold_s"], _ = timed(run, ids)
    res["prefill_s"], _ = timed(run, ids)
  except Exception as e:  # noqa: BLE001 (out of memory takes many forms: MemoryError, RuntimeError, XLA's)
    res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
  else:
    res["prefill_tps"] = len(ids) / res["prefill_s"]
  res["prefill_len"] = len(ids)
  res["peak_rss_after_load"] = hwm_bytes()
  res["loadavg_end"] = os.getloadavg()
  res["info"] = engine.info()
  log(f"  long prefill {len(ids)}: " + (res.get("error") or f"{res['prefill_tps']:.0f} tok/s") +
      f", peak rss after load {res['peak_rss_after_load'] / 2**20:.0f} MiB")
  with open(out_path, "w") as f:
    json.dump(res, f, indent=1)


def main(engine_cls) -> None:
  spec_path, out_path = sys.argv[1], sys.argv[2]
  with open(spec_path) as f:
    spec = json.load(f)
  if spec.get("long"):
    return long_prefill(engine_cls(), spec, out_path)
  reps = spec["repeats"]
  res: dict = {"loadavg_start": os.getloadavg()}
  engine = engine_cls()
  res["import_s"], _ = timed(engine.setup)
  res["rss_before_load"] = rss_bytes()
  res["load_s"], _ = timed(engine.load, spec)
  res["rss_after_load"] = rss_bytes()
  res["peak_reset_ok"] = reset_peak()
  log(f"  loaded in {res['load_s']:.1f}s, rss {res['rss_after_load'] / 2**20:.0f} MiB")

  short = [spec["short_ids"]]
  res["ttft_cold_s"], _ = timed(engine.generate, short, 1)
  warm = [timed(engine.generate, short, 1)[0] for _ in range(reps)]
  res["ttft_warm_s"] = statistics.median(warm)
  res["ttft_warm_all"] = warm
  log(f"  ttft cold {res['ttft_cold_s']:.2f}s warm {res['ttft_warm_s'] * 1e3:.0f}ms")

  res["check_ids"] = engine.generate(short, spec["check_tokens"])[0]

  ids = spec["prefill_ids"]
  res["prefill_len"] = len(ids)
  res["prefill_cold_s"], _ = timed(engine.prefill, ids)
  pre = [timed(engine.prefill, ids)[0] for _ in range(reps)]
  res["prefill_s"] = statistics.median(pre)
  res["prefill_all"] = pre
  res["prefill_tps"] = len(ids) / res["prefill_s"]
  log(f"  prefill {len(ids)}: {res['prefill_tps']:.0f} tok/s")

  n = spec["new_tokens"]
  for name, prompts in (("b1", spec["decode_prompts"][:1]), (f"b{len(spec['decode_prompts'])}",
                                                             spec["decode_prompts"])):
    b = len(prompts)
    t1_cold, _ = timed(engine.generate, prompts, 1)
    tn_cold, outs = timed(engine.generate, prompts, n)
    assert all(len(o) == n for o in outs), [len(o) for o in outs]
    t1s, tns = [], []
    for _ in range(spec.get("decode_repeats", reps)):
      t1s.append(timed(engine.generate, prompts, 1)[0])
      tns.append(timed(engine.generate, prompts, n)[0])
    m1, mn = statistics.median(t1s), statistics.median(tns)
    res[f"decode_{name}"] = {
        "batch": b, "new_tokens": n, "t1_s": m1, "tn_s": mn, "t1_all": t1s, "tn_all": tns,
        "t1_cold_s": t1_cold, "tn_cold_s": tn_cold,
        "step_ms": (mn - m1) / (n - 1) * 1e3, "tps": b * (n - 1) / (mn - m1),
        "first_ids": outs[0][:8],
    }
    log(f"  decode {name}: {res[f'decode_{name}']['tps']:.1f} tok/s "
        f"({res[f'decode_{name}']['step_ms']:.1f} ms/step)")

  res["peak_rss_after_load"] = hwm_bytes()
  res["ru_maxrss"] = ru_maxrss_bytes()
  res["loadavg_end"] = os.getloadavg()
  res["info"] = engine.info()
  with open(out_path, "w") as f:
    json.dump(res, f, indent=1)
